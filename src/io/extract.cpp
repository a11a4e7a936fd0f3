#include "lowrank/io/extract.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include "file_util.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/io/checkpoint.hpp"
#include "lowrank/io/merge.hpp"
#include "lowrank/io/peft.hpp"
#include "lowrank/kernels/convert.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

using lowrank::detail::fail;
namespace fs = std::filesystem;

namespace {

constexpr std::uint64_t kBlockBytes = 4u << 20;
constexpr std::string_view kWeight = ".weight";
// The model types whose linear layers are transformers' Conv1D (weight stored (in, out)).
constexpr std::array<std::string_view, 4> kConv1dModels = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"};
// The Conv1D modules of those models.
constexpr std::array<std::string_view, 4> kConv1dModules = {"c_attn", "c_proj", "c_fc", "q_attn"};

std::string_view last_segment(std::string_view module) {
  const auto dot = module.rfind('.');
  return dot == std::string_view::npos ? module : module.substr(dot + 1);
}

// One targeted module, planned and validated.
struct Item {
  std::string module;
  Checkpoint::Entry base, tuned;
  std::uint64_t out = 0, in = 0;
  bool f64 = false;
};

// A finished module: the report line and its factors (fp32, PEFT shapes, row-major).
struct Result {
  ExtractedModule info;
  std::vector<float> A, B;  // r x in, out x r
};

// Elements [first, first + out.size()) of a floating-point tensor, widened to C, read with pread
// through `raw` (no page faults on the mapping).
template <class C>
void read_block(const SafetensorsFile& f, const TensorInfo& t, std::uint64_t first, std::span<C> out,
                std::vector<std::byte>& raw) {
  const std::size_t size = dtype_size(t.dtype);
  raw.resize(out.size() * size);
  f.read_bytes(t, first * size, raw);
  auto widen = [&]<class S>(S) {
    for (std::size_t k = 0; k < out.size(); ++k) {
      S x;
      std::memcpy(&x, raw.data() + k * size, sizeof(S));
      if constexpr (std::is_same_v<S, bf16> || std::is_same_v<S, f16>) {
        out[k] = static_cast<C>(static_cast<float>(x));
      } else {
        out[k] = static_cast<C>(x);
      }
    }
  };
  switch (t.dtype) {
    case Dtype::F64: widen(double{}); break;
    case Dtype::F32: widen(float{}); break;
    case Dtype::BF16: widen(bf16{}); break;
    case Dtype::F16: widen(f16{}); break;
    default: fail("extract", "{}: tensor \"{}\" is {}, not floating-point", f.path().string(), t.name, to_string(t.dtype));
  }
}

// dW = TUNED - BASE of one module, truncated to rank r.
template <class C>
void extract_one(const Item& item, const ExtractOptions& options, Layout layout, Result& result) {
  const TensorInfo& tb = *item.base.info;
  const TensorInfo& tt = *item.tuned.info;
  const SafetensorsFile& fb = item.base.shard->file;
  const SafetensorsFile& ft = item.tuned.shard->file;
  const std::uint64_t n = tb.numel();
  std::vector<C> d(static_cast<std::size_t>(n));
  std::vector<C> scratch;
  std::vector<std::byte> raw;
  const std::uint64_t step = std::max<std::uint64_t>(1, kBlockBytes / sizeof(C));
  for (std::uint64_t first = 0; first < n; first += step) {
    const std::uint64_t count = std::min(step, n - first);
    const std::span<C> block(d.data() + first, static_cast<std::size_t>(count));
    read_block<C>(ft, tt, first, block, raw);
    scratch.resize(static_cast<std::size_t>(count));
    read_block<C>(fb, tb, first, std::span<C>(scratch), raw);
    for (std::size_t k = 0; k < count; ++k) block[k] -= scratch[k];
  }
  fb.release(tb);
  ft.release(tt);

  ExtractedModule& info = result.info;
  double norm2 = 0;
  for (std::uint64_t k = 0; k < n; ++k) {
    const C x = d[static_cast<std::size_t>(k)];
    if (!std::isfinite(x)) {
      // Name the culprit: the element in each checkpoint, in stored (row, column) order.
      std::array<double, 2> v{};
      std::vector<std::byte> one;
      std::array<double, 1> e{};
      read_block<double>(fb, tb, k, std::span<double>(e), one);
      v[0] = e[0];
      read_block<double>(ft, tt, k, std::span<double>(e), one);
      v[1] = e[0];
      const std::uint64_t cols = tb.shape[1];
      fail("extract", "module {}: tensor \"{}\" element ({}, {}) is {} in BASE and {} in TUNED; the difference is not finite",
           item.module, tb.name, k / cols, k % cols, v[0], v[1]);
    }
    norm2 += static_cast<double>(x) * static_cast<double>(x);
  }
  info.delta_norm = std::sqrt(norm2);
  if (norm2 == 0) {  // exactly zero (no underflow: a nonzero element's square is > 0 in double)
    info.written = false;
    info.captured_energy = 1;
    return;
  }

  linalg::SvdOptions so = options.svd;
  so.stream = stream_of(item.module);
  const auto out = static_cast<Index>(item.out), in = static_cast<Index>(item.in);
  const Index r = options.rank;
  // dW as an (out x in) matrix: row-major for out_in storage; stored (in x out) row-major is the
  // same memory as (out x in) column-major.
  const auto svd = layout == Layout::out_in
                       ? linalg::truncated_svd(Eigen::Map<const RowMatrix<C>>(d.data(), out, in), r, so)
                       : linalg::truncated_svd(Eigen::Map<const ColMatrix<C>>(d.data(), out, in), r, so);
  d = {};  // the factors are small; give the dense difference back before building them
  info.written = true;
  info.rank = options.rank;
  info.captured_energy = svd.captured_energy;
  info.residual_norm = svd.residual_norm;
  info.exact_svd = svd.exact;
  for (Index k = 0; k < r; ++k) info.singular_values.push_back(static_cast<double>(svd.S(k)));
  // PEFT's convert_to_lora: B = U_k S_k (out x r), A = V_k^T (r x in); lora_alpha = r (scale 1).
  result.B.resize(static_cast<std::size_t>(out * r));
  result.A.resize(static_cast<std::size_t>(r * in));
  for (Index i = 0; i < out; ++i)
    for (Index k = 0; k < r; ++k) result.B[static_cast<std::size_t>(i * r + k)] = static_cast<float>(svd.U(i, k) * svd.S(k));
  for (Index k = 0; k < r; ++k)
    for (Index j = 0; j < in; ++j) result.A[static_cast<std::size_t>(k * in + j)] = static_cast<float>(svd.V(j, k));
}

}  // namespace

