/// \file
/// Owning Eigen matrix aliases used by the layers above the kernels. Factors follow PEFT and
/// safetensors: row-major (`RowMatrix`), so a file buffer maps onto them without a transpose.
#pragma once

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

/// Row-major dynamic matrix (LoRA factors, weights read from safetensors).
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Column-major dynamic matrix (Eigen's default; orthonormal bases, SVD outputs).
template <class T>
using ColMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
/// Dynamic column vector.
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

LOWRANK_END_NAMESPACE
