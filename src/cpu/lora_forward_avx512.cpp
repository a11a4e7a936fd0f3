// AVX-512F lora_forward kernels (compiled with -mavx512f -mavx2 -mfma -mf16c; chosen at run time).
#include <immintrin.h>

#include <cstdint>

#include "lora_forward_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace lora_forward_avx512_isa {

#include "float_bits-inl.hpp"

struct Ops {
  using V = __m512;
  static constexpr int kRegisters = 32;  // vector registers (tile shapes)
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const Bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  // Halves added, then as the 256-bit sum; always in this order (AVX-512F only, no DQ).
  static float hsum(V x) {
    const __m256 lo = _mm512_castps512_ps256(x);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
    const __m256 h = _mm256_add_ps(lo, hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};

#include "quad_x86-inl.hpp"
#include "lora_forward_body-inl.hpp"

}  // namespace lora_forward_avx512_isa

const ForwardKernels lora_forward_avx512 = lora_forward_avx512_isa::kForwardKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
