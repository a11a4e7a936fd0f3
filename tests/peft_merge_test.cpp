// PEFT adapters and merging: configs and patterns, adapter validation, the streaming merge against a
// float64 reference and against PEFT's own merge_and_unload (fixtures from the real clients), and
// bad input that must leave nothing behind.
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <fstream>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "io_util.hpp"
#include "test_util.hpp"
#include "lowrank/io/checkpoint.hpp"
#include "lowrank/io/merge.hpp"
#include "lowrank/io/peft.hpp"
#include "lowrank/io/safetensors.hpp"
#include "lowrank/kernels/rank_update.hpp"

namespace {

using namespace lowrank_test;
using lowrank::bf16;
using lowrank::f16;
using lowrank::io::Checkpoint;
using lowrank::io::Dtype;
using lowrank::io::LoraFactors;
using lowrank::io::PeftAdapter;
using lowrank::io::PeftConfig;
using lowrank::io::SafetensorsFile;
using lowrank::io::TensorData;

// ---- adapter_config.json -----------------------------------------------------------------------

TEST(PeftConfig, DefaultsPatternsAndScales) {
  const auto c = PeftConfig::parse(R"({"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]})", "min.json");
  EXPECT_EQ(c.r, 8);
  EXPECT_EQ(c.lora_alpha, 8);
  EXPECT_FALSE(c.use_rslora);
  EXPECT_EQ(c.scale_for("model.layers.0.self_attn.q_proj"), 1.0);
  EXPECT_TRUE(c.targets("model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(c.targets("q_proj"));
  EXPECT_FALSE(c.targets("model.layers.0.self_attn.qq_proj"));
  EXPECT_FALSE(c.targets("model.layers.0.self_attn.k_proj"));

  const auto p = PeftConfig::parse(R"({"r": 4, "lora_alpha": 16, "use_rslora": true, "target_modules": ".*\\.(q|k)_proj",
      "rank_pattern": {"layers\\.1\\.self_attn\\.q_proj": 8, "q_proj": 2, "proj": 3},
      "alpha_pattern": {"^model\\.layers\\.0\\.self_attn\\.k_proj": 2},
      "some_future_key": {"x": [1, 2]}})", "p.json");
  // PEFT's rule: re.match(r"(.*\.)?(KEY)$", module); the first key in file order wins.
  EXPECT_EQ(p.rank_for("model.layers.1.self_attn.q_proj"), 8);
  EXPECT_EQ(p.rank_for("model.layers.0.self_attn.q_proj"), 2);
  EXPECT_EQ(p.rank_for("model.layers.0.self_attn.k_proj"), 4) << "\"proj\" matches whole segments only";
  EXPECT_EQ(p.alpha_for("model.layers.0.self_attn.k_proj"), 2);
  EXPECT_EQ(p.alpha_for("model.layers.1.self_attn.k_proj"), 16);
  EXPECT_DOUBLE_EQ(p.scale_for("model.layers.1.self_attn.q_proj"), 16 / std::sqrt(8.0));
  EXPECT_DOUBLE_EQ(p.scale_for("model.layers.0.self_attn.k_proj"), 2 / 2.0);
  // A string target is a full match.
  EXPECT_TRUE(p.targets("model.layers.0.self_attn.k_proj"));
  EXPECT_FALSE(p.targets("model.layers.0.self_attn.v_proj"));
  EXPECT_TRUE(p.unsupported().empty());

  // Written back: known fields as set, unknown keys kept, and it parses to the same meaning.
  const auto back = PeftConfig::parse(p.to_json(), "back.json");
  EXPECT_EQ(back.r, 4);
  EXPECT_EQ(back.lora_alpha, 16);
  EXPECT_TRUE(back.use_rslora);
  // Keys come back sorted, as PEFT writes them (json.dumps(sort_keys=True)); like PEFT's, that
  // order is the priority order once the file is read again.
  auto sorted = p.rank_pattern;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(back.rank_pattern, sorted);
  EXPECT_EQ(back.alpha_pattern, p.alpha_pattern);
  EXPECT_EQ(back.target_modules_regex, p.target_modules_regex);
  EXPECT_EQ(nlohmann::json::parse(back.extra_json).at("some_future_key").at("x")[1], 2);
}

