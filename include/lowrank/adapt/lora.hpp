/// \file
/// LoRA adapters with PEFT's conventions: factors `A` (`r x in`) and `B` (`out x r`), scaling
/// `s = alpha / r` (or `alpha / sqrt(r)` for rsLoRA), the dense delta `s B A`, and merge / unmerge /
/// safe merge of that delta into a base weight of any storage type and either `Layout`.
///
/// Precision: merges go through `lowrank::rank_update`, which accumulates `W + s w B A` in fp32
/// (fp64 for fp64 storage) and rounds each element once into the storage type (nearest-even, or
/// stochastic on request). Unmerge subtracts the same delta and is therefore exact only in exact
/// arithmetic: in bf16/fp16 storage `unmerge(merge(W))` differs from `W` by up to about one ulp of
/// `max(|W|, |W + delta|)` per element (peft#1388). Keep a copy of W when exact reversal matters.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt {

/// Precision of LoRA factors and of their arithmetic: fp32 (PEFT's default, it upcasts bf16/fp16
/// adapters) or fp64.
template <class T>
concept FactorScalar = std::same_as<T, float> || std::same_as<T, double>;

/// PEFT's LoRA scaling: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA (arXiv 2312.03732).
/// \throws Error if `rank < 1` or `alpha` is not finite.
inline double lora_scaling(double alpha, Index rank, bool use_rslora) {
  if (rank < 1) lowrank::detail::fail("lowrank::adapt::lora_scaling", "rank is {}; it must be at least 1", rank);
  if (!std::isfinite(alpha)) {
    lowrank::detail::fail("lowrank::adapt::lora_scaling", "alpha is {}; it must be finite (rank {})", alpha, rank);
  }
  const auto r = static_cast<double>(rank);
  return use_rslora ? alpha / std::sqrt(r) : alpha / r;
}

/// A LoRA adapter of one linear layer, stored as PEFT stores it: `delta = s B A` with `A`
/// (`rank x in`, PEFT `lora_A.weight`) and `B` (`out x rank`, `lora_B.weight`), both row-major so
/// that safetensors buffers map onto them without a transpose.
///
/// `layout` is the layout of the BASE weight the adapter belongs to (PEFT's `fan_in_fan_out`, set
/// for GPT-2 `Conv1D`): it never changes the factors' shapes, only the dense delta, which is
/// `out x in` for `Layout::out_in` and its transpose `(s B A)^T` (`in x out`) for `Layout::in_out`.
///
/// `lora_bias` is PEFT's `lora_bias=True` bias of `lora_B` (`out` entries), empty otherwise; it is
/// merged into the base layer's bias as `bias += s * lora_bias`.
///
/// Invariants checked by every function that takes an adapter (not by the struct):
/// `A.rows() == B.cols() >= 1`, `in, out >= 1`, `alpha` finite, `lora_bias` empty or `out` long.
template <FactorScalar T = float>
struct LoraAdapter {
  RowMatrix<T> A;                   ///< rank x in
  RowMatrix<T> B;                   ///< out x rank
  double alpha = 8;                 ///< PEFT `lora_alpha`
  bool use_rslora = false;          ///< scaling alpha / sqrt(rank) instead of alpha / rank
  Layout layout = Layout::out_in;   ///< layout of the base weight (`in_out` = PEFT fan_in_fan_out)
  Vector<T> lora_bias;              ///< empty, or `out` entries (PEFT `lora_bias=True`)

  /// The rank r (rows of A).
  [[nodiscard]] Index rank() const noexcept { return A.rows(); }
  /// Input features (columns of A).
  [[nodiscard]] Index in_features() const noexcept { return A.cols(); }
  /// Output features (rows of B).
  [[nodiscard]] Index out_features() const noexcept { return B.rows(); }
  /// `lora_scaling(alpha, rank(), use_rslora)`. \throws Error for rank 0 or a non-finite alpha.
  [[nodiscard]] double scaling() const { return lora_scaling(alpha, rank(), use_rslora); }
};

}  // namespace adapt

