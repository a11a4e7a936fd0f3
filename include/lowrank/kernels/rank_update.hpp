/// \file
/// The rank update \f$ W \leftarrow W + \alpha\, U V^\top \f$, the primitive under every method of
/// lowrank (LoRA merges, ROME/MEMIT edits, ReLoRA restarts, GaLore/EGGROLL updates).
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "lowrank/core/config.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

/// How fp32 results are rounded into bf16/fp16 storage.
enum class Rounding {
  nearest_even,  ///< round to nearest, ties to even (IEEE default); deterministic
  stochastic,    ///< round up with probability equal to the fraction of the gap; unbiased
};

/// Options of `rank_update`.
struct RankUpdateOptions {
  /// Rounding into bf16/fp16 storage; ignored for fp32/fp64 storage (the accumulation precision
  /// equals the storage precision there).
  Rounding rounding = Rounding::nearest_even;
  /// Key of the Philox stream that drives stochastic rounding: element `(i, j)` of the `W` view
  /// as passed uses `RandomStream(seed, stream).bits(i * W.cols + j)` (see `index_row0` below).
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
  /// Where this `W` sits in a larger matrix, for stochastic-rounding indices only: element `(i, j)`
  /// of the view as passed uses `bits((index_row0 + i) * index_cols + index_col0 + j)`, with
  /// `index_cols == 0` meaning `W.cols`. Updating a matrix block by block with the blocks' origins
  /// gives bitwise the result of one call on the whole matrix.
  std::uint64_t index_row0 = 0;
  std::uint64_t index_col0 = 0;
  std::uint64_t index_cols = 0;
  /// Most threads this call may use; 0 means `num_threads()`. Callers that run several updates
  /// concurrently on their own threads pass 1. Results do not depend on it.
  int max_threads = 0;
};

/// Rank-r update in place: \f$ W \leftarrow W + \alpha\, U V^\top \f$, i.e.
/// `W(i, j) += alpha * sum_k U(i, k) * V(j, k)`.
///
/// \tparam TW storage type of W (fp64, fp32, bf16, fp16)
/// \tparam TF storage type of the factors (any supported type; need not equal TW)
/// \param W      `m x n`, any strides (row- or column-major, blocks of larger matrices)
/// \param U      `m x r`, r >= 1
/// \param V      `n x r`
/// \param alpha  finite scale
///
/// Accumulates in fp64 for fp64 storage and in fp32 otherwise: each element is loaded, the r
/// products added in order k = 0..r-1 with fused multiply-adds (`alpha` folded into U first,
/// `alpha * U(i, k)` rounded once to the accumulation type), and the sum rounded once into
/// storage (nearest-even, or stochastic on request).
///
/// Determinism: for a given target (`active_target()`), the result is bitwise independent of the
/// thread count and of tiling. The scalar target rounds `a * b + c` twice where SIMD targets fuse,
/// so targets agree to rounding error, not bitwise.
///
/// NaN policy: NaN and infinity in W, U or V propagate as IEEE arithmetic says (a NaN stored into
/// bf16/fp16 stays a NaN). `alpha == 0` returns without reading U or V. Non-finite `alpha` is an
/// error.
///
/// Cost: 2·m·n·r flops, one read and one write of W; memory-bound for r up to about 16 (fp32).
/// Allocation: packs U and V into the calling thread's workspace, which grows only when a call
/// needs more than any earlier call on the same thread.
///
/// \throws Error (W unchanged) if shapes disagree, r == 0, alpha is not finite, a stride is not
/// positive, a non-empty view has a null pointer, W's elements overlap each other, or W's memory
/// overlaps U's or V's.
template <SupportedScalar TW, SupportedScalar TF>
  requires(!std::is_const_v<TW>)
void rank_update(MatrixView<TW> W, MatrixView<const TF> U, MatrixView<const TF> V, double alpha,
                 const RankUpdateOptions& options = {});

/// Rank-r update of a weight with an explicit layout: \f$ W_{out \times in} \mathrel{+}= \alpha\,
/// U V^\top \f$ with `U` (`out x r`) on the output side and `V` (`in x r`) on the input side,
/// whichever way `W` is stored (`Layout::in_out` stores the transpose, so there
/// `W_stored += alpha * V U^T`). The LoRA delta `scale * B A` is `U = B`, `V = A^T`.
///
/// The result is bitwise the same for both layouts, and stochastic-rounding indices refer to the
/// `out x in` matrix (`i` output, `j` input), so a seed rounds a weight the same way in either.
template <SupportedScalar TW, SupportedScalar TF>
  requires(!std::is_const_v<TW>)
void rank_update(WeightView<TW> W, MatrixView<const TF> U, MatrixView<const TF> V, double alpha,
                 const RankUpdateOptions& options = {}) {
  rank_update(W.as_out_in(), U, V, alpha, options);
}

namespace detail {
template <class T>
struct is_view : std::false_type {};
template <class T>
struct is_view<MatrixView<T>> : std::true_type {};
template <class T>
struct is_view<WeightView<T>> : std::true_type {};
template <class T>
struct is_const_view : std::false_type {};
template <class T>
struct is_const_view<MatrixView<const T>> : std::true_type {};

template <class T>
MatrixView<const std::remove_const_t<T>> const_view(MatrixView<T> v) noexcept {
  return {v.data, v.rows, v.cols, v.row_stride, v.col_stride};
}
template <class T>
WeightView<T> any_view(WeightView<T> w) noexcept {
  return w;
}
template <class T>
decltype(auto) any_view(T&& x) noexcept {
  return view(std::forward<T>(x));
}
/// Storage type of what `view(x)` gives, without const.
template <class T>
using view_scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(view(std::declval<const T&>()).data)>>;
}  // namespace detail

/// Convenience overload for Eigen objects (`Matrix`, `Map`, `Ref`, blocks) and non-const views:
/// `lowrank::rank_update(W, U, V, 0.5)`. U and V must have the same storage type.
template <class W, class U, class V>
  requires(!(detail::is_view<std::remove_cvref_t<W>>::value && detail::is_const_view<U>::value &&
             detail::is_const_view<V>::value)) &&
          std::same_as<detail::view_scalar_t<U>, detail::view_scalar_t<V>>
void rank_update(W&& w, const U& u, const V& v, double alpha, const RankUpdateOptions& options = {}) {
  rank_update(detail::any_view(std::forward<W>(w)), detail::const_view(view(u)), detail::const_view(view(v)), alpha,
              options);
}

LOWRANK_END_NAMESPACE
