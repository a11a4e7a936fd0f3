/// \file
/// LoRA initialisations with PEFT's conventions (`init_lora_weights`): the default
/// (kaiming-uniform A, zero B), "gaussian", "orthogonal", PiSSA ("pissa", "pissa_niter_K") and
/// OLoRA, plus the conversion of a residualised adapter to a plain LoRA.
///
/// WARNING: `init_pissa` and `init_olora` MUTATE THE BASE WEIGHT. They move the principal part of
/// W into the adapter and overwrite W with the residual `W_res = W - s B A`, so that the adapted
/// layer computes the same function at step 0. Afterwards the base weight is no longer the
/// pretrained one: disabling the adapter, or loading another adapter trained on the original W
/// next to it, gives wrong outputs (peft#2184). To ship the result as an ordinary LoRA of the
/// ORIGINAL weight, keep a copy of the initial adapter and call `to_plain_lora(trained, initial)`.
///
/// Randomness comes only from `lowrank::RandomStream(seed, stream)`; the index of every draw is
/// documented with each function, so a (seed, stream) pair gives the same adapter on every
/// machine and thread count (bitwise for the uniform draws; normal draws to a few ulp across
/// math libraries). Torch's RNG is not reproduced: compare distributions, not bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include <Eigen/Core>
#include <Eigen/QR>

#include "lowrank/adapt/lora.hpp"
#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"
#include "lowrank/linalg/svd.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace detail {

inline void lora_check_init(const char* fn, Index out, Index in, Index r, double alpha) {
  if (out < 1 || in < 1) fail(fn, "out = {} and in = {}; both must be at least 1", out, in);
  if (r < 1 || r > std::min(out, in)) {
    fail(fn, "rank r = {} is outside [1, min(out, in) = {}] (out {}, in {})", r, std::min(out, in), out, in);
  }
  if (!std::isfinite(alpha)) fail(fn, "alpha is {}; it must be finite (rank {})", alpha, r);
}

template <class T>
adapt::LoraAdapter<T> lora_shell(Index out, Index in, Index r, double alpha, Layout layout, bool use_rslora) {
  adapt::LoraAdapter<T> a;
  a.A.resize(r, in);
  a.B.resize(out, r);
  a.alpha = alpha;
  a.use_rslora = use_rslora;
  a.layout = layout;
  return a;
}

template <class TW>
void lora_check_finite_weight(const char* fn, const WeightView<TW>& W) {
  const auto v = W.as_out_in();
  if (!v.empty() && v.data == nullptr) fail(fn, "W ({}x{}) has a null data pointer", W.matrix.rows, W.matrix.cols);
  for (Index i = 0; i < v.rows; ++i)
    for (Index j = 0; j < v.cols; ++j)
      if (!lora_isfinite(v(i, j))) {
        fail(fn, "W ({}x{}, {}) has a non-finite value {} at (out {}, in {})", W.matrix.rows, W.matrix.cols,
             to_string(W.layout), lora_to_double(v(i, j)), i, j);
      }
}

/// W_out_in -= s B A through the rank-update kernel (one rounding into W's storage).
template <class TW, class T>
void lora_residualise(WeightView<TW> W, const adapt::LoraAdapter<T>& a, double s) {
  rank_update(W, view(a.B), view(a.A).transposed(), -s, RankUpdateOptions{});
}

}  // namespace detail

