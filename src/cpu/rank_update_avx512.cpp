// AVX-512F rank-update kernels (compiled with -mavx512f -mfma -mf16c; chosen at run time).
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "kernel_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace avx512_isa {

#include "float_bits-inl.hpp"

struct OpsF32 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  // bf16 in pairs of vectors, even columns first (see load_row in rank_update_body-inl.hpp).
  static constexpr bool kBf16Pairs = true;
  static void load_bf16_pair(const Bf16* p, V& even, V& odd) {
    const __m512i x = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // Round to nearest even into the top 16 bits: bits + 0x7FFF + lsb (not valid for NaN).
  static __m512i round_bf16(V x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  }
  static void store_bf16_pair(Bf16* p, V even_f, V odd_f) {
    const __m512i even = _mm512_srli_epi32(round_bf16(even_f), 16);
    const __m512i odd = round_bf16(odd_f);
    _mm512_storeu_si512(p, _mm512_or_si512(even, _mm512_and_si512(odd, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
  }
  static bool any_nan(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) != 0; }
  static V load(const F16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(F16* p, V x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct OpsF64 {
  using V = __m512d;
  static constexpr int kLanes = 8;
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V x) { _mm512_storeu_pd(p, x); }
};

// 8 x 32 (fp32) and 8 x 16 (fp64) tiles: 16 accumulators + 2 B vectors + 1 broadcast of 32 zmm.
constexpr int kMrF32 = 8, kNvF32 = 2;
constexpr int kBf16OrderTable[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                     1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
constexpr const int* kBf16Order = kBf16OrderTable;
constexpr int kMrF64 = 8, kNvF64 = 2;

#include "rank_update_body-inl.hpp"

}  // namespace avx512_isa

const RankUpdateKernels rank_update_avx512 = avx512_isa::kKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