TEST(PeftConfig, BadValuesAndUnsupportedFeatures) {
  LOWRANK_EXPECT_ERROR(PeftConfig::parse("{not json", "c.json"), "c.json", "not valid JSON");
  LOWRANK_EXPECT_ERROR(PeftConfig::parse("[1]", "c.json"), "not a JSON object");
  LOWRANK_EXPECT_ERROR(PeftConfig::parse(R"({"r": "8"})", "c.json"), "c.json", "\"r\"", "positive integer");
  LOWRANK_EXPECT_ERROR(PeftConfig::parse(R"({"r": 0})", "c.json"), "\"r\"");
  LOWRANK_EXPECT_ERROR(PeftConfig::parse(R"({"lora_alpha": "x"})", "c.json"), "lora_alpha");
  LOWRANK_EXPECT_ERROR(PeftConfig::parse(R"({"rank_pattern": {"q": -1}})", "c.json"), "rank_pattern", "\"q\"");
  LOWRANK_EXPECT_ERROR(PeftConfig::parse(R"({"use_rslora": 1})", "c.json"), "use_rslora");
  const auto d = PeftConfig::parse(R"({"use_dora": true, "bias": "all", "peft_type": "LOHA", "use_qalora": false})", "d.json");
  const auto u = d.unsupported();
  ASSERT_EQ(u.size(), 3u);
  EXPECT_NE(u[0].find("LOHA"), std::string::npos);
  EXPECT_NE(u[1].find("use_dora"), std::string::npos);
  EXPECT_NE(u[2].find("bias"), std::string::npos);
}

TEST(PeftConfig, HostilePatternsAreFastOrRefused) {
  // Catastrophic backtracking: exponential with a backtracking matcher, fast with lowrank's.
  const auto c = PeftConfig::parse(R"({"r": 4, "rank_pattern": {"(.*)*x": 2, "(a|aa)*b": 3}, "target_modules": ".**\\.(q|v)_proj"})",
                                   "evil.json");
  const std::string name = "model.layers.10.self_attn.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.q_proj";
  EXPECT_EQ(c.rank_for(name), 4);
  EXPECT_EQ(c.rank_for(name + "x"), 2);
  EXPECT_TRUE(c.targets(name));
  // Counted repetitions that overflow libstdc++'s compiler, or expand to huge automata.
  LOWRANK_EXPECT_ERROR(PeftConfig::parse(R"({"rank_pattern": {"a{99999999999999999999}": 2}})", "c.json"),
                       "rank_pattern key", "counted repetitions");
  LOWRANK_EXPECT_ERROR(PeftConfig::parse(R"({"alpha_pattern": {"a{200}b{100}": 2}})", "c.json"), "alpha_pattern key");
  EXPECT_EQ(PeftConfig::parse(R"({"rank_pattern": {"layers\\.\\d{1,2}\\.q": 2}})", "c.json").rank_for("layers.12.q"), 2);
  // Lengths past what std::regex's recursive compiler and matcher handle on a thread's stack.
  LOWRANK_EXPECT_ERROR(PeftConfig::parse(R"({"rank_pattern": {")" + std::string(2000, 'a') + R"(": 2}})", "c.json"),
                       "2000 characters");
  LOWRANK_EXPECT_ERROR((void)c.rank_for(std::string(5000, 'm')), "module name", "5000 characters");
  // Back-references are not regular: compared literally, as a name.
  EXPECT_EQ(PeftConfig::parse(R"({"r": 4, "rank_pattern": {"(a)\\1": 2}})", "c.json").rank_for("x.aa"), 4);
}

TEST(PeftConfig, RanksAndAlphasAgreeWithPeftOnTheFixture) {
  // generation_info.json records the r / alpha / scaling PEFT itself gave each module.
  const auto c = PeftConfig::load(data_path("peft/llama_rslora/adapter/adapter_config.json"));
  std::ifstream in(data_path("peft/llama_rslora/generation_info.json"));
  const auto info = nlohmann::json::parse(in);
  int checked = 0;
  for (const auto& [name, m] : info.at("modules").items()) {
    const std::string module = name.substr(std::string("base_model.model.").size());
    EXPECT_EQ(c.rank_for(module), m.at("r").get<int>()) << module;
    EXPECT_EQ(c.alpha_for(module), m.at("lora_alpha").get<double>()) << module;
    EXPECT_NEAR(c.scale_for(module), m.at("scaling").get<double>(), 1e-12) << module;
    ++checked;
  }
  EXPECT_EQ(checked, 14);
}

// ---- synthetic checkpoints and adapters --------------------------------------------------------

struct Module {
  std::string name;
  std::uint64_t out, in, rank;
  std::vector<float> A, B;  // r x in, out x r
};

