/// \file
/// Combining several LoRA adapters of one layer into one (PEFT `add_weighted_adapter`):
/// `combine_cat` (exact), `combine_svd` (best rank-k approximation of the exact weighted sum) and
/// `combine_linear` (PEFT's "linear" type, kept only as a compatibility mode: it is NOT the
/// weighted sum, see its comment).
///
/// As in PEFT, each source's scaling is folded into the combination weights (`w_i s_i`) and the
/// combined adapter has `alpha = new rank` and `use_rslora = false`, so its scaling is exactly 1.
/// Unlike PEFT before PR #3449, rsLoRA is never inherited (an inherited rsLoRA flag would scale the
/// result by sqrt(new rank)). The sources' `lora_bias` vectors (missing = 0) are combined exactly
/// as `sum_i w_i s_i lora_bias_i` by all three. Also unlike PEFT, a single source is not turned
/// into the "linear" type: each function does what it says for any number of sources.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <fmt/format.h>

#include "lowrank/adapt/lora.hpp"
#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/linalg/svd.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace detail {

/// Validates sources and weights of a combination; returns the folded weights `w_i s_i`.
template <class T>
std::vector<double> lora_check_sources(const char* fn, std::span<const adapt::LoraAdapter<T>> adapters,
                                       std::span<const double> weights) {
  if (adapters.empty()) fail(fn, "no adapters given (need at least 1)");
  if (weights.size() != adapters.size()) {
    fail(fn, "{} weights for {} adapters; give one weight per adapter", weights.size(), adapters.size());
  }
  const auto& a0 = adapters[0];
  std::vector<double> folded(adapters.size());
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const auto& a = adapters[i];
    const std::string name = fmt::format("adapters[{}]", i);
    lora_check_adapter(fn, name.c_str(), a);
    if (a.in_features() != a0.in_features() || a.out_features() != a0.out_features()) {
      fail(fn, "adapters[{}] has A {}x{}, B {}x{} (out {}, in {}) but adapters[0] has A {}x{}, B {}x{} (out {}, in {})",
           i, a.A.rows(), a.A.cols(), a.B.rows(), a.B.cols(), a.out_features(), a.in_features(), a0.A.rows(),
           a0.A.cols(), a0.B.rows(), a0.B.cols(), a0.out_features(), a0.in_features());
    }
    if (a.layout != a0.layout) {
      fail(fn, "adapters[{}] has layout {} but adapters[0] has layout {}", i, to_string(a.layout), to_string(a0.layout));
    }
    if (!std::isfinite(weights[i])) fail(fn, "weights[{}] is {}; weights must be finite", i, weights[i]);
    folded[i] = weights[i] * a.scaling();
  }
  return folded;
}

/// Fills the combined adapter's configuration and `sum_i c_i lora_bias_i`.
template <class T>
void lora_finish_combined(adapt::LoraAdapter<T>& out, std::span<const adapt::LoraAdapter<T>> adapters,
                          const std::vector<double>& folded) {
  out.alpha = static_cast<double>(out.A.rows());
  out.use_rslora = false;
  out.layout = adapters[0].layout;
  bool any_bias = false;
  for (const auto& a : adapters) any_bias = any_bias || a.lora_bias.size() != 0;
  if (!any_bias) return;
  Vector<double> bias = Vector<double>::Zero(adapters[0].out_features());
  for (std::size_t i = 0; i < adapters.size(); ++i)
    if (adapters[i].lora_bias.size() != 0) bias += folded[i] * adapters[i].lora_bias.template cast<double>();
  out.lora_bias = bias.template cast<T>();
}

}  // namespace detail

