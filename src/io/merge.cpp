#include "lowrank/io/merge.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <atomic>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <tuple>
#include <unordered_map>

#include "file_util.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/io/checkpoint.hpp"
#include "lowrank/io/peft.hpp"
#include "lowrank/kernels/convert.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

using lowrank::detail::fail;
namespace fs = std::filesystem;

std::uint64_t stream_of(std::string_view name) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : name) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

namespace {

constexpr std::size_t kChunkBytes = 4u << 20;

// A module's factors, loaded once, in the compute type of its tensor.
struct Factors {
  std::vector<double> a64, b64;
  std::vector<float> a32, b32;
};

struct Plan {
  const LoraModule* module = nullptr;
  Layout layout = Layout::out_in;
  Factors factors;
};

template <class T>
bool finite_value(T x) {
  return std::isfinite(static_cast<double>(x));
}

// Loads A (r x in) and B (out x r) of a module, checks them finite and the delta bounded.
template <class C>
void load_factors(const PeftAdapter& ad, const LoraModule& m, std::vector<C>& a, std::vector<C>& b) {
  const auto& f = ad.file();
  a.resize(static_cast<std::size_t>(m.A->numel()));
  b.resize(static_cast<std::size_t>(m.B->numel()));
  f.read_as<C>(*m.A, a);
  f.read_as<C>(*m.B, b);
  const auto r = static_cast<std::size_t>(m.rank), in = static_cast<std::size_t>(m.in), out = static_cast<std::size_t>(m.out);
  std::vector<double> amax(r, 0.0);
  for (std::size_t k = 0; k < r; ++k)
    for (std::size_t j = 0; j < in; ++j) {
      const C x = a[k * in + j];
      if (!finite_value(x)) {
        fail("merge", "{}: module {}: lora_A({}, {}) is {}; a non-finite delta is refused", ad.file().path().string(),
             m.module, k, j, static_cast<double>(x));
      }
      amax[k] = std::max(amax[k], std::abs(static_cast<double>(x)));
    }
  double bound = 0;
  for (std::size_t i = 0; i < out; ++i) {
    double row = 0;
    for (std::size_t k = 0; k < r; ++k) {
      const C x = b[i * r + k];
      if (!finite_value(x)) {
        fail("merge", "{}: module {}: lora_B({}, {}) is {}; a non-finite delta is refused", ad.file().path().string(),
             m.module, i, k, static_cast<double>(x));
      }
      row += std::abs(static_cast<double>(x)) * amax[k];
    }
    bound = std::max(bound, row);
  }
  bound *= std::abs(m.scale);
  if (!(bound < 0.5 * static_cast<double>(std::numeric_limits<C>::max()))) {
    fail("merge", "{}: module {}: |scale * B A| may reach {:.3g}, beyond the {} range; refusing a possibly non-finite delta",
         ad.file().path().string(), m.module, bound, sizeof(C) == 8 ? "fp64" : "fp32");
  }
}

// Whether x is infinite or NaN, from its exponent bits.
template <class T>
bool nonfinite(const T& x) {
  if constexpr (sizeof(T) == 2) {
    constexpr std::uint16_t e = std::is_same_v<T, bf16> ? 0x7F80u : 0x7C00u;
    std::uint16_t u;
    std::memcpy(&u, &x, 2);
    return (u & e) == e;
  } else {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    return (u & 0x7F800000u) == 0x7F800000u;
  }
}

// Whether any of p[0, n) is infinite or NaN: a branch-free reduction the compiler vectorizes.
template <class T>
bool any_nonfinite(const T* p, std::size_t n) {
  unsigned any = 0;
  for (std::size_t k = 0; k < n; ++k) any |= static_cast<unsigned>(nonfinite(p[k]));
  return any != 0;
}

// Per-worker scratch buffers, one per storage type.
struct Buffers {
  std::tuple<std::vector<double>, std::vector<float>, std::vector<bf16>, std::vector<f16>> in, out, c;
};

template <class T>
std::vector<T>& sized(std::vector<T>& v, std::size_t n) {
  if (v.size() < n) v.resize(n);
  return v;
}

// One unit of work: a whole tensor copied in the kernel, or a block of a tensor (stored rows of a
// merged weight, elements of a converted tensor) read, updated/converted and written.
struct Task {
  const TensorInfo* tensor = nullptr;
  Plan* plan = nullptr;
  Dtype out = Dtype::F32;
  bool copy = false;
  std::uint64_t first = 0, count = 0;  // rows (merged) or elements (converted)
  std::uint64_t bytes = 0;             // input bytes, for progress
  std::size_t tensor_index = 0;
};

// Streams one shard: tasks run on a pool of worker threads (each task single-threaded, so that
// reading, computing and writing of different blocks overlap), results written with pwrite.
class ShardMerger {
 public:
  ShardMerger(const SafetensorsFile& file, SafetensorsWriter& writer, const MergeOptions& options,
              MergeProgress& progress, std::mutex& progress_mutex)
      : file_(file), writer_(writer), options_(options), progress_(progress), progress_mutex_(progress_mutex) {}

