/// \file
/// Incremental rank-1 sums with a selector vector: `W = W_0 + sum_{i active} s_i u_i v_i^T`.
/// Components are appended one at a time; a selector switches each on or off; the first
/// `frozen_prefix` components are not trainable (their gradients are zero). Applying and merging go
/// through `rank_update` with the active components packed as one rank-k factor pair.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

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

/// A sum of rank-1 terms `sum_i selected_i s_i u_i v_i^T` (`out x in`) on a base weight of layout
/// `layout`. Columns of `U` (`out x K`) are the `u_i`, columns of `V` (`in x K`) the `v_i`.
///
/// \tparam T factor precision, `float` or `double`
template <class T = float>
struct RankOneSum {
  RowMatrix<T> U;                       ///< `out x K`, column i = u_i
  RowMatrix<T> V;                       ///< `in x K`, column i = v_i
  Vector<T> s;                          ///< `K` coefficients
  std::vector<std::uint8_t> selected;   ///< `K` flags: 1 = component is active
  Index frozen_prefix = 0;              ///< components `[0, frozen_prefix)` are not trainable
  Layout layout = Layout::out_in;       ///< layout of the base weight this sum belongs to

  /// An empty sum for an `out x in` weight.
  RankOneSum() = default;
  /// An empty sum (K = 0) for a weight with `out` outputs and `in` inputs.
  /// \throws Error if `out` or `in` is negative.
  RankOneSum(Index out, Index in, Layout layout_ = Layout::out_in) : U(out < 0 ? 0 : out, 0), V(in < 0 ? 0 : in, 0), layout(layout_) {
    if (out < 0 || in < 0) lowrank::detail::fail("lowrank::adapt::RankOneSum", "out = {} and in = {} must be >= 0", out, in);
  }

  /// Number of components K (active or not).
  [[nodiscard]] Index size() const noexcept { return U.cols(); }
  /// Output features.
  [[nodiscard]] Index out_features() const noexcept { return U.rows(); }
  /// Input features.
  [[nodiscard]] Index in_features() const noexcept { return V.rows(); }
  /// Number of active components.
  [[nodiscard]] Index active_count() const noexcept {
    Index n = 0;
    for (auto f : selected) n += f != 0;
    return n;
  }
  /// Whether component `i` is active. \throws Error if `i` is out of range.
  [[nodiscard]] bool active(Index i) const {
    check_index("lowrank::adapt::RankOneSum::active", i);
    return selected[static_cast<std::size_t>(i)] != 0;
  }
  /// Whether component `i` receives gradients: active and not in the frozen prefix.
  /// \throws Error if `i` is out of range.
  [[nodiscard]] bool trainable(Index i) const { return active(i) && i >= frozen_prefix; }

  /// Appends `s u v^T` (`u` of length `out`, `v` of length `in`) and returns its index. Cost: a
  /// copy of U and V (`O((out + in) K)`); reserve by building U and V directly for many components.
  /// \throws Error (sum unchanged) if a length is wrong or an entry is not finite.
  template <class DU, class DV>
  Index append(const Eigen::MatrixBase<DU>& u, const Eigen::MatrixBase<DV>& v, double coefficient, bool is_active = true) {
    constexpr const char* fn = "lowrank::adapt::RankOneSum::append";
    if (u.size() != out_features() || v.size() != in_features())
      lowrank::detail::fail(fn, "u has {} entries and v {} but the sum is out={} x in={}", u.size(), v.size(), out_features(),
                            in_features());
    variants_detail::check_finite(fn, "u", u);
    variants_detail::check_finite(fn, "v", v);
    variants_detail::check_finite_scalar(fn, "coefficient", coefficient);
    const Index k = size();
    U.conservativeResize(Eigen::NoChange, k + 1);
    V.conservativeResize(Eigen::NoChange, k + 1);
    s.conservativeResize(k + 1);
    for (Index i = 0; i < out_features(); ++i) U(i, k) = static_cast<T>(u(i));
    for (Index j = 0; j < in_features(); ++j) V(j, k) = static_cast<T>(v(j));
    s(k) = static_cast<T>(coefficient);
    selected.push_back(is_active ? 1 : 0);
    return k;
  }

  /// Switches component `i` on or off. \throws Error if `i` is out of range.
  void set_active(Index i, bool on) {
    check_index("lowrank::adapt::RankOneSum::set_active", i);
    selected[static_cast<std::size_t>(i)] = on ? 1 : 0;
  }

  /// Freezes the first `k` components (0 <= k <= K). \throws Error if `k` is out of range.
  void freeze_prefix(Index k) {
    if (k < 0 || k > size())
      lowrank::detail::fail("lowrank::adapt::RankOneSum::freeze_prefix", "k = {} is not in [0, K = {}]", k, size());
    frozen_prefix = k;
  }

 private:
  void check_index(const char* fn, Index i) const {
    if (i < 0 || i >= size() || static_cast<std::size_t>(size()) != selected.size())
      lowrank::detail::fail(fn, "index {} is not in [0, K = {}) (selected has {} flags)", i, size(), selected.size());
  }
};

