// Scalar (portable C++) lora_forward kernels: always built, the path for every CPU and for
// sanitizer builds. Compiled with -ffp-contract=off: a * b + c is rounded twice everywhere.
#include <cstdint>

#include "lora_forward_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace lora_forward_scalar_isa {

#include "float_bits-inl.hpp"

struct Ops {
  using V = float;
  static constexpr int kRegisters = 16;  // vector registers (tile shapes)
  static constexpr int kLanes = 1;
  static V zero() { return 0.0f; }
  static V set1(float x) { return x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V load(const float* p) { return *p; }
  static V load(const Bf16* p) { return bf16_bits_to_f32(p->bits); }
  static V load(const F16* p) { return f16_bits_to_f32(p->bits); }
  static void store(float* p, V x) { *p = x; }
  static float hsum(V x) { return x; }
};

// Four lanes as plain floats (the packing of W and X for the GEMM path).
struct Quad {
  struct Q {
    float v[4];
  };
  template <class S>
  static Q load(const S* p) {
    return {{Ops::load(p), Ops::load(p + 1), Ops::load(p + 2), Ops::load(p + 3)}};
  }
  static void store(float* p, const Q& x) {
    for (int i = 0; i < 4; ++i) p[i] = x.v[i];
  }
  static Q zero() { return {{0.0f, 0.0f, 0.0f, 0.0f}}; }
  static void store_pairs(float* p, std::ptrdiff_t stride, const Q& a, const Q& b) {
    for (int k = 0; k < 4; ++k) {
      p[k * stride] = a.v[k];
      p[k * stride + 1] = b.v[k];
    }
  }
  static void transpose(Q& a, Q& b, Q& c, Q& d) {
    Q* q[4] = {&a, &b, &c, &d};
    for (int i = 0; i < 4; ++i)
      for (int j = i + 1; j < 4; ++j) {
        const float t = q[i]->v[j];
        q[i]->v[j] = q[j]->v[i];
        q[j]->v[i] = t;
      }
  }
};

#include "lora_forward_body-inl.hpp"

}  // namespace lora_forward_scalar_isa

const ForwardKernels lora_forward_scalar = lora_forward_scalar_isa::kForwardKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
