// Scalar (portable C++) rank-update kernels: always built, the reference path for every CPU and
// for sanitizer builds.
#include <cstdint>
#include <type_traits>

#include "kernel_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace scalar_isa {

#include "float_bits-inl.hpp"

struct OpsF32 {
  using V = float;
  static constexpr int kLanes = 1;
  static V set1(float x) { return x; }
  static void prefetch(const void*) {}
  // Two roundings: without a hardware FMA, std::fma would be a slow library call.
  static V fma(V a, V b, V c) { return a * b + c; }
  static V load(const float* p) { return *p; }
  static constexpr bool kBf16Pairs = false;
  static V load(const Bf16* p) { return bf16_bits_to_f32(p->bits); }
  static V load(const F16* p) { return f16_bits_to_f32(p->bits); }
  static void store(float* p, V x) { *p = x; }
  static void store(Bf16* p, V x) { p->bits = f32_to_bf16_bits(x); }
  static void store(F16* p, V x) { p->bits = f32_to_f16_bits(x); }
};

struct OpsF64 {
  using V = double;
  static constexpr int kLanes = 1;
  static V set1(double x) { return x; }
  static void prefetch(const void*) {}
  static V fma(V a, V b, V c) { return a * b + c; }
  static V load(const double* p) { return *p; }
  static void store(double* p, V x) { *p = x; }
};

constexpr const int* kBf16Order = nullptr;
constexpr int kMrF32 = 4, kNvF32 = 4;
constexpr int kMrF64 = 4, kNvF64 = 4;

#include "rank_update_body-inl.hpp"

}  // namespace scalar_isa

const RankUpdateKernels rank_update_scalar = scalar_isa::kKernels;

}  // namespace detail
LOWRANK_END_NAMESPACE
