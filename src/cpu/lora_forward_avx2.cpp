// AVX2 + FMA + F16C lora_forward kernels on 256-bit vectors (compiled with -mavx2 -mfma -mf16c;
// chosen at run time).
#include <immintrin.h>

#include <cstdint>

#include "lora_forward_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace lora_forward_avx2_isa {

#include "float_bits-inl.hpp"

struct Ops {
  using V = __m256;
  static constexpr int kRegisters = 16;  // vector registers (tile shapes)
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const Bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  // (l0 + l4 + l2 + l6) + (l1 + l5 + l3 + l7), always in this order.
  static float hsum(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};

#include "quad_x86-inl.hpp"
#include "lora_forward_body-inl.hpp"

}  // namespace lora_forward_avx2_isa

const ForwardKernels lora_forward_avx2 = lora_forward_avx2_isa::kForwardKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