Module random_module(const std::string& name, std::uint64_t out, std::uint64_t in, std::uint64_t rank, std::mt19937_64& rng) {
  std::normal_distribution<float> n(0.0f, 0.05f);
  Module m{name, out, in, rank, std::vector<float>(rank * in), std::vector<float>(out * rank)};
  for (auto& x : m.A) x = n(rng);
  for (auto& x : m.B) x = n(rng);
  return m;
}

void write_adapter(const fs::path& dir, const PeftConfig& c, const std::vector<Module>& modules) {
  std::vector<LoraFactors> f;
  for (const auto& m : modules) f.push_back({m.name, m.rank, m.in, m.out, m.A, m.B});
  lowrank::io::write_peft_adapter(dir, c, f);
}

template <class T>
std::vector<T> random_weights(std::size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<T> w(n);
  for (auto& x : w) x = T(d(rng));
  return w;
}

// The float64 truth of a merged element: W + s * sum_k B(i, k) A(k, j).
double truth(double w, const Module& m, double s, std::uint64_t i, std::uint64_t j) {
  double d = 0;
  for (std::uint64_t k = 0; k < m.rank; ++k) d += static_cast<double>(m.B[i * m.rank + k]) * m.A[k * m.in + j];
  return w + s * d;
}

TEST(PeftAdapter, WrittenAdaptersRoundTrip) {
  TempDir dir;
  std::mt19937_64 rng(1);
  PeftConfig c;
  c.r = 3;
  c.lora_alpha = 6;
  c.target_modules = {"q", "v"};
  c.rank_pattern = {{"v", 2}};
  const std::vector<Module> mods{random_module("layers.0.q", 8, 5, 3, rng), random_module("layers.0.v", 4, 5, 2, rng)};
  write_adapter(dir / "ad", c, mods);
  const auto a = PeftAdapter::open(dir / "ad");
  EXPECT_EQ(a.file().metadata().at("format"), "pt");
  ASSERT_EQ(a.modules().size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    const auto& m = a.modules()[i];
    EXPECT_EQ(m.module, mods[i].name);
    EXPECT_EQ(m.base_tensor, mods[i].name + ".weight");
    EXPECT_EQ(m.rank, static_cast<int>(mods[i].rank));
    EXPECT_EQ(m.in, mods[i].in);
    EXPECT_EQ(m.out, mods[i].out);
    EXPECT_DOUBLE_EQ(m.scale, 6.0 / static_cast<double>(mods[i].rank));
    std::vector<float> A(mods[i].A.size()), B(mods[i].B.size());
    a.file().read_as<float>(*m.A, A);
    a.file().read_as<float>(*m.B, B);
    EXPECT_EQ(A, mods[i].A);
    EXPECT_EQ(B, mods[i].B);
  }
  EXPECT_EQ(a.file().at("base_model.model.layers.0.q.lora_A.weight").shape, (std::vector<std::uint64_t>{3, 5}));
  EXPECT_EQ(a.config().rank_pattern, c.rank_pattern);
  LOWRANK_EXPECT_ERROR(write_adapter(dir / "bad", c, {random_module("layers.0.v", 4, 5, 3, rng)}), "layers.0.v",
                       "rank 3", "rank 2");
}

TEST(PeftAdapter, MalformedAdaptersAreRefused) {
  TempDir dir;
  std::mt19937_64 rng(2);
  PeftConfig c;
  c.r = 2;
  const auto m = random_module("l.q", 6, 4, 2, rng);
  auto tensors = [&](bool with_b, std::uint64_t a_rows) {
    std::vector<TensorData> t{{{"base_model.model.l.q.lora_A.weight", Dtype::F32, {a_rows, 4}},
                               std::as_bytes(std::span(m.A).subspan(0, a_rows * 4))}};
    if (with_b) t.push_back({{"base_model.model.l.q.lora_B.weight", Dtype::F32, {6, 2}}, std::as_bytes(std::span(m.B))});
    return t;
  };
  auto make = [&](const std::string& name, const std::string& config, const std::vector<TensorData>& t) {
    fs::create_directories(dir / name);
    write_text(dir / name / "adapter_config.json", config);
    lowrank::io::write_safetensors(dir / name / "adapter_model.safetensors", t);
    return dir / name;
  };
  LOWRANK_EXPECT_ERROR(PeftAdapter::open(make("noB", c.to_json(), tensors(false, 2))), "l.q", "no lora_B");
  LOWRANK_EXPECT_ERROR(PeftAdapter::open(make("rank", c.to_json(), tensors(true, 1))), "l.q", "lora_A is 1x4",
                       "lora_B is 6x2");
  auto c3 = c;
  c3.r = 3;
  LOWRANK_EXPECT_ERROR(PeftAdapter::open(make("cfg", c3.to_json(), tensors(true, 2))), "l.q", "rank 2",
                       "adapter_config.json gives it rank 3");
  auto extra = tensors(true, 2);
  std::vector<float> mag(6, 1.0f);
  extra.push_back({{"base_model.model.l.q.lora_magnitude_vector", Dtype::F32, {6}}, std::as_bytes(std::span(mag))});
  LOWRANK_EXPECT_ERROR(PeftAdapter::open(make("dora", c.to_json(), extra)), "lora_magnitude_vector", "not a LoRA factor");
  LOWRANK_EXPECT_ERROR(PeftAdapter::open(make("json", "{\"r\": ", tensors(true, 2))), "adapter_config.json", "JSON");
  fs::create_directories(dir / "empty");
  LOWRANK_EXPECT_ERROR(PeftAdapter::open(dir / "empty"), "missing adapter_config.json");
  LOWRANK_EXPECT_ERROR(PeftAdapter::open(dir / "nowhere"), "not an adapter folder");
}

