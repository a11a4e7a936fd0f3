// AVX2 + FMA + F16C rank-update kernels (compiled with -mavx2 -mfma -mf16c; chosen at run time).
#include <immintrin.h>

#include <cstdint>

#include "kernel_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace avx2_isa {

#include "float_bits-inl.hpp"

struct OpsF32 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V load(const Bf16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static void store(Bf16* p, V x) {
    // Round to nearest even: bits + 0x7FFF + lsb(bits >> 16); NaN keeps its top bits, quieted.
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m256i result = _mm256_blendv_epi8(rounded, quiet, is_nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(result), _mm256_extracti128_si256(result, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static V load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(F16* p, V x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct OpsF64 {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V x) { _mm256_storeu_pd(p, x); }
};

// 6 x 16 (fp32) and 6 x 8 (fp64) tiles: 12 accumulators + 2 B vectors + 1 broadcast of 16 ymm.
constexpr int kMrF32 = 6, kNvF32 = 2;
constexpr int kMrF64 = 6, kNvF64 = 2;

#include "rank_update_body-inl.hpp"

}  // namespace avx2_isa

const RankUpdateKernels rank_update_avx2 = avx2_isa::kKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