  void add(const TensorInfo& t, Dtype out, Plan* plan) {
    const std::size_t index = remaining_.size();
    std::size_t chunks = 0;
    if (plan == nullptr && out == t.dtype) {
      tasks_.push_back({&t, nullptr, out, true, 0, 0, t.nbytes(), index});
      chunks = 1;
    } else if (plan == nullptr) {
      const std::uint64_t step = std::max<std::uint64_t>(1, kChunkBytes / 8);
      for (std::uint64_t e = 0; e < t.numel() || (e == 0 && chunks == 0); e += step) {
        const std::uint64_t n = std::min(step, t.numel() - e);
        tasks_.push_back({&t, nullptr, out, false, e, n, n * dtype_size(t.dtype), index});
        ++chunks;
        if (n == 0) break;
      }
    } else {
      const std::uint64_t rows = t.shape[0], cols = t.shape[1];
      const std::uint64_t row_bytes = std::max<std::uint64_t>(1, cols * 8);
      const std::uint64_t step = std::max<std::uint64_t>(1, kChunkBytes / row_bytes);
      for (std::uint64_t r = 0; r < rows; r += step) {
        const std::uint64_t h = std::min(step, rows - r);
        tasks_.push_back({&t, plan, out, false, r, h, h * cols * dtype_size(t.dtype), index});
        ++chunks;
      }
      if (rows == 0) {
        tasks_.push_back({&t, plan, out, false, 0, 0, 0, index});
        ++chunks;
      }
    }
    remaining_.emplace_back(chunks);
  }

  void run(int workers) {
    std::atomic<std::size_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto work = [&]() {
      Buffers buffers;
      while (!failed.load(std::memory_order_relaxed)) {
        const std::size_t i = next.fetch_add(1);
        if (i >= tasks_.size()) return;
        try {
          execute(tasks_[i], buffers);
        } catch (...) {
          const std::lock_guard lock(error_mutex);
          if (!error) error = std::current_exception();
          failed = true;
          return;
        }
      }
    };
    workers = std::max(1, std::min<int>(workers, static_cast<int>(tasks_.size())));
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; ++w) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    if (error) std::rethrow_exception(error);
  }

 private:
  void execute(const Task& task, Buffers& b) {
    const TensorInfo& t = *task.tensor;
    if (task.copy) {
      writer_.copy_from(t.name, file_, t);
    } else {
      switch (t.dtype) {
        case Dtype::F64: by_out<double>(task, b); break;
        case Dtype::F32: by_out<float>(task, b); break;
        case Dtype::BF16: by_out<bf16>(task, b); break;
        case Dtype::F16: by_out<f16>(task, b); break;
        default:
          fail("merge", "{}: tensor \"{}\" is {}; only floating-point tensors can be merged or converted",
               file_.path().string(), t.name, to_string(t.dtype));
      }
    }
    const bool last = remaining_[task.tensor_index].fetch_sub(1) == 1;
    const std::lock_guard lock(progress_mutex_);
    progress_.bytes_done += task.bytes;
    if (last) ++progress_.tensors_done;
    if (options_.progress) options_.progress(progress_);
  }

