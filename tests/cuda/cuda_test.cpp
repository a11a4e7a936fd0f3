// lowrank::cuda against the CPU implementation: rank update (bitwise on FMA targets), LoRA forward
// (to rounding), EGGROLL forward (float64 host reference from es::noise_normal), the noise
// itself (bitwise) and the randomized SVD (against linalg::truncated_svd with the same test matrix). Random inputs, outputs poisoned with NaN, awkward sizes. Without a device the
// GPU tests skip with the runtime's reason; the argument checks that need no device still run.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <Eigen/Core>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "launch.hpp"  // src/cuda: the rounding self-check
#include "lowrank/cuda/eggroll.hpp"
#include "lowrank/cuda/lora_forward.hpp"
#include "lowrank/cuda/projection.hpp"
#include "lowrank/cuda/rank_update.hpp"
#include "lowrank/cuda/svd.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/es/noise.hpp"
#include "lowrank/kernels/lora_forward.hpp"
#include "lowrank/kernels/rank_update.hpp"
#include "lowrank/kernels/targets.hpp"
#include "lowrank/linalg/svd.hpp"

namespace {

using lowrank::bf16;
using lowrank::f16;
using lowrank::cuda::DeviceMatrix;

#define REQUIRE_GPU()                                                         \
  do {                                                                        \
    std::string why_;                                                         \
    if (!lowrank::cuda::device_available(&why_)) GTEST_SKIP() << "no CUDA device: " << why_; \
  } while (0)

void check(cudaError_t s, const char* what) {
  ASSERT_EQ(s, cudaSuccess) << what << ": " << cudaGetErrorString(s);
}

// Device memory for n elements of T, freed on scope exit.
template <class T>
struct Buffer {
  T* p = nullptr;
  std::size_t n = 0;
  explicit Buffer(std::size_t count) : n(count) {
    if (cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(count, 1) * sizeof(T)) != cudaSuccess) {
      p = nullptr;
      ADD_FAILURE() << "cudaMalloc of " << count * sizeof(T) << " bytes failed";
    }
  }
  ~Buffer() {
    if (p != nullptr) cudaFree(p);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void upload(const std::vector<T>& h) {
    ASSERT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
};

template <class T>
std::vector<T> random_vector(std::size_t n, std::mt19937_64& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(rng));
  return v;
}

template <class T>
std::uint32_t bits_of(T x) {
  if constexpr (sizeof(T) == 4) {
    return std::bit_cast<std::uint32_t>(x);
  } else {
    return std::bit_cast<std::uint16_t>(x);
  }
}

// ---- rank update ---------------------------------------------------------------------------------

struct RankCase {
  std::int64_t m, n, r;
  bool col_major;
  std::int64_t pad;    // extra elements per leading dimension
  std::int64_t offset;  // elements before W's first element (misaligns the fast path when odd)
};

template <class TW>
void run_rank_update_case(const RankCase& c, lowrank::Rounding rounding, std::uint64_t seed, bool pipelined) {
  std::mt19937_64 rng(seed);
  const std::int64_t ld = (c.col_major ? c.m : c.n) + c.pad;
  const std::int64_t outer = c.col_major ? c.n : c.m;
  const std::size_t w_elems = static_cast<std::size_t>(c.offset + ld * outer);
  std::vector<TW> w_host = random_vector<TW>(w_elems, rng);
  const std::vector<float> u_host = random_vector<float>(static_cast<std::size_t>(c.m * c.r), rng);
  const std::vector<float> v_host = random_vector<float>(static_cast<std::size_t>(c.n * c.r), rng);
  const double alpha = 0.37;
  lowrank::RankUpdateOptions options;
  options.rounding = rounding;
  options.seed = seed * 7 + 1;
  options.stream = 3;
  options.index_row0 = 5;
  options.index_col0 = 2;
  options.index_cols = static_cast<std::uint64_t>(c.n) + 9;

  // CPU reference on a copy.
  std::vector<TW> expect = w_host;
  auto view_of = [&](TW* base) {
    return c.col_major ? lowrank::col_major(base + c.offset, c.m, c.n, ld) : lowrank::row_major(base + c.offset, c.m, c.n, ld);
  };
  lowrank::rank_update(view_of(expect.data()), lowrank::row_major<const float>(u_host.data(), c.m, c.r),
                       lowrank::row_major<const float>(v_host.data(), c.n, c.r), alpha, options);

  Buffer<TW> w(w_elems);
  Buffer<float> u(u_host.size()), v(v_host.size());
  w.upload(w_host);
  u.upload(u_host);
  v.upload(v_host);
  const DeviceMatrix<TW> wd = c.col_major ? lowrank::cuda::device_col_major(w.p + c.offset, c.m, c.n, ld)
                                          : lowrank::cuda::device_row_major(w.p + c.offset, c.m, c.n, ld);
  lowrank::cuda::rank_update<TW>(wd, lowrank::cuda::device_row_major<const float>(u.p, c.m, c.r),
                                 lowrank::cuda::device_row_major<const float>(v.p, c.n, c.r), alpha, options,
                                 nullptr, lowrank::cuda::DeviceRankUpdateOptions{pipelined});
  check(cudaDeviceSynchronize(), "rank_update");
  const std::vector<TW> got = w.download();
  const bool exact = lowrank::active_target() != lowrank::Target::scalar;
  std::size_t mismatches = 0;
  for (std::size_t e = 0; e < w_elems; ++e) {
    const float a = static_cast<float>(got[e]), b = static_cast<float>(expect[e]);
    const bool same = exact ? bits_of(got[e]) == bits_of(expect[e])
                            : std::abs(a - b) <= 1e-5f * (1 + std::abs(b)) + (sizeof(TW) == 2 ? 0.01f * std::abs(b) : 0);
    if (!same && ++mismatches <= 5) {
      ADD_FAILURE() << "element " << e << ": GPU " << a << " CPU " << b << " (m=" << c.m << " n=" << c.n
                    << " r=" << c.r << (c.col_major ? " col-major" : " row-major")
                    << (pipelined ? ", pipelined kernel" : "") << ")";
    }
  }
  EXPECT_EQ(mismatches, 0u);
}

const RankCase kRankCases[] = {
    {37, 53, 3, false, 0, 0},     {64, 1027, 16, false, 4, 0}, {130, 2050, 1, false, 0, 0},
    {70, 515, 7, false, 8, 1},    {33, 17, 20, false, 0, 0},   {45, 91, 5, true, 3, 0},
    {1, 300, 2, false, 0, 0},     {129, 1, 4, false, 0, 0},    {200, 4100, 16, false, 0, 0},
    // Aligned rows (the bandwidth kernels): 16-byte rows for every type, tails, uneven row chunks.
    {100, 1000, 1, false, 0, 0},  {67, 2056, 2, false, 8, 0},  {130, 520, 16, false, 0, 0},
    {64, 4096, 8, false, 0, 0},   {300, 2048, 3, false, 0, 0}, {66, 1032, 1, false, 16, 0},
    {40, 264, 2, true, 0, 0},
    // Tall and narrow: more than one 64-row chunk per block (the pipelined kernel carries a batch
    // of loads across chunks), a partial last chunk, a partial column strip (n = 26).
    {38437, 26, 16, false, 2, 0}, {38437, 40, 1, false, 8, 0},
    // 16-bit storage at rank <= 2 takes 8-element vectors: n % 8 != 0 gives a partial last strip.
    {70, 1030, 2, false, 2, 0},
};

TEST(CudaRankUpdate, Fp32MatchesCpu) {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (const bool pipelined : {false, true})
    for (const RankCase& c : kRankCases)
      run_rank_update_case<float>(c, lowrank::Rounding::nearest_even, seed++, pipelined);
}

TEST(CudaRankUpdate, Bf16MatchesCpuNearestAndStochastic) {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (const bool pipelined : {false, true})
    for (const RankCase& c : kRankCases) {
      run_rank_update_case<bf16>(c, lowrank::Rounding::nearest_even, seed++, pipelined);
      run_rank_update_case<bf16>(c, lowrank::Rounding::stochastic, seed++, pipelined);
    }
}

TEST(CudaRankUpdate, Fp16MatchesCpuNearestAndStochastic) {
  REQUIRE_GPU();
  std::uint64_t seed = 200;
  for (const bool pipelined : {false, true})
    for (const RankCase& c : kRankCases) {
      run_rank_update_case<f16>(c, lowrank::Rounding::nearest_even, seed++, pipelined);
      run_rank_update_case<f16>(c, lowrank::Rounding::stochastic, seed++, pipelined);
    }
}

// W filled with random bit patterns (every exponent: subnormals, infinities, NaNs of both signs),
// small and large products (overflow to infinity): both kernels, every storage type, equal to
// the CPU bit for bit except that a NaN only has to stay a NaN (the device's FMA returns the
// canonical NaN, the CPU's keeps the payload).
template <class TW>
void run_special_values(bool pipelined, std::int64_t r, float scale, std::uint64_t seed) {
  const std::int64_t m = 70, n = 1024;
  std::mt19937_64 rng(seed);
  std::vector<TW> w_host(static_cast<std::size_t>(m * n));
  for (auto& x : w_host) {
    if constexpr (sizeof(TW) == 4) {
      x = std::bit_cast<float>(static_cast<std::uint32_t>(rng()));
    } else {
      x = std::bit_cast<TW>(static_cast<std::uint16_t>(rng()));
    }
  }
  const std::vector<float> u_host = random_vector<float>(static_cast<std::size_t>(m * r), rng, scale);
  const std::vector<float> v_host = random_vector<float>(static_cast<std::size_t>(n * r), rng, scale);
  std::vector<TW> expect = w_host;
  lowrank::rank_update(lowrank::row_major(expect.data(), m, n), lowrank::row_major<const float>(u_host.data(), m, r),
                       lowrank::row_major<const float>(v_host.data(), n, r), 0.37);
  Buffer<TW> w(w_host.size());
  Buffer<float> u(u_host.size()), v(v_host.size());
  w.upload(w_host);
  u.upload(u_host);
  v.upload(v_host);
  lowrank::cuda::rank_update<TW>(lowrank::cuda::device_row_major(w.p, m, n),
                                 lowrank::cuda::device_row_major<const float>(u.p, m, r),
                                 lowrank::cuda::device_row_major<const float>(v.p, n, r), 0.37, {}, nullptr,
                                 lowrank::cuda::DeviceRankUpdateOptions{pipelined});
  check(cudaDeviceSynchronize(), "rank_update");
  const std::vector<TW> got = w.download();
  std::size_t mismatches = 0;
  for (std::size_t e = 0; e < got.size(); ++e) {
    const float a = static_cast<float>(got[e]), b = static_cast<float>(expect[e]);
    const bool same = (a != a && b != b) || bits_of(got[e]) == bits_of(expect[e]);
    if (!same && ++mismatches <= 5) {
      ADD_FAILURE() << "element " << e << ": W was bits 0x" << std::hex << bits_of(w_host[e]) << ", GPU 0x"
                    << bits_of(got[e]) << ", CPU 0x" << bits_of(expect[e]) << std::dec << " (r=" << r
                    << ", scale " << scale << (pipelined ? ", pipelined kernel" : "") << ")";
    }
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST(CudaRankUpdate, SpecialValuesInWRoundAsOnTheCpu) {
  REQUIRE_GPU();
  if (lowrank::active_target() == lowrank::Target::scalar) GTEST_SKIP() << "the CPU reference needs an FMA target";
  std::uint64_t seed = 300;
  for (const bool pipelined : {false, true})
    for (const std::int64_t r : {1, 16})
      for (const float scale : {1e-3f, 1e19f}) {
        run_special_values<float>(pipelined, r, scale, seed++);
        run_special_values<bf16>(pipelined, r, scale, seed++);
        run_special_values<f16>(pipelined, r, scale, seed++);
      }
}

// The pipelined kernel rounds 16-bit storage with the hardware conversion: the same bits as the
// integer code (that the CPU uses too) for all 2^32 float bit patterns, in both halves of a word.
TEST(CudaRankUpdate, HardwareRoundingIsTheIntegerRoundingForEveryFloat) {
  REQUIRE_GPU();
  Buffer<unsigned long long> counts(2);
  counts.upload({0, 0});
  check(static_cast<cudaError_t>(lowrank::cuda::detail::launch_rounding_self_check(counts.p, nullptr)),
        "rounding self-check launch");
  check(cudaDeviceSynchronize(), "rounding self-check");
  const std::vector<unsigned long long> bad = counts.download();
  EXPECT_EQ(bad[0], 0u) << "bf16 words that differ";
  EXPECT_EQ(bad[1], 0u) << "fp16 words that differ";
}

TEST(CudaRankUpdate, BadArgumentsThrowWithoutTouchingW) {
  // Shape errors are found before any device call: these run without a GPU too.
  auto* fake = reinterpret_cast<float*>(std::uintptr_t{4096});
  const auto w = lowrank::cuda::device_row_major(fake, 8, 8);
  const auto u = lowrank::cuda::device_row_major<const float>(fake + 1000, 7, 2);
  const auto v = lowrank::cuda::device_row_major<const float>(fake + 2000, 8, 2);
  EXPECT_THROW(lowrank::cuda::rank_update<float>(w, u, v, 1.0), lowrank::Error);
  const auto u8 = lowrank::cuda::device_row_major<const float>(fake + 1000, 8, 2);
  EXPECT_THROW(lowrank::cuda::rank_update<float>(w, u8, v, std::nan("")), lowrank::Error);
  const auto u_overlap = lowrank::cuda::device_row_major<const float>(fake + 10, 8, 2);
  EXPECT_THROW(lowrank::cuda::rank_update<float>(w, u_overlap, v, 1.0), lowrank::Error);
  const auto v0 = lowrank::cuda::device_row_major<const float>(fake + 2000, 8, 0);
  const auto u0 = lowrank::cuda::device_row_major<const float>(fake + 1000, 8, 0);
  EXPECT_THROW(lowrank::cuda::rank_update<float>(w, u0, v0, 1.0), lowrank::Error);
  try {
    lowrank::cuda::rank_update<float>(w, u, v, 1.0);
  } catch (const lowrank::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda::rank_update: U has 7 rows, W is 8x8"), std::string::npos) << e.what();
  }
}

TEST(CudaRankUpdate, HostPointerIsRejected) {
  REQUIRE_GPU();
  std::vector<float> host(64, 1.0f);
  Buffer<float> u(16), v(16);
  EXPECT_THROW(lowrank::cuda::rank_update<float>(lowrank::cuda::device_row_major(host.data(), 8, 8),
                                                 lowrank::cuda::device_row_major<const float>(u.p, 8, 2),
                                                 lowrank::cuda::device_row_major<const float>(v.p, 8, 2), 1.0),
               lowrank::Error);
  for (float x : host) EXPECT_EQ(x, 1.0f);
}

// ---- LoRA forward --------------------------------------------------------------------------------

template <class T>
double rel_error(const std::vector<T>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double g = static_cast<double>(static_cast<float>(got[i]));
    if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
    num += (g - ref[i]) * (g - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

template <class T>
std::vector<float> widen(const std::vector<T>& v) {
  std::vector<float> f(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) f[i] = static_cast<float>(v[i]);
  return f;
}

template <class T>
void run_lora_case(std::int64_t tokens, std::int64_t in, std::int64_t out, std::int64_t r, bool w_col_major,
                   std::uint64_t seed, const lowrank::cuda::DeviceLoraOptions& options = {}) {
  std::mt19937_64 rng(seed);
  const auto x = random_vector<T>(static_cast<std::size_t>(tokens * in), rng);
  const auto w = random_vector<T>(static_cast<std::size_t>(out * in), rng, 0.05f);
  const auto a = random_vector<T>(static_cast<std::size_t>(r * in), rng, 0.1f);
  const auto b = random_vector<T>(static_cast<std::size_t>(out * r), rng, 0.1f);
  const double scale = 1.7;
  // CPU reference on the widened inputs.
  const auto xf = widen(x), wf = widen(w), af = widen(a), bf = widen(b);
  std::vector<float> ref(static_cast<std::size_t>(tokens * out));
  // Column-major W: element (o, i) at o + i * out (the in x out layout in memory).
  const auto w_view = lowrank::WeightView<const float>{
      w_col_major ? lowrank::col_major<const float>(wf.data(), out, in) : lowrank::row_major<const float>(wf.data(), out, in),
      lowrank::Layout::out_in};
  lowrank::lora_forward<float>(lowrank::row_major<const float>(xf.data(), tokens, in), w_view,
                               lowrank::row_major<const float>(af.data(), r, in),
                               lowrank::row_major<const float>(bf.data(), out, r), scale,
                               lowrank::row_major(ref.data(), tokens, out));
  Buffer<T> xd(x.size()), wd(w.size()), ad(std::max<std::size_t>(a.size(), 1)), bd(std::max<std::size_t>(b.size(), 1)),
      yd(ref.size());
  xd.upload(x);
  wd.upload(w);
  if (r > 0) ad.upload(a), bd.upload(b);
  check(cudaMemset(yd.p, 0xFF, ref.size() * sizeof(T)), "poison Y");  // NaN in fp32 and bf16
  const std::size_t ws_bytes = lowrank::cuda::lora_forward_workspace_bytes(tokens, r);
  Buffer<unsigned char> ws(ws_bytes);
  const DeviceMatrix<const T> wv = w_col_major ? lowrank::cuda::device_col_major<const T>(wd.p, out, in)
                                               : lowrank::cuda::device_row_major<const T>(wd.p, out, in);
  lowrank::cuda::lora_forward<T>(lowrank::cuda::device_row_major<const T>(xd.p, tokens, in), wv,
                                 lowrank::cuda::device_row_major<const T>(ad.p, r, in),
                                 lowrank::cuda::device_row_major<const T>(bd.p, out, r), scale,
                                 lowrank::cuda::device_row_major<T>(yd.p, tokens, out), ws.p, ws_bytes, nullptr,
                                 options);
  check(cudaDeviceSynchronize(), "lora_forward");
  const double err = rel_error(yd.download(), ref);
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1.5e-2;
  EXPECT_LT(err, tol) << "tokens=" << tokens << " in=" << in << " out=" << out << " r=" << r
                      << " options=" << options.fp32_one_pass_max_tokens << "/" << options.bf16_one_pass_max_tokens
                      << "/" << options.term_max_tokens;
}

// Kernel choices: the default paths, then each optional kernel forced on.
lowrank::cuda::DeviceLoraOptions one_pass(std::int64_t tokens) {
  lowrank::cuda::DeviceLoraOptions o;
  o.fp32_one_pass_max_tokens = tokens;
  o.bf16_one_pass_max_tokens = tokens;
  return o;
}
lowrank::cuda::DeviceLoraOptions cublas_only() {
  lowrank::cuda::DeviceLoraOptions o;
  o.fp32_one_pass_max_tokens = 0;
  o.bf16_one_pass_max_tokens = 0;
  o.term_max_tokens = 0;
  return o;
}
lowrank::cuda::DeviceLoraOptions term(std::int64_t tokens) {
  lowrank::cuda::DeviceLoraOptions o = cublas_only();
  o.term_max_tokens = tokens;
  return o;
}

TEST(CudaLoraForward, Fp32MatchesCpu) {
  REQUIRE_GPU();
  run_lora_case<float>(1, 96, 77, 16, false, 1);       // default: one-pass FMA kernel
  run_lora_case<float>(5, 130, 67, 3, false, 2);       // cuBLAS
  run_lora_case<float>(67, 257, 129, 16, true, 3);     // cuBLAS, column-major W
  run_lora_case<float>(33, 64, 50, 0, false, 4);       // no adapter
  run_lora_case<float>(16, 264, 77, 16, false, 5, term(512));
  run_lora_case<float>(3, 1000, 45, 5, false, 6);      // one-pass, loop remainder
  run_lora_case<float>(1, 96, 77, 16, false, 7, cublas_only());
  run_lora_case<float>(2, 64, 31, 0, false, 8);        // one-pass without adapter
  run_lora_case<float>(41, 512, 96, 16, false, 9, term(512));  // term kernel, odd token count
  run_lora_case<float>(600, 64, 40, 2, false, 10, term(512));  // above the term limit: cuBLAS
}

TEST(CudaLoraForward, Bf16MatchesCpu) {
  REQUIRE_GPU();
  run_lora_case<bf16>(1, 96, 77, 16, false, 11);                 // default: cuBLAS
  run_lora_case<bf16>(16, 130, 67, 3, false, 12);
  run_lora_case<bf16>(67, 258, 129, 16, true, 13);
  run_lora_case<bf16>(300, 512, 300, 8, false, 14, term(512));   // term kernel
  run_lora_case<bf16>(16, 264, 77, 16, false, 15, one_pass(16)); // in % 32 != 0: FMA only to 4 tokens
  run_lora_case<bf16>(3, 264, 45, 5, false, 16, one_pass(16));   // FMA one-pass kernel
  run_lora_case<bf16>(1, 96, 77, 16, false, 17, one_pass(16));   // tensor-core kernel
  run_lora_case<bf16>(5, 256, 77, 3, false, 18, one_pass(16));   // tensor-core kernel, one n-tile
  run_lora_case<bf16>(16, 512, 50, 16, false, 19, one_pass(16)); // two n-tiles
  run_lora_case<bf16>(12, 1024, 129, 7, false, 20, one_pass(16));
  run_lora_case<bf16>(9, 2080, 33, 0, false, 21, one_pass(16));  // no adapter; 65 chunks
  run_lora_case<bf16>(1, 96, 77, 16, false, 22, term(512));
  lowrank::cuda::DeviceLoraOptions fma = one_pass(4);
  fma.bf16_one_pass_tensor_cores = false;
  run_lora_case<bf16>(1, 4096, 333, 16, false, 23, fma);         // FMA one-pass kernel where mma could run
  run_lora_case<bf16>(4, 512, 129, 16, false, 24, fma);
  run_lora_case<bf16>(5, 512, 129, 16, false, 25, fma);          // above 4 tokens: cuBLAS
}

TEST(CudaLoraForward, BadArgumentsThrow) {
  auto* fake = reinterpret_cast<float*>(std::uintptr_t{1} << 20);
  const auto x = lowrank::cuda::device_row_major<const float>(fake, 4, 8);
  const auto w = lowrank::cuda::device_row_major<const float>(fake + 100, 6, 8);
  const auto a = lowrank::cuda::device_row_major<const float>(fake + 200, 2, 8);
  const auto b = lowrank::cuda::device_row_major<const float>(fake + 300, 6, 2);
  const auto y = lowrank::cuda::device_row_major<float>(fake + 400, 4, 6);
  const auto y_bad = lowrank::cuda::device_row_major<float>(fake + 400, 4, 5);
  void* ws = fake + 1024;
  EXPECT_THROW(lowrank::cuda::lora_forward<float>(x, w, a, b, 1.0, y_bad, ws, 4096), lowrank::Error);
  EXPECT_THROW(lowrank::cuda::lora_forward<float>(x, w, a, b, INFINITY, y, ws, 4096), lowrank::Error);
  EXPECT_THROW(lowrank::cuda::lora_forward<float>(x, w, a, b, 1.0, y, ws, 8), lowrank::Error);  // workspace too small
  const auto y_overlap = lowrank::cuda::device_row_major<float>(fake + 2, 4, 6);
  EXPECT_THROW(lowrank::cuda::lora_forward<float>(x, w, a, b, 1.0, y_overlap, ws, 4096), lowrank::Error);
  const DeviceMatrix<const float> w_strided(fake + 100, 6, 8, 16, 2);
  EXPECT_THROW(lowrank::cuda::lora_forward<float>(x, w_strided, a, b, 1.0, y, ws, 4096), lowrank::Error);
}

// ---- EGGROLL -------------------------------------------------------------------------------------

TEST(CudaEggroll, NoiseFactorsAreBitwiseTheHostGenerator) {
  REQUIRE_GPU();
  for (std::int64_t rank : {1, 3, 16}) {
    const std::int64_t in = 131, out = 77;
    const lowrank::es::NoiseKey key{0x1234'5678'9ABCull + static_cast<std::uint64_t>(rank), 7, 3};
    const std::uint32_t index = 41;
    Buffer<float> a(static_cast<std::size_t>(out * rank)), b(static_cast<std::size_t>(in * rank));
    check(cudaMemset(a.p, 0xFF, a.n * sizeof(float)), "poison");
    check(cudaMemset(b.p, 0xFF, b.n * sizeof(float)), "poison");
    lowrank::cuda::eggroll_noise_factors(key, index, lowrank::cuda::device_row_major(a.p, out, rank),
                                         lowrank::cuda::device_row_major(b.p, in, rank));
    check(cudaDeviceSynchronize(), "noise");
    const auto ah = a.download(), bh = b.download();
    std::size_t bad = 0;
    for (std::int64_t j = 0; j < in; ++j)
      for (std::int64_t c = 0; c < rank; ++c) {
        const float h = lowrank::es::noise_normal(key, index, static_cast<std::uint64_t>(j * rank + c));
        bad += std::bit_cast<std::uint32_t>(h) != std::bit_cast<std::uint32_t>(bh[static_cast<std::size_t>(j * rank + c)]);
      }
    for (std::int64_t i = 0; i < out; ++i)
      for (std::int64_t c = 0; c < rank; ++c) {
        const float h = lowrank::es::noise_normal(key, index, static_cast<std::uint64_t>(in * rank + i * rank + c));
        bad += std::bit_cast<std::uint32_t>(h) != std::bit_cast<std::uint32_t>(ah[static_cast<std::size_t>(i * rank + c)]);
      }
    EXPECT_EQ(bad, 0u) << "rank " << rank;
  }
}

template <class T>
void run_eggroll_case(std::int64_t rows, std::int64_t in, std::int64_t out, const lowrank::cuda::EggrollPopulation& pop,
                      std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto x = random_vector<T>(static_cast<std::size_t>(rows * in), rng);
  const auto w = random_vector<T>(static_cast<std::size_t>(out * in), rng, 0.05f);
  // float64 reference: Y_i = X_i W^T + sign sigma/sqrt(r) (X_i B_k) A_k^T.
  std::vector<float> ref(static_cast<std::size_t>(rows * out));
  const std::int64_t r = pop.rank;
  for (std::int64_t i = 0; i < rows; ++i) {
    const auto mn = lowrank::es::member_noise(pop.member0 + i, pop.population, pop.antithetic);
    std::vector<double> t(static_cast<std::size_t>(r), 0.0);
    for (std::int64_t j = 0; j < in; ++j)
      for (std::int64_t c = 0; c < r; ++c)
        t[static_cast<std::size_t>(c)] += static_cast<double>(static_cast<float>(x[static_cast<std::size_t>(i * in + j)])) *
                                          lowrank::es::noise_normal(pop.key, mn.index, static_cast<std::uint64_t>(j * r + c));
    for (std::int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (std::int64_t j = 0; j < in; ++j)
        acc += static_cast<double>(static_cast<float>(x[static_cast<std::size_t>(i * in + j)])) *
               static_cast<double>(static_cast<float>(w[static_cast<std::size_t>(o * in + j)]));
      double low = 0;
      for (std::int64_t c = 0; c < r; ++c)
        low += t[static_cast<std::size_t>(c)] *
               lowrank::es::noise_normal(pop.key, mn.index, static_cast<std::uint64_t>(in * r + o * r + c));
      ref[static_cast<std::size_t>(i * out + o)] =
          static_cast<float>(acc + mn.sign * pop.sigma / std::sqrt(static_cast<double>(r)) * low);
    }
  }
  Buffer<T> xd(x.size()), wd(w.size()), yd(ref.size());
  xd.upload(x);
  wd.upload(w);
  check(cudaMemset(yd.p, 0xFF, ref.size() * sizeof(T)), "poison Y");
  lowrank::cuda::eggroll_forward<T>(lowrank::cuda::device_row_major<const T>(xd.p, rows, in),
                                    lowrank::cuda::device_row_major<const T>(wd.p, out, in), pop,
                                    lowrank::cuda::device_row_major<T>(yd.p, rows, out));
  check(cudaDeviceSynchronize(), "eggroll_forward");
  const double err = rel_error(yd.download(), ref);
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1.5e-2;
  EXPECT_LT(err, tol) << "rows=" << rows << " in=" << in << " out=" << out << " r=" << r
                      << " antithetic=" << static_cast<int>(pop.antithetic) << " member0=" << pop.member0;
}

TEST(CudaEggroll, ForwardMatchesFloat64Reference) {
  REQUIRE_GPU();
  using lowrank::es::Antithetic;
  std::uint64_t seed = 300;
  for (const Antithetic anti : {Antithetic::interleaved, Antithetic::halves, Antithetic::none}) {
    for (const std::int64_t r : {1, 3, 16}) {
      lowrank::cuda::EggrollPopulation pop;
      pop.key = {99 + static_cast<std::uint64_t>(r), 2, 5};
      pop.rank = r;
      pop.sigma = 0.3;
      pop.population = 10;
      pop.antithetic = anti;
      run_eggroll_case<float>(10, 131, 67, pop, seed++);
      run_eggroll_case<bf16>(10, 130, 67, pop, seed++);
      pop.population = 24;
      pop.member0 = 3;  // odd offset: no pairs in one block
      run_eggroll_case<float>(7, 64, 33, pop, seed++);
      run_eggroll_case<bf16>(7, 64, 33, pop, seed++);
    }
  }
}

TEST(CudaEggroll, BadArgumentsThrow) {
  auto* fake = reinterpret_cast<float*>(std::uintptr_t{1} << 20);
  const auto x = lowrank::cuda::device_row_major<const float>(fake, 4, 8);
  const auto w = lowrank::cuda::device_row_major<const float>(fake + 100, 6, 8);
  const auto y = lowrank::cuda::device_row_major<float>(fake + 400, 4, 6);
  lowrank::cuda::EggrollPopulation pop;
  pop.population = 4;
  pop.sigma = 0.1;
  pop.rank = 17;
  EXPECT_THROW(lowrank::cuda::eggroll_forward<float>(x, w, pop, y), lowrank::Error);
  pop.rank = 1;
  pop.population = 3;
  EXPECT_THROW(lowrank::cuda::eggroll_forward<float>(x, w, pop, y), lowrank::Error);  // odd, antithetic
  pop.population = 4;
  pop.member0 = 2;
  EXPECT_THROW(lowrank::cuda::eggroll_forward<float>(x, w, pop, y), lowrank::Error);  // past the population
  pop.member0 = 0;
  pop.sigma = NAN;
  EXPECT_THROW(lowrank::cuda::eggroll_forward<float>(x, w, pop, y), lowrank::Error);
}

// ---- projections ---------------------------------------------------------------------------------

// A host matrix in a device buffer, row- or column-major.
struct DeviceCopy {
  Buffer<float> buf;
  std::int64_t rows, cols;
  bool row_major;
  DeviceCopy(const Eigen::MatrixXf& M, bool rm)
      : buf(static_cast<std::size_t>(std::max<Eigen::Index>(M.size(), 1))), rows(M.rows()), cols(M.cols()), row_major(rm) {
    std::vector<float> h(buf.n);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) h[static_cast<std::size_t>(rm ? i * cols + j : j * rows + i)] = M(i, j);
    buf.upload(h);
  }
  DeviceMatrix<float> view() {
    return row_major ? lowrank::cuda::device_row_major(buf.p, rows, cols) : lowrank::cuda::device_col_major(buf.p, rows, cols);
  }
  Eigen::MatrixXf host() const {
    const std::vector<float> h = buf.download();
    Eigen::MatrixXf M(rows, cols);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) M(i, j) = h[static_cast<std::size_t>(row_major ? i * cols + j : j * rows + i)];
    return M;
  }
};

TEST(CudaProjection, ProjectAndBackProjectMatchTheCpuProjectorOnBothSidesAndLayouts) {
  REQUIRE_GPU();
  using lowrank::optim::Side;
  for (const auto& [m, n] : {std::pair<std::int64_t, std::int64_t>{70, 45}, {45, 70}, {64, 64}})
    for (const Side side : {Side::left, Side::right})
      for (const bool rm : {true, false}) {
        SCOPED_TRACE(std::to_string(m) + "x" + std::to_string(n) + (side == Side::left ? " left" : " right") +
                     (rm ? " row-major" : " column-major"));
        const std::int64_t r = 9, len = side == Side::left ? m : n;
        lowrank::optim::Projector p(m, n, r, side);
        lowrank::ColMatrix<float> basis = Eigen::MatrixXf::Random(len, r);
        lowrank::linalg::detail::orthonormalize_columns(basis);
        p.set_basis(basis);
        const lowrank::RowMatrix<float> G = Eigen::MatrixXf::Random(m, n);
        lowrank::RowMatrix<float> R_cpu;
        p.project({G.data(), m, n, n, 1}, R_cpu);
        DeviceCopy g(G, rm), q(basis, !rm), R(Eigen::MatrixXf::Constant(R_cpu.rows(), R_cpu.cols(), NAN), rm);
        lowrank::cuda::project(g.view(), q.view(), side, R.view());
        const Eigen::MatrixXf R_gpu = R.host();
        EXPECT_LT((R_gpu - Eigen::MatrixXf(R_cpu)).cwiseAbs().maxCoeff(), 1e-5f * (1 + R_cpu.cwiseAbs().maxCoeff()));
        // W += alpha back(N) against the CPU's add_back.
        const lowrank::RowMatrix<float> Nm = Eigen::MatrixXf::Random(R_cpu.rows(), R_cpu.cols());
        lowrank::RowMatrix<float> W_cpu = Eigen::MatrixXf::Random(m, n);
        DeviceCopy w(W_cpu, !rm), nn(Nm, rm);
        p.add_back({W_cpu.data(), m, n, n, 1}, Nm, -0.75);
        lowrank::cuda::back_project(w.view(), nn.view(), q.view(), side, -0.75);
        EXPECT_LT((w.host() - Eigen::MatrixXf(W_cpu)).cwiseAbs().maxCoeff(), 1e-5f);
      }
}

TEST(CudaProjection, AnEmptyProjectedDimensionGivesZeros) {
  REQUIRE_GPU();
  // Right side of a 6 x 0 gradient: R = G Q is 6 x 3 zeros (poisoned first), padded leading dimension.
  Buffer<float> g(1), q(1), r(6 * 5);
  r.upload(std::vector<float>(r.n, NAN));
  lowrank::cuda::project(lowrank::cuda::device_row_major<const float>(g.p, 6, 0),
                         lowrank::cuda::device_col_major<const float>(q.p, 0, 3), lowrank::optim::Side::right,
                         lowrank::cuda::device_row_major(r.p, 6, 3, 5));
  const std::vector<float> h = r.download();
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 5; ++j) {
      if (j < 3) {
        EXPECT_EQ(h[static_cast<std::size_t>(i * 5 + j)], 0.0f) << i << "," << j;
      } else {
        EXPECT_TRUE(std::isnan(h[static_cast<std::size_t>(i * 5 + j)])) << "padding written at " << i << "," << j;
      }
    }
}

TEST(CudaProjection, BadArgumentsThrowBeforeAnyDeviceCall) {
  namespace lc = lowrank::cuda;
  using lowrank::optim::Side;
  auto* fake = reinterpret_cast<float*>(std::uintptr_t{1} << 26);
  const auto G = lc::device_row_major<const float>(fake, 40, 30);
  const auto Q = lc::device_col_major<const float>(fake + 4096, 30, 5);
  const auto R = lc::device_row_major<float>(fake + 8192, 40, 5);
  const auto what = [](auto&& call) {
    try {
      call();
    } catch (const lowrank::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(what([&] { lc::project(G, Q, Side::left, R); }).find("basis is 30x5; for the left side of a 40x30 matrix it must have 40 rows"),
            std::string::npos);
  EXPECT_NE(what([&] { lc::project(G, Q, Side::right, lc::device_row_major<float>(fake + 8192, 40, 4)); })
                .find("R is 40x4; it must be 40x5"),
            std::string::npos);
  EXPECT_NE(what([&] { lc::project(G, Q, Side::right, lc::device_row_major<float>(fake + 10, 40, 5)); }).find("overlaps G"),
            std::string::npos);
  const auto W = lc::device_row_major<float>(fake + 16384, 40, 30);
  const auto N = lc::device_row_major<const float>(fake + 8192, 40, 5);
  EXPECT_NE(what([&] { lc::back_project(W, N, Q, Side::right, std::nan("")); }).find("alpha is nan"), std::string::npos);
  EXPECT_NE(what([&] { lc::back_project(W, N, Q, Side::right, 1e39); }).find("finite in fp32"), std::string::npos);
  EXPECT_NE(what([&] { lc::back_project(W, N, Q, Side::left, 1.0); }).find("basis is 30x5"), std::string::npos);
  EXPECT_NE(what([&] { lc::back_project(lc::device_row_major<float>(fake + 8200, 40, 30), N, Q, Side::right, 1.0); })
                .find("overlaps N"),
            std::string::npos);
  EXPECT_NE(what([&] { lc::project(G, lc::device_col_major<const float>(fake + 4096, 30, 0), Side::right, R); })
                .find("the rank must be at least 1"),
            std::string::npos);
}

// ---- randomized SVD -----------------------------------------------------------------------------

// m x n with singular values about 0.8^i (32 directions) plus noise of 1e-3: well-separated
// leading singular values, so singular vectors are comparable up to sign.
lowrank::ColMatrix<float> decaying(std::int64_t m, std::int64_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Eigen::MatrixXf A = Eigen::MatrixXf::Zero(m, n);
  for (int i = 0; i < 32; ++i) {
    Eigen::VectorXf u(m), v(n);
    for (auto& x : u) x = dist(rng);
    for (auto& x : v) x = dist(rng);
    A += (std::pow(0.8f, static_cast<float>(i)) / std::sqrt(static_cast<float>(m * n))) * u * v.transpose();
  }
  for (std::int64_t j = 0; j < n; ++j)
    for (std::int64_t i = 0; i < m; ++i) A(i, j) += 1e-3f * dist(rng) / std::sqrt(static_cast<float>(m + n));
  return A;
}

struct DeviceSvdResult {
  Eigen::MatrixXf U, V;
  Eigen::VectorXf S;
};

// Uploads A (row- or column-major), runs cuda::truncated_svd with NaN-poisoned outputs. Output
// layouts: U row-major, S a k x 1 column, V column-major; with `flip`, U column-major with
// leading dimension m + 3, S a 1 x k row with stride 2, V row-major with leading dimension k + 3.
DeviceSvdResult device_svd(const lowrank::ColMatrix<float>& A, std::int64_t k, bool row_major,
                           const lowrank::cuda::DeviceSvdOptions& o, bool flip = false) {
  namespace lc = lowrank::cuda;
  const std::int64_t m = A.rows(), n = A.cols();
  std::vector<float> h(static_cast<std::size_t>(m * n));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) h[static_cast<std::size_t>(row_major ? i * n + j : j * m + i)] = A(i, j);
  const std::int64_t ldu = flip ? m + 3 : k, lds = flip ? 2 : 1, ldv = flip ? k + 3 : n;
  Buffer<float> a(h.size()), u(static_cast<std::size_t>((flip ? k : m) * ldu)), s(static_cast<std::size_t>(k * lds)),
      v(static_cast<std::size_t>((flip ? n : k) * ldv));
  a.upload(h);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  u.upload(std::vector<float>(u.n, nan));
  s.upload(std::vector<float>(s.n, nan));
  v.upload(std::vector<float>(v.n, nan));
  const std::size_t bytes = lc::truncated_svd_workspace_bytes(m, n, k, o);
  Buffer<unsigned char> ws(bytes);
  const auto A_view = row_major ? lc::device_row_major<const float>(a.p, m, n) : lc::device_col_major<const float>(a.p, m, n);
  const auto U_view = flip ? lc::device_col_major(u.p, m, k, ldu) : lc::device_row_major(u.p, m, k);
  const auto S_view = flip ? lc::DeviceMatrix<float>(s.p, 1, k, k * lds, lds) : lc::device_col_major(s.p, k, 1);
  const auto V_view = flip ? lc::device_row_major(v.p, n, k, ldv) : lc::device_col_major(v.p, n, k);
  lc::truncated_svd(A_view, U_view, S_view, V_view, ws.p, bytes, o, nullptr);
  DeviceSvdResult r;
  const std::vector<float> hu = u.download(), hs = s.download(), hv = v.download();
  r.U.resize(m, k);
  r.V.resize(n, k);
  r.S.resize(k);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < k; ++j) r.U(i, j) = hu[static_cast<std::size_t>(flip ? j * ldu + i : i * k + j)];
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < k; ++j) r.V(i, j) = hv[static_cast<std::size_t>(flip ? i * ldv + j : j * n + i)];
  for (std::int64_t j = 0; j < k; ++j) r.S(j) = hs[static_cast<std::size_t>(j * lds)];
  return r;
}

TEST(CudaSvd, MatchesTheCpuRandomizedSvdOnBothOrientationsAndLayouts) {
  REQUIRE_GPU();
  const std::int64_t k = 12;
  for (const auto& [m, n] : {std::pair<std::int64_t, std::int64_t>{300, 200}, {200, 300}, {257, 257}})
    for (const bool row_major : {true, false}) {
      const bool flip = !row_major;  // the other output layouts with the column-major inputs
      SCOPED_TRACE(std::to_string(m) + "x" + std::to_string(n) + (row_major ? " row-major" : " column-major, flipped outputs"));
      const lowrank::ColMatrix<float> A = decaying(m, n, static_cast<std::uint64_t>(m * 7 + n));
      lowrank::linalg::SvdOptions co;
      co.method = lowrank::linalg::SvdMethod::randomized;
      co.oversample = 10;
      co.power_iterations = 2;
      co.seed = 7;
      co.stream = 3;
      const auto cpu = lowrank::linalg::truncated_svd(A, k, co);
      lowrank::cuda::DeviceSvdOptions go;
      go.oversample = 10;
      go.power_iterations = 2;
      go.seed = 7;
      go.stream = 3;
      const DeviceSvdResult gpu = device_svd(A, k, row_major, go, flip);
      ASSERT_TRUE(gpu.U.allFinite() && gpu.S.allFinite() && gpu.V.allFinite());
      // The same test matrix and algorithm: the same singular values up to fp32 rounding of the
      // products, and the same singular vectors up to sign.
      for (std::int64_t j = 0; j < k; ++j) {
        EXPECT_NEAR(gpu.S(j), cpu.S(j), 1e-4 * cpu.S(0)) << j;
        EXPECT_GT(std::abs(gpu.U.col(j).dot(cpu.U.col(j))), 0.999f) << j;
        EXPECT_GT(std::abs(gpu.V.col(j).dot(cpu.V.col(j))), 0.999f) << j;
        if (j > 0) {
          EXPECT_LE(gpu.S(j), gpu.S(j - 1));
        }
      }
      const Eigen::MatrixXf I = Eigen::MatrixXf::Identity(k, k);
      EXPECT_LT((gpu.U.transpose() * gpu.U - I).cwiseAbs().maxCoeff(), 1e-4f);
      EXPECT_LT((gpu.V.transpose() * gpu.V - I).cwiseAbs().maxCoeff(), 1e-4f);
      // An orthogonal projection of A: ||A - U S V^T||^2 = ||A||^2 - sum S^2 (in double).
      const Eigen::MatrixXd Ad = A.cast<double>();
      const Eigen::MatrixXd R = Ad - gpu.U.cast<double>() * gpu.S.cast<double>().asDiagonal() * gpu.V.cast<double>().transpose();
      EXPECT_NEAR(R.squaredNorm(), Ad.squaredNorm() - gpu.S.cast<double>().squaredNorm(), 1e-4 * Ad.squaredNorm());
    }
}

TEST(CudaSvd, QOverridesTheOversampleAndZeroPowerIterationsRun) {
  REQUIRE_GPU();
  const lowrank::ColMatrix<float> A = decaying(180, 140, 91);
  lowrank::linalg::SvdOptions co;
  co.method = lowrank::linalg::SvdMethod::randomized;
  co.q = 20;
  co.power_iterations = 0;
  const auto cpu = lowrank::linalg::truncated_svd(A, 8, co);
  lowrank::cuda::DeviceSvdOptions go;
  go.q = 20;
  go.power_iterations = 0;
  const DeviceSvdResult gpu = device_svd(A, 8, false, go);
  for (int j = 0; j < 8; ++j) EXPECT_NEAR(gpu.S(j), cpu.S(j), 1e-4 * cpu.S(0)) << j;
}

TEST(CudaSvd, TheTestMatrixIsTheHostsPhiloxStream) {
  // A = [I; 0] (p x s) and q = k = 2 without power iterations: the range is that of Omega itself,
  // so U must span the host's RandomStream(seed, stream) columns normal(j s + i) (a different
  // stream or lane order gives a different plane).
  REQUIRE_GPU();
  const std::int64_t p = 60, s = 50, k = 2;
  lowrank::ColMatrix<float> A = lowrank::ColMatrix<float>::Zero(p, s);
  A.topRows(s).setIdentity();
  lowrank::cuda::DeviceSvdOptions o;
  o.q = k;
  o.power_iterations = 0;
  o.seed = 0x1234567890ull;
  o.stream = 5;
  const DeviceSvdResult gpu = device_svd(A, k, true, o);
  const lowrank::RandomStream rng(o.seed, o.stream);
  Eigen::MatrixXd omega = Eigen::MatrixXd::Zero(p, k);
  for (std::int64_t j = 0; j < k; ++j)
    for (std::int64_t i = 0; i < s; ++i) omega(i, j) = rng.normal(static_cast<std::uint64_t>(j * s + i));
  const Eigen::MatrixXd U = gpu.U.cast<double>();
  EXPECT_LT((omega - U * (U.transpose() * omega)).norm() / omega.norm(), 1e-5);
  // And a neighbouring stream does not.
  const lowrank::RandomStream other(o.seed, o.stream + 1);
  for (std::int64_t j = 0; j < k; ++j)
    for (std::int64_t i = 0; i < s; ++i) omega(i, j) = other.normal(static_cast<std::uint64_t>(j * s + i));
  EXPECT_GT((omega - U * (U.transpose() * omega)).norm() / omega.norm(), 0.1);
}

TEST(CudaSvd, BadArgumentsThrowBeforeAnyDeviceCall) {
  // Found before any device call: these run without a GPU too.
  namespace lc = lowrank::cuda;
  auto* fake = reinterpret_cast<float*>(std::uintptr_t{1} << 24);
  const auto A = lc::device_row_major<const float>(fake, 40, 30);
  const auto U = lc::device_row_major<float>(fake + 4096, 40, 5);
  const auto S = lc::device_col_major<float>(fake + 8192, 5, 1);
  const auto V = lc::device_col_major<float>(fake + 12288, 30, 5);
  void* ws = fake + 65536;
  const auto message = [&](auto&& call) {
    try {
      call();
    } catch (const lowrank::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { lc::truncated_svd(A, lc::device_row_major<float>(fake + 4096, 39, 5), S, V, ws, 1 << 20); })
                .find("U is 39x5 but A is 40x30"),
            std::string::npos);
  EXPECT_NE(message([&] { lc::truncated_svd(A, U, S, lc::device_col_major<float>(fake + 12288, 30, 4), ws, 1 << 20); })
                .find("V is 30x4; it must be 30x5"),
            std::string::npos);
  EXPECT_NE(message([&] { lc::truncated_svd(A, U, lc::device_col_major<float>(fake + 8192, 5, 2), V, ws, 1 << 20); })
                .find("S is 5x2"),
            std::string::npos);
  EXPECT_NE(message([&] {
              lc::truncated_svd(A, lc::device_row_major<float>(fake + 4096, 40, 31), lc::device_col_major<float>(fake + 8192, 31, 1),
                                lc::device_col_major<float>(fake + 12288, 30, 31), ws, 1 << 20);
            }).find("rank is 31"),
            std::string::npos);
  lc::DeviceSvdOptions o;
  o.q = 3;
  EXPECT_NE(message([&] { lc::truncated_svd(A, U, S, V, ws, 1 << 20, o); }).find("options.q is 3"), std::string::npos);
  o = {};
  o.power_iterations = -1;
  EXPECT_NE(message([&] { lc::truncated_svd(A, U, S, V, ws, 1 << 20, o); }).find("power_iterations"), std::string::npos);
  EXPECT_NE(message([&] { lc::truncated_svd(A, U, S, V, nullptr, 1 << 20); }).find("workspace is null"), std::string::npos);
  EXPECT_NE(message([&] { lc::truncated_svd(A, U, S, V, fake + 65537, 1 << 20); }).find("aligned"), std::string::npos);
  EXPECT_NE(message([&] { lc::truncated_svd(A, lc::device_row_major<float>(fake + 100, 40, 5), S, V, ws, 1 << 20); })
                .find("overlaps A"),
            std::string::npos);
  EXPECT_NE(message([&] { lc::truncated_svd(A, U, S, lc::device_col_major<float>(fake + 65536 + 64, 30, 5), ws, 1 << 20); })
                .find("V overlaps the workspace"),
            std::string::npos);
  EXPECT_NE(message([&] { (void)lc::truncated_svd_workspace_bytes(40, 30, 0); }).find("rank is 0"), std::string::npos);
}

TEST(CudaSvd, SmallWorkspaceAndHostPointersAreRejected) {
  REQUIRE_GPU();
  namespace lc = lowrank::cuda;
  Buffer<float> a(40 * 30), u(40 * 5), s(5), v(30 * 5);
  const std::size_t bytes = lc::truncated_svd_workspace_bytes(40, 30, 5);
  Buffer<unsigned char> ws(bytes);
  const auto A = lc::device_row_major<const float>(a.p, 40, 30);
  EXPECT_THROW(lc::truncated_svd(A, lc::device_row_major(u.p, 40, 5), lc::device_col_major(s.p, 5, 1),
                                 lc::device_col_major(v.p, 30, 5), ws.p, bytes - 256),
               lowrank::Error);
  std::vector<float> host(40 * 5);
  EXPECT_THROW(lc::truncated_svd(A, lc::device_row_major(host.data(), 40, 5), lc::device_col_major(s.p, 5, 1),
                                 lc::device_col_major(v.p, 30, 5), ws.p, bytes),
               lowrank::Error);
}

TEST(CudaDevice, AvailabilityReportsAReason) {
  std::string why;
  if (!lowrank::cuda::device_available(&why)) {
    EXPECT_FALSE(why.empty());
    GTEST_SKIP() << "no CUDA device: " << why;
  }
  int device = -1;
  check(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  std::printf("device %d: %s, sm_%d%d, %d SMs\n", device, prop.name, prop.major, prop.minor, prop.multiProcessorCount);
}

}  // namespace