// A checkpoint file with one weight per module (stored for `layout`) plus an untouched tensor.
template <class T>
struct Synthetic {
  std::vector<std::vector<T>> weights;
  std::vector<float> bias;
};

template <class T>
Synthetic<T> write_checkpoint(const fs::path& file, const std::vector<Module>& mods, bool conv1d, std::mt19937_64& rng) {
  Synthetic<T> s;
  std::vector<TensorData> t;
  for (const auto& m : mods) s.weights.push_back(random_weights<T>(m.out * m.in, rng));
  s.bias = random_weights<float>(7, rng);
  for (std::size_t i = 0; i < mods.size(); ++i) {
    const auto& m = mods[i];
    const std::vector<std::uint64_t> shape = conv1d ? std::vector<std::uint64_t>{m.in, m.out} : std::vector<std::uint64_t>{m.out, m.in};
    t.push_back({{m.name + ".weight", lowrank::io::dtype_of<T>(), shape}, std::as_bytes(std::span(s.weights[i]))});
  }
  t.push_back({{"untouched.bias", Dtype::F32, {7}}, std::as_bytes(std::span(s.bias))});
  lowrank::io::write_safetensors(file, t);
  return s;
}

template <class T>
std::vector<T> read_tensor(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.at(name);
  std::vector<T> out(t.numel());
  f.read_as<T>(t, out);
  return out;
}

double ulp_of(bf16 x) {
  const double v = std::abs(static_cast<double>(static_cast<float>(x)));
  return v < 0x1.0p-126 ? 0x1.0p-133 : std::ldexp(1.0, std::ilogb(v) - 7);
}

template <class T>
void check_synthetic_merge(bool conv1d) {
  SCOPED_TRACE(testing::Message() << type_name<T>() << (conv1d ? " Conv1D" : " Linear"));
  TempDir dir;
  std::mt19937_64 rng(conv1d ? 7 : 8);
  // The second module spans several 4 MiB chunks of the streaming merge.
  const std::vector<Module> mods{random_module("m.a", 40, 24, 4, rng), random_module("m.big", 1100, 1024, 16, rng)};
  const auto ck = write_checkpoint<T>(dir / "base.safetensors", mods, conv1d, rng);
  PeftConfig c;
  c.r = 4;
  c.lora_alpha = 8;
  c.fan_in_fan_out = conv1d;
  c.rank_pattern = {{"big", 16}};
  write_adapter(dir / "ad", c, mods);
  const auto report = lowrank::io::merge_adapter(dir / "base.safetensors", dir / "ad", dir / "out.safetensors");
  EXPECT_EQ(report.tensors, 3u);
  EXPECT_EQ(report.merged, 2u);
  const auto out = SafetensorsFile::open(dir / "out.safetensors");
  const auto base = SafetensorsFile::open(dir / "base.safetensors");
  EXPECT_TRUE(std::ranges::equal(out.bytes(out.at("untouched.bias")), base.bytes(base.at("untouched.bias"))));
  for (std::size_t k = 0; k < mods.size(); ++k) {
    const auto& m = mods[k];
    const double s = c.scale_for(m.name);
    const auto got = read_tensor<T>(out, m.name + ".weight");
    // Bitwise what one in-memory rank_update on the whole tensor gives.
    auto expect = ck.weights[k];
    const auto stored = conv1d ? lowrank::row_major(expect.data(), static_cast<Index>(m.in), static_cast<Index>(m.out))
                               : lowrank::row_major(expect.data(), static_cast<Index>(m.out), static_cast<Index>(m.in));
    lowrank::rank_update(lowrank::WeightView<T>{stored, conv1d ? lowrank::Layout::in_out : lowrank::Layout::out_in},
                         lowrank::MatrixView<const float>(m.B.data(), static_cast<Index>(m.out), static_cast<Index>(m.rank),
                                                          static_cast<Index>(m.rank), 1),
                         lowrank::MatrixView<const float>(m.A.data(), static_cast<Index>(m.in), static_cast<Index>(m.rank), 1,
                                                          static_cast<Index>(m.in)),
                         s);
    ASSERT_EQ(std::memcmp(got.data(), expect.data(), got.size() * sizeof(T)), 0) << m.name;
    // And within rounding of the float64 truth.
    for (std::uint64_t i = 0; i < m.out; i += 7)
      for (std::uint64_t j = 0; j < m.in; j += 3) {
        const std::size_t at = conv1d ? j * m.out + i : i * m.in + j;
        const double ref = truth(to_double(ck.weights[k][at]), m, s, i, j);
        ASSERT_NEAR(to_double(got[at]), ref, 2 * unit_roundoff<T>() * std::abs(ref) + 1e-5) << m.name << " " << i << "," << j;
      }
  }
}

