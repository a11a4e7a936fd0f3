/// \file
/// LoRA-XS / LoRA-SB core: `W + s B R A` with frozen `B` (`out x r`) and `A` (`r x in`) and a
/// trainable `R` (`r x r`); the gradient of `R` from the full-weight gradient; the LoRA-XS init
/// (SVD of `W`) and the LoRA-SB init (SVD of an approximate first optimiser step). Conventions:
/// `../shared/reference/adapters.md` section 4 (official code `RaghavSinghal10/lora-sb`).
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
#include "lowrank/linalg/svd.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt::variants_detail {
/// The randomized SVD of LoRA-XS / LoRA-SB: range width q = r (no oversampling), as the reference code.
template <class Options>
linalg::SvdOptions svd_options_q_r(Index r, const Options& o) {
  return linalg::SvdOptions{.q = r, .power_iterations = o.niter, .seed = o.seed, .stream = o.stream, .method = o.method};
}
}  // namespace adapt::variants_detail

namespace adapt {

/// A LoRA-XS / LoRA-SB adapter: effective weight `W_0 + s B R A` (`out x in`), stored in the base
/// layout `layout` when made dense. Only `R` trains; `A` and `B` are frozen (in the reference
/// code they have `requires_grad=False`).
///
/// \tparam T factor precision, `float` or `double`
template <class T = float>
struct LoraXsAdapter {
  RowMatrix<T> A;                   ///< `r x in`, frozen
  RowMatrix<T> B;                   ///< `out x r`, frozen
  RowMatrix<T> R;                   ///< `r x r`, the only trainable factor
  double scale = 1.0;               ///< `s`; the LoRA-SB scripts set `lora_alpha = r`, hence 1
  Layout layout = Layout::out_in;   ///< layout of the base weight this adapter belongs to

