// `io::extract_adapter`: a base checkpoint (the PEFT fixtures) plus a known low-rank change gives
// back that change as a PEFT adapter; merging the adapter into the base reproduces the tuned
// checkpoint; a smaller rank gives the Eckart-Young optimum; bad input is refused with nothing left
// behind.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>

#include <Eigen/Core>
#include <Eigen/QR>
#include <gtest/gtest.h>

#include "io_util.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/io/checkpoint.hpp"
#include "lowrank/io/extract.hpp"
#include "lowrank/io/merge.hpp"
#include "lowrank/io/peft.hpp"
#include "lowrank/io/safetensors.hpp"

namespace {

using namespace lowrank_test;
using lowrank::Index;
using lowrank::Layout;
using lowrank::io::Dtype;
using lowrank::io::ExtractOptions;
using lowrank::io::ExtractReport;
using lowrank::io::PeftAdapter;
using lowrank::io::SafetensorsFile;
using lowrank::io::TensorData;
using lowrank::io::TensorSpec;
using Mat = lowrank::RowMatrix<double>;

// A known change dW = P diag(s) Q^T (out x in) of one module, P and Q with orthonormal columns.
struct Change {
  std::string module;
  std::vector<double> s;
  Mat delta;  // out x in
};

Mat orthonormal(Index rows, Index cols, std::mt19937_64& rng) {
  std::normal_distribution<double> n(0.0, 1.0);
  lowrank::ColMatrix<double> g(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) g(i, j) = n(rng);
  const Eigen::HouseholderQR<lowrank::ColMatrix<double>> qr(g);
  return qr.householderQ() * lowrank::ColMatrix<double>::Identity(rows, cols);
}

// Every tensor of a safetensors file as raw bytes, in file order.
struct Tensors {
  std::vector<TensorSpec> specs;
  std::vector<std::vector<std::byte>> bytes;
  std::size_t index(const std::string& name) const {
    for (std::size_t i = 0; i < specs.size(); ++i)
      if (specs[i].name == name) return i;
    throw std::runtime_error("no tensor " + name);
  }
  std::vector<float> floats(const std::string& name) const {
    const auto& b = bytes[index(name)];
    std::vector<float> v(b.size() / 4);
    std::memcpy(v.data(), b.data(), b.size());
    return v;
  }
  void set(const std::string& name, const std::vector<float>& v) {
    auto& b = bytes[index(name)];
    b.resize(v.size() * 4);
    std::memcpy(b.data(), v.data(), b.size());
  }
  void write(const fs::path& file) const {
    std::vector<TensorData> t;
    for (std::size_t i = 0; i < specs.size(); ++i) t.push_back({specs[i], std::span<const std::byte>(bytes[i])});
    lowrank::io::write_safetensors(file, t);
  }
};

Tensors read_all(const fs::path& file) {
  const auto f = SafetensorsFile::open(file);
  Tensors t;
  for (const auto& info : f.tensors()) {
    t.specs.push_back({info.name, info.dtype, info.shape});
    const auto b = f.bytes(info);
    t.bytes.emplace_back(b.begin(), b.end());
  }
  return t;
}

// Copies the fixture `family`'s base to dir/base and writes dir/tuned = base + the changes (fp32
// tensors, stored for `layout`), with the same config.json.
std::vector<Change> make_pair(const fs::path& dir, const std::string& family, Layout layout,
                              const std::map<std::string, std::vector<double>>& spectra, std::uint64_t seed) {
  fs::copy(data_path("peft/" + family + "/base"), dir / "base", fs::copy_options::recursive);
  fs::create_directories(dir / "tuned");
  fs::copy_file(dir / "base" / "config.json", dir / "tuned" / "config.json");
  Tensors t = read_all(dir / "base" / "model.safetensors");
  std::mt19937_64 rng(seed);
  std::vector<Change> changes;
  for (const auto& [module, s] : spectra) {
    const auto& spec = t.specs[t.index(module + ".weight")];
    const Index out = static_cast<Index>(layout == Layout::out_in ? spec.shape[0] : spec.shape[1]);
    const Index in = static_cast<Index>(layout == Layout::out_in ? spec.shape[1] : spec.shape[0]);
    const auto k = static_cast<Index>(s.size());
    const Mat P = orthonormal(out, k, rng), Q = orthonormal(in, k, rng);
    Mat d = P * Eigen::Map<const Eigen::VectorXd>(s.data(), k).asDiagonal() * Q.transpose();
    auto w = t.floats(spec.name);
    for (Index i = 0; i < out; ++i)
      for (Index j = 0; j < in; ++j) {
        const auto at = static_cast<std::size_t>(layout == Layout::out_in ? i * in + j : j * out + i);
        const float tuned = static_cast<float>(w[at] + d(i, j));
        d(i, j) = static_cast<double>(tuned) - w[at];  // the change as stored in fp32
        w[at] = tuned;
      }
    t.set(spec.name, w);
    changes.push_back({module, s, std::move(d)});
  }
  t.write(dir / "tuned" / "model.safetensors");
  return changes;
}

// max |a - b| over every tensor of two fp32 checkpoints with the same names, and whether the
// tensors outside `changed` are bitwise equal.
double max_difference(const fs::path& a, const fs::path& b, double* frobenius_of = nullptr, const std::string& only = "") {
  const auto fa = SafetensorsFile::open(a), fb = SafetensorsFile::open(b);
  double worst = 0, f2 = 0;
  for (const auto& t : fa.tensors()) {
    if (!only.empty() && t.name != only) continue;
    std::vector<double> x(t.numel()), y(t.numel());
    fa.read_as<double>(t, x);
    fb.read_as<double>(fb.at(t.name), y);
    for (std::size_t i = 0; i < x.size(); ++i) {
      worst = std::max(worst, std::abs(x[i] - y[i]));
      f2 += (x[i] - y[i]) * (x[i] - y[i]);
    }
  }
  if (frobenius_of != nullptr) *frobenius_of = std::sqrt(f2);
  return worst;
}

const lowrank::io::ExtractedModule& find_module(const ExtractReport& r, const std::string& module) {
  for (const auto& m : r.modules)
    if (m.module == module) return m;
  throw std::runtime_error("no module " + module + " in the report");
}

// The full-rank round trip on one fixture family: every change recovered, merge reproduces TUNED.
void check_round_trip(const std::string& family, Layout layout, const std::map<std::string, std::vector<double>>& spectra,
                      std::size_t default_targets) {
  SCOPED_TRACE(family);
  TempDir dir;
  const auto changes = make_pair(dir.path, family, layout, spectra, 11);
  ExtractOptions o;
  o.rank = 3;
  const auto report = lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "adapter", o);
  EXPECT_EQ(report.layout, layout);
  EXPECT_NE(report.layout_source.find("config.json model_type"), std::string::npos) << report.layout_source;
  EXPECT_EQ(report.modules.size(), default_targets);
  EXPECT_EQ(report.written, changes.size());
  EXPECT_EQ(report.skipped, default_targets - changes.size());
  for (const auto& c : changes) {
    const auto& m = find_module(report, c.module);
    EXPECT_TRUE(m.written) << c.module;
    EXPECT_EQ(m.rank, 3);
    EXPECT_NEAR(m.captured_energy, 1.0, 2e-6) << c.module;
    EXPECT_NEAR(m.delta_norm, c.delta.norm(), 1e-6 * c.delta.norm());
    ASSERT_EQ(m.singular_values.size(), 3u);
    for (std::size_t k = 0; k < 3; ++k) EXPECT_NEAR(m.singular_values[k], c.s[k], 1e-5) << c.module << " sigma " << k;
  }
  for (const auto& m : report.modules) {
    if (!m.written) {
      EXPECT_EQ(m.delta_norm, 0) << m.module;
    }
  }

