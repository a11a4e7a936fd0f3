/// \file
/// The fused LoRA forward \f$ Y = X W^\top + s\,(X A^\top) B^\top \f$ for token batches on a CUDA
/// device, mirroring `lowrank::lora_forward` (kernels/lora_forward.hpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "lowrank/core/config.hpp"
#include "lowrank/cuda/device.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace cuda {

/// Which kernels the device `lora_forward` may use. The defaults are what measured fastest on an
/// H200 (2026-11-27, docs/performance.md): cuBLAS for bf16 at every token count, the FMA one-pass
/// kernel for fp32 up to 4 tokens. The other paths are kept, tested and selectable.
struct DeviceLoraOptions {
  /// fp32: up to this many tokens (at most 4; 0 disables it) a one-pass FMA kernel reads W once
  /// and adds the low-rank term before the single rounding.
  std::int64_t fp32_one_pass_max_tokens = 4;
  /// bf16: up to this many tokens (at most 16; 0 disables it) a one-pass kernel: on tensor cores
  /// (mma.sync, sm_80+) when `in` is a multiple of 32, else the FMA kernel (at most 4 tokens).
  /// Off by default: 1.9-2.1x the base GEMV on an H200 against 1.6-1.7x for the cuBLAS path.
  std::int64_t bf16_one_pass_max_tokens = 0;
  /// bf16 one-pass kernel on tensor cores where it can run (see above); false takes the FMA
  /// kernel (at most 4 tokens) instead.
  bool bf16_one_pass_tensor_cores = true;
  /// Up to this many tokens (and above the one-pass kernels) the low-rank term `Y = s (X A^T) B^T`
  /// is one kernel (T in fp32) before cuBLAS adds X W^T. Off by default: slower than the three
  /// cuBLAS products on an H200 (2.8x against 1.6x the base GEMM at 256 tokens).
  std::int64_t term_max_tokens = 0;
};

/// Bytes of device workspace `lora_forward` needs for `tokens` tokens and rank `rank` (the
/// intermediate `T = s X A^T`, padded). 0 when no workspace is needed.
[[nodiscard]] std::size_t lora_forward_workspace_bytes(std::int64_t tokens, std::int64_t rank) noexcept;

/// Fused LoRA forward of one adapter on the device, enqueued on `stream`:
/// \f$ Y = X W_{out \times in}^\top + s\,(X A^\top) B^\top \f$, Y overwritten.
///
/// \tparam T    storage type of every operand: fp32 or bf16 (fp32 accumulation for both; fp32
///              runs true fp32 products, never TF32)
/// \param X     `tokens x in` device matrix
/// \param W     `out x in` device matrix (a column-major view is the `in x out` layout)
/// \param A     `r x in`
/// \param B     `out x r`
/// \param scale finite
/// \param Y     `tokens x out`; must not overlap the other operands or the workspace
/// \param workspace, workspace_bytes device memory of at least
///              `lora_forward_workspace_bytes(tokens, r)` bytes, 256-byte aligned; not read
///              before it is written; free to reuse once the stream has passed this call
///
/// Every matrix must have unit stride along one of its two dimensions (cuBLAS leading-dimension
/// layouts). Arithmetic, fp32 accumulation throughout:
/// - one-pass kernels (see `DeviceLoraOptions`; they need unit column strides for X, W and Y,
///   16-byte aligned rows of X and W, `in` a multiple of 8 and r <= 64): `T = s X A^T` in fp32
///   (a small kernel; on sm_90 the main kernel is its programmatic dependent launch, started as
///   soon as the small kernel is, and streams W meanwhile), then each output is one fp32 sum of
///   the `in` products followed by the `r` products `T(t, c) B(o, c)`, rounded once into Y;
/// - the term kernel (`DeviceLoraOptions::term_max_tokens`; X and A row-major with 16-byte aligned
///   rows, `in` a multiple of 8, 1 <= r <= 16, Y row-major): `T = s X A^T` in fp32, `Y = T B^T`
///   rounded into Y by one kernel, then `Y = X W^T + Y` (cuBLAS, beta = 1);
/// - otherwise (cuBLAS): `T = s X A^T` rounded to the storage type, `Y = T B^T` rounded into Y,
///   then `Y = X W^T + Y` (cuBLAS, beta = 1).
/// So bf16 results agree with the CPU's fp32 forward of the same (widened) inputs to bf16
/// rounding, not bitwise. Uses a cuBLAS handle per host thread and device, created on first use.
///
/// \throws Error (nothing enqueued, Y unchanged) if shapes disagree, scale is not finite, a view
/// has no unit stride or a non-positive stride, a non-empty view's pointer is null or not device
/// memory, Y overlaps an input or the workspace, the workspace is too small or misaligned, or no
/// CUDA device is available; a failed cuBLAS call or launch throws `Error` too.
template <ForwardScalar T>
void lora_forward(DeviceMatrix<const T> X, DeviceMatrix<const T> W, DeviceMatrix<const T> A,
                  DeviceMatrix<const T> B, double scale, DeviceMatrix<T> Y, void* workspace,
                  std::size_t workspace_bytes, cudaStream_t stream = nullptr, const DeviceLoraOptions& options = {});

/// The base forward alone, \f$ Y = X W^\top \f$ (one cuBLAS GEMM), with the conventions of
/// `lora_forward`: the baseline the fused forward is measured against.
template <ForwardScalar T>
void linear_forward(DeviceMatrix<const T> X, DeviceMatrix<const T> W, DeviceMatrix<T> Y, cudaStream_t stream = nullptr);

}  // namespace cuda

LOWRANK_END_NAMESPACE