  template <class TB>
  void by_out(const Task& task, Buffers& b) {
    switch (task.out) {
      case Dtype::F64: return block<TB, double>(task, b);
      case Dtype::F32: return block<TB, float>(task, b);
      case Dtype::BF16: return block<TB, bf16>(task, b);
      default: return block<TB, f16>(task, b);
    }
  }

  template <class TB, class TO>
  void block(const Task& task, Buffers& bufs) {
    using C = std::conditional_t<std::is_same_v<TB, double> || std::is_same_v<TO, double>, double, float>;
    const TensorInfo& t = *task.tensor;
    ConvertOptions co{options_.rounding, options_.seed, stream_of(t.name)};
    co.max_threads = 1;
    auto& in = std::get<std::vector<TB>>(bufs.in);
    auto& out = std::get<std::vector<TO>>(bufs.out);
    auto& cb = std::get<std::vector<C>>(bufs.c);
    if (task.plan == nullptr) {  // convert only, as one flat row
      const auto n = static_cast<Index>(task.count);
      sized(in, task.count);
      sized(out, task.count);
      file_.read_bytes(t, task.first * sizeof(TB), std::as_writable_bytes(std::span(in.data(), task.count)));
      co.index_col0 = task.first;
      co.index_cols = std::max<std::uint64_t>(1, t.numel());
      convert(MatrixView<const TB>(in.data(), 1, n, n, 1), MatrixView<TO>(out.data(), 1, n, n, 1), co);
      writer_.write(t.name, std::as_bytes(std::span(out.data(), task.count)), task.first * sizeof(TO));
      return;
    }
    const LoraModule& m = *task.plan->module;
    const auto cols = static_cast<Index>(t.shape[1]);
    const auto i0 = static_cast<Index>(task.first), h = static_cast<Index>(task.count);
    const auto r = static_cast<Index>(m.rank), in_dim = static_cast<Index>(m.in);
    const bool transposed = task.plan->layout == Layout::in_out;  // stored rows are input features
    const std::vector<C>& a = factors_a<C>(task.plan->factors);   // r x in, row-major
    const std::vector<C>& bm = factors_b<C>(task.plan->factors);  // out x r, row-major
    RankUpdateOptions ro = co;
    ro.index_cols = static_cast<std::uint64_t>(in_dim);
    MatrixView<const C> U, V;  // U on the output side, V on the input side, for these stored rows
    if (transposed) {
      U = MatrixView<const C>(bm.data(), static_cast<Index>(m.out), r, r, 1);
      V = MatrixView<const C>(a.data() + i0, h, r, 1, in_dim);  // rows i0.. of A^T
      ro.index_col0 = static_cast<std::uint64_t>(i0);
    } else {
      U = MatrixView<const C>(bm.data() + i0 * r, h, r, r, 1);
      V = MatrixView<const C>(a.data(), in_dim, r, 1, in_dim);  // A^T
      ro.index_row0 = static_cast<std::uint64_t>(i0);
    }
    const auto count = static_cast<std::size_t>(h * cols);
    const std::uint64_t elem0 = static_cast<std::uint64_t>(i0 * cols);
    sized(out, count);
    if constexpr (std::is_same_v<TB, TO>) {
      file_.read_bytes(t, elem0 * sizeof(TB), std::as_writable_bytes(std::span(out.data(), count)));
      rank_update(WeightView<TO>{row_major(out.data(), h, cols), task.plan->layout}, U, V, m.scale, ro);
    } else {
      sized(in, count);
      sized(cb, count);
      file_.read_bytes(t, elem0 * sizeof(TB), std::as_writable_bytes(std::span(in.data(), count)));
      convert(MatrixView<const TB>(row_major(in.data(), h, cols)), row_major(cb.data(), h, cols));
      const WeightView<C> cv{row_major(cb.data(), h, cols), task.plan->layout};
      RankUpdateOptions exact;
      exact.max_threads = 1;
      rank_update(cv, U, V, m.scale, exact);
      const WeightView<TO> ov{row_major(out.data(), h, cols), task.plan->layout};
      convert(MatrixView<const C>(cv.as_out_in()), ov.as_out_in(), ro);
    }
    if constexpr (!std::is_same_v<TO, double>) {
      if (any_nonfinite(out.data(), count)) {
        for (std::size_t k = 0; k < count; ++k) {
          if (nonfinite(out[k])) check_overflow<TB>(t, m, elem0 + k, static_cast<std::uint64_t>(cols));
        }
      }
    }
    writer_.write(t.name, std::as_bytes(std::span(out.data(), count)), elem0 * sizeof(TO));
  }