TEST(Merge, MatchesTheFloat64ReferenceAndOneWholeRankUpdate) {
  check_synthetic_merge<float>(false);
  check_synthetic_merge<float>(true);
  check_synthetic_merge<bf16>(false);
  check_synthetic_merge<bf16>(true);
  check_synthetic_merge<f16>(false);
}

TEST(Merge, DtypeConversionAndStochasticRounding) {
  TempDir dir;
  std::mt19937_64 rng(3);
  const std::vector<Module> mods{random_module("m.big", 1100, 1024, 16, rng)};
  const auto ck = write_checkpoint<float>(dir / "base.safetensors", mods, false, rng);
  PeftConfig c;
  c.r = 16;
  c.lora_alpha = 32;
  write_adapter(dir / "ad", c, mods);
  lowrank::io::MergeOptions o;
  o.dtype = Dtype::BF16;
  lowrank::io::merge_adapter(dir / "base.safetensors", dir / "ad", dir / "near.safetensors", o);
  o.rounding = lowrank::Rounding::stochastic;
  o.seed = 9;
  lowrank::io::merge_adapter(dir / "base.safetensors", dir / "ad", dir / "sr1.safetensors", o);
  lowrank::io::merge_adapter(dir / "base.safetensors", dir / "ad", dir / "sr2.safetensors", o);
  o.seed = 10;
  lowrank::io::merge_adapter(dir / "base.safetensors", dir / "ad", dir / "sr3.safetensors", o);
  EXPECT_EQ(read_bytes(dir / "sr1.safetensors"), read_bytes(dir / "sr2.safetensors")) << "same seed, same bits";
  EXPECT_NE(read_bytes(dir / "sr1.safetensors"), read_bytes(dir / "sr3.safetensors"));
  const auto near = SafetensorsFile::open(dir / "near.safetensors");
  const auto sr = SafetensorsFile::open(dir / "sr1.safetensors");
  EXPECT_EQ(near.at("m.big.weight").dtype, Dtype::BF16);
  EXPECT_EQ(near.at("untouched.bias").dtype, Dtype::BF16);
  const auto& m = mods[0];
  const auto a = read_tensor<bf16>(near, "m.big.weight"), b = read_tensor<bf16>(sr, "m.big.weight");
  // Nearest: the correctly rounded fp32 result (one rounding); stochastic: one of its two neighbours.
  std::size_t differ = 0;
  for (std::uint64_t i = 0; i < m.out; i += 5)
    for (std::uint64_t j = 0; j < m.in; ++j) {
      const std::size_t at = i * m.in + j;
      const double ref = truth(ck.weights[0][at], m, 2.0, i, j);
      const double u = ulp_of(a[at]);
      ASSERT_LE(std::abs(to_double(a[at]) - ref), 0.5 * u * (1 + 1e-3) + 1e-6 * std::abs(ref)) << i << "," << j;
      ASSERT_LE(std::abs(to_double(b[at]) - ref), u * 1.01) << i << "," << j;
      differ += std::bit_cast<std::uint16_t>(a[at]) != std::bit_cast<std::uint16_t>(b[at]);
    }
  EXPECT_GT(differ, 1000u) << "stochastic rounding differs from nearest on a good share of elements";
  const auto bias = read_tensor<bf16>(near, "untouched.bias");
  for (std::size_t i = 0; i < 7; ++i) EXPECT_EQ(std::bit_cast<std::uint16_t>(bias[i]), std::bit_cast<std::uint16_t>(bf16(ck.bias[i])));
}

