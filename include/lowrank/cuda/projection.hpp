/// \file
/// GaLore / FRUGAL / Fira projections on a CUDA device through cuBLAS, with the explicit side of
/// `optim::Projector` (optim/projector.hpp): the device counterparts of `Projector::project` and
/// `Projector::add_back` for a basis already on the device.
#pragma once

#include <cstdint>

#include "lowrank/cuda/device.hpp"
#include "lowrank/optim/projector.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace cuda {

/// Projection of an fp32 `rows x cols` gradient G onto a basis, enqueued on `stream`:
///   - `Side::left`:  `basis` is P (`rows x r`), R = P^T G is `r x cols`;
///   - `Side::right`: `basis` is Q (`cols x r`), R = G Q is `rows x r`.
/// R overwritten. cuBLAS fp32 GEMM (no TF32). G, basis and R: one unit stride each (row- or
/// column-major, any leading dimension).
/// \throws Error (nothing enqueued) on disagreeing shapes, r = 0, bad strides or pointers, R
///   overlapping G or the basis, or no CUDA device.
void project(DeviceMatrix<const float> G, DeviceMatrix<const float> basis, optim::Side side, DeviceMatrix<float> R,
             cudaStream_t stream = nullptr);

/// Back-projection into the weight, enqueued on `stream`: `W += alpha P N` (left; N `r x cols`)
/// or `W += alpha N Q^T` (right; N `rows x r`), one fp32 GEMM with beta = 1.
/// \throws Error (nothing enqueued) on disagreeing shapes, an alpha that is not finite in fp32, bad strides or
///   pointers, W overlapping N or the basis, or no CUDA device.
void back_project(DeviceMatrix<float> W, DeviceMatrix<const float> N, DeviceMatrix<const float> basis, optim::Side side,
                  double alpha, cudaStream_t stream = nullptr);

}  // namespace cuda

LOWRANK_END_NAMESPACE