  // A non-finite merged element: an error unless the base element was non-finite already.
  template <class TB>
  void check_overflow(const TensorInfo& t, const LoraModule& m, std::uint64_t k, std::uint64_t cols) {
    TB x;
    file_.read_bytes(t, k * sizeof(TB), std::as_writable_bytes(std::span(&x, 1)));
    if (!finite_value(static_cast<double>(x))) return;
    fail("merge", "{}: tensor \"{}\" (module {}): element ({}, {}) is {} and becomes non-finite after the merge "
         "(the output dtype's range is exceeded); nothing was written", file_.path().string(), t.name, m.module,
         k / cols, k % cols, static_cast<double>(x));
  }

  template <class C>
  static const std::vector<C>& factors_a(const Factors& f) {
    if constexpr (std::is_same_v<C, double>) return f.a64;
    else return f.a32;
  }
  template <class C>
  static const std::vector<C>& factors_b(const Factors& f) {
    if constexpr (std::is_same_v<C, double>) return f.b64;
    else return f.b32;
  }

  const SafetensorsFile& file_;
  SafetensorsWriter& writer_;
  const MergeOptions& options_;
  MergeProgress& progress_;
  std::mutex& progress_mutex_;
  std::vector<Task> tasks_;
  std::deque<std::atomic<std::size_t>> remaining_;  // chunks left per tensor
};

}  // namespace