  /// The rank r (rows of A).
  [[nodiscard]] Index rank() const noexcept { return A.rows(); }
  /// Input features (columns of A).
  [[nodiscard]] Index in_features() const noexcept { return A.cols(); }
  /// Output features (rows of B).
  [[nodiscard]] Index out_features() const noexcept { return B.rows(); }
};

namespace variants_detail {
template <class T>
void check_xs(const char* fn, const LoraXsAdapter<T>& a) {
  const Index r = a.A.rows();
  if (r < 1) lowrank::detail::fail(fn, "A is {}x{}: rank must be >= 1", a.A.rows(), a.A.cols());
  if (a.B.cols() != r)
    lowrank::detail::fail(fn, "B is {}x{} but A is {}x{} (B must be out x r)", a.B.rows(), a.B.cols(), a.A.rows(), a.A.cols());
  if (a.R.rows() != r || a.R.cols() != r)
    lowrank::detail::fail(fn, "R is {}x{} but the rank is {} (R must be r x r)", a.R.rows(), a.R.cols(), r);
  check_finite_scalar(fn, "scale", a.scale);
}
}  // namespace variants_detail

/// Dense delta `s B R A`, in the base layout (`out x in` for `Layout::out_in`, `in x out` for
/// `Layout::in_out`), computed in precision `T`. Cost: `2 r^2 in + 2 out r in` flops.
/// \throws Error if the factor shapes disagree or `scale` is not finite.
template <class T>
[[nodiscard]] RowMatrix<T> dense_delta(const LoraXsAdapter<T>& a) {
  variants_detail::check_xs("lowrank::adapt::dense_delta(LoraXsAdapter)", a);
  RowMatrix<T> d = (static_cast<T>(a.scale) * a.B) * (a.R * a.A);
  return variants_detail::in_layout<T>(std::move(d), a.layout);
}

/// Adapter branch of the forward: `s ((X A^T) R^T) B^T` for `X` (`tokens x in`), giving
/// `tokens x out`. Add the base output `X W^T` (e.g. with `lora_forward`) for the full layer.
/// Cost: `2 tokens r (in + r + out)` flops.
/// \throws Error if `X` has the wrong number of columns or the factors disagree.
template <class T, class DX>
[[nodiscard]] RowMatrix<T> adapter_output(const LoraXsAdapter<T>& a, const Eigen::MatrixBase<DX>& X) {
  constexpr const char* fn = "lowrank::adapt::adapter_output(LoraXsAdapter)";
  variants_detail::check_xs(fn, a);
  variants_detail::check_input(fn, X, a.in_features());
  RowMatrix<T> t = X.template cast<T>() * a.A.transpose();
  RowMatrix<T> u = t * a.R.transpose();
  return static_cast<T>(a.scale) * (u * a.B.transpose());
}

/// Full forward `X W^T + s ((X A^T) R^T) B^T (+ bias)` for `X` (`tokens x in`), in precision `T`.
/// `bias` (length `out`) may be null. \throws Error on shape mismatches.
template <SupportedScalar TW, class T, class DX>
[[nodiscard]] RowMatrix<T> forward(WeightView<TW> W, const LoraXsAdapter<T>& a, const Eigen::MatrixBase<DX>& X,
                                   const T* bias = nullptr) {
  constexpr const char* fn = "lowrank::adapt::forward(LoraXsAdapter)";
  variants_detail::check_xs(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  variants_detail::check_input(fn, X, a.in_features());
  RowMatrix<T> Y = variants_detail::base_output<T>(W, X) + adapter_output(a, X);
  if (bias != nullptr)
    for (Index i = 0; i < Y.rows(); ++i)
      for (Index j = 0; j < Y.cols(); ++j) Y(i, j) += bias[j];
  return Y;
}

/// Gradient of the loss with respect to `R` from the full-weight gradient `G = dL/dW` (same shape
/// and layout as the base weight): `dL/dR = s B^T G_{out x in} A^T` (`r x r`), computed in fp64
/// and rounded to `T`. Cost: `2 r out in + 2 r^2 in` flops.
/// \throws Error if `G` does not match the adapter's features.
template <class T, SupportedScalar TG>
[[nodiscard]] RowMatrix<T> grad_R(const LoraXsAdapter<T>& a, WeightView<TG> G) {
  constexpr const char* fn = "lowrank::adapt::grad_R";
  variants_detail::check_xs(fn, a);
  variants_detail::check_weight_shape(fn, "G", G, a.out_features(), a.in_features());
  const RowMatrix<double> g = variants_detail::to_out_in_f64(G);
  const RowMatrix<double> gr = a.scale * (a.B.template cast<double>().transpose() * g) * a.A.template cast<double>().transpose();
  return gr.template cast<T>();
}

/// The change of the effective weight when `R` changes by `dR`: `s B dR A`, in the base layout.
/// With `dR = grad_R(a, G)` this is LoRA-SB's equivalent full-weight gradient
/// `s^2 B B^T G A^T A`, which lies in `span(B) x span(A)`; an SGD step `R -= lr dR` moves the
/// weight by `-lr` times it. Computed in fp64, rounded to `T`.
/// \throws Error if `dR` is not `r x r`.
template <class T, class DR>
[[nodiscard]] RowMatrix<T> full_space_update(const LoraXsAdapter<T>& a, const Eigen::MatrixBase<DR>& dR) {
  constexpr const char* fn = "lowrank::adapt::full_space_update";
  variants_detail::check_xs(fn, a);
  if (dR.rows() != a.rank() || dR.cols() != a.rank())
    lowrank::detail::fail(fn, "dR is {}x{} but the rank is {}", dR.rows(), dR.cols(), a.rank());
  RowMatrix<double> d =
      a.scale * (a.B.template cast<double>() * dR.template cast<double>()) * a.A.template cast<double>();
  return variants_detail::in_layout<T>(d.template cast<T>(), a.layout);
}

/// Merges `s B R A` into `W` through `rank_update` (`U = B R`, `V = A^T`, alpha = `s`): one
/// rounding per element into W's storage type. \throws Error (W unchanged) on shape mismatch.
template <SupportedScalar TW, class T>
void merge(WeightView<TW> W, const LoraXsAdapter<T>& a, const RankUpdateOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::merge(LoraXsAdapter)";
  variants_detail::check_xs(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  const RowMatrix<T> U = a.B * a.R;
  const RowMatrix<T> V = a.A.transpose();
  rank_update(W, view(U), view(V), a.scale, options);
}

/// Removes `s B R A` from `W` (the negated `merge`); not bit-exact in low-precision storage.
/// \throws Error (W unchanged) on shape mismatch.
template <SupportedScalar TW, class T>
void unmerge(WeightView<TW> W, const LoraXsAdapter<T>& a, const RankUpdateOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::unmerge(LoraXsAdapter)";
  variants_detail::check_xs(fn, a);
  variants_detail::check_weight_shape(fn, "W", W, a.out_features(), a.in_features());
  const RowMatrix<T> U = a.B * a.R;
  const RowMatrix<T> V = a.A.transpose();
  rank_update(W, view(U), view(V), -a.scale, options);
}

/// Options of `init_lora_xs`.
struct LoraXsOptions {
  double scale = 1.0;           ///< `s` of the adapter
  double r_std = 1e-5;          ///< standard deviation of the Gaussian `R` (reference: 1e-5)
  int niter = 10;               ///< power iterations of the randomized SVD (reference: `svd_lowrank(q=r, niter=10)`)
  std::uint64_t seed = 42;      ///< key of the SVD's test matrix and of `R` (reference: seed 42)
  std::uint64_t stream = 0;     ///< SVD uses `stream`, `R` uses `stream + 1`
  linalg::SvdMethod method = linalg::SvdMethod::automatic;  ///< exact SVD for small problems
};

/// LoRA-XS init from the base weight (not modified): truncated SVD `W ~ U_r S_r V_r^T`
/// (`linalg::truncated_svd`, range width `q = r`, `niter` power iterations, fp64), then
/// `B = U_r` (orthonormal columns), `A = S_r V_r^T` (orthogonal rows with norms `S_r`) and
/// `R ~ N(0, r_std^2)` from `RandomStream(seed, stream + 1).normal(i * r + j)`, so `dW ~ 0`.
/// \throws Error if `r` is not in `[1, min(out, in)]` or W's view is invalid.
template <class T = float, SupportedScalar TW>
[[nodiscard]] LoraXsAdapter<T> init_lora_xs(WeightView<TW> W, Index r, const LoraXsOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::init_lora_xs";
  variants_detail::check_weight_view(fn, "W", W);
  const Index out = W.out_features(), in = W.in_features();
  if (r < 1 || r > std::min(out, in))
    lowrank::detail::fail(fn, "rank r = {} is not in [1, min(out, in)] for W {}x{} (out={}, in={})", r, W.matrix.rows,
                          W.matrix.cols, out, in);
  variants_detail::check_finite_scalar(fn, "scale", options.scale);
  variants_detail::check_finite_scalar(fn, "r_std", options.r_std);
  const RowMatrix<double> M = variants_detail::to_out_in_f64(W);
  const auto svd = linalg::truncated_svd(M, r, variants_detail::svd_options_q_r(r, options));
  LoraXsAdapter<T> a;
  a.scale = options.scale;
  a.layout = W.layout;
  a.B = svd.U.leftCols(r).template cast<T>();
  a.A = (svd.S.head(r).asDiagonal() * svd.V.leftCols(r).transpose()).template cast<T>();
  a.R.resize(r, r);
  const RandomStream rng(options.seed, options.stream + 1);
  for (Index i = 0; i < r; ++i)
    for (Index j = 0; j < r; ++j)
      a.R(i, j) = static_cast<T>(options.r_std * static_cast<double>(rng.normal(static_cast<std::uint64_t>(i * r + j))));
  return a;
}

/// How LoRA-SB turns the accumulated gradient `G` into the approximate first step `dW_1`.
enum class LoraSbStep {
  sign,  ///< `dW_1 = -eta_eff sign(G)` (Adam's first step; the official code); `sign(0) = 0`
  raw,   ///< `dW_1 = -eta_eff G` (the raw gradient; third-party variant)
};

/// Options of `init_lora_sb`.
struct LoraSbOptions {
  LoraSbStep step = LoraSbStep::sign;  ///< sign of the gradient (default) or the raw gradient
  double scale = 1.0;                  ///< `s`; `R = diag(S_r) / s` so that `s B R A = trunc_r(dW_1)`
  int niter = 10;                      ///< power iterations (reference: `svd_lowrank(q=r, niter=10)`)
  std::uint64_t seed = 42;             ///< key of the SVD's test matrix
  std::uint64_t stream = 0;            ///< stream of the SVD's test matrix
  linalg::SvdMethod method = linalg::SvdMethod::automatic;  ///< exact SVD for small problems
};

/// LoRA-SB init from an accumulated gradient `G` (shape and layout of the base weight, e.g. the sum
/// of per-sample gradients): `dW_1 = -eta_eff sign(G)` (or `-eta_eff G`), truncated SVD
/// `dW_1 ~ U_r S_r V_r^T` (fp64, `q = r`, `niter`), `B = U_r`, `A = V_r^T`, `R = diag(S_r) / s`.
/// Hence `B^T B = A A^T = I_r` and `s B R A` is the best rank-r approximation of `dW_1` (exactly so
/// with the exact SVD). The base weight is NOT modified: the model starts at
/// `W_0 + trunc_r(dW_1)`, an approximate first optimiser step (unlike PiSSA, which subtracts).
/// In `train_arithmetic.py`, `eta_eff = lr / (warmup_ratio * total_steps)`.
/// \throws Error if `r` is not in `[1, min(out, in)]`, `eta_eff` or `scale` is not finite or
/// `scale == 0`, or `G` has a non-finite entry.
template <class T = float, SupportedScalar TG>
[[nodiscard]] LoraXsAdapter<T> init_lora_sb(WeightView<TG> G, Index r, double eta_eff, const LoraSbOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::init_lora_sb";
  variants_detail::check_weight_view(fn, "G", G);
  const Index out = G.out_features(), in = G.in_features();
  if (r < 1 || r > std::min(out, in))
    lowrank::detail::fail(fn, "rank r = {} is not in [1, min(out, in)] for G {}x{} (out={}, in={})", r, G.matrix.rows,
                          G.matrix.cols, out, in);
  variants_detail::check_finite_scalar(fn, "eta_eff", eta_eff);
  variants_detail::check_finite_scalar(fn, "scale", options.scale);
  if (options.scale == 0) lowrank::detail::fail(fn, "scale must be non-zero (R = diag(S) / scale)");
  RowMatrix<double> M = variants_detail::to_out_in_f64(G);
  variants_detail::check_finite(fn, "G", M);
  if (options.step == LoraSbStep::sign)
    M = M.unaryExpr([](double g) { return g > 0 ? 1.0 : (g < 0 ? -1.0 : 0.0); });
  M *= -eta_eff;
  const auto svd = linalg::truncated_svd(M, r, variants_detail::svd_options_q_r(r, options));
  LoraXsAdapter<T> a;
  a.scale = options.scale;
  a.layout = G.layout;
  a.B = svd.U.leftCols(r).template cast<T>();
  a.A = svd.V.leftCols(r).transpose().template cast<T>();
  a.R = (svd.S.head(r) / options.scale).asDiagonal().toDenseMatrix().template cast<T>();
  return a;
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
