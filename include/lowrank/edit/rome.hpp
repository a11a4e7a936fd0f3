/// \file
/// ROME's closed form (Meng et al. 2022, `kmeng01/rome`): the rank-1 edit that makes a weight map
/// the key `k_eq` to the value `v*` while changing it least in the metric of the key statistics C.
#pragma once

#include "lowrank/core/config.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/edit/factored.hpp"
#include "lowrank/linalg/spd.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace edit {

struct RomeOptions {
  /// The denominator `k_eq^T u` (u of unit norm) must exceed `min_denominator * ||k_eq||` in
  /// magnitude: a smaller one (keys nearly C^{-1}-orthogonal) would make v blow up, which the
  /// reference code does silently. >= 0.
  double min_denominator = 1e-8;
};

/// ROME's edit as a pure function:
///
///   `u = C^{-1} k_dir / ||C^{-1} k_dir||`,   `v = (v* - W k_eq) / (k_eq^T u)`,   `dW = v u^T`,
///
/// so that `(W + dW) k_eq = v*` exactly in exact arithmetic, and `(W + dW) x = W x` for every x
/// with `x^T C^{-1} k_dir = 0`. With `k_dir = k_eq = k*` this is the paper's
/// `dW = (v* - W k*) (C^{-1} k*)^T / (k*^T C^{-1} k*)`, the update of least `tr(dW C dW^T)` among
/// those meeting the constraint. The reference code takes `k_dir` from prefix-averaged contexts and
/// `k_eq` from the bare prompt (the asymmetry r-ROME blames for model collapse); pass the same key
/// for both unless reproducing it. ROME's update does not depend on the scale of C.
///
/// \param k_dir  key that sets the direction u (`in`)
/// \param k_eq   key for the equality constraint (`in`)
/// \param v_star target value (`out`)
/// \param w_k_eq the current output for `k_eq`: `W k_eq`, plus the bias if the layer has one (then
///               `v*` is the wanted output including the bias)
/// \param C      factor of the key second moment (`linalg::SpdFactor`, `in x in`); its ridge and
///               scale are used as they are
/// \returns the edit with `U = u` (unit norm) and `V = v`, rank 1
/// \throws Error (naming the argument and the sizes) on size mismatches, non-finite entries, a zero
///   `k_dir`, or a degenerate denominator (`RomeOptions::min_denominator`)
FactoredEdit rome(const Eigen::Ref<const Vector<double>>& k_dir, const Eigen::Ref<const Vector<double>>& k_eq,
                  const Eigen::Ref<const Vector<double>>& v_star, const Eigen::Ref<const Vector<double>>& w_k_eq,
                  const linalg::SpdFactor& C, const RomeOptions& options = {});

/// `rome` with `W k_eq` computed from the weight (fp64 accumulation) and an optional bias
/// (`out` floats, or nullptr).
template <SupportedScalar TW>
FactoredEdit rome(const Eigen::Ref<const Vector<double>>& k_dir, const Eigen::Ref<const Vector<double>>& k_eq,
                  const Eigen::Ref<const Vector<double>>& v_star, WeightView<const TW> W, const float* bias,
                  const linalg::SpdFactor& C, const RomeOptions& options = {});

/// `W k` in fp64 for a weight in either layout (`out` entries), plus the bias when given.
template <SupportedScalar TW>
Vector<double> weight_times(WeightView<const TW> W, const Eigen::Ref<const Vector<double>>& k,
                            const float* bias = nullptr);

}  // namespace edit

LOWRANK_END_NAMESPACE