MergeReport merge_adapter(const fs::path& base, const fs::path& adapter, const fs::path& out_arg,
                          const MergeOptions& options) {
  if (options.dtype && !is_float(*options.dtype)) {
    fail("merge", "the output dtype must be F64, F32, BF16 or F16, not {}", to_string(*options.dtype));
  }
  const Checkpoint ck = Checkpoint::open(base);
  const PeftAdapter ad = PeftAdapter::open(adapter);
  const std::string adapter_file = ad.file().path().string();
  if (const auto u = ad.config().unsupported(); !u.empty()) {
    std::string list;
    for (const auto& s : u) list += (list.empty() ? "" : "; ") + s;
    fail("merge", "{}: the adapter uses features lowrank cannot merge yet: {}", (ad.folder() / "adapter_config.json").string(), list);
  }

  // The output must not overwrite or live inside an input.
  fs::path out = out_arg;
  if (!ck.is_folder() && fs::is_directory(out)) out /= base.filename();
  for (const fs::path& input : {base, ad.folder()}) {
    if (detail::same_file(out, input) || detail::inside(out, input)) {
      fail("merge", "the output {} is or is inside the input {}; choose another output", out.string(), input.string());
    }
  }

  // Plan and validate every module before anything is written.
  std::unordered_map<std::string, Plan> plans;
  for (const auto& m : ad.modules()) {
    const auto e = ck.find(m.base_tensor);
    if (e.info == nullptr) {
      fail("merge", "{}: module {}: the base checkpoint {} has no tensor \"{}\"", adapter_file, m.module, base.string(),
           m.base_tensor);
    }
    const TensorInfo& t = *e.info;
    const std::string where = detail::where(ck, e);
    if (!is_float(t.dtype)) fail("merge", "{}: tensor \"{}\" is {}, not floating-point", where, t.name, to_string(t.dtype));
    const Layout layout = ad.config().fan_in_fan_out ? Layout::in_out : Layout::out_in;
    const std::vector<std::uint64_t> expected =
        layout == Layout::out_in ? std::vector<std::uint64_t>{m.out, m.in} : std::vector<std::uint64_t>{m.in, m.out};
    if (t.shape != expected) {
      std::string hint;
      if (t.shape.size() == 2 && t.shape[0] == expected[1] && t.shape[1] == expected[0]) {
        hint = ad.config().fan_in_fan_out ? " (the weight is stored (out, in): is fan_in_fan_out wrong?)"
                                          : " (the weight is stored (in, out), as GPT-2's Conv1D: set fan_in_fan_out)";
      }
      fail("merge", "{}: tensor \"{}\" has shape {}, but module {} (lora_A {}x{}, lora_B {}x{}{}) needs {}{}", where,
           t.name, shape_string(t.shape), m.module, m.rank, m.in, m.out, m.rank,
           layout == Layout::in_out ? ", fan_in_fan_out" : "", shape_string(expected), hint);
    }
    Plan p;
    p.module = &m;
    p.layout = layout;
    const Dtype od = options.dtype.value_or(t.dtype);
    if (t.dtype == Dtype::F64 || od == Dtype::F64) {
      load_factors<double>(ad, m, p.factors.a64, p.factors.b64);
    } else {
      load_factors<float>(ad, m, p.factors.a32, p.factors.b32);
    }
    ad.file().release(*m.A);  // the copies are kept; the mapped pages need not stay resident
    ad.file().release(*m.B);
    plans.emplace(t.name, std::move(p));
  }

  MergeReport report;
  MergeProgress progress;
  for (const auto& s : ck.shards()) {
    progress.tensors_total += s.file.tensors().size();
    for (const auto& t : s.file.tensors()) progress.bytes_total += t.nbytes();
  }
  std::mutex progress_mutex;
  const int workers = std::max(1, options.threads > 0 ? options.threads : num_threads());

  auto write_shard = [&](const Checkpoint::Shard& s, const fs::path& target, std::uint64_t& bytes) {
    std::vector<TensorSpec> specs;
    for (const auto& t : s.file.tensors()) {
      const Dtype od = is_float(t.dtype) ? options.dtype.value_or(t.dtype) : t.dtype;
      specs.push_back({t.name, od, t.shape});
    }
    SafetensorsWriter w(target, std::move(specs), s.file.metadata(), TensorOrder::as_given);
    ShardMerger sm(s.file, w, options, progress, progress_mutex);
    for (const auto& t : s.file.tensors()) {
      auto it = plans.find(t.name);
      Plan* plan = it == plans.end() ? nullptr : &it->second;
      sm.add(t, w.at(t.name).dtype, plan);
      report.merged += plan != nullptr;
      ++report.tensors;
    }
    sm.run(workers);
    for (const auto& t : w.tensors()) bytes += t.nbytes();
    w.commit();
    report.bytes_written += w.file_size();
  };

  if (!ck.is_folder()) {
    std::uint64_t bytes = 0;
    write_shard(ck.shards().front(), out, bytes);
    report.files.push_back(out.filename().string());
    return report;
  }

  // A folder: build it next to the target, rename at the end.
  if (fs::exists(out) && !fs::is_directory(out)) fail("merge", "the output {} exists and is not a folder", out.string());
  const bool replace = fs::exists(out) && !fs::is_empty(out);
  if (replace && !options.overwrite) {
    fail("merge", "the output folder {} exists and is not empty; remove it or allow overwriting (--force)", out.string());
  }
  const fs::path temp = detail::make_temp_folder(out, "merge");
  detail::FolderGuard guard(temp);
  std::uint64_t total = 0;
  std::vector<std::pair<std::string, std::string>> weight_map;
  for (const auto& s : ck.shards()) {
    write_shard(s, temp / s.file_name, total);
    report.files.push_back(s.file_name);
    for (const auto& t : s.file.tensors()) weight_map.emplace_back(t.name, s.file_name);
  }
  if (ck.index_name()) {
    write_index(temp / *ck.index_name(), ck.index_metadata_json(), total, weight_map);
    report.files.push_back(*ck.index_name());
  }
  for (const auto& name : ck.other_files()) {
    detail::Fd in(::open((base / name).c_str(), O_RDONLY | O_CLOEXEC));
    if (in.get() < 0) fail("merge", "{}: cannot open: {}", (base / name).string(), detail::last_error());
    detail::TempFile copy(temp / name);
    detail::copy_range(in.get(), 0, copy.fd(), 0, fs::file_size(base / name), (base / name).string());
    copy.commit();
    report.files.push_back(name);
  }
  detail::commit_folder(temp, out, replace, "merge");
  guard.path.clear();
  return report;
}

}  // namespace io
LOWRANK_END_NAMESPACE
