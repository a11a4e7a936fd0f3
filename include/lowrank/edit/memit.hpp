/// \file
/// MEMIT's batched closed form (Meng et al. 2023, `kmeng01/memit`) through a cached factor of the
/// key statistics and the Woodbury identity, and EMMET's equality-constrained variant
/// (Gupta et al. 2024).
#pragma once

#include "lowrank/core/config.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/edit/factored.hpp"
#include "lowrank/linalg/spd.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace edit {

/// MEMIT's edit of one layer for n requests:
///
///   `dW = R K^T (lambda A + K K^T)^{-1}`,   returned factored as `U = (lambda A + K K^T)^{-1} K`
///   (MEMIT's `adj_k`, `in x n`) and `V = R` (`out x n`),
///
/// where A is the matrix factored by `C` (the key second moment, with the factor's own scale and
/// ridge) and `lambda` MEMIT's `mom2_update_weight` (15000 for GPT-J, 20000 for GPT-2 XL, with C
/// the normalised moment E[k k^T]). The reference code solves the `in x in` system with a fresh
/// fp64 LU per call; here the factor of A is cached and the Woodbury identity reduces each call to
/// `U = A^{-1} K (lambda I_n + K^T A^{-1} K)^{-1}`: two triangular solves with n right-hand sides
/// (2 in^2 n flops), `K^T A^{-1} K` (in n^2) and an n x n Cholesky, all in fp64.
///
/// Properties (editing.md 8.4): `dW (lambda A + K K^T) = R K^T`; the remaining residual
/// `(W + dW) K - (W K + R) = -lambda R (lambda I + K^T A^{-1} K)^{-1}`; `dW x = 0` whenever
/// `K^T A^{-1} x = 0`; replacing A by cA equals replacing lambda by c lambda. With n = 1 it is
/// ROME's edit with the denominator damped by lambda: `r (A^{-1} k)^T / (lambda + k^T A^{-1} k)`.
/// Spreading the residual over layers (`R / (L - i)`) stays with the caller, who must recompute
/// the keys after each layer.
///
/// \param K keys (`in x n`, one column per request), \param R residuals (`out x n`),
/// \param lambda > 0 and finite
/// \throws Error on size mismatches, non-finite entries, n == 0 or a bad lambda
FactoredEdit memit(const Eigen::Ref<const ColMatrix<double>>& K, const Eigen::Ref<const ColMatrix<double>>& R,
                   const linalg::SpdFactor& C, double lambda);

/// MEMIT's residual spreading over the edited layers (`memit_main.py`): layer `layer` (0-based, in
/// ascending order) of `layers` takes `R / (layers - layer)` of the *current* residual, which the
/// caller recomputes (with the keys) on the model edited by the layers before. With a linear
/// response each layer ends up contributing about `R_0 / layers`.
/// \throws Error if `layers < 1`, `layer` is outside `[0, layers)`, or R has a non-finite entry
ColMatrix<double> spread_residual(const Eigen::Ref<const ColMatrix<double>>& R, Index layer, Index layers);

/// Options of `emmet`.
struct EmmetOptions {
  /// Added to the diagonal of `D = K^T A^{-1} K` when n > 1 (EMMET's `emmet_lambda`; >= 0). With
  /// 0 the constraints hold exactly.
  double lambda = 0;
  /// Relative eigenvalue threshold of the pseudo-inverse used when D is singular (duplicate keys):
  /// eigenvalues below `pinv_tolerance * max eigenvalue` are dropped.
  double pinv_tolerance = 1e-12;
};

/// What `emmet` did.
struct EmmetResult {
  FactoredEdit edit;      ///< `U = A^{-1} K D^{-1}` (`in x n`), `V = R`
  bool pseudo_inverse;    ///< D was singular: its pseudo-inverse was used
  Index dropped;          ///< eigenvalues of D dropped by the pseudo-inverse (0 otherwise)
};

/// EMMET's batched equality-constrained edit: `dW = R D^{-1} K^T A^{-1}`,
/// `D = K^T A^{-1} K (+ lambda I when n > 1)`. With `lambda = 0` and D nonsingular,
/// `(W + dW) K = W K + R` exactly (to rounding) and the edit does not depend on the scale of A; with
/// n = 1 it is ROME's edit with symmetric keys; with `lambda = e` it equals MEMIT with
/// `lambda_MEMIT = e` on the same A. When D is singular (duplicate keys) the pseudo-inverse of D is
/// used (as the reference's `pinv` fallback), so duplicated requests give the edit of one.
/// \throws Error as `memit`, or if an option is negative or not finite
EmmetResult emmet(const Eigen::Ref<const ColMatrix<double>>& K, const Eigen::Ref<const ColMatrix<double>>& R,
                  const linalg::SpdFactor& C, const EmmetOptions& options = {});

}  // namespace edit

LOWRANK_END_NAMESPACE