namespace adapt {

/// PEFT "cat": the exact combination. `A_new = [w_1 s_1 A_1; ...; w_n s_n A_n]` (rows stacked),
/// `B_new = [B_1, ..., B_n]` (columns), so `B_new A_new = sum_i w_i s_i B_i A_i` (each scaled
/// block rounded once to T); rank `sum_i r_i` (may exceed min(out, in)), alpha = that rank,
/// scaling 1. Cost: copies of the factors.
/// \param adapters one or more adapters of the same layer (same in, out and layout; ranks may differ)
/// \param weights  one finite weight per adapter
/// \throws Error for no adapters, a weight count that differs, non-finite weights, invalid
/// adapters, or differing shapes or layouts.
template <FactorScalar T>
[[nodiscard]] LoraAdapter<T> combine_cat(std::span<const LoraAdapter<T>> adapters, std::span<const double> weights) {
  const auto folded = lowrank::detail::lora_check_sources("lowrank::adapt::combine_cat", adapters, weights);
  Index rank = 0;
  for (const auto& a : adapters) rank += a.rank();
  LoraAdapter<T> out;
  out.A.resize(rank, adapters[0].in_features());
  out.B.resize(adapters[0].out_features(), rank);
  Index row = 0;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const auto& a = adapters[i];
    out.A.middleRows(row, a.rank()) = (folded[i] * a.A.template cast<double>()).template cast<T>();
    out.B.middleCols(row, a.rank()) = a.B;
    row += a.rank();
  }
  lowrank::detail::lora_finish_combined(out, adapters, folded);
  return out;
}

/// `combine_cat` on a vector of adapters.
template <FactorScalar T>
[[nodiscard]] LoraAdapter<T> combine_cat(const std::vector<LoraAdapter<T>>& adapters, std::span<const double> weights) {
  return combine_cat(std::span<const LoraAdapter<T>>(adapters), weights);
}

/// Result of `combine_svd`: the adapter and how well it represents the exact weighted sum.
template <FactorScalar T>
struct SvdCombination {
  LoraAdapter<T> adapter;       ///< rank k, alpha = k, scaling 1
  double residual_norm = 0;     ///< ||sum_i w_i s_i B_i A_i - B A||_F (before rounding to T)
  double captured_energy = 0;   ///< sum(S_k^2) / ||sum||_F^2 (1 for a zero sum)
  bool exact = false;           ///< whether the exact SVD was used
};

/// PEFT "svd": re-compresses the exact weighted sum `D = sum_i w_i s_i B_i A_i` (`out x in`, in
/// fp64) to rank k with `linalg::truncated_svd(D, k, options)`: `B = U_k diag(S_k)` (all singular
/// values in B), `A = V_k^T` (so `A A^T = I_k`), alpha = k, scaling 1. With an exact SVD this is
/// the Eckart-Young best rank-k approximation (Frobenius error = sqrt of the discarded sigma^2),
/// and it reproduces D when k >= rank(D). `options` defaults to `SvdMethod::automatic` (exact for
/// small layers, randomized for large ones; see `linalg::SvdOptions`); PEFT always runs a full
/// SVD. PEFT's `svd_clamp` is not provided.
/// \param new_rank k in [1, min(out, in)]; 0 means PEFT's default `max_i r_i` (clamped to min(out, in))
/// Cost: forming D (2 out in sum r_i flops) plus the truncated SVD; memory O(out in).
/// \throws Error as `combine_cat`, and for new_rank < 0 or > min(out, in).
template <FactorScalar T>
[[nodiscard]] SvdCombination<T> combine_svd(std::span<const LoraAdapter<T>> adapters, std::span<const double> weights,
                                            Index new_rank = 0, const linalg::SvdOptions& options = {}) {
  constexpr const char* fn = "lowrank::adapt::combine_svd";
  const auto folded = lowrank::detail::lora_check_sources(fn, adapters, weights);
  const Index out_f = adapters[0].out_features(), in_f = adapters[0].in_features();
  const Index most = std::min(out_f, in_f);
  Index k = new_rank;
  if (k == 0) {
    for (const auto& a : adapters) k = std::max(k, a.rank());
    k = std::min(k, most);
  }
  if (k < 1 || k > most) {
    lowrank::detail::fail(fn, "new_rank {} is outside [1, min(out, in) = {}] (out {}, in {}); 0 selects max rank",
                          new_rank, most, out_f, in_f);
  }
  RowMatrix<double> D = RowMatrix<double>::Zero(out_f, in_f);
  for (std::size_t i = 0; i < adapters.size(); ++i)
    D.noalias() += folded[i] * (adapters[i].B.template cast<double>() * adapters[i].A.template cast<double>());
  const auto svd = linalg::truncated_svd(D, k, options);
  SvdCombination<T> result;
  result.adapter.B = (svd.U * svd.S.asDiagonal()).template cast<T>();
  result.adapter.A = svd.V.transpose().template cast<T>();
  result.residual_norm = svd.residual_norm;
  result.captured_energy = svd.captured_energy;
  result.exact = svd.exact;
  lowrank::detail::lora_finish_combined(result.adapter, adapters, folded);
  return result;
}

