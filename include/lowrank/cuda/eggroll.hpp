/// \file
/// EGGROLL population forward on a CUDA device: every row of a batch is one population member's
/// input, evaluated with that member's low-rank perturbed weight, the noise generated inside the
/// kernel from the Philox streams of `lowrank/es/noise.hpp` (never stored).
#pragma once

#include <cstdint>

#include "lowrank/core/config.hpp"
#include "lowrank/cuda/device.hpp"
#include "lowrank/es/noise.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace cuda {

/// The population whose members a batch holds.
struct EggrollPopulation {
  es::NoiseKey key;                                  ///< seed, layer id and noise epoch
  std::int64_t rank = 1;                             ///< r, 1..16
  double sigma = 0;                                  ///< noise scale (finite)
  std::int64_t population = 0;                       ///< N, all members (even unless Antithetic::none)
  std::int64_t member0 = 0;                          ///< row i of the batch is member `member0 + i`
  es::Antithetic antithetic = es::Antithetic::interleaved;
};

/// Population forward, enqueued on `stream`: for every row i (member m = member0 + i, noise
/// `(k, sign) = es::member_noise(m, population, antithetic)`)
/// \f$ Y_i = X_i W^\top + \mathrm{sign}\,\frac{\sigma}{\sqrt r}\,(X_i B_k) A_k^\top \f$,
/// with `A_k` (`out x r`) and `B_k` (`in x r`) the factors of noise index k (es/noise.hpp),
/// regenerated in the kernel. Y overwritten.
///
/// \tparam T storage type of X, W and Y: fp32 or bf16
/// \param X  `rows x in` device matrix, unit stride along one dimension
/// \param W  `out x in` device matrix, unit stride along one dimension
/// \param Y  `rows x out`, unit column stride (row-major); must not overlap X or W
///
/// Arithmetic: `t_c = sum_j X(i, j) B(j, c)` in fp32, `y(o) = (sign sigma / sqrt r) sum_c t_c A(o, c)`
/// in fp32, rounded into Y; then cuBLAS adds the base product (`beta = 1`, fp32 accumulation).
/// Antithetic pairs whose two members are both in the batch generate their noise once.
///
/// \throws Error (nothing enqueued) on disagreeing shapes, rank outside 1..16, a non-finite sigma,
/// members outside `[0, population)`, an odd population with antithetic pairs, bad strides or
/// pointers, Y overlapping X or W, or no CUDA device.
template <ForwardScalar T>
void eggroll_forward(DeviceMatrix<const T> X, DeviceMatrix<const T> W, const EggrollPopulation& population,
                     DeviceMatrix<T> Y, cudaStream_t stream = nullptr);

/// The factors of one noise index, materialised (for tests, updates and debugging): `A` (`out x
/// r`) and `B` (`in x r`), fp32 device matrices with any positive strides, filled with the
/// stream's normals exactly as `eggroll_forward` generates them; bitwise equal to
/// `es::noise_normal` on the host.
void eggroll_noise_factors(const es::NoiseKey& key, std::uint32_t noise_index, DeviceMatrix<float> A,
                           DeviceMatrix<float> B, cudaStream_t stream = nullptr);

}  // namespace cuda

LOWRANK_END_NAMESPACE
