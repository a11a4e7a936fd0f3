/// \file
/// SingLoRA: `W_0 + (alpha / r) u(t) A[:out] A[:in]^T` with one trainable factor `A`
/// (`max(out, in) x r`) and the ramp-up `u(t) = min(t / T, 1)`. Conventions:
/// `../shared/reference/adapters.md` section 5.1 (arXiv 2507.05566).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

#include <Eigen/Core>

#include "lowrank/adapt/variants_detail.hpp"
#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt {

/// The SingLoRA ramp-up `u(t) = min(t / T, 1)`; `T = 0` means no ramp-up (`u = 1`).
/// \throws Error if `t < 0` or `T < 0`.
[[nodiscard]] inline double singlora_ramp(std::int64_t t, std::int64_t T) {
  if (t < 0 || T < 0) lowrank::detail::fail("lowrank::adapt::singlora_ramp", "step t = {} and ramp_up_steps T = {} must be >= 0", t, T);
  if (T == 0 || t >= T) return 1.0;
  return static_cast<double>(t) / static_cast<double>(T);
}

/// A SingLoRA adapter on an `out x in` base weight. `A` has `max(out, in)` rows; the delta is
/// `dW = (alpha / r) u(t) A[:out] A[:in]^T` (`out x in`): for `out >= in` that is `A A*^T` with
/// `A*` the first `in` rows, for `in > out` it is `A* A^T` with `A*` the first `out` rows. (The
/// `kyegomez/SingLoRA` branch for `out > in` is suspected to build the transposed `in x out`
/// product; this form always has the shape of `W`.) For a square weight `dW` is symmetric PSD.
///
/// \tparam T factor precision, `float` or `double`
template <class T = float>
struct SingLoraAdapter {
  RowMatrix<T> A;                   ///< `max(out, in) x r`, trainable
  Index out = 0;                    ///< output features of the base weight
  Index in = 0;                     ///< input features of the base weight
  double alpha = 8.0;               ///< scaling numerator: `s = alpha / r`
  std::int64_t ramp_up_steps = 0;   ///< `T` of `u(t) = min(t / T, 1)`; 0: no ramp-up
  Layout layout = Layout::out_in;   ///< layout of the base weight this adapter belongs to

  /// The rank r (columns of A).
  [[nodiscard]] Index rank() const noexcept { return A.cols(); }
  /// Input features.
  [[nodiscard]] Index in_features() const noexcept { return in; }
  /// Output features.
  [[nodiscard]] Index out_features() const noexcept { return out; }
  /// `alpha / r`.
  [[nodiscard]] double scaling() const noexcept { return alpha / static_cast<double>(A.cols()); }
  /// The effective scale at training step `t`: `(alpha / r) u(t)`. \throws Error if `t < 0`.
  [[nodiscard]] double scale_at(std::int64_t t) const { return scaling() * singlora_ramp(t, ramp_up_steps); }
};

namespace variants_detail {
template <class T>
void check_singlora(const char* fn, const SingLoraAdapter<T>& a) {
  if (a.out < 1 || a.in < 1) lowrank::detail::fail(fn, "out = {} and in = {} must be >= 1", a.out, a.in);
  if (a.A.rows() != std::max(a.out, a.in) || a.A.cols() < 1)
    lowrank::detail::fail(fn, "A is {}x{} but must be max(out, in) x r = {}x(r >= 1) for out={}, in={}", a.A.rows(),
                          a.A.cols(), std::max(a.out, a.in), a.out, a.in);
  check_finite_scalar(fn, "alpha", a.alpha);
  if (a.ramp_up_steps < 0) lowrank::detail::fail(fn, "ramp_up_steps = {} must be >= 0", a.ramp_up_steps);
}
}  // namespace variants_detail

/// SingLoRA init: `A` (`max(out, in) x r`) kaiming-uniform with `a = sqrt(5)` as torch does for
/// a `(d, r)` tensor (fan_in = r), i.e. `A ~ U(-1/sqrt(r), 1/sqrt(r))`, entry `(i, j)` from
/// `RandomStream(seed, stream).uniform(i * r + j)`. `dW = 0` at `t = 0` although `A != 0`.
/// \throws Error if `out`, `in` or `r` is < 1, `r > max(out, in)`, `alpha` is not finite or
/// `ramp_up_steps < 0`.
template <class T = float>
[[nodiscard]] SingLoraAdapter<T> init_singlora(Index out, Index in, Index r, double alpha, std::int64_t ramp_up_steps,
                                               Layout layout = Layout::out_in, std::uint64_t seed = 0,
                                               std::uint64_t stream = 0) {
  constexpr const char* fn = "lowrank::adapt::init_singlora";
  if (out < 1 || in < 1 || r < 1 || r > std::max(out, in))
    lowrank::detail::fail(fn, "out = {}, in = {}, r = {}: need out, in >= 1 and 1 <= r <= max(out, in)", out, in, r);
  variants_detail::check_finite_scalar(fn, "alpha", alpha);
  if (ramp_up_steps < 0) lowrank::detail::fail(fn, "ramp_up_steps = {} must be >= 0", ramp_up_steps);
  SingLoraAdapter<T> a;
  a.out = out;
  a.in = in;
  a.alpha = alpha;
  a.ramp_up_steps = ramp_up_steps;
  a.layout = layout;
  const Index d = std::max(out, in);
  a.A.resize(d, r);
  const double bound = 1.0 / std::sqrt(static_cast<double>(r));
  const RandomStream rng(seed, stream);
  for (Index i = 0; i < d; ++i)
    for (Index j = 0; j < r; ++j) {
      const double u = static_cast<double>(rng.uniform(static_cast<std::uint64_t>(i * r + j)));
      a.A(i, j) = static_cast<T>((2.0 * u - 1.0) * bound);
    }
  return a;
}