namespace detail {

/// Value of any supported storage scalar as a double (exact).
template <SupportedScalar T>
inline double lora_to_double(T x) noexcept {
  return static_cast<double>(static_cast<compute_t<T>>(x));
}

template <SupportedScalar T>
inline bool lora_isfinite(T x) noexcept {
  return std::isfinite(static_cast<compute_t<T>>(x));
}

/// Checks the adapter invariants; `what` names the argument in messages.
template <class T>
void lora_check_adapter(const char* fn, const char* what, const adapt::LoraAdapter<T>& a) {
  if (a.A.rows() < 1) fail(fn, "{}.A is {}x{}: the rank (rows of A) must be at least 1", what, a.A.rows(), a.A.cols());
  if (a.A.cols() < 1 || a.B.rows() < 1) {
    fail(fn, "{}.A is {}x{} and {}.B is {}x{}: in and out features must be at least 1", what, a.A.rows(), a.A.cols(),
         what, a.B.rows(), a.B.cols());
  }
  if (a.B.cols() != a.A.rows()) {
    fail(fn, "{}.B is {}x{} but {}.A is {}x{}: B must have one column per row of A (the rank)", what, a.B.rows(),
         a.B.cols(), what, a.A.rows(), a.A.cols());
  }
  if (!std::isfinite(a.alpha)) fail(fn, "{}.alpha is {}; it must be finite", what, a.alpha);
  if (a.lora_bias.size() != 0 && a.lora_bias.size() != a.B.rows()) {
    fail(fn, "{}.lora_bias has {} entries but {}.B is {}x{}: it must be empty or have out = {} entries", what,
         a.lora_bias.size(), what, a.B.rows(), a.B.cols(), a.B.rows());
  }
}

/// Checks that `W` is the base weight of `a` (features and layout).
template <class TW, class T>
void lora_check_weight(const char* fn, const WeightView<TW>& W, const adapt::LoraAdapter<T>& a) {
  if (W.layout != a.layout) {
    fail(fn, "W has layout {} but the adapter was made for layout {} (W is {}x{})", to_string(W.layout),
         to_string(a.layout), W.matrix.rows, W.matrix.cols);
  }
  if (W.out_features() != a.out_features() || W.in_features() != a.in_features()) {
    fail(fn, "W is {}x{} ({}: out {}, in {}) but the adapter has A {}x{} and B {}x{} (out {}, in {})", W.matrix.rows,
         W.matrix.cols, to_string(W.layout), W.out_features(), W.in_features(), a.A.rows(), a.A.cols(), a.B.rows(),
         a.B.cols(), a.out_features(), a.in_features());
  }
  if (!W.matrix.empty() && W.matrix.data == nullptr) fail(fn, "W ({}x{}) has a null data pointer", W.matrix.rows, W.matrix.cols);
}

/// Checks the bias arguments of a merge.
template <class TB, class T>
void lora_check_bias(const char* fn, std::span<TB> bias, const adapt::LoraAdapter<T>& a) {
  if (!bias.empty() && static_cast<Index>(bias.size()) != a.out_features()) {
    fail(fn, "bias has {} entries but the adapter has out = {} (B is {}x{})", bias.size(), a.out_features(), a.B.rows(),
         a.B.cols());
  }
  if (a.lora_bias.size() != 0 && bias.empty()) {
    fail(fn, "the adapter has a lora_bias of {} entries but no base bias was given to merge it into",
         a.lora_bias.size());
  }
}

/// First non-finite entry of an Eigen matrix as (row, col), or (-1, -1).
template <class Derived>
std::pair<Index, Index> lora_first_nonfinite(const Eigen::MatrixBase<Derived>& M) {
  for (Index i = 0; i < M.rows(); ++i)
    for (Index j = 0; j < M.cols(); ++j)
      if (!lora_isfinite(M(i, j))) return {i, j};
  return {-1, -1};
}

/// The base weight as an `out x in` fp64 matrix (exact copy).
template <class TW>
RowMatrix<double> lora_out_in_f64(const WeightView<TW>& W) {
  const auto v = W.as_out_in();
  RowMatrix<double> M(v.rows, v.cols);
  for (Index i = 0; i < v.rows; ++i)
    for (Index j = 0; j < v.cols; ++j) M(i, j) = lora_to_double(v(i, j));
  return M;
}

/// `bias[i] += scale * lora_bias[i]` in compute_t<TB>, rounded once to nearest-even into TB.
template <class TB, class T>
void lora_bias_add(std::span<TB> out, std::span<const std::remove_const_t<TB>> in, const Vector<T>& lora_bias,
                   double scale) {
  using C = compute_t<TB>;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const C value = static_cast<C>(in[i]) + static_cast<C>(scale * static_cast<double>(lora_bias(static_cast<Index>(i))));
    out[i] = static_cast<std::remove_const_t<TB>>(value);
  }
}