// ---- bad input: a clear error, no output, inputs untouched -----------------------------------

class MergeErrors : public testing::Test {
 protected:
  TempDir dir;
  std::mt19937_64 rng{5};
  std::vector<Module> mods;
  PeftConfig config;
  std::set<std::string> before;

  void SetUp() override {
    mods = {random_module("m.a", 12, 10, 2, rng)};
    write_checkpoint<float>(dir / "base.safetensors", mods, false, rng);
    config.r = 2;
    config.lora_alpha = 4;
    write_adapter(dir / "ad", config, mods);
    before = dir.listing();
  }
  // Runs a merge that must fail and checks nothing new appeared (no output, no temporaries).
  template <class... F>
  void expect_refused(const fs::path& base, const fs::path& adapter, const fs::path& out, F... fragments) {
    const auto base_bytes = read_bytes(dir / "base.safetensors");
    LOWRANK_EXPECT_ERROR(lowrank::io::merge_adapter(base, adapter, out), fragments...);
    EXPECT_EQ(dir.listing(), before);
    EXPECT_EQ(read_bytes(dir / "base.safetensors"), base_bytes);
  }
};

TEST_F(MergeErrors, ShapeMismatchWithTheBase) {
  mods[0].in = 5;
  mods[0].A.resize(10);
  fs::remove_all(dir / "ad");
  write_adapter(dir / "ad", config, mods);
  before = dir.listing();
  expect_refused(dir / "base.safetensors", dir / "ad", dir / "out.safetensors", "m.a.weight", "[12, 10]", "needs [12, 5]");
}

TEST_F(MergeErrors, TransposedLayoutGetsAHint) {
  auto c = config;
  c.fan_in_fan_out = true;
  fs::remove_all(dir / "ad");
  write_adapter(dir / "ad", c, mods);
  before = dir.listing();
  expect_refused(dir / "base.safetensors", dir / "ad", dir / "out.safetensors", "fan_in_fan_out wrong");
}

TEST_F(MergeErrors, MissingBaseTensor) {
  mods[0].name = "m.zzz";
  fs::remove_all(dir / "ad");
  write_adapter(dir / "ad", config, mods);
  before = dir.listing();
  expect_refused(dir / "base.safetensors", dir / "ad", dir / "out.safetensors", "m.zzz", "no tensor \"m.zzz.weight\"");
}

TEST_F(MergeErrors, NonFiniteDelta) {
  mods[0].B[5] = std::numeric_limits<float>::quiet_NaN();
  fs::remove_all(dir / "ad");
  write_adapter(dir / "ad", config, mods);
  before = dir.listing();
  expect_refused(dir / "base.safetensors", dir / "ad", dir / "out.safetensors", "lora_B(2, 1)", "non-finite");
  mods[0].B[5] = 1e30f;   // B(2, 1)
  mods[0].A[10] = 1e30f;  // A(1, 0): delta(2, 0) overflows fp32
  fs::remove_all(dir / "ad");
  write_adapter(dir / "ad", config, mods);
  before = dir.listing();
  expect_refused(dir / "base.safetensors", dir / "ad", dir / "out.safetensors", "m.a", "beyond the fp32 range");
}

TEST_F(MergeErrors, Fp16OverflowAfterTheMerge) {
  auto c = config;
  c.lora_alpha = 2e4;  // scale 1e4: a delta of tens of thousands, past fp16's 65504 once added
  for (auto& x : mods[0].A) x = 3.0f;
  for (auto& x : mods[0].B) x = 1.5f;
  fs::remove_all(dir / "ad");
  write_adapter(dir / "ad", c, mods);
  before = dir.listing();
  lowrank::io::MergeOptions o;
  o.dtype = Dtype::F16;
  LOWRANK_EXPECT_ERROR(lowrank::io::merge_adapter(dir / "base.safetensors", dir / "ad", dir / "o.safetensors", o),
                       "m.a.weight", "non-finite after the merge");
  EXPECT_EQ(dir.listing(), before);
}

TEST_F(MergeErrors, UnsupportedFeaturesAndOutputsThatAreInputs) {
  write_text(dir / "ad" / "adapter_config.json", R"({"r": 2, "lora_alpha": 4, "use_dora": true, "target_modules": ["a"]})");
  expect_refused(dir / "base.safetensors", dir / "ad", dir / "out.safetensors", "use_dora", "cannot merge yet");
  write_text(dir / "ad" / "adapter_config.json", config.to_json());
  expect_refused(dir / "base.safetensors", dir / "ad", dir / "base.safetensors", "input");
  expect_refused(dir / "base.safetensors", dir / "ad", dir / "ad" / "x.safetensors", "inside the input");
  expect_refused(dir / "missing.safetensors", dir / "ad", dir / "out.safetensors", "missing.safetensors");
}

