// AVX2 + FMA + F16C lora_forward kernels on 128-bit vectors (compiled with -mavx2 -mfma -mf16c;
// chosen at run time on cores that split 256-bit operations, AMD Zen 1: see targets.hpp).
#include <immintrin.h>

#include <cstdint>

#include "lora_forward_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace lora_forward_avx2_128_isa {

#include "float_bits-inl.hpp"

struct Ops {
  using V = __m128;
  static constexpr int kRegisters = 16;  // vector registers (tile shapes)
  static constexpr int kLanes = 4;
  static V zero() { return _mm_setzero_ps(); }
  static V set1(float x) { return _mm_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  // Interleaving zeros below each bf16 pattern widens it: one instruction.
  static V load(const Bf16* p) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
  }
  static V load(const F16* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, V x) { _mm_storeu_ps(p, x); }
  // (l0 + l2) + (l1 + l3), always in this order.
  static float hsum(V x) {
    __m128 s = _mm_add_ps(x, _mm_movehl_ps(x, x));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};

#include "quad_x86-inl.hpp"
#include "lora_forward_body-inl.hpp"

}  // namespace lora_forward_avx2_128_isa

const ForwardKernels lora_forward_avx2_128 = lora_forward_avx2_128_isa::kForwardKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