  // The repository's own reader: PEFT's shapes, convert_to_lora's alpha = r, the layout flag.
  const auto ad = PeftAdapter::open(dir / "adapter");
  EXPECT_EQ(ad.config().r, 3);
  EXPECT_EQ(ad.config().lora_alpha, 3);
  EXPECT_EQ(ad.config().fan_in_fan_out, layout == Layout::in_out);
  EXPECT_TRUE(ad.config().unsupported().empty());
  EXPECT_EQ(ad.file().metadata().at("format"), "pt");
  ASSERT_EQ(ad.modules().size(), changes.size());
  for (const auto& m : ad.modules()) {
    EXPECT_TRUE(ad.config().targets(m.module));
    EXPECT_EQ(m.scale, 1.0);
    const auto& c = *std::find_if(changes.begin(), changes.end(), [&](const Change& x) { return x.module == m.module; });
    EXPECT_EQ(m.out, static_cast<std::uint64_t>(c.delta.rows()));
    EXPECT_EQ(m.in, static_cast<std::uint64_t>(c.delta.cols()));
    // A = V^T has orthonormal rows; B A is the change.
    std::vector<double> A(m.A->numel()), B(m.B->numel());
    ad.file().read_as<double>(*m.A, A);
    ad.file().read_as<double>(*m.B, B);
    const Eigen::Map<const Mat> a(A.data(), 3, static_cast<Index>(m.in)), b(B.data(), static_cast<Index>(m.out), 3);
    EXPECT_LT((a * a.transpose() - Mat::Identity(3, 3)).norm(), 1e-5);
    EXPECT_LT((b * a - c.delta).norm(), 1e-5 * c.delta.norm()) << m.module;
  }

