// Interface between the ISA-independent lora_forward driver and its per-ISA kernel translation
// units. Plain declarations only (no inline code compiled with ISA flags can leak out of a TU).
#pragma once

#include <cstddef>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

using FIndex = std::ptrdiff_t;

// Dot form (W rows contiguous along the input): for t < tokens, o < outs,
//   acc = lane-wise sum over k < depth of x[t*ldx + k] * w[o*ldw + k]
//         then over k < aug_depth of xa[t*ldxa + k] * wa[o*ldwa + k]   (same lane accumulators:
//         lane l takes the k congruent to l modulo the vector width, from 0 in each part)
//   y[t*ldy + o*ycs] = hsum(acc) (+ bias[o] when bias != nullptr)
// w points to float, or to bf16 / fp16 bit patterns (uint16_t), per entry.
struct DotArgs {
  const float* x;
  FIndex ldx;
  FIndex tokens;
  const void* w;
  FIndex ldw;
  FIndex outs;
  FIndex depth;
  const float* xa;
  FIndex ldxa;
  const float* wa;
  FIndex ldwa;
  FIndex aug_depth;
  const float* bias;
  float* y;
  FIndex ldy;
  FIndex ycs;
};

// Axpy form (W rows contiguous along the output, W stored in x out): for t < tokens, o < outs,
//   acc[t*ldacc + o] = fma chain, in k order, of x[t*ldx + k] * w[k*ldw + o] for k < depth,
//   starting from the value in acc.
struct AxpyArgs {
  const float* x;
  FIndex ldx;
  FIndex tokens;
  const void* w;
  FIndex ldw;
  FIndex outs;
  FIndex depth;
  float* acc;
  FIndex ldacc;
};

// Packing of W for the GEMM path (many tokens): for j < nr, k < depth,
//   dst[k*nr + j] = W element (j, k) widened to fp32, at w[j*rs + k*cs], for j < rows; 0 for j >= rows.
// (j runs over output features, k over input features: a kc x nr micro-panel of W^T, as the
// rank-update micro-kernel takes its B operand.)
struct PackWArgs {
  const void* w;
  FIndex rs;
  FIndex cs;
  FIndex rows;
  FIndex depth;
  FIndex nr;
  float* dst;
};

// Packing of X for the GEMM path (X contiguous along k): for i < mr, k < depth,
//   dst[k*mr + i] = x[i*rs + k] for i < rows; 0 for rows <= i < mr.
struct PackXArgs {
  const float* x;
  FIndex rs;
  FIndex rows;
  FIndex depth;
  FIndex mr;
  float* dst;
};

using DotKernel = void (*)(const DotArgs&);
using AxpyKernel = void (*)(const AxpyArgs&);
using PackWKernel = void (*)(const PackWArgs&);
using PackXKernel = void (*)(const PackXArgs&);

struct ForwardKernels {
  DotKernel dot_f32, dot_bf16, dot_f16;
  AxpyKernel axpy_f32, axpy_bf16, axpy_f16;
  PackWKernel pack_w_f32, pack_w_bf16, pack_w_f16;
  PackXKernel pack_x;
};

// Defined in src/cpu/lora_forward_<isa>.cpp; constant-initialized.
extern const ForwardKernels lora_forward_scalar;
#if defined(LOWRANK_HAVE_AVX2)
extern const ForwardKernels lora_forward_avx2;
extern const ForwardKernels lora_forward_avx2_128;
#endif
#if defined(LOWRANK_HAVE_AVX512)
extern const ForwardKernels lora_forward_avx512;
#endif

}  // namespace detail
LOWRANK_END_NAMESPACE
