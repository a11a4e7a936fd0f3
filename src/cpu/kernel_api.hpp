// Interface between the ISA-independent dispatch code and the per-ISA kernel translation units.
// Only plain declarations: nothing here can be emitted as an inline function compiled with ISA
// flags (an ODR trap that would run AVX code on CPUs without it).
#pragma once

#include <cstddef>
#include <cstdint>

#include "lowrank/core/config.hpp"
#include "lowrank/kernels/targets.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

using KIndex = std::ptrdiff_t;

// C[0:rows, 0:cols] += A B^T for one row panel of at most MR rows, where
//   a: packed A panel, [r][MR] in the compute type (alpha already folded in, zero padded),
//   b: packed B,      [ceil(cols / NR)][r][NR] in the compute type (zero padded),
//   c: row-major storage, element (i, j) at c[i * ldc + j].
// The storage type of c is fixed per entry; bf16/fp16 are passed as their 16-bit patterns and
// rounded to nearest-even. Each tile prefetches, for each of its rows, the element `prefetch`
// elements after its first one (the caller picks what will be needed next).
using PanelF32 = void (*)(const float* a, const float* b, KIndex r, void* c, KIndex ldc, KIndex rows, KIndex cols,
                          KIndex prefetch);
using PanelF64 = void (*)(const double* a, const double* b, KIndex r, double* c, KIndex ldc, KIndex rows,
                          KIndex cols, KIndex prefetch);

struct RankUpdateKernels {
  int mr_f32, nr_f32;  // micro-tile of the fp32-compute kernels
  int mr_f64, nr_f64;  // micro-tile of the fp64 kernel
  PanelF32 f32;        // c is float
  PanelF32 bf16;       // c is bf16 bits (uint16_t)
  PanelF32 f16;        // c is fp16 bits (uint16_t)
  PanelF64 f64;
  // Column order of packed B for the bf16 kernel (nr_f32 entries; nullptr: identity). The AVX
  // kernels widen bf16 pairs with one shift and one mask, which puts even columns in one vector
  // and odd columns in the next; packing B the same way makes that free.
  const int* bf16_b_order;
  PanelF32 f32_store;  // c is float and is only written: c = a b^T (the GEMM path's first chunk)
};

// Defined in src/cpu/rank_update_<isa>.cpp; constant-initialized data, so reading them runs no
// ISA-specific code.
extern const RankUpdateKernels rank_update_scalar;
#if defined(LOWRANK_HAVE_AVX2)
extern const RankUpdateKernels rank_update_avx2;
extern const RankUpdateKernels rank_update_avx2_128;
#endif
#if defined(LOWRANK_HAVE_AVX512)
extern const RankUpdateKernels rank_update_avx512;
#endif

// The kernels of a target (scalar for targets not compiled in); defined in rank_update.cpp.
const RankUpdateKernels& rank_update_kernels(Target target);

}  // namespace detail
LOWRANK_END_NAMESPACE