  // Merging the adapter into BASE gives TUNED within fp32 rounding; other tensors untouched.
  lowrank::io::merge_adapter(dir / "base", dir / "adapter", dir / "merged");
  EXPECT_LT(max_difference(dir / "merged" / "model.safetensors", dir / "tuned" / "model.safetensors"), 2e-6);
}

TEST(Extract, RecoversAKnownChangeFromALinearCheckpoint) {
  check_round_trip("llama_rslora", Layout::out_in,
                   {{"model.layers.0.self_attn.q_proj", {0.5, 0.2, 0.05}},
                    {"model.layers.0.mlp.down_proj", {0.3, 0.3, 0.1}},  // out 32 x in 64
                    {"model.layers.1.mlp.gate_proj", {1.0, 0.01, 0.001}}},  // out 64 x in 32
                   14);
}

TEST(Extract, RecoversAKnownChangeFromAConv1dCheckpoint) {
  check_round_trip("gpt2", Layout::in_out,
                   {{"transformer.h.0.attn.c_attn", {0.5, 0.2, 0.05}},  // stored in 32 x out 96
                    {"transformer.h.1.mlp.c_proj", {0.4, 0.1, 0.02}}},  // stored in 128 x out 32
                   8);
}

TEST(Extract, SmallerRankIsTheEckartYoungOptimum) {
  TempDir dir;
  const std::string module = "model.layers.0.mlp.down_proj";
  const std::vector<double> s{0.5, 0.3, 0.2, 0.1};
  make_pair(dir.path, "llama_rslora", Layout::out_in, {{module, s}}, 5);
  ExtractOptions o;
  o.rank = 2;
  o.target_modules = {"down_proj"};
  const auto report = lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "adapter", o);
  ASSERT_EQ(report.modules.size(), 2u);
  const auto& m = find_module(report, module);
  const double total = 0.25 + 0.09 + 0.04 + 0.01;
  EXPECT_LT(m.captured_energy, 1.0);
  EXPECT_NEAR(m.captured_energy, (0.25 + 0.09) / total, 1e-5);
  EXPECT_NEAR(m.residual_norm, std::sqrt(0.04 + 0.01), 1e-5);
  EXPECT_FALSE(find_module(report, "model.layers.1.mlp.down_proj").written);
  // The merged weight misses TUNED by exactly the discarded part: sqrt(sigma_3^2 + sigma_4^2).
  lowrank::io::merge_adapter(dir / "base", dir / "adapter", dir / "merged");
  double frobenius = 0;
  max_difference(dir / "merged" / "model.safetensors", dir / "tuned" / "model.safetensors", &frobenius, module + ".weight");
  EXPECT_NEAR(frobenius, std::sqrt(0.04 + 0.01), 1e-5);
  const auto ad = PeftAdapter::open(dir / "adapter");
  EXPECT_EQ(ad.config().target_modules, std::vector<std::string>{module});
}