template <class TW, class T, class TB>
void lora_apply(const char* fn, WeightView<TW> W, const adapt::LoraAdapter<T>& a, double weight, double sign,
                Rounding rounding, std::uint64_t seed, std::uint64_t stream, int max_threads, std::span<TB> bias) {
  lora_check_adapter(fn, "adapter", a);
  lora_check_weight(fn, W, a);
  lora_check_bias(fn, bias, a);
  if (!std::isfinite(weight)) fail(fn, "options.weight is {}; it must be finite", weight);
  const double scale = sign * weight * a.scaling();
  RankUpdateOptions ro;
  ro.rounding = rounding;
  ro.seed = seed;
  ro.stream = stream;
  ro.max_threads = max_threads;
  // rank_update validates (overlaps, strides) before its first write: on a throw nothing changed.
  rank_update(W, view(a.B), view(a.A).transposed(), scale, ro);
  if (a.lora_bias.size() != 0) {
    std::vector<std::remove_const_t<TB>> old(bias.begin(), bias.end());
    lora_bias_add(bias, std::span<const std::remove_const_t<TB>>(old), a.lora_bias, scale);
  }
}

}  // namespace detail

namespace adapt {

/// The dense delta `weight * s * B A` in the base layout: `out x in` for `Layout::out_in`,
/// `in x out` (the transpose) for `Layout::in_out`. Computed in fp64 and rounded once to `Out`
/// (default: the factor type `T`). Cost: `2 out in r` flops and one `out x in` allocation.
/// \throws Error for an invalid adapter or a non-finite `weight`.
template <class Out = void, FactorScalar T>
  requires(std::is_void_v<Out> || SupportedScalar<Out>)
[[nodiscard]] RowMatrix<std::conditional_t<std::is_void_v<Out>, T, Out>> dense_delta(const LoraAdapter<T>& adapter,
                                                                                    double weight = 1.0) {
  using R = std::conditional_t<std::is_void_v<Out>, T, Out>;
  constexpr const char* fn = "lowrank::adapt::dense_delta";
  lowrank::detail::lora_check_adapter(fn, "adapter", adapter);
  if (!std::isfinite(weight)) lowrank::detail::fail(fn, "weight is {}; it must be finite", weight);
  const double s = weight * adapter.scaling();
  const RowMatrix<double> d = s * (adapter.B.template cast<double>() * adapter.A.template cast<double>());
  if (adapter.layout == Layout::out_in) return d.template cast<R>();
  return d.transpose().template cast<R>();
}

/// Options of `merge`, `unmerge`, `safe_merge` and `safe_unmerge`.
struct MergeOptions {
  /// Rounding of the merged weight into bf16/fp16 storage (ignored for fp32/fp64 storage).
  Rounding rounding = Rounding::nearest_even;
  /// Philox key of stochastic rounding: element `(i, j)` of the `out x in` weight uses
  /// `RandomStream(seed, stream).bits(i * in + j)` whatever the layout (as `rank_update`). Use a
  /// different stream for an unmerge than for its merge if the two roundings must be independent.
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
  /// Multiplier of the delta: `W += weight * s * B A` (PEFT `set_scale` / `scale_layer`). Finite.
  double weight = 1.0;
  /// Most threads of the update (0: `num_threads()`); results do not depend on it.
  int max_threads = 0;
};

/// Merges the adapter into its base weight in place: `W_out_in += weight * s * B A`, and
/// `bias += weight * s * lora_bias` when the adapter has a `lora_bias`.
///
/// \param W     the base weight, `out x in` (`Layout::out_in`) or `in x out` (`Layout::in_out`),
///              any strides, storage fp64/fp32/bf16/fp16; its layout must equal `adapter.layout`
/// \param bias  the base layer's bias (`out` entries), needed only when the adapter has a
///              `lora_bias`; accumulated in fp32 (fp64 for fp64) and rounded once to nearest-even
///
/// One `rank_update(W, B, A^T, weight * s)` call: fp32 accumulation (fp64 for fp64 storage) and a
/// single rounding per element into the storage type. NaN/Inf in the factors propagate into W
/// (use `safe_merge` to refuse them). Cost: `2 out in r` flops, one pass over W.
/// Several adapters merged in turn are undone by unmerging them in the reverse (LIFO) order; in
/// exact arithmetic any order works, in rounded storage LIFO restores W within the accumulated
/// rounding bound described in the file comment.
/// \throws Error (W and bias unchanged) on invalid adapters, mismatched shapes or layouts, a bias
/// of the wrong length, a missing bias for a `lora_bias`, a non-finite weight, or views
/// `rank_update` refuses.
template <SupportedScalar TW, FactorScalar T, SupportedScalar TB = std::remove_const_t<TW>>
  requires(!std::is_const_v<TW> && !std::is_const_v<TB>)
void merge(WeightView<TW> W, const LoraAdapter<T>& adapter, const MergeOptions& options = {},
           std::span<TB> bias = {}) {
  lowrank::detail::lora_apply("lowrank::adapt::merge", W, adapter, options.weight, 1.0, options.rounding,
                              options.seed, options.stream, options.max_threads, bias);
}

/// Removes a merged adapter: `W_out_in -= weight * s * B A` (and the `lora_bias`), with the same
/// single rounding as `merge`. Not an exact inverse in rounded storage: in fp32 the round trip
/// restores W within a few ulps of `max(|W|, |W + delta|)` per element, in bf16/fp16 within about
/// one ulp of it; keep a copy (or an fp32 shadow) of W when exact reversal is required.
/// \throws Error as `merge`.
template <SupportedScalar TW, FactorScalar T, SupportedScalar TB = std::remove_const_t<TW>>
  requires(!std::is_const_v<TW> && !std::is_const_v<TB>)
void unmerge(WeightView<TW> W, const LoraAdapter<T>& adapter, const MergeOptions& options = {},
             std::span<TB> bias = {}) {
  lowrank::detail::lora_apply("lowrank::adapt::unmerge", W, adapter, options.weight, -1.0, options.rounding,
                              options.seed, options.stream, options.max_threads, bias);
}

}  // namespace adapt