namespace variants_detail {
template <class T>
void check_sum(const char* fn, const RankOneSum<T>& a) {
  const Index K = a.U.cols();
  if (a.V.cols() != K || a.s.size() != K || static_cast<Index>(a.selected.size()) != K)
    lowrank::detail::fail(fn, "U is {}x{}, V is {}x{}, s has {} and selected {} entries: all must have K = {} components",
                          a.U.rows(), a.U.cols(), a.V.rows(), a.V.cols(), a.s.size(), a.selected.size(), K);
  if (a.frozen_prefix < 0 || a.frozen_prefix > K)
    lowrank::detail::fail(fn, "frozen_prefix = {} is not in [0, K = {}]", a.frozen_prefix, K);
}

/// The active components packed as `U_a = [s_i u_i]` (`out x k`) and `V_a = [v_i]` (`in x k`).
template <class T>
std::pair<RowMatrix<T>, RowMatrix<T>> pack_active(const RankOneSum<T>& a) {
  const Index k = a.active_count();
  RowMatrix<T> Ua(a.U.rows(), k), Va(a.V.rows(), k);
  Index c = 0;
  for (Index i = 0; i < a.U.cols(); ++i) {
    if (a.selected[static_cast<std::size_t>(i)] == 0) continue;
    Ua.col(c) = a.s(i) * a.U.col(i);
    Va.col(c) = a.V.col(i);
    ++c;
  }
  return {std::move(Ua), std::move(Va)};
}
}  // namespace variants_detail

/// Dense `sum_{i active} s_i u_i v_i^T`, in the base layout, precision `T`.
/// Cost: `2 out in k` flops for k active components. \throws Error if the sum is inconsistent.
template <class T>
[[nodiscard]] RowMatrix<T> dense_delta(const RankOneSum<T>& a) {
  variants_detail::check_sum("lowrank::adapt::dense_delta(RankOneSum)", a);
  const auto [Ua, Va] = variants_detail::pack_active(a);
  RowMatrix<T> d = Ua * Va.transpose();
  return variants_detail::in_layout<T>(std::move(d), a.layout);
}

/// Branch output `sum_{i active} s_i (X v_i) u_i^T` for `X` (`tokens x in`), `tokens x out`.
/// \throws Error on shape mismatch.
template <class T, class DX>
[[nodiscard]] RowMatrix<T> adapter_output(const RankOneSum<T>& a, const Eigen::MatrixBase<DX>& X) {
  constexpr const char* fn = "lowrank::adapt::adapter_output(RankOneSum)";
  variants_detail::check_sum(fn, a);
  variants_detail::check_input(fn, X, a.in_features());
  const auto [Ua, Va] = variants_detail::pack_active(a);
  RowMatrix<T> t = X.template cast<T>() * Va;
  return t * Ua.transpose();
}

/// Adds (`sign = +1`) the active components to `W` through one `rank_update` with the packed
/// factors `[s_i u_i]`, `[v_i]` (alpha = `weight`); nothing happens when none is active.
/// \throws Error (W unchanged) on shape mismatch or a non-finite `weight`.
template <SupportedScalar TW, class T>
void merge(WeightView<TW> W, const RankOneSum<T>& a, const RankUpdateOptions& options = {}, double weight = 1.0) {
  constexpr const char* fn = "lowrank::adapt::merge(RankOneSum)";
  variants_detail::check_sum(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  variants_detail::check_finite_scalar(fn, "weight", weight);
  if (a.active_count() == 0) return;
  const auto [Ua, Va] = variants_detail::pack_active(a);
  rank_update(W, view(Ua), view(Va), weight, options);
}

/// Removes the active components from `W` (`merge` with the negated weight).
/// \throws Error (W unchanged) on shape mismatch.
template <SupportedScalar TW, class T>
void unmerge(WeightView<TW> W, const RankOneSum<T>& a, const RankUpdateOptions& options = {}, double weight = 1.0) {
  variants_detail::check_finite_scalar("lowrank::adapt::unmerge(RankOneSum)", "weight", weight);
  merge(W, a, options, -weight);
}

/// Gradients of the loss with respect to the components, from the full-weight gradient
/// `G = dL/dW` (base shape and layout): `dL/ds_i = u_i^T G v_i`, `dL/du_i = s_i G v_i`,
/// `dL/dv_i = s_i G^T u_i`, zero for components that are inactive or in the frozen prefix.
template <class T>
struct RankOneSumGrad {
  RowMatrix<T> U;  ///< `out x K`
  RowMatrix<T> V;  ///< `in x K`
  Vector<T> s;     ///< `K`
};

/// Computes `RankOneSumGrad` in fp64 (rounded to `T`). Cost: `2 out in (K_trainable)` flops x 2.
/// \throws Error on shape mismatch.
template <class T, SupportedScalar TG>
[[nodiscard]] RankOneSumGrad<T> gradients(const RankOneSum<T>& a, WeightView<TG> G) {
  constexpr const char* fn = "lowrank::adapt::gradients(RankOneSum)";
  variants_detail::check_sum(fn, a);
  variants_detail::check_weight_shape(fn, "G", G, a.out_features(), a.in_features());
  const RowMatrix<double> g = variants_detail::to_out_in_f64(G);
  const Index K = a.size();
  RankOneSumGrad<T> r{RowMatrix<T>::Zero(a.out_features(), K), RowMatrix<T>::Zero(a.in_features(), K), Vector<T>::Zero(K)};
  for (Index i = a.frozen_prefix; i < K; ++i) {
    if (a.selected[static_cast<std::size_t>(i)] == 0) continue;
    const Eigen::VectorXd u = a.U.col(i).template cast<double>(), v = a.V.col(i).template cast<double>();
    const Eigen::VectorXd gv = g * v;
    const Eigen::VectorXd gtu = g.transpose() * u;
    const double si = static_cast<double>(a.s(i));
    r.s(i) = static_cast<T>(u.dot(gv));
    r.U.col(i) = (si * gv).template cast<T>();
    r.V.col(i) = (si * gtu).template cast<T>();
  }
  return r;
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
