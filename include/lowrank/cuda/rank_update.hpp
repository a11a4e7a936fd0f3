/// \file
/// The rank update \f$ W \leftarrow W + \alpha\, U V^\top \f$ on a CUDA device, mirroring
/// `lowrank::rank_update` (kernels/rank_update.hpp).
#pragma once

#include <type_traits>

#include "lowrank/core/config.hpp"
#include "lowrank/cuda/device.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace cuda {

/// Which kernel the device `rank_update` uses for row-major W with rows aligned to its access width
/// (16 bytes; 8 for 16-bit storage at rank > 2) and rank <= 16 (every other case takes the generic
/// kernel). Both give the same bits.
struct DeviceRankUpdateOptions {
  /// Software-pipelined variant: the loads of the next rows are in flight while the current rows
  /// are updated (two register buffers per thread), and 16-bit storage is rounded by the
  /// hardware's conversion. Nearest-even rounding only (stochastic rounding always takes the
  /// first kernel). Off by default: written on 2026-11-28 without a GPU to measure it on;
  /// `scripts/gpu-check.sh` benchmarks both kernels and the GPU tests check both against the CPU.
  bool pipelined = false;
};

/// Rank-r update in place on the device: `W(i, j) += alpha * sum_k U(i, k) * V(j, k)`,
/// enqueued on `stream` (asynchronous; no workspace, no allocation).
///
/// \tparam TW storage type of W: fp32, bf16 or fp16
/// \param W      `m x n` device matrix, any positive strides (row-major with 16-byte aligned rows
///               and rank <= 16 takes the bandwidth-bound kernel; anything else a generic one)
/// \param U      `m x r` fp32 device matrix, r >= 1 (any r; rank <= 16 is the fast path)
/// \param V      `n x r` fp32 device matrix
/// \param alpha  finite
/// \param options rounding (bf16/fp16 storage), Philox key and index origin of stochastic
///               rounding, exactly as the CPU's; `max_threads` is ignored
/// \param stream  CUDA stream the kernel is enqueued on
/// \param kernel  which kernel takes the fast path (`DeviceRankUpdateOptions`)
///
/// Arithmetic: the CPU's (SIMD targets) exactly: `a_k = (float)(alpha * (double)U(i, k))`, then
/// `acc = W(i, j)` widened to fp32 and `acc = fma(a_k, V(j, k), acc)` for k = 0..r-1, then one
/// rounding into storage (nearest-even, or stochastic with the 32 bits
/// `RandomStream(seed, stream).bits((index_row0 + i) * index_cols + index_col0 + j)`). So for
/// fp32 factors the result is bitwise the CPU's on an FMA target (AVX2, AVX-512), except that a
/// NaN is only a NaN (the device's FMA returns the canonical NaN, the CPU's passes on a NaN
/// operand's payload).
///
/// \throws Error (nothing enqueued, W unchanged) if shapes disagree, r == 0, alpha is not finite,
/// a stride is not positive, a non-empty view has a null pointer or a pointer the CUDA runtime
/// does not know as device (or managed) memory, W's elements overlap each other or W's memory
/// overlaps U's or V's, or no CUDA device is available. A failed launch throws `Error` too.
template <DeviceScalar TW>
  requires(!std::is_const_v<TW>)
void rank_update(DeviceMatrix<TW> W, DeviceMatrix<const float> U, DeviceMatrix<const float> V, double alpha,
                 const RankUpdateOptions& options = {}, cudaStream_t stream = nullptr,
                 const DeviceRankUpdateOptions& kernel = {});

}  // namespace cuda

LOWRANK_END_NAMESPACE
