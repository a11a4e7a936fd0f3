/// \file
/// Threading knobs of the CPU kernels (OpenMP when the library was built with it).
#pragma once

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE

/// Sets the number of threads lowrank's CPU kernels use; 0 restores the default (OpenMP's
/// `omp_get_max_threads()`, i.e. `OMP_NUM_THREADS` or the core count). Results never depend on it.
/// Also sets Eigen's thread count (`Eigen::setNbThreads`) for the Eigen products inside lowrank's
/// compiled code when it was built with OpenMP.
void set_num_threads(int threads);

/// The number of threads lowrank's CPU kernels will use (1 when built without OpenMP).
[[nodiscard]] int num_threads() noexcept;

/// Whether the library was built with OpenMP.
[[nodiscard]] bool has_openmp() noexcept;

LOWRANK_END_NAMESPACE