// A single-file checkpoint without config.json, large enough for the randomized SVD.
struct Big {
  TempDir dir;
  Mat delta;
  Big(Index out, Index in, const std::vector<double>& s, Dtype dtype = Dtype::F32) {
    std::mt19937_64 rng(21);
    std::normal_distribution<float> n(0.0f, 0.05f);
    std::vector<float> w(static_cast<std::size_t>(out * in)), t(w.size()), other(16);
    for (auto& x : w) x = n(rng);
    for (auto& x : other) x = n(rng);
    const auto k = static_cast<Index>(s.size());
    delta = orthonormal(out, k, rng) * Eigen::Map<const Eigen::VectorXd>(s.data(), k).asDiagonal() *
            orthonormal(in, k, rng).transpose();
    for (Index i = 0; i < out * in; ++i) {
      t[static_cast<std::size_t>(i)] = static_cast<float>(w[static_cast<std::size_t>(i)] + delta(i / in, i % in));
      delta(i / in, i % in) = static_cast<double>(t[static_cast<std::size_t>(i)]) - w[static_cast<std::size_t>(i)];
    }
    const std::vector<std::uint64_t> shape{static_cast<std::uint64_t>(out), static_cast<std::uint64_t>(in)};
    auto file = [&](const std::string& name, const std::vector<float>& weight) {
      std::vector<double> w64(weight.begin(), weight.end());
      const std::span<const std::byte> bytes = dtype == Dtype::F64 ? std::as_bytes(std::span(w64)) : std::as_bytes(std::span(weight));
      const std::vector<TensorData> tensors{{{"layer.proj.weight", dtype, shape}, bytes},
                                            {{"layer.norm.weight", Dtype::F32, {16}}, std::as_bytes(std::span(other))}};
      lowrank::io::write_safetensors(dir / name, tensors);
    };
    file("base.safetensors", w);
    file("tuned.safetensors", t);
  }
};

TEST(Extract, RandomizedSvdOnALargerWeightIsIndependentOfThreadsAndLayoutDefaultsToLinear) {
  Big big(200, 160, {3.0, 2.0, 1.0, 0.5, 0.25, 0.125});
  ExtractOptions o;
  o.rank = 6;
  o.threads = 1;
  const auto r1 = lowrank::io::extract_adapter(big.dir / "base.safetensors", big.dir / "tuned.safetensors", big.dir / "a1", o);
  EXPECT_EQ(r1.layout, Layout::out_in);
  EXPECT_NE(r1.layout_source.find("default"), std::string::npos);
  ASSERT_EQ(r1.modules.size(), 1u);
  const auto& m = r1.modules[0];
  EXPECT_FALSE(m.exact_svd) << "min(m, n) = 160 > 64 with q = 16: the randomized method";
  EXPECT_NEAR(m.captured_energy, 1.0, 1e-5);
  EXPECT_NEAR(m.singular_values[0], 3.0, 1e-5);
  EXPECT_NEAR(m.singular_values[5], 0.125, 1e-5);
  o.threads = 3;
  lowrank::io::extract_adapter(big.dir / "base.safetensors", big.dir / "tuned.safetensors", big.dir / "a3", o);
  EXPECT_EQ(read_bytes(big.dir / "a1" / "adapter_model.safetensors"), read_bytes(big.dir / "a3" / "adapter_model.safetensors"));
  // No config.json: no base_model path is recorded for a single file.
  EXPECT_FALSE(PeftAdapter::open(big.dir / "a1").config().base_model_name_or_path.has_value());

  // bf16 factors: B A within bf16 rounding of the change.
  o.dtype = Dtype::BF16;
  lowrank::io::extract_adapter(big.dir / "base.safetensors", big.dir / "tuned.safetensors", big.dir / "bf16", o);
  const auto ad = PeftAdapter::open(big.dir / "bf16");
  const auto& lm = ad.modules().at(0);
  EXPECT_EQ(lm.A->dtype, Dtype::BF16);
  EXPECT_EQ(lm.B->dtype, Dtype::BF16);
  std::vector<double> A(lm.A->numel()), B(lm.B->numel());
  ad.file().read_as<double>(*lm.A, A);
  ad.file().read_as<double>(*lm.B, B);
  const Mat ba = Eigen::Map<const Mat>(B.data(), 200, 6) * Eigen::Map<const Mat>(A.data(), 6, 160);
  EXPECT_LT((ba - big.delta).norm(), 1e-2 * big.delta.norm());
  EXPECT_GT((ba - big.delta).norm(), 1e-6 * big.delta.norm()) << "bf16 factors are rounded";
}