namespace detail {

template <class TW, class T, class TB>
void lora_safe_apply(const char* fn, WeightView<TW> W, const adapt::LoraAdapter<T>& a,
                     const adapt::MergeOptions& o, double sign, std::span<TB> bias) {
  using W0 = std::remove_const_t<TW>;
  using B0 = std::remove_const_t<TB>;
  lora_check_adapter(fn, "adapter", a);
  lora_check_weight(fn, W, a);
  lora_check_bias(fn, bias, a);
  if (!std::isfinite(o.weight)) fail(fn, "options.weight is {}; it must be finite", o.weight);
  if (auto [i, j] = lora_first_nonfinite(a.A); i >= 0) {
    fail(fn, "adapter.A ({}x{}) has a non-finite value {} at ({}, {})", a.A.rows(), a.A.cols(), a.A(i, j), i, j);
  }
  if (auto [i, j] = lora_first_nonfinite(a.B); i >= 0) {
    fail(fn, "adapter.B ({}x{}) has a non-finite value {} at ({}, {})", a.B.rows(), a.B.cols(), a.B(i, j), i, j);
  }
  if (auto [i, j] = lora_first_nonfinite(a.lora_bias); i >= 0) {
    fail(fn, "adapter.lora_bias ({} entries) has a non-finite value {} at {}", a.lora_bias.size(), a.lora_bias(i), i);
  }
  const double scale = sign * o.weight * a.scaling();

  // Stage the merged weight in a temporary with W's layout (so that stochastic-rounding indices,
  // which refer to the out x in matrix, and hence the bits, equal those of an in-place merge).
  const MatrixView<TW>& m = W.matrix;
  RowMatrix<W0> staged(m.rows, m.cols);
  for (Index i = 0; i < m.rows; ++i)
    for (Index j = 0; j < m.cols; ++j) staged(i, j) = m(i, j);
  RankUpdateOptions ro;
  ro.rounding = o.rounding;
  ro.seed = o.seed;
  ro.stream = o.stream;
  ro.max_threads = o.max_threads;
  rank_update(WeightView<W0>{view(staged), W.layout}, view(a.B), view(a.A).transposed(), scale, ro);
  {
    const auto out_in = WeightView<W0>{view(staged), W.layout}.as_out_in();
    for (Index i = 0; i < out_in.rows; ++i)
      for (Index j = 0; j < out_in.cols; ++j)
        if (!lora_isfinite(out_in(i, j))) {
          fail(fn,
               "the merged weight W + delta has a non-finite value {} at (out {}, in {}) (W is {}x{}, {}); W was "
               "{} there; nothing was changed",
               lora_to_double(out_in(i, j)), i, j, m.rows, m.cols, to_string(W.layout),
               lora_to_double(W.as_out_in()(i, j)));
        }
  }
  std::vector<B0> staged_bias;
  if (a.lora_bias.size() != 0) {
    std::vector<B0> old(bias.begin(), bias.end());
    staged_bias.resize(bias.size());
    lora_bias_add(std::span<B0>(staged_bias), std::span<const B0>(old), a.lora_bias, scale);
    for (std::size_t i = 0; i < staged_bias.size(); ++i)
      if (!lora_isfinite(staged_bias[i])) {
        fail(fn, "the merged bias has a non-finite value {} at {} (bias was {}); nothing was changed",
             lora_to_double(staged_bias[i]), i, lora_to_double(old[i]));
      }
  }
  // Commit: nothing below can fail.
  for (Index i = 0; i < m.rows; ++i)
    for (Index j = 0; j < m.cols; ++j) m(i, j) = staged(i, j);
  for (std::size_t i = 0; i < staged_bias.size(); ++i) bias[i] = staged_bias[i];
}

}  // namespace detail