namespace adapt {

/// PEFT's default init (`init_lora_weights=True`, Microsoft loralib): `kaiming_uniform_(A,
/// a=sqrt(5))`, i.e. `A ~ U(-1/sqrt(in), 1/sqrt(in))` (variance `1/(3 in)`), and `B = 0`, so the
/// delta is exactly zero and the adapted layer equals the base layer at step 0.
///
/// Randomness: `A(i, j) = (2 u - 1) / sqrt(in)` with `u = RandomStream(seed, stream).uniform(i * in + j)`
/// (computed in double, rounded once to T), so A lies in `[-1/sqrt(in), 1/sqrt(in))`.
/// \param out, in features of the base layer (`out x in` as `nn.Linear`, whatever `layout`)
/// \param r      rank in [1, min(out, in)]
/// \throws Error for a rank outside [1, min(out, in)], non-positive features or a non-finite alpha.
template <FactorScalar T = float>
[[nodiscard]] LoraAdapter<T> init_default(Index out, Index in, Index r, double alpha, Layout layout,
                                          std::uint64_t seed, std::uint64_t stream = 0, bool use_rslora = false) {
  lowrank::detail::lora_check_init("lowrank::adapt::init_default", out, in, r, alpha);
  auto a = lowrank::detail::lora_shell<T>(out, in, r, alpha, layout, use_rslora);
  const RandomStream rng(seed, stream);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  for (Index i = 0; i < r; ++i)
    for (Index j = 0; j < in; ++j) {
      const double u = rng.uniform(static_cast<std::uint64_t>(i * in + j));
      a.A(i, j) = static_cast<T>((2.0 * u - 1.0) * bound);
    }
  a.B.setZero();
  return a;
}

/// PEFT's "gaussian" init: `A ~ N(0, (1/r)^2)` (std `1/r`), `B = 0`.
/// Randomness: `A(i, j) = RandomStream(seed, stream).normal(i * in + j) / r`.
/// \throws Error as `init_default`.
template <FactorScalar T = float>
[[nodiscard]] LoraAdapter<T> init_gaussian(Index out, Index in, Index r, double alpha, Layout layout,
                                           std::uint64_t seed, std::uint64_t stream = 0, bool use_rslora = false) {
  lowrank::detail::lora_check_init("lowrank::adapt::init_gaussian", out, in, r, alpha);
  auto a = lowrank::detail::lora_shell<T>(out, in, r, alpha, layout, use_rslora);
  const RandomStream rng(seed, stream);
  for (Index i = 0; i < r; ++i)
    for (Index j = 0; j < in; ++j)
      a.A(i, j) = static_cast<T>(static_cast<double>(rng.normal(static_cast<std::uint64_t>(i * in + j))) /
                                 static_cast<double>(r));
  a.B.setZero();
  return a;
}

/// PEFT's "orthogonal" init: Q from the QR of an `r x r` Gaussian matrix G;
/// `A = (G_A Q[0::2])^T / 10` with `G_A` (`in x r/2`) Gaussian, `B = G_B^T Q[1::2] / 10` with
/// `G_B` (`r/2 x out`) Gaussian. Both factors are non-zero (both get gradients) but `B A = 0` in
/// exact arithmetic because the factors use disjoint rows of Q (rounding level in T);
/// `rank(A), rank(B) <= r/2`. The base weight is untouched.
///
/// Randomness (`g(k) = RandomStream(seed, stream).normal(k)`, computed in double):
/// `G(i, j) = g(i r + j)`; `G_A(p, q) = g(r^2 + p (r/2) + q)`; `G_B(p, q) = g(r^2 + in r/2 + p out + q)`.
/// \throws Error if r is odd (as PEFT), and as `init_default`.
template <FactorScalar T = float>
[[nodiscard]] LoraAdapter<T> init_orthogonal(Index out, Index in, Index r, double alpha, Layout layout,
                                             std::uint64_t seed, std::uint64_t stream = 0, bool use_rslora = false) {
  constexpr const char* fn = "lowrank::adapt::init_orthogonal";
  lowrank::detail::lora_check_init(fn, out, in, r, alpha);
  if (r % 2 != 0) lowrank::detail::fail(fn, "rank r = {} is odd; the orthogonal init needs an even rank", r);
  const RandomStream rng(seed, stream);
  const auto g = [&](Index k) { return static_cast<double>(rng.normal(static_cast<std::uint64_t>(k))); };
  const Index h = r / 2;
  ColMatrix<double> G(r, r);
  for (Index i = 0; i < r; ++i)
    for (Index j = 0; j < r; ++j) G(i, j) = g(i * r + j);
  const Eigen::HouseholderQR<ColMatrix<double>> qr(G);
  const ColMatrix<double> Q = qr.householderQ() * ColMatrix<double>::Identity(r, r);
  ColMatrix<double> q_even(h, r), q_odd(h, r);
  for (Index k = 0; k < h; ++k) {
    q_even.row(k) = Q.row(2 * k);
    q_odd.row(k) = Q.row(2 * k + 1);
  }
  ColMatrix<double> GA(in, h), GB(h, out);
  for (Index p = 0; p < in; ++p)
    for (Index q = 0; q < h; ++q) GA(p, q) = g(r * r + p * h + q);
  for (Index p = 0; p < h; ++p)
    for (Index q = 0; q < out; ++q) GB(p, q) = g(r * r + in * h + p * out + q);
  auto a = lowrank::detail::lora_shell<T>(out, in, r, alpha, layout, use_rslora);
  a.A = ((GA * q_even).transpose() / 10.0).template cast<T>();
  a.B = ((GB.transpose() * q_odd) / 10.0).template cast<T>();
  return a;
}

/// Options of `init_pissa`.
struct PissaOptions {
  /// -1: exact SVD (PEFT "pissa"). K >= 0: randomized SVD with range width q = r and K power
  /// iterations, no oversampling (PEFT "pissa_niter_K", `torch.svd_lowrank(W, q=r, niter=K)`).
  int niter = -1;
  /// Key of the randomized SVD's Gaussian test matrix (`linalg::SvdOptions` seed/stream; index
  /// scheme in `linalg::truncated_svd`). Unused for the exact SVD.
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
};

/// The `PissaOptions` of a PEFT `init_lora_weights` string: "pissa" (exact SVD) or
/// "pissa_niter_K" with K a non-negative decimal integer (randomized, K power iterations).
/// \throws Error for any other string.
[[nodiscard]] inline PissaOptions pissa_options_from_peft(std::string_view init_lora_weights) {
  constexpr const char* fn = "lowrank::adapt::pissa_options_from_peft";
  PissaOptions o;
  if (init_lora_weights == "pissa") return o;
  constexpr std::string_view prefix = "pissa_niter_";
  if (init_lora_weights.substr(0, prefix.size()) != prefix || init_lora_weights.size() == prefix.size() ||
      init_lora_weights.size() > prefix.size() + 9) {
    lowrank::detail::fail(fn, "\"{}\" is neither \"pissa\" nor \"pissa_niter_K\" (K a non-negative integer)",
                          init_lora_weights);
  }
  int k = 0;
  for (const char c : init_lora_weights.substr(prefix.size())) {
    if (c < '0' || c > '9') {
      lowrank::detail::fail(fn, "\"{}\": K in \"pissa_niter_K\" must be a non-negative integer", init_lora_weights);
    }
    k = 10 * k + (c - '0');
  }
  o.niter = k;
  return o;
}

/// PiSSA init (arXiv 2404.02948; PEFT `pissa_init`). MUTATES W into the residual.
///
/// With the (truncated) SVD `W_out_in ~ U_r S_r V_r^T` computed in fp64 and `s` the adapter
/// scaling: `A = diag(sqrt(S_r / s)) V_r^T` (r x in), `B = U_r diag(sqrt(S_r / s))` (out x r),
/// rounded to T; then `W <- W - s B A` through `rank_update` with the rounded factors (fp32
/// accumulation, fp64 for fp64 storage, one nearest-even rounding into W's storage), so that
/// `W_res + s B A = W` to that rounding. With the exact SVD, `B A = U_r S_r V_r^T / s`,
/// `A A^T = B^T B = diag(S_r) / s` and `sigma_1(W_res) = sigma_{r+1}(W)`.
///
/// \param W       base weight, either layout, any storage (processed as `out x in`; PEFT
///                transposes for fan_in_fan_out the same way); OVERWRITTEN with the residual
/// \param r       rank in [1, min(out, in)]
/// \param alpha   must be > 0 (S / s needs s > 0)
/// Cost: exact: one SVD of the out x in matrix in fp64, O(out in min(out, in)); randomized:
/// O(out in r (niter + 1)). Memory: one fp64 copy of W.
/// \throws Error (W unchanged) for a rank outside [1, min(out, in)], alpha <= 0 or non-finite,
/// niter < -1, or a W with a NaN or infinity.
template <FactorScalar T = float, SupportedScalar TW>
  requires(!std::is_const_v<TW>)
[[nodiscard]] LoraAdapter<T> init_pissa(WeightView<TW> W, Index r, double alpha, bool use_rslora = false,
                                        const PissaOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::init_pissa";
  lowrank::detail::lora_check_init(fn, W.out_features(), W.in_features(), r, alpha);
  if (!(alpha > 0)) lowrank::detail::fail(fn, "alpha is {}; PiSSA divides S by the scaling, so alpha must be > 0", alpha);
  if (options.niter < -1) lowrank::detail::fail(fn, "options.niter is {}; it must be -1 (exact) or >= 0", options.niter);
  lowrank::detail::lora_check_finite_weight(fn, W);
  const RowMatrix<double> M = lowrank::detail::lora_out_in_f64(W);
  linalg::SvdOptions so;
  if (options.niter < 0) {
    so.method = linalg::SvdMethod::exact;
  } else {
    so.method = linalg::SvdMethod::randomized;
    so.q = r;
    so.power_iterations = options.niter;
    so.seed = options.seed;
    so.stream = options.stream;
  }
  const auto svd = linalg::truncated_svd(M, r, so);
  auto a = lowrank::detail::lora_shell<T>(W.out_features(), W.in_features(), r, alpha, W.layout, use_rslora);
  const double s = a.scaling();
  const Vector<double> root = (svd.S / s).cwiseSqrt();
  a.A = (root.asDiagonal() * svd.V.transpose()).template cast<T>();
  a.B = (svd.U * root.asDiagonal()).template cast<T>();
  lowrank::detail::lora_residualise(W, a, s);
  return a;
}

/// OLoRA init (arXiv 2406.01775; PEFT `olora_init`). MUTATES W into the residual.
///
/// Reduced QR of `W_out_in = Q R` in fp64 (signs normalised so that `R(i, i) >= 0`):
/// `B = Q[:, :r]` (orthonormal columns, `B^T B = I`), `A = R[:r, :]` (upper trapezoidal), nothing
/// divided by s; then `W <- W - s B A` as in `init_pissa`. `B A = Q_r Q_r^T W` is the orthogonal
/// projection of W onto the span of its first r columns. Unlike PEFT (which does not transpose
/// for fan_in_fan_out), an `in_out` weight is handled as its `out x in` transpose, so the factors
/// have the usual shapes.
/// \param r rank in [1, min(out, in)]
/// Cost: one Householder QR of the out x in matrix in fp64.
/// \throws Error (W unchanged) for a rank outside [1, min(out, in)], a non-finite alpha, or a W
/// with a NaN or infinity.
template <FactorScalar T = float, SupportedScalar TW>
  requires(!std::is_const_v<TW>)
[[nodiscard]] LoraAdapter<T> init_olora(WeightView<TW> W, Index r, double alpha, bool use_rslora = false) {
  constexpr const char* fn = "lowrank::adapt::init_olora";
  const Index out = W.out_features(), in = W.in_features();
  lowrank::detail::lora_check_init(fn, out, in, r, alpha);
  lowrank::detail::lora_check_finite_weight(fn, W);
  const ColMatrix<double> M = lowrank::detail::lora_out_in_f64(W);
  const Eigen::HouseholderQR<ColMatrix<double>> qr(M);
  ColMatrix<double> Q = qr.householderQ() * ColMatrix<double>::Identity(out, r);
  RowMatrix<double> R = qr.matrixQR().topRows(r).template triangularView<Eigen::Upper>();
  for (Index i = 0; i < r; ++i)
    if (R(i, i) < 0) {
      R.row(i) *= -1.0;
      Q.col(i) *= -1.0;
    }
  auto a = lowrank::detail::lora_shell<T>(out, in, r, alpha, W.layout, use_rslora);
  a.A = R.template cast<T>();
  a.B = Q.template cast<T>();
  lowrank::detail::lora_residualise(W, a, a.scaling());
  return a;
}

/// Converts an adapter trained on a residualised base (PiSSA, OLoRA, ...) into a plain LoRA of the
/// ORIGINAL weight (PEFT `path_initial_model_for_weight_conversion`, `subtract_mutated_init`):
/// since `W_res = W - s B0 A0`, `W_res + s B A = W + s (B A - B0 A0)`, which is the rank-2r adapter
/// `A' = [A; A0]` (2r x in), `B' = [B, -B0]` (out x 2r) with `alpha' = 2 alpha` (`sqrt(2) alpha`
/// for rsLoRA), so that `s' = s`. A `lora_bias` becomes `trained - initial` (missing = 0).
/// \param trained the adapter after training
/// \param initial the adapter as the residualising init returned it
/// \throws Error if the two differ in shape, alpha, use_rslora or layout, or either is invalid.
template <FactorScalar T>
[[nodiscard]] LoraAdapter<T> to_plain_lora(const LoraAdapter<T>& trained, const LoraAdapter<T>& initial) {
  constexpr const char* fn = "lowrank::adapt::to_plain_lora";
  lowrank::detail::lora_check_adapter(fn, "trained", trained);
  lowrank::detail::lora_check_adapter(fn, "initial", initial);
  if (trained.A.rows() != initial.A.rows() || trained.A.cols() != initial.A.cols() ||
      trained.B.rows() != initial.B.rows()) {
    lowrank::detail::fail(fn, "trained has A {}x{}, B {}x{} but initial has A {}x{}, B {}x{}", trained.A.rows(),
                          trained.A.cols(), trained.B.rows(), trained.B.cols(), initial.A.rows(), initial.A.cols(),
                          initial.B.rows(), initial.B.cols());
  }
  if (trained.alpha != initial.alpha || trained.use_rslora != initial.use_rslora || trained.layout != initial.layout) {
    lowrank::detail::fail(fn,
                          "trained (alpha {}, use_rslora {}, layout {}) and initial (alpha {}, use_rslora {}, layout "
                          "{}) must have the same configuration (rank {})",
                          trained.alpha, trained.use_rslora, to_string(trained.layout), initial.alpha,
                          initial.use_rslora, to_string(initial.layout), trained.rank());
  }
  const Index r = trained.rank(), in = trained.in_features(), out = trained.out_features();
  LoraAdapter<T> c;
  c.A.resize(2 * r, in);
  c.A.topRows(r) = trained.A;
  c.A.bottomRows(r) = initial.A;
  c.B.resize(out, 2 * r);
  c.B.leftCols(r) = trained.B;
  c.B.rightCols(r) = -initial.B;
  c.use_rslora = trained.use_rslora;
  c.alpha = trained.use_rslora ? std::sqrt(2.0) * trained.alpha : 2.0 * trained.alpha;
  c.layout = trained.layout;
  if (trained.lora_bias.size() != 0 || initial.lora_bias.size() != 0) {
    c.lora_bias = Vector<T>::Zero(out);
    if (trained.lora_bias.size() != 0) c.lora_bias += trained.lora_bias;
    if (initial.lora_bias.size() != 0) c.lora_bias -= initial.lora_bias;
  }
  return c;
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