TEST(Extract, Fp64TensorsAndMixedSourcesShardedBf16Base) {
  {
    Big big(80, 70, {1.0, 0.5}, Dtype::F64);
    ExtractOptions o;
    o.rank = 2;
    o.svd.method = lowrank::linalg::SvdMethod::randomized;
    const auto r = lowrank::io::extract_adapter(big.dir / "base.safetensors", big.dir / "tuned.safetensors", big.dir / "a", o);
    EXPECT_NEAR(r.modules.at(0).captured_energy, 1.0, 1e-10) << "fp64 tensors are extracted in fp64";
    EXPECT_EQ(r.modules.at(0).base_dtype, Dtype::F64);
  }
  // A sharded bf16 base and an fp32 tuned single file: bf16 widens exactly, so the change is exact.
  TempDir dir;
  const auto base = lowrank::io::Checkpoint::open(data_path("peft/llama_bf16/base"));
  std::vector<TensorSpec> specs;
  std::vector<std::vector<float>> data;
  std::mt19937_64 rng(8);
  const std::string module = "model.layers.1.self_attn.o_proj";
  Mat delta;
  for (const auto& s : base.shards())
    for (const auto& t : s.file.tensors()) {
      std::vector<float> v(t.numel());
      s.file.read_as<float>(t, v);
      if (t.name == module + ".weight") {
        delta = orthonormal(32, 2, rng) * Eigen::Vector2d(0.25, 0.125).asDiagonal() * orthonormal(32, 2, rng).transpose();
        for (Index i = 0; i < 32 * 32; ++i) {
          const float x = static_cast<float>(v[static_cast<std::size_t>(i)] + delta(i / 32, i % 32));
          delta(i / 32, i % 32) = static_cast<double>(x) - v[static_cast<std::size_t>(i)];
          v[static_cast<std::size_t>(i)] = x;
        }
      }
      specs.push_back({t.name, Dtype::F32, t.shape});
      data.push_back(std::move(v));
    }
  std::vector<TensorData> tensors;
  for (std::size_t i = 0; i < specs.size(); ++i) tensors.push_back({specs[i], std::as_bytes(std::span(data[i]))});
  lowrank::io::write_safetensors(dir / "tuned.safetensors", tensors);
  ExtractOptions o;
  o.rank = 2;
  const auto r = lowrank::io::extract_adapter(data_path("peft/llama_bf16/base"), dir / "tuned.safetensors", dir / "a", o);
  EXPECT_EQ(r.written, 1u);
  EXPECT_EQ(r.skipped, 13u);
  const auto& m = find_module(r, module);
  EXPECT_EQ(m.base_dtype, Dtype::BF16);
  EXPECT_EQ(m.tuned_dtype, Dtype::F32);
  EXPECT_NEAR(m.captured_energy, 1.0, 2e-6);
  EXPECT_NEAR(m.delta_norm, delta.norm(), 1e-6);
}