/// Dense delta at training step `t`: `(alpha / r) u(t) A[:out] A[:in]^T`, in the base layout
/// (`out x in`, or `in x out` for `Layout::in_out`), precision `T`. Cost: `2 out in r` flops.
/// \throws Error if the adapter is inconsistent or `t < 0`.
template <class T>
[[nodiscard]] RowMatrix<T> dense_delta(const SingLoraAdapter<T>& a, std::int64_t t) {
  variants_detail::check_singlora("lowrank::adapt::dense_delta(SingLoraAdapter)", a);
  const double s = a.scale_at(t);
  RowMatrix<T> d = static_cast<T>(s) * (a.A.topRows(a.out) * a.A.topRows(a.in).transpose());
  return variants_detail::in_layout<T>(std::move(d), a.layout);
}

/// Adapter branch of the forward at step `t`: `s u(t) ((X A[:in]) A[:out]^T)` for `X`
/// (`tokens x in`), giving `tokens x out`. \throws Error on shape mismatch or `t < 0`.
template <class T, class DX>
[[nodiscard]] RowMatrix<T> adapter_output(const SingLoraAdapter<T>& a, const Eigen::MatrixBase<DX>& X, std::int64_t t) {
  constexpr const char* fn = "lowrank::adapt::adapter_output(SingLoraAdapter)";
  variants_detail::check_singlora(fn, a);
  variants_detail::check_input(fn, X, a.in);
  const double s = a.scale_at(t);
  RowMatrix<T> h = X.template cast<T>() * a.A.topRows(a.in);
  return static_cast<T>(s) * (h * a.A.topRows(a.out).transpose());
}

/// Full forward at step `t`: `X W^T + adapter_output(a, X, t) (+ bias)`, precision `T`.
/// \throws Error on shape mismatch or `t < 0`.
template <SupportedScalar TW, class T, class DX>
[[nodiscard]] RowMatrix<T> forward(WeightView<TW> W, const SingLoraAdapter<T>& a, const Eigen::MatrixBase<DX>& X,
                                   std::int64_t t, const T* bias = nullptr) {
  constexpr const char* fn = "lowrank::adapt::forward(SingLoraAdapter)";
  variants_detail::check_singlora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out, a.in);
  variants_detail::check_input(fn, X, a.in);
  RowMatrix<T> Y = variants_detail::base_output<T>(W, X) + adapter_output(a, X, t);
  if (bias != nullptr)
    for (Index i = 0; i < Y.rows(); ++i)
      for (Index j = 0; j < Y.cols(); ++j) Y(i, j) += bias[j];
  return Y;
}

/// Merges the delta at step `t` into `W` through `rank_update` (`U = A[:out]`, `V = A[:in]`,
/// alpha = `(alpha / r) u(t)`). \throws Error (W unchanged) on shape mismatch or `t < 0`.
template <SupportedScalar TW, class T>
void merge(WeightView<TW> W, const SingLoraAdapter<T>& a, std::int64_t t, const RankUpdateOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::merge(SingLoraAdapter)";
  variants_detail::check_singlora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out, a.in);
  const double s = a.scale_at(t);
  const RowMatrix<T> U = a.A.topRows(a.out);
  const RowMatrix<T> V = a.A.topRows(a.in);
  rank_update(W, view(U), view(V), s, options);
}

/// Removes the delta at step `t` from `W` (the negated `merge`).
/// \throws Error (W unchanged) on shape mismatch or `t < 0`.
template <SupportedScalar TW, class T>
void unmerge(WeightView<TW> W, const SingLoraAdapter<T>& a, std::int64_t t, const RankUpdateOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::unmerge(SingLoraAdapter)";
  variants_detail::check_singlora(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out, a.in);
  const double s = a.scale_at(t);
  const RowMatrix<T> U = a.A.topRows(a.out);
  const RowMatrix<T> V = a.A.topRows(a.in);
  rank_update(W, view(U), view(V), -s, options);
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
