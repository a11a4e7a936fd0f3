// AVX2 + FMA + F16C rank-update kernels on 128-bit vectors (compiled with -mavx2 -mfma -mf16c;
// chosen at run time). Cores that execute 256-bit operations as two 128-bit halves (AMD Zen 1)
// run these faster than the 256-bit kernels: the same work in fewer, simpler instructions
// (docs/performance.md).
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "kernel_api.hpp"


LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace avx2_128_isa {

#include "float_bits-inl.hpp"

struct OpsF32 {
  using V = __m128;
  static constexpr int kLanes = 4;
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static V set1(float x) { return _mm_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, V x) { _mm_storeu_ps(p, x); }
  static V load(const F16* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static void store(F16* p, V x) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // bf16 in pairs of vectors, even columns first (see load_row in rank_update_body-inl.hpp).
  static constexpr bool kBf16Pairs = true;
  static void load_bf16_pair(const Bf16* p, V& even, V& odd) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    even = _mm_castsi128_ps(_mm_slli_epi32(x, 16));
    odd = _mm_castsi128_ps(_mm_and_si128(x, _mm_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // Round to nearest even into the top 16 bits: bits + 0x7FFF + lsb (not valid for NaN).
  static __m128i round_bf16(V x) {
    const __m128i bits = _mm_castps_si128(x);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
    return _mm_add_epi32(_mm_add_epi32(bits, _mm_set1_epi32(0x7FFF)), lsb);
  }
  static void store_bf16_pair(Bf16* p, V even_f, V odd_f) {
    const __m128i even = _mm_srli_epi32(round_bf16(even_f), 16);
    const __m128i odd = round_bf16(odd_f);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_blend_epi16(even, odd, 0xAA));
  }
  static bool any_nan(V a, V b) { return _mm_movemask_ps(_mm_cmpunord_ps(a, b)) != 0; }
};

struct OpsF64 {
  using V = __m128d;
  static constexpr int kLanes = 2;
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static V set1(double x) { return _mm_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm_fmadd_pd(a, b, c); }
  static V load(const double* p) { return _mm_loadu_pd(p); }
  static void store(double* p, V x) { _mm_storeu_pd(p, x); }
};

// 3 x 16 (fp32) and 3 x 8 (fp64) tiles: 12 accumulators + 4 B vectors of 16 xmm (measured best
// of 6 x 8, 4 x 8 and 3 x 16 on Zen 1). A bf16 row is two pairs: columns 0-7 and 8-15.
constexpr int kMrF32 = 3, kNvF32 = 4;
constexpr int kBf16OrderTable[16] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};
constexpr const int* kBf16Order = kBf16OrderTable;
constexpr int kMrF64 = 3, kNvF64 = 4;

#include "rank_update_body-inl.hpp"

}  // namespace avx2_128_isa

const RankUpdateKernels rank_update_avx2_128 = avx2_128_isa::kKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
