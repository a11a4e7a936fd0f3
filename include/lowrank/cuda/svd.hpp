/// \file
/// Randomized truncated SVD of an fp32 device matrix through cuBLAS and cuSOLVER, mirroring
/// `lowrank::linalg::truncated_svd`'s randomized method (linalg/svd.hpp) step for step: the same
/// Gaussian test matrix (Philox, `RandomStream(seed, stream)`, element (i, j) = normal(j s + i)),
/// range finder with QR re-orthonormalisation after every product, and the small SVD in fp64.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lowrank/cuda/device.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace cuda {

/// Options of the device randomized SVD (the CPU's `linalg::SvdOptions`, randomized method).
struct DeviceSvdOptions {
  /// Range width q = rank + oversample, clamped to min(m, n); >= 0.
  std::int64_t oversample = 10;
  /// If > 0: the total range width q (`torch.svd_lowrank`'s q), overriding `oversample`; >= rank.
  std::int64_t q = 0;
  /// Power (subspace) iterations (`torch.svd_lowrank`'s niter); 0 to 14.
  int power_iterations = 2;
  /// Key of the Gaussian test matrix (the CPU's `SvdOptions::seed` and `stream`).
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
};

/// Bytes of device workspace `truncated_svd` needs for a `rows x cols` matrix and rank `rank`.
/// Queries cuSOLVER's buffer sizes, so it needs a device.
/// \throws Error on a rank outside [1, min(rows, cols)], invalid options, or no CUDA device.
[[nodiscard]] std::size_t truncated_svd_workspace_bytes(std::int64_t rows, std::int64_t cols, std::int64_t rank,
                                                        const DeviceSvdOptions& options = {});

/// Rank-k randomized SVD \f$ A \approx U\,\mathrm{diag}(S)\,V^\top \f$ of an m x n fp32 device
/// matrix, k = `U.cols`. The tall orientation is used (A^T when m < n), as on the CPU:
/// with T (p x s, p >= s) and l = q:
///   Y = T Omega (Omega s x l Gaussian), Q = qr(Y); `power_iterations` times Z = qr(T^T Q),
///   Q = qr(T Z); then T^T Q = Qb R (thin QR) and the SVD of the l x l `R^T = Ur S Vr^T` in fp64
///   (cuSOLVER `gesvdj`) give `T ~= (Q Ur_k) S_k (Qb Vr_k)^T`.
/// GEMMs run in fp32 without TF32 (cuBLAS's default math mode), QRs are cuSOLVER's Householder
/// `geqrf` + `orgqr`.
///
/// \param A  `m x n` device matrix, one unit stride (row- or column-major, any leading dimension)
/// \param U  `m x k` output, one unit stride: orthonormal columns (left singular vectors)
/// \param S  `k x 1` or `1 x k` output: the singular values, non-increasing
/// \param V  `n x k` output, one unit stride: orthonormal columns (right singular vectors)
/// \param workspace  device memory of at least `truncated_svd_workspace_bytes(m, n, k, options)`
///   bytes, 256-byte aligned; not touched by anything else until the call returns
///
/// Synchronizes `stream` before returning (to read cuSOLVER's status words): the results are
/// ready on return, and the call cannot be captured in a CUDA graph.
/// \throws Error (nothing enqueued) on mismatched shapes, k outside [1, min(m, n)], bad strides or
///   pointers, overlapping outputs or outputs overlapping A or the workspace, a workspace that is
///   too small or misaligned, more than 14 power iterations, or no CUDA device; Error after the
///   work on a cuSOLVER failure (a non-converged Jacobi SVD or an invalid argument it reports; a
///   launch or library call failing part-way waits for the work already enqueued first).
void truncated_svd(DeviceMatrix<const float> A, DeviceMatrix<float> U, DeviceMatrix<float> S, DeviceMatrix<float> V,
                   void* workspace, std::size_t workspace_bytes, const DeviceSvdOptions& options = {},
                   cudaStream_t stream = nullptr);

}  // namespace cuda

LOWRANK_END_NAMESPACE