bool is_embedding_like(std::string_view module) {
  const std::string_view s = last_segment(module);
  return s.find("embed") != std::string_view::npos || s == "wte" || s == "wpe" || s == "shared";
}

bool excluded_by_default(std::string_view module) {
  const std::string_view s = last_segment(module);
  return is_embedding_like(module) || s.find("lm_head") != std::string_view::npos || s == "output";
}

std::optional<Layout> detect_layout(const fs::path& checkpoint, std::string* source) {
  const fs::path folder = fs::is_directory(checkpoint) ? checkpoint : checkpoint.parent_path();
  const fs::path file = (folder.empty() ? fs::path(".") : folder) / "config.json";
  if (!fs::is_regular_file(file)) return std::nullopt;
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(detail::read_small_file(file, 64u << 20, "extract"));
  } catch (const nlohmann::json::exception& e) {
    fail("extract", "{}: not valid JSON ({})", file.string(), e.what());
  }
  std::string type;
  if (doc.is_object() && doc.contains("model_type") && doc["model_type"].is_string()) type = doc["model_type"].get<std::string>();
  const bool conv1d = std::find(kConv1dModels.begin(), kConv1dModels.end(), type) != kConv1dModels.end();
  if (source != nullptr) {
    *source = type.empty() ? fmt::format("{} (no model_type: nn.Linear assumed)", file.string())
                           : fmt::format("{} model_type {}", file.string(), type);
  }
  return conv1d ? Layout::in_out : Layout::out_in;
}