namespace adapt {

/// Merge that validates everything before it changes anything ("validate, then commit"; PEFT's
/// `safe_merge=True` without peft#3710's gaps): the factors and `lora_bias` must be finite; the
/// merged weight `W + weight * s * B A` is computed into a temporary (bitwise what `merge` would
/// store, including stochastic rounding) and must be finite (overflow to Inf in bf16/fp16 and a
/// non-finite W are refused too); the merged bias likewise; only then are weight and bias written,
/// together. A bias given for an adapter without `lora_bias` is neither changed nor checked.
/// Cost: `merge` plus one temporary copy of W.
/// \throws Error naming the first offending element; W and bias are then bitwise unchanged.
template <SupportedScalar TW, FactorScalar T, SupportedScalar TB = std::remove_const_t<TW>>
  requires(!std::is_const_v<TW> && !std::is_const_v<TB>)
void safe_merge(WeightView<TW> W, const LoraAdapter<T>& adapter, const MergeOptions& options = {},
                std::span<TB> bias = {}) {
  lowrank::detail::lora_safe_apply("lowrank::adapt::safe_merge", W, adapter, options, 1.0, bias);
}

/// `unmerge` with the validation and all-or-nothing commit of `safe_merge`.
/// \throws Error (W and bias bitwise unchanged) as `safe_merge`.
template <SupportedScalar TW, FactorScalar T, SupportedScalar TB = std::remove_const_t<TW>>
  requires(!std::is_const_v<TW> && !std::is_const_v<TB>)
void safe_unmerge(WeightView<TW> W, const LoraAdapter<T>& adapter, const MergeOptions& options = {},
                  std::span<TB> bias = {}) {
  lowrank::detail::lora_safe_apply("lowrank::adapt::safe_unmerge", W, adapter, options, -1.0, bias);
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
