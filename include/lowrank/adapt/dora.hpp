/// \file
/// DoRA's magnitude vector for forward and merging (PEFT `dora.py::DoraLinearLayer`): a LoRA
/// `s B A` plus a per-output-channel magnitude `m` (length `out`); the layer computes
/// `diag(m / ||W + s B A||_row) (W + s B A) x + b`, where `||.||_row` is the L2 norm of each output
/// row over the input dimension (`dim=1` of the `out x in` weight) and is treated as a constant
/// (detached, DoRA paper section 4.3). The bias is not rescaled. Conventions:
/// `../shared/reference/adapters.md` sections 1.6 and 11.2.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include <Eigen/Core>

#include "lowrank/adapt/variants_detail.hpp"
#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt {

/// A DoRA adapter: LoRA factors (PEFT shapes) plus the magnitude vector.
///
/// \tparam T factor precision, `float` or `double`
template <class T = float>
struct DoraAdapter {
  RowMatrix<T> A;                   ///< `r x in`
  RowMatrix<T> B;                   ///< `out x r`
  double scale = 1.0;               ///< LoRA scaling `s` (alpha / r or alpha / sqrt(r))
  Vector<T> magnitude;              ///< `m`, length `out` (PEFT key `...lora_magnitude_vector`)
  Layout layout = Layout::out_in;   ///< layout of the base weight this adapter belongs to

  /// The rank r.
  [[nodiscard]] Index rank() const noexcept { return A.rows(); }
  /// Input features.
  [[nodiscard]] Index in_features() const noexcept { return A.cols(); }
  /// Output features.
  [[nodiscard]] Index out_features() const noexcept { return B.rows(); }
};

/// What `merge` of a DoRA adapter returns and `unmerge` needs: the row norms
/// `||W + s B A||_row` at merge time (fp64), so that unmerge can invert the rescaling.
struct DoraMergeCache {
  Vector<double> weight_norm;  ///< length `out`
};

namespace variants_detail {

template <class T>
void check_dora_factors(const char* fn, const DoraAdapter<T>& a) {
  if (a.A.rows() < 1) lowrank::detail::fail(fn, "A is {}x{}: rank must be >= 1", a.A.rows(), a.A.cols());
  if (a.B.cols() != a.A.rows())
    lowrank::detail::fail(fn, "B is {}x{} but A is {}x{} (B must be out x r)", a.B.rows(), a.B.cols(), a.A.rows(), a.A.cols());
  check_finite_scalar(fn, "scale", a.scale);
}

template <class T>
void check_dora(const char* fn, const DoraAdapter<T>& a) {
  check_dora_factors(fn, a);
  if (a.magnitude.size() != a.B.rows())
    lowrank::detail::fail(fn, "magnitude has {} entries but out = {} (B is {}x{})", a.magnitude.size(), a.B.rows(),
                          a.B.rows(), a.B.cols());
}

/// fp64 `W + s B A` (`out x in`).
template <class T, class TW>
RowMatrix<double> dora_combined(const WeightView<TW>& W, const DoraAdapter<T>& a) {
  RowMatrix<double> M = to_out_in_f64(W);
  M.noalias() += a.scale * (a.B.template cast<double>() * a.A.template cast<double>());
  return M;
}

inline void check_norms(const char* fn, const Vector<double>& n) {
  for (Index i = 0; i < n.size(); ++i)
    if (!(n(i) > 0) || !std::isfinite(n(i)))
      lowrank::detail::fail(fn, "row {} of W + s B A has norm {} (must be finite and > 0)", i, n(i));
}

}  // namespace variants_detail