ExtractReport extract_adapter(const fs::path& base, const fs::path& tuned, const fs::path& out_arg,
                              const ExtractOptions& options) {
  // "adapter/" names the folder "adapter" (the temporary folder goes next to it, not inside).
  fs::path out = out_arg.lexically_normal();
  if (!out.has_filename() && out.has_parent_path()) out = out.parent_path();
  // ---- options and paths ----
  if (options.rank < 1) fail("extract", "the rank must be at least 1, not {}", options.rank);
  if (options.dtype != Dtype::F32 && options.dtype != Dtype::BF16) {
    fail("extract", "the adapter dtype must be F32 or BF16, not {}", to_string(options.dtype));
  }
  if (options.threads < 0) fail("extract", "threads must be >= 0, not {}", options.threads);
  const Checkpoint cb = Checkpoint::open(base);
  const Checkpoint ct = Checkpoint::open(tuned);
  for (const fs::path& input : {base, tuned}) {
    if (detail::same_file(out, input) || detail::inside(out, input) || detail::inside(input, out)) {
      fail("extract", "the output {} is, contains or is inside the input {}; choose another output", out.string(),
           input.string());
    }
  }
  if (fs::exists(out) && !fs::is_directory(out)) fail("extract", "the output {} exists and is not a folder", out.string());
  const bool replace = fs::exists(out) && !fs::is_empty(out);
  if (replace && !options.overwrite) {
    fail("extract", "the output folder {} exists and is not empty; remove it or allow overwriting (--force)", out.string());
  }

  ExtractReport report;
  bool detected = false;
  if (options.layout) {
    report.layout = *options.layout;
    report.layout_source = "option";
  } else if (auto l = detect_layout(base, &report.layout_source)) {
    report.layout = *l;
    detected = true;
  } else if (auto lt = detect_layout(tuned, &report.layout_source)) {
    report.layout = *lt;
    detected = true;
  } else {
    report.layout = Layout::out_in;
    report.layout_source = "default (no config.json next to either checkpoint: nn.Linear, fan_in_fan_out false)";
  }
  const Layout layout = report.layout;

  // ---- targets, validated before any arithmetic ----
  const bool explicit_targets = !options.target_modules.empty() || options.target_regex.has_value();
  PeftConfig rule;
  rule.target_modules = options.target_modules;
  rule.target_modules_regex = options.target_regex;
  std::set<std::string> names;  // "<module>.weight" tensors of both checkpoints
  for (const Checkpoint* ck : {&cb, &ct})
    for (const auto& s : ck->shards())
      for (const auto& t : s.file.tensors())
        if (t.name.size() > kWeight.size() && std::string_view(t.name).ends_with(kWeight)) names.insert(t.name);

  std::vector<Item> items;
  for (const auto& name : names) {
    const std::string module = name.substr(0, name.size() - kWeight.size());
    const auto eb = cb.find(name), et = ct.find(name);
    if (explicit_targets) {
      if (!rule.targets(module)) continue;
    } else if (excluded_by_default(module)) {
      continue;
    }
    if (eb.info == nullptr || et.info == nullptr) {
      const bool in_base = eb.info != nullptr;
      if (!explicit_targets) {
        (in_base ? report.only_in_base : report.only_in_tuned).push_back(name);
        continue;
      }
      fail("extract", "module {}: tensor \"{}\" is in {} ({}) but not in {} ({})", module, name, in_base ? "BASE" : "TUNED",
           in_base ? base.string() : tuned.string(), in_base ? "TUNED" : "BASE", in_base ? tuned.string() : base.string());
    }
    const TensorInfo& tb = *eb.info;
    const TensorInfo& tt = *et.info;
    const auto candidate = [](const TensorInfo& t) { return t.shape.size() == 2 && is_float(t.dtype); };
    if (!explicit_targets && !candidate(tb) && !candidate(tt)) {
      continue;  // norms, convolutions, integer buffers: not LoRA targets by default (a mismatch is an error below)
    }
    if (explicit_targets && is_embedding_like(module)) {
      fail("extract", "module {} looks like an embedding; PEFT stores embedding adapters as lora_embedding_A/B, which "
           "lowrank does not write; leave it out of the targets", module);
    }
    for (const auto& [t, ck, e] : std::array{std::tuple{&tb, &cb, &eb}, std::tuple{&tt, &ct, &et}}) {
      if (!is_float(t->dtype)) {
        fail("extract", "{}: tensor \"{}\" is {}, not floating-point", detail::where(*ck, *e), name, to_string(t->dtype));
      }
      if (t->shape.size() != 2) {
        fail("extract", "{}: tensor \"{}\" has shape {}; only 2-D weights (nn.Linear, Conv1D) can be extracted",
             detail::where(*ck, *e), name, shape_string(t->shape));
      }
    }
    if (tb.shape != tt.shape) {
      fail("extract", "module {}: tensor \"{}\" has shape {} in BASE ({}) but {} in TUNED ({})", module, name,
           shape_string(tb.shape), detail::where(cb, eb), shape_string(tt.shape), detail::where(ct, et));
    }
    if (detected && layout == Layout::in_out &&
        std::find(kConv1dModules.begin(), kConv1dModules.end(), last_segment(module)) == kConv1dModules.end()) {
      fail("extract", "module {} is not one of GPT-2's Conv1D layers (c_attn, c_proj, c_fc, q_attn), but the adapter's "
           "fan_in_fan_out (from {}) applies to every module; leave it out of the targets or give the layout explicitly",
           module, report.layout_source);
    }
    Item item;
    item.module = module;
    item.base = eb;
    item.tuned = et;
    item.out = layout == Layout::out_in ? tb.shape[0] : tb.shape[1];
    item.in = layout == Layout::out_in ? tb.shape[1] : tb.shape[0];
    item.f64 = options.fp64 || tb.dtype == Dtype::F64 || tt.dtype == Dtype::F64;
    if (item.out == 0 || item.in == 0 || static_cast<std::uint64_t>(options.rank) > std::min(item.out, item.in)) {
      fail("extract", "module {}: rank {} exceeds min(in, out) = {} of tensor \"{}\" (shape {}, {}: out {} x in {})", module,
           options.rank, std::min(item.out, item.in), name, shape_string(tb.shape), to_string(layout), item.out, item.in);
    }
    items.push_back(std::move(item));
  }
  if (items.empty()) {
    if (explicit_targets) {
      std::string list = options.target_regex ? "\"" + *options.target_regex + "\"" : "";
      for (const auto& t : options.target_modules) list += (list.empty() ? "" : ", ") + t;
      fail("extract", "the targets ({}) match no \"<module>.weight\" tensor of {}", list, base.string());
    }
    fail("extract", "{} and {} have no 2-D floating-point \"<module>.weight\" tensor in common outside the embeddings and "
         "lm_head; nothing to extract", base.string(), tuned.string());
  }

  // ---- the SVDs, on a pool of workers (one module each at a time) ----
  std::vector<Result> results(items.size());
  ExtractProgress progress;
  progress.modules_total = items.size();
  for (const auto& it : items) progress.bytes_total += it.base.info->nbytes() + it.tuned.info->nbytes();
  std::mutex progress_mutex;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  auto work = [&]() {
    while (!failed.load(std::memory_order_relaxed)) {
      const std::size_t i = next.fetch_add(1);
      if (i >= items.size()) return;
      try {
        const Item& item = items[i];
        Result& r = results[i];
        r.info.module = item.module;
        r.info.tensor = item.base.info->name;
        r.info.out = item.out;
        r.info.in = item.in;
        r.info.base_dtype = item.base.info->dtype;
        r.info.tuned_dtype = item.tuned.info->dtype;
        if (item.f64) {
          extract_one<double>(item, options, layout, r);
        } else {
          extract_one<float>(item, options, layout, r);
        }
        const std::lock_guard lock(progress_mutex);
        ++progress.modules_done;
        progress.bytes_done += item.base.info->nbytes() + item.tuned.info->nbytes();
        if (options.progress) options.progress(progress);
      } catch (...) {
        const std::lock_guard lock(progress_mutex);
        if (!error) error = std::current_exception();
        failed = true;
        return;
      }
    }
  };
  const int requested = options.threads > 0 ? options.threads : std::min(num_threads(), 4);
  const int workers = std::max(1, std::min<int>(requested, static_cast<int>(items.size())));
  report.threads = workers;
  {
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; ++w) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
  }
  if (error) std::rethrow_exception(error);

  // ---- the adapter, in a temporary folder renamed at the end ----
  PeftConfig config;
  config.r = options.rank;
  config.lora_alpha = options.rank;
  config.fan_in_fan_out = layout == Layout::in_out;
  if (cb.is_folder()) {
    std::error_code ec;
    const fs::path abs = fs::absolute(base, ec);
    config.base_model_name_or_path = (ec ? base : abs).lexically_normal().string();
  }
  std::vector<TensorSpec> specs;
  for (auto& r : results) {
    report.modules.push_back(r.info);
    if (!r.info.written) {
      ++report.skipped;
      continue;
    }
    ++report.written;
    config.target_modules.push_back(r.info.module);
    const std::string key = "base_model.model." + r.info.module;
    const auto rank = static_cast<std::uint64_t>(options.rank);
    specs.push_back({key + ".lora_A.weight", options.dtype, {rank, r.info.in}});
    specs.push_back({key + ".lora_B.weight", options.dtype, {r.info.out, rank}});
  }
  if (report.written == 0) {
    fail("extract", "all {} targeted weights are identical in {} and {}; no adapter written", report.skipped,
         base.string(), tuned.string());
  }
  const fs::path temp = detail::make_temp_folder(out, "extract");
  detail::FolderGuard guard(temp);
  {
    SafetensorsWriter writer(temp / "adapter_model.safetensors", std::move(specs));
    std::vector<bf16> half;
    auto put = [&](const std::string& name, const std::vector<float>& v) {
      if (options.dtype == Dtype::F32) {
        writer.write<float>(name, std::span<const float>(v));
        return;
      }
      half.resize(v.size());
      const auto n = static_cast<Index>(v.size());
      convert(MatrixView<const float>(v.data(), 1, n, n, 1), MatrixView<bf16>(half.data(), 1, n, n, 1));
      writer.write<bf16>(name, std::span<const bf16>(half));
    };
    for (auto& r : results) {
      if (!r.info.written) continue;
      const std::string key = "base_model.model." + r.info.module;
      put(key + ".lora_A.weight", r.A);
      put(key + ".lora_B.weight", r.B);
      r.A = {};
      r.B = {};
    }
    writer.commit();
    report.bytes_written = writer.file_size();
  }
  {
    const std::string text = config.to_json();
    detail::TempFile file(temp / "adapter_config.json");
    detail::pwrite_all(file.fd(), std::as_bytes(std::span(text)), 0, file.path().string());
    file.commit();
  }
  (void)PeftAdapter::open(temp);  // what was written reads back as a valid adapter
  detail::commit_folder(temp, out, replace, "extract");
  guard.path.clear();
  return report;
}

}  // namespace io
LOWRANK_END_NAMESPACE