TEST_F(MergeErrors, FolderOutputsAreReplacedOnlyWhenAsked) {
  fs::create_directories(dir / "ck");
  fs::copy_file(dir / "base.safetensors", dir / "ck" / "model.safetensors");
  write_text(dir / "ck" / "config.json", "{\"x\": 1}");
  fs::create_directories(dir / "out");
  write_text(dir / "out" / "keep.txt", "mine");
  before = dir.listing();
  expect_refused(dir / "ck", dir / "ad", dir / "out", "exists and is not empty");
  EXPECT_EQ(read_bytes(dir / "out" / "keep.txt").size(), 4u);
  lowrank::io::MergeOptions o;
  o.overwrite = true;
  const auto r = lowrank::io::merge_adapter(dir / "ck", dir / "ad", dir / "out", o);
  EXPECT_EQ(r.files, (std::vector<std::string>{"model.safetensors", "config.json"}));
  EXPECT_FALSE(fs::exists(dir / "out" / "keep.txt"));
  EXPECT_EQ(read_bytes(dir / "out" / "config.json"), read_bytes(dir / "ck" / "config.json"));
  for (const auto& e : dir.listing()) EXPECT_EQ(e.find(".lowrank-"), std::string::npos) << e;
}

// ---- the fixtures from the real clients ----------------------------------------------------------

struct FixtureStats {
  std::size_t merged_elements = 0, differ = 0, ours_closer = 0, peft_closer = 0;
};

