// AVX2 + FMA + F16C rank-update kernels (compiled with -mavx2 -mfma -mf16c; chosen at run time).
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "kernel_api.hpp"


LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace avx2_isa {

#include "float_bits-inl.hpp"

struct OpsF32 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  // bf16 in pairs of vectors, even columns first (see load_row in rank_update_body-inl.hpp).
  static constexpr bool kBf16Pairs = true;
  static void load_bf16_pair(const Bf16* p, V& even, V& odd) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // Round to nearest even into the top 16 bits: bits + 0x7FFF + lsb (not valid for NaN).
  static __m256i round_bf16(V x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  }
  static void store_bf16_pair(Bf16* p, V even_f, V odd_f) {
    const __m256i even = _mm256_srli_epi32(round_bf16(even_f), 16);
    const __m256i odd = round_bf16(odd_f);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_blend_epi16(even, odd, 0xAA));
  }
  static bool any_nan(V a, V b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) != 0; }
  static V load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(F16* p, V x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct OpsF64 {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V x) { _mm256_storeu_pd(p, x); }
};

// 6 x 16 (fp32) and 6 x 8 (fp64) tiles: 12 accumulators + 2 B vectors + 1 broadcast of 16 ymm.
constexpr int kMrF32 = 6, kNvF32 = 2;
constexpr int kBf16OrderTable[16] = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15};
constexpr const int* kBf16Order = kBf16OrderTable;
constexpr int kMrF64 = 6, kNvF64 = 2;

#include "rank_update_body-inl.hpp"

}  // namespace avx2_isa

const RankUpdateKernels rank_update_avx2 = avx2_isa::kKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
