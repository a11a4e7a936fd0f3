/// \file
/// Internal helpers shared by the adapter variants (`lora_xs.hpp`, `singlora.hpp`, `mora.hpp`,
/// `dora.hpp`, `selector.hpp`): weight views to fp64 `out x in` copies, dense additions into any
/// storage type with one rounding, shape and finiteness checks. Namespace `lowrank::adapt::variants_detail`.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/convert.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt::variants_detail {

/// Factor precisions the variants accept.
template <class T>
concept FactorScalar = std::same_as<T, float> || std::same_as<T, double>;

/// Validates a weight view: non-negative sizes, positive strides, non-null data when non-empty.
template <class TW>
void check_weight_view(const char* fn, const char* name, const WeightView<TW>& W) {
  const auto& m = W.matrix;
  if (m.rows < 0 || m.cols < 0) lowrank::detail::fail(fn, "{} has negative shape {}x{}", name, m.rows, m.cols);
  if (m.row_stride <= 0 || m.col_stride <= 0)
    lowrank::detail::fail(fn, "{} ({}x{}) has non-positive strides ({}, {})", name, m.rows, m.cols, m.row_stride,
                          m.col_stride);
  if (!m.empty() && m.data == nullptr) lowrank::detail::fail(fn, "{} ({}x{}) has a null data pointer", name, m.rows, m.cols);
}

/// Checks that `W` maps `in` features to `out` features.
template <class TW>
void check_weight_shape(const char* fn, const char* name, const WeightView<TW>& W, Index out, Index in) {
  check_weight_view(fn, name, W);
  if (W.out_features() != out || W.in_features() != in)
    lowrank::detail::fail(fn, "{} is {}x{} ({}: out={}, in={}) but the adapter has out={}, in={}", name, W.matrix.rows,
                          W.matrix.cols, to_string(W.layout), W.out_features(), W.in_features(), out, in);
}

/// fp64 copy of a weight as an `out x in` matrix (a transposed copy for `Layout::in_out`).
template <class TW>
RowMatrix<double> to_out_in_f64(const WeightView<TW>& W) {
  const auto v = W.as_out_in();
  RowMatrix<double> M(v.rows, v.cols);
  for (Index i = 0; i < v.rows; ++i)
    for (Index j = 0; j < v.cols; ++j) M(i, j) = static_cast<double>(static_cast<compute_t<std::remove_const_t<TW>>>(v(i, j)));
  return M;
}

/// An `out x in` matrix returned in the base layout: itself for `out_in`, its transpose for `in_out`.
template <class T>
RowMatrix<T> in_layout(RowMatrix<T> out_in, Layout layout) {
  if (layout == Layout::out_in) return out_in;
  return out_in.transpose();
}

/// Whether every entry is finite.
template <class Derived>
bool all_finite(const Eigen::MatrixBase<Derived>& M) {
  for (Index j = 0; j < M.cols(); ++j)
    for (Index i = 0; i < M.rows(); ++i)
      if (!std::isfinite(static_cast<double>(M(i, j)))) return false;
  return true;
}

/// Throws unless every entry of `M` is finite.
template <class Derived>
void check_finite(const char* fn, const char* name, const Eigen::MatrixBase<Derived>& M) {
  if (!all_finite(M)) lowrank::detail::fail(fn, "{} ({}x{}) has a non-finite entry", name, M.rows(), M.cols());
}

/// Throws unless `x` is finite.
inline void check_finite_scalar(const char* fn, const char* name, double x) {
  if (!std::isfinite(x)) lowrank::detail::fail(fn, "{} = {} is not finite", name, x);
}

/// Writes the fp64 `out x in` matrix `value` into `W` (any layout, any storage type), rounded once
/// per element with `options.rounding` (fp64 -> bf16/fp16 goes through fp32, as `convert` says);
/// stochastic-rounding indices refer to the `out x in` matrix, as in `rank_update`.
template <SupportedScalar TW>
void store_out_in(WeightView<TW> W, const RowMatrix<double>& value, const RankUpdateOptions& options) {
  const MatrixView<const double> src(value.data(), value.rows(), value.cols(), value.cols(), 1);
  ConvertOptions copt = options;
  lowrank::convert<TW, double>(src, W.as_out_in(), copt);
}

/// `W += sign * delta` for an fp64 `out x in` delta: the sum is formed in fp64 from the stored
/// value and rounded once into storage. `W` is unchanged if anything throws.
template <SupportedScalar TW>
void add_dense(WeightView<TW> W, const RowMatrix<double>& delta_out_in, double sign, const RankUpdateOptions& options) {
  RowMatrix<double> sum = to_out_in_f64(W);
  sum += sign * delta_out_in;
  store_out_in(W, sum, options);
}

/// `X W^T` for a `tokens x in` input and a weight of either layout, in precision `T`.
template <class T, class TW, class DX>
RowMatrix<T> base_output(const WeightView<TW>& W, const Eigen::MatrixBase<DX>& X) {
  const auto v = W.as_out_in();
  RowMatrix<T> Wt(v.rows, v.cols);
  for (Index i = 0; i < v.rows; ++i)
    for (Index j = 0; j < v.cols; ++j) Wt(i, j) = static_cast<T>(static_cast<compute_t<std::remove_const_t<TW>>>(v(i, j)));
  return X.template cast<T>() * Wt.transpose();
}

/// Checks the `tokens x in` input of a forward against the adapter's `in`.
template <class DX>
void check_input(const char* fn, const Eigen::MatrixBase<DX>& X, Index in) {
  if (X.cols() != in) lowrank::detail::fail(fn, "X is {}x{} but the adapter has in={}", X.rows(), X.cols(), in);
}

}  // namespace adapt::variants_detail

LOWRANK_END_NAMESPACE
