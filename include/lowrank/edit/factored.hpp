/// \file
/// A factored weight edit `dW = V U^T` (`out x in`) and how it meets a weight: applied, reverted
/// and used in a forward pass without ever forming `dW`, in an explicit `Layout`.
#pragma once

#include "lowrank/core/config.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace edit {

/// A rank-r edit of an `out x in` weight: `dW = V U^T`, with `U` (`in x r`) on the key side and
/// `V` (`out x r`) on the value side, in fp64. ROME returns r = 1 (`U` = the unit direction u,
/// `V` = v), MEMIT r = n (`U` = MEMIT's `adj_k`, `V` = its residual R).
///
/// Layouts (never guessed from a shape; square weights are ambiguous):
/// `Layout::out_in` (torch `nn.Linear`, GPT-J `fc_out`) stores `W` and receives `W += V U^T`;
/// `Layout::in_out` (GPT-2 `Conv1D` `c_proj`) stores `W^T` and receives `W += U V^T`.
struct FactoredEdit {
  ColMatrix<double> U;  ///< in x r (key side)
  ColMatrix<double> V;  ///< out x r (value side)

  Index rank() const { return U.cols(); }
  Index in_features() const { return U.rows(); }
  Index out_features() const { return V.rows(); }
  /// `V U^T` (`out x in`), for tests and small problems.
  ColMatrix<double> dense() const { return V * U.transpose(); }
};

/// `W += sign * dW` in W's layout, through `rank_update` (fp32 accumulation for fp32/bf16/fp16
/// weights, fp64 for fp64, one rounding into storage; `options` selects stochastic rounding).
/// \throws Error (W unchanged) if the edit's shapes do not match W's `out x in`, U and V disagree
///   on the rank, the rank is 0, sign is not finite, or as `rank_update`.
template <SupportedScalar TW>
  requires(!std::is_const_v<TW>)
void apply(WeightView<TW> W, const FactoredEdit& edit, double sign = 1, const RankUpdateOptions& options = {});

/// `apply(W, edit, -1)`: subtracts the edit. Not bit-exact in general (each element is rounded
/// twice); the error per element is at most a few units in the last place of the weight type
/// times `|W| + |dW|` (the revert bound of editing.md 8.3). Use an `EditLog` snapshot for a
/// bit-exact restore.
template <SupportedScalar TW>
  requires(!std::is_const_v<TW>)
void revert(WeightView<TW> W, const FactoredEdit& edit, const RankUpdateOptions& options = {}) {
  apply(W, edit, -1.0, options);
}

/// Factored forward of the edit alone: `Y += X dW^T = (X U) V^T` for `X` (`tokens x in`, any
/// strides) and `Y` (`tokens x out`), in fp64 accumulation: `2 tokens r (in + out)` flops, `dW`
/// never formed. Add it to the base forward to get the edited layer's output.
/// \throws Error (Y unchanged) on shape mismatches.
void forward_add(MatrixView<const float> X, const FactoredEdit& edit, MatrixView<float> Y);

/// Checks `edit` against an `out x in` weight (the messages of `apply`); exposed for callers
/// that validate before doing other work.
void check_edit(const char* fn, const FactoredEdit& edit, Index out, Index in);

}  // namespace edit

LOWRANK_END_NAMESPACE