TEST(Extract, TargetsAndLayout) {
  TempDir dir;
  make_pair(dir.path, "llama_rslora", Layout::out_in,
            {{"model.layers.0.self_attn.q_proj", {0.5}}, {"model.layers.1.self_attn.v_proj", {0.5}}, {"lm_head", {0.5}}}, 3);
  ExtractOptions o;
  o.rank = 1;
  // Default: lm_head and the embeddings are left out even when they changed.
  auto r = lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "a", o);
  EXPECT_EQ(r.written, 2u);
  EXPECT_EQ(r.modules.size(), 14u);
  // A PEFT-style list; lm_head may be targeted explicitly.
  o.target_modules = {"q_proj", "lm_head"};
  r = lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "b", o);
  ASSERT_EQ(r.modules.size(), 3u);
  EXPECT_EQ(r.modules[0].module, "lm_head");
  EXPECT_EQ(r.written, 2u);
  EXPECT_EQ(PeftAdapter::open(dir / "b").config().target_modules, (std::vector<std::string>{"lm_head", "model.layers.0.self_attn.q_proj"}));
  // A regular expression, matched against whole names.
  o.target_modules.clear();
  o.target_regex = R"(model\.layers\.1\.self_attn\.(q|v)_proj)";
  r = lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "c", o);
  ASSERT_EQ(r.modules.size(), 2u);
  EXPECT_EQ(r.written, 1u);
  EXPECT_EQ(r.modules[1].module, "model.layers.1.self_attn.v_proj");

  // Layout detection reads config.json's model_type; never shapes.
  std::string source;
  EXPECT_EQ(lowrank::io::detect_layout(data_path("peft/gpt2/base"), &source), Layout::in_out);
  EXPECT_NE(source.find("gpt2"), std::string::npos);
  EXPECT_EQ(lowrank::io::detect_layout(data_path("peft/gpt2/base/model.safetensors")), Layout::in_out);
  EXPECT_EQ(lowrank::io::detect_layout(data_path("peft/llama_bf16/base")), Layout::out_in);
  EXPECT_FALSE(lowrank::io::detect_layout(dir / "a").has_value());
  EXPECT_TRUE(lowrank::io::is_embedding_like("transformer.wte"));
  EXPECT_TRUE(lowrank::io::is_embedding_like("model.embed_tokens"));
  EXPECT_FALSE(lowrank::io::is_embedding_like("lm_head"));
  EXPECT_TRUE(lowrank::io::excluded_by_default("lm_head"));
  EXPECT_FALSE(lowrank::io::excluded_by_default("model.layers.0.mlp.down_proj"));
  // An explicit layout wins over config.json.
  o.target_regex.reset();
  o.layout = Layout::in_out;
  r = lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "d", o);
  EXPECT_EQ(r.layout_source, "option");
  EXPECT_TRUE(PeftAdapter::open(dir / "d").config().fan_in_fan_out);
}