/// `combine_svd` on a vector of adapters.
template <FactorScalar T>
[[nodiscard]] SvdCombination<T> combine_svd(const std::vector<LoraAdapter<T>>& adapters,
                                            std::span<const double> weights, Index new_rank = 0,
                                            const linalg::SvdOptions& options = {}) {
  return combine_svd(std::span<const LoraAdapter<T>>(adapters), weights, new_rank, options);
}

/// PEFT "linear" compatibility mode: combines the A and B factors SEPARATELY,
/// `A = sum_i sign(c_i) sqrt(|c_i|) A_i`, `B = sum_i sqrt(|c_i|) B_i` with `c_i = w_i s_i`; rank r
/// (all sources must have the same rank), alpha = r, scaling 1.
///
/// The product is NOT the weighted sum: `B A = sum_i c_i B_i A_i + sum_{i != j} sign(c_j)
/// sqrt(|c_i c_j|) B_i A_j`, the cross terms `B_i A_j` (peft PR #3013). For example weights
/// [1, -1] with unit scalings give `(B_1 + B_2)(A_1 - A_2)`, not `B_1 A_1 - B_2 A_2`. Use
/// `combine_cat` for the exact sum or `combine_svd` for a rank-k approximation of it; this mode
/// exists to reproduce adapters made by PEFT.
/// \throws Error as `combine_cat`, and if the ranks differ.
template <FactorScalar T>
[[nodiscard]] LoraAdapter<T> combine_linear(std::span<const LoraAdapter<T>> adapters,
                                            std::span<const double> weights) {
  constexpr const char* fn = "lowrank::adapt::combine_linear";
  const auto folded = lowrank::detail::lora_check_sources(fn, adapters, weights);
  const Index r = adapters[0].rank();
  for (std::size_t i = 1; i < adapters.size(); ++i)
    if (adapters[i].rank() != r) {
      lowrank::detail::fail(fn, "adapters[{}] has rank {} but adapters[0] has rank {}; the linear mode needs equal ranks",
                            i, adapters[i].rank(), r);
    }
  RowMatrix<double> A = RowMatrix<double>::Zero(r, adapters[0].in_features());
  RowMatrix<double> B = RowMatrix<double>::Zero(adapters[0].out_features(), r);
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const double root = std::sqrt(std::abs(folded[i]));
    const double sign = folded[i] < 0 ? -1.0 : 1.0;
    A += (sign * root) * adapters[i].A.template cast<double>();
    B += root * adapters[i].B.template cast<double>();
  }
  LoraAdapter<T> out;
  out.A = A.template cast<T>();
  out.B = B.template cast<T>();
  lowrank::detail::lora_finish_combined(out, adapters, folded);
  return out;
}

/// `combine_linear` on a vector of adapters.
template <FactorScalar T>
[[nodiscard]] LoraAdapter<T> combine_linear(const std::vector<LoraAdapter<T>>& adapters,
                                            std::span<const double> weights) {
  return combine_linear(std::span<const LoraAdapter<T>>(adapters), weights);
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