void check_fixture(const std::string& family) {
  SCOPED_TRACE(family);
  TempDir dir;
  const fs::path root = data_path("peft/" + family);
  const auto report = lowrank::io::merge_adapter(root / "base", root / "adapter", dir / "merged");
  const auto ours = Checkpoint::open(dir / "merged");
  const auto base = Checkpoint::open(root / "base");
  const auto peft = SafetensorsFile::open(root / "merged" / "model.safetensors");
  const auto adapter = PeftAdapter::open(root / "adapter");
  EXPECT_EQ(report.merged, adapter.modules().size());
  EXPECT_EQ(ours.tensor_count(), peft.tensors().size());

  // The output folder mirrors the base: same shard files, index, other files byte for byte.
  std::set<std::string> base_files, our_files;
  for (const auto& e : fs::directory_iterator(root / "base")) base_files.insert(e.path().filename().string());
  for (const auto& e : fs::directory_iterator(dir / "merged")) our_files.insert(e.path().filename().string());
  EXPECT_EQ(our_files, base_files);
  EXPECT_EQ(read_bytes(dir / "merged" / "config.json"), read_bytes(root / "base" / "config.json"));
  if (base.index_name()) {
    std::ifstream a(root / "base" / *base.index_name()), b(dir / "merged" / *base.index_name());
    EXPECT_EQ(nlohmann::json::parse(a), nlohmann::json::parse(b)) << "index (weight map and total size) kept";
  }

  FixtureStats st;
  for (const auto& t : peft.tensors()) {
    const auto e = ours.find(t.name);
    ASSERT_NE(e.info, nullptr) << t.name;
    ASSERT_EQ(e.info->dtype, t.dtype) << t.name;
    ASSERT_EQ(e.info->shape, t.shape) << t.name;
    const auto* mod = [&]() -> const lowrank::io::LoraModule* {
      for (const auto& m : adapter.modules())
        if (m.base_tensor == t.name) return &m;
      return nullptr;
    }();
    const auto b = base.find(t.name);
    if (mod == nullptr) {  // untouched: byte-identical to PEFT's output and to the base
      EXPECT_TRUE(std::ranges::equal(e.shard->file.bytes(*e.info), peft.bytes(t))) << t.name;
      EXPECT_TRUE(std::ranges::equal(e.shard->file.bytes(*e.info), b.shard->file.bytes(*b.info))) << t.name;
      continue;
    }
    // The float64 truth from the base and the adapter.
    std::vector<double> w(t.numel()), A(mod->A->numel()), B(mod->B->numel()), got(t.numel()), ref(t.numel());
    b.shard->file.read_as<double>(*b.info, w);
    adapter.file().read_as<double>(*mod->A, A);
    adapter.file().read_as<double>(*mod->B, B);
    e.shard->file.read_as<double>(*e.info, got);
    peft.read_as<double>(t, ref);
    const bool conv1d = adapter.config().fan_in_fan_out;
    double err2 = 0, ref2 = 0, truth_err2 = 0;
    for (std::uint64_t i = 0; i < mod->out; ++i)
      for (std::uint64_t j = 0; j < mod->in; ++j) {
        double d = 0;
        for (int k = 0; k < mod->rank; ++k) d += B[i * mod->rank + k] * A[k * mod->in + j];
        const std::size_t at = conv1d ? j * mod->out + i : i * mod->in + j;
        const double exact = w[at] + mod->scale * d;
        err2 += (got[at] - ref[at]) * (got[at] - ref[at]);
        ref2 += ref[at] * ref[at];
        truth_err2 += (got[at] - exact) * (got[at] - exact);
        if (t.dtype == Dtype::BF16) {
          ++st.merged_elements;
          const auto go = std::bit_cast<std::uint16_t>(bf16(static_cast<float>(got[at])));
          const auto pe = std::bit_cast<std::uint16_t>(bf16(static_cast<float>(ref[at])));
          if (go != pe) {
            ++st.differ;
            // One unit in the last place at most: adjacent bf16 values of the same sign.
            EXPECT_EQ(go >> 15, pe >> 15) << t.name << " " << i << "," << j;
            EXPECT_LE(std::abs(static_cast<int>(go) - static_cast<int>(pe)), 1) << t.name << " " << i << "," << j;
            (std::abs(got[at] - exact) < std::abs(ref[at] - exact) ? st.ours_closer : st.peft_closer) += 1;
          }
        }
      }
    if (t.dtype == Dtype::F32) {
      EXPECT_LE(std::sqrt(err2 / ref2), 1e-6) << t.name << ": relative difference to PEFT";
      EXPECT_LE(std::sqrt(truth_err2 / ref2), 1e-6) << t.name << ": relative error to the float64 truth";
    }
  }
  if (st.merged_elements > 0) {
    const double share = static_cast<double>(st.differ) / static_cast<double>(st.merged_elements);
    std::printf("[ %s ] bf16: %zu of %zu merged elements differ from PEFT by one ulp (%.3f%%); closer to the float64 "
                "truth: lowrank %zu, PEFT %zu\n",
                family.c_str(), st.differ, st.merged_elements, 100 * share, st.ours_closer, st.peft_closer);
    testing::Test::RecordProperty("bf16_differ", static_cast<int>(st.differ));
    testing::Test::RecordProperty("bf16_ours_closer", static_cast<int>(st.ours_closer));
    EXPECT_LT(share, 0.01) << "rounding once from fp32 should agree with PEFT almost everywhere";
  }
}

TEST(PeftFixtures, Gpt2Conv1dFanInFanOut) { check_fixture("gpt2"); }
TEST(PeftFixtures, LlamaRsloraWithRankAndAlphaPatterns) { check_fixture("llama_rslora"); }
TEST(PeftFixtures, LlamaBf16Sharded) { check_fixture("llama_bf16"); }

TEST(PeftFixtures, LowrankWrittenAdapterMergesLikeTheOriginal) {
  // Re-write the PEFT adapter with lowrank's writer, merge again: the same bytes.
  TempDir dir;
  const fs::path root = data_path("peft/llama_rslora");
  const auto a = PeftAdapter::open(root / "adapter");
  std::vector<std::vector<float>> keep;
  std::vector<LoraFactors> f;
  for (const auto& m : a.modules()) {
    keep.emplace_back(m.A->numel());
    a.file().read_as<float>(*m.A, keep.back());
    keep.emplace_back(m.B->numel());
    a.file().read_as<float>(*m.B, keep.back());
    f.push_back({m.module, static_cast<std::uint64_t>(m.rank), m.in, m.out, keep[keep.size() - 2], keep.back()});
  }
  lowrank::io::write_peft_adapter(dir / "ad", a.config(), f);
  // tools/fixtures/check_peft_loads.py loads this adapter with PEFT itself.
  if (const char* keep = std::getenv("LOWRANK_WRITE_ADAPTER_TO")) lowrank::io::write_peft_adapter(keep, a.config(), f);
  lowrank::io::merge_adapter(root / "base", root / "adapter", dir / "one");
  lowrank::io::merge_adapter(root / "base", dir / "ad", dir / "two");
  EXPECT_EQ(read_bytes(dir / "one" / "model.safetensors"), read_bytes(dir / "two" / "model.safetensors"));
}

}  // namespace