TEST(Extract, BadInputIsRefusedAndLeavesNothing) {
  TempDir dir;
  make_pair(dir.path, "llama_rslora", Layout::out_in,
            {{"model.layers.0.self_attn.q_proj", {0.5, 0.25}}, {"model.layers.1.self_attn.o_proj", {0.5}}}, 4);
  const auto extract = [&](const ExtractOptions& o, const std::string& tuned = "tuned", const std::string& base = "base") {
    return lowrank::io::extract_adapter(dir / base, dir / tuned, dir / "out", o);
  };
  ExtractOptions o;
  o.rank = 17;  // k_proj is 16 x 32
  LOWRANK_EXPECT_ERROR(extract(o), "model.layers.0.self_attn.k_proj", "rank 17", "min(in, out) = 16", "[16, 32]");
  o.rank = 0;
  LOWRANK_EXPECT_ERROR(extract(o), "rank must be at least 1");
  o.rank = 2;
  o.dtype = Dtype::F16;
  LOWRANK_EXPECT_ERROR(extract(o), "F32 or BF16");
  o.dtype = Dtype::F32;
  LOWRANK_EXPECT_ERROR(extract(o, "base"), "identical");
  o.target_modules = {"no_such_proj"};
  LOWRANK_EXPECT_ERROR(extract(o), "no_such_proj", "match no");
  o.target_modules = {"embed_tokens"};
  LOWRANK_EXPECT_ERROR(extract(o), "model.embed_tokens", "embedding");
  o.target_modules.clear();

  // TUNED variants: a shape, a dtype, a missing tensor, a NaN.
  Tensors t = read_all(dir / "tuned" / "model.safetensors");
  auto variant = [&](const std::string& name, auto edit) {
    Tensors v = t;
    edit(v);
    fs::create_directories(dir / name);
    v.write(dir / name / "model.safetensors");
    fs::copy_file(dir / "tuned" / "config.json", dir / name / "config.json");
  };
  const std::string q = "model.layers.0.self_attn.q_proj.weight";
  variant("shape", [&](Tensors& v) { v.specs[v.index(q)].shape = {16, 64}; });
  LOWRANK_EXPECT_ERROR(extract(o, "shape"), q.c_str(), "[32, 32] in BASE", "[16, 64] in TUNED");
  variant("dtype", [&](Tensors& v) { v.specs[v.index(q)].dtype = Dtype::I32; });
  LOWRANK_EXPECT_ERROR(extract(o, "dtype"), q.c_str(), "I32", "not floating-point");
  variant("missing", [&](Tensors& v) {
    const auto i = v.index(q);
    v.specs.erase(v.specs.begin() + static_cast<std::ptrdiff_t>(i));
    v.bytes.erase(v.bytes.begin() + static_cast<std::ptrdiff_t>(i));
  });
  o.target_modules = {"q_proj"};
  LOWRANK_EXPECT_ERROR(extract(o, "missing"), q.c_str(), "not in TUNED");
  o.target_modules.clear();
  // By default a tensor in one checkpoint only is reported, not extracted.
  const auto r = extract(o, "missing");
  EXPECT_EQ(r.only_in_base, std::vector<std::string>{q});
  fs::remove_all(dir / "out");
  variant("nan", [&](Tensors& v) {
    auto w = v.floats(q);
    w[33] = std::nanf("");
    v.set(q, w);
  });
  LOWRANK_EXPECT_ERROR(extract(o, "nan"), "model.layers.0.self_attn.q_proj", "element (1, 1)", "nan in TUNED", "not finite");

  // Output: not over an input, not over a non-empty folder unless allowed.
  LOWRANK_EXPECT_ERROR(lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "tuned" / "a", o), "is inside");
  LOWRANK_EXPECT_ERROR(lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "base", o), "input");
  EXPECT_FALSE(fs::exists(dir / "out"));
  for (const auto& name : dir.listing()) EXPECT_EQ(name.find("lowrank-"), std::string::npos) << "left behind: " << name;
  fs::create_directories(dir / "out");
  write_text(dir / "out" / "keep.txt", "x");
  LOWRANK_EXPECT_ERROR(extract(o), "not empty", "--force");
  o.overwrite = true;
  EXPECT_EQ(extract(o).written, 2u);
  EXPECT_FALSE(fs::exists(dir / "out" / "keep.txt"));
  EXPECT_TRUE(fs::exists(dir / "out" / "adapter_config.json"));
  // "slash/" is the folder "slash": the temporary folder goes next to it.
  EXPECT_EQ(lowrank::io::extract_adapter(dir / "base", dir / "tuned", (dir / "slash").string() + "/", o).written, 2u);
  EXPECT_TRUE(fs::exists(dir / "slash" / "adapter_model.safetensors"));
  for (const auto& name : dir.listing()) EXPECT_EQ(name.find("lowrank-"), std::string::npos) << "left behind: " << name;
}

TEST(Extract, Conv1dModelsTakeOnlyConv1dModules) {
  TempDir dir;
  make_pair(dir.path, "gpt2", Layout::in_out, {{"transformer.h.0.mlp.c_fc", {0.5}}}, 6);
  ExtractOptions o;
  o.rank = 1;
  o.target_modules = {"wte"};
  LOWRANK_EXPECT_ERROR(lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "a", o), "transformer.wte", "embedding");
  // A rank above min(in, out) names the stored shape and the layout.
  o.target_modules = {"c_proj"};
  o.rank = 33;
  LOWRANK_EXPECT_ERROR(lowrank::io::extract_adapter(dir / "base", dir / "tuned", dir / "a", o), "transformer.h.0.attn.c_proj",
                       "in_out", "[32, 32]");
}

}  // namespace
