// AVX-512F rank-update kernels (compiled with -mavx512f -mfma -mf16c; chosen at run time).
#include <immintrin.h>

#include <cstdint>

#include "kernel_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace avx512_isa {

#include "float_bits-inl.hpp"

struct OpsF32 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V load(const Bf16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static void store(Bf16* p, V x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i result = _mm512_mask_blend_epi32(is_nan, rounded, quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(result));
  }
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
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V x) { _mm512_storeu_pd(p, x); }
};

// 8 x 32 (fp32) and 8 x 16 (fp64) tiles: 16 accumulators + 2 B vectors + 1 broadcast of 32 zmm.
constexpr int kMrF32 = 8, kNvF32 = 2;
constexpr int kMrF64 = 8, kNvF64 = 2;

#include "rank_update_body-inl.hpp"

}  // namespace avx512_isa

const RankUpdateKernels rank_update_avx512 = avx512_isa::kKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