/// Row norms `||W + s B A||_row` (L2 over the input dimension of each output channel), fp64,
/// length `out`; `W` in either layout. Cost: `2 out in r` flops.
/// \throws Error on shape mismatch.
template <SupportedScalar TW, class T>
[[nodiscard]] Vector<double> dora_weight_norm(WeightView<TW> W, const DoraAdapter<T>& a) {
  constexpr const char* fn = "lowrank::adapt::dora_weight_norm";
  variants_detail::check_dora_factors(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  return variants_detail::dora_combined(W, a).rowwise().norm();
}

/// PEFT's `dora_init`: sets `a.magnitude = ||W + s B A||_row` (so with `B = 0`, `m = ||W||_row` and
/// the output equals the base output). \throws Error (adapter unchanged) on shape mismatch.
template <SupportedScalar TW, class T>
void init_magnitude(DoraAdapter<T>& a, WeightView<TW> W) {
  constexpr const char* fn = "lowrank::adapt::init_magnitude";
  variants_detail::check_dora_factors(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  a.magnitude = variants_detail::dora_combined(W, a).rowwise().norm().template cast<T>();
}

/// DoRA forward `diag(m / ||W + s B A||_row) (X W^T + s (X A^T) B^T)^T + bias` for `X`
/// (`tokens x in`), giving `tokens x out`: output column `i` is scaled by `k_i = m_i / n_i`, the bias
/// (length `out`, may be null) is added unscaled. The norm is computed in fp64, the products in `T`.
/// \throws Error on shape mismatch or a zero / non-finite row norm.
template <SupportedScalar TW, class T, class DX>
[[nodiscard]] RowMatrix<T> forward(WeightView<TW> W, const DoraAdapter<T>& a, const Eigen::MatrixBase<DX>& X,
                                   const T* bias = nullptr) {
  constexpr const char* fn = "lowrank::adapt::forward(DoraAdapter)";
  variants_detail::check_dora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  variants_detail::check_input(fn, X, a.in_features());
  const Vector<double> n = variants_detail::dora_combined(W, a).rowwise().norm();
  variants_detail::check_norms(fn, n);
  RowMatrix<T> Y = variants_detail::base_output<T>(W, X);
  RowMatrix<T> XA = X.template cast<T>() * a.A.transpose();
  Y.noalias() += static_cast<T>(a.scale) * (XA * a.B.transpose());
  for (Index j = 0; j < Y.cols(); ++j) {
    const T k = static_cast<T>(static_cast<double>(a.magnitude(j)) / n(j));
    Y.col(j) *= k;
    if (bias != nullptr) Y.col(j).array() += bias[j];
  }
  return Y;
}

/// Merges a DoRA adapter: `W' = diag(m / n) (W + s B A)` with `n = ||W + s B A||_row`, computed in
/// fp64 and rounded once into W's storage (fp64 -> bf16/fp16 through fp32, as `convert`). Returns
/// the norms `n` needed by `unmerge`. The bias is not touched.
/// \throws Error (W unchanged) on shape mismatch, a non-finite magnitude or a zero row norm.
template <SupportedScalar TW, class T>
[[nodiscard]] DoraMergeCache merge(WeightView<TW> W, const DoraAdapter<T>& a, const RankUpdateOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::merge(DoraAdapter)";
  variants_detail::check_dora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  variants_detail::check_finite(fn, "magnitude", a.magnitude);
  RowMatrix<double> M = variants_detail::dora_combined(W, a);
  DoraMergeCache cache{M.rowwise().norm()};
  variants_detail::check_norms(fn, cache.weight_norm);
  for (Index i = 0; i < M.rows(); ++i) M.row(i) *= static_cast<double>(a.magnitude(i)) / cache.weight_norm(i);
  variants_detail::store_out_in(W, M, options);
  return cache;
}

/// Undoes `merge` with the cached norms: `W = W' / k - s B A`, `k = m / n`, in fp64, rounded once
/// into storage. Exact up to rounding (about one ulp of the storage type per element).
/// \throws Error (W unchanged) on shape mismatch, a cache of the wrong length, or a zero `k`.
template <SupportedScalar TW, class T>
void unmerge(WeightView<TW> W, const DoraAdapter<T>& a, const DoraMergeCache& cache, const RankUpdateOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::unmerge(DoraAdapter)";
  variants_detail::check_dora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  if (cache.weight_norm.size() != a.out_features())
    lowrank::detail::fail(fn, "cache.weight_norm has {} entries but out = {}", cache.weight_norm.size(), a.out_features());
  variants_detail::check_norms(fn, cache.weight_norm);
  for (Index i = 0; i < a.magnitude.size(); ++i)
    if (!(std::abs(static_cast<double>(a.magnitude(i))) > 0) || !std::isfinite(static_cast<double>(a.magnitude(i))))
      lowrank::detail::fail(fn, "magnitude({}) = {} cannot be inverted", i, static_cast<double>(a.magnitude(i)));
  RowMatrix<double> M = variants_detail::to_out_in_f64(W);
  for (Index i = 0; i < M.rows(); ++i) M.row(i) *= cache.weight_norm(i) / static_cast<double>(a.magnitude(i));
  M.noalias() -= a.scale * (a.B.template cast<double>() * a.A.template cast<double>());
  variants_detail::store_out_in(W, M, options);
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
