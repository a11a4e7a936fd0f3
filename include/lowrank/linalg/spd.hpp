/// \file
/// A cached Cholesky factor of a symmetric positive definite matrix `A = scale * C + ridge * I`
/// (a key second moment C as ROME, MEMIT and Perfusion use it), with a ridge escalation policy for
/// singular or indefinite statistics, fp64 solves with one or many right-hand sides, and rank-1
/// update and downdate of the factor in O(d^2).
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/matrix.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace linalg {

/// What to do when `scale * C + ridge * I` is not numerically positive definite.
struct RidgePolicy {
  /// false: a failed factorisation throws `Error`. true: retry with a growing extra ridge.
  bool escalate = true;
  /// First extra ridge, relative to the mean of the diagonal of `scale * C + ridge * I`
  /// (1 when that mean is not positive).
  double initial = 1e-10;
  /// Each retry multiplies the extra ridge by this (> 1).
  double factor = 10;
  /// Most retries (>= 1): the last extra ridge is `initial * factor^(max_steps - 1)` relative,
  /// 1e-1 with the defaults. After that the factorisation throws.
  int max_steps = 10;
};

/// Options of `SpdFactor`.
struct SpdOptions {
  /// The factored matrix is `scale * C + ridge * I` (MEMIT's `lambda C`; > 0).
  double scale = 1;
  /// A ridge always added (>= 0), before any escalation.
  double ridge = 0;
  RidgePolicy policy;
};

/// Cholesky factor `L L^T = A = scale * C + (ridge + extra) I` of a symmetric matrix C, in fp64.
///
/// "Numerically positive definite" means: Eigen's `LLT` succeeds and every pivot `L(j, j)^2` is at
/// least `d * 2^-52 * max_j A(j, j)` (a smaller pivot is a rank deficiency drowned in rounding,
/// whose solves would be garbage). When the matrix fails that test and the policy escalates, the
/// factorisation is retried with an extra ridge `initial * mean(diag A) * factor^s`,
/// s = 0, 1, ...; `extra_ridge()` and `escalations()` report what was used (0 and 0 when the first
/// attempt passed). Statistics from fewer samples than dimensions (rank-deficient C) are the usual
/// reason; a singular C is never silently inverted.
///
/// Only the lower triangle of C is read. Cost: d^3 / 3 flops per attempt; solves cost d^2 flops per
/// right-hand side; memory one d x d fp64 matrix (the factor).
class SpdFactor {
 public:
  SpdFactor() = default;

  /// Factors `options.scale * C + options.ridge * I`.
  /// \throws Error (naming the argument and C's shape) if C is empty or not square, has a NaN or
  ///   infinity in its lower triangle, `scale` is not finite and positive, `ridge` is negative or
  ///   not finite, the policy is invalid (`initial <= 0`, `factor <= 1`, `max_steps < 1`), or the
  ///   matrix is not numerically positive definite (after the last escalation, or at once when the
  ///   policy does not escalate; the message gives the smallest pivot).
  explicit SpdFactor(const Eigen::Ref<const ColMatrix<double>>& C, const SpdOptions& options = {});

  /// d (0 for a default-constructed factor).
  Index dim() const { return dim_; }
  /// `options.scale`.
  double scale() const { return scale_; }
  /// `options.ridge`: the ridge asked for.
  double ridge() const { return ridge_; }
  /// The ridge the escalation added on top of `ridge()` (0 if none was needed).
  double extra_ridge() const { return extra_; }
  /// How many escalation steps ran (0: the first factorisation passed).
  int escalations() const { return escalations_; }
  /// Rank-1 updates and downdates applied since the factorisation.
  Index updates() const { return updates_; }

  /// `A^{-1} b` (two triangular solves).
  /// \throws Error if `b.size() != dim()`, or the factor is empty.
  Vector<double> solve(const Eigen::Ref<const Vector<double>>& b) const;
  /// `A^{-1} B` for `d x n` B (n right-hand sides at once).
  ColMatrix<double> solve_many(const Eigen::Ref<const ColMatrix<double>>& B) const;
  /// `L^{-1} B` (one triangular solve): `(L^{-1} B)^T (L^{-1} B) = B^T A^{-1} B`.
  ColMatrix<double> half_solve(const Eigen::Ref<const ColMatrix<double>>& B) const;
  /// `L^{-T} B`: `solve(B) == half_solve_transposed(half_solve(B))`.
  ColMatrix<double> half_solve_transposed(const Eigen::Ref<const ColMatrix<double>>& B) const;
  /// `b^T A^{-1} b` as `||L^{-1} b||^2` (>= 0 by construction).
  double inverse_quadratic(const Eigen::Ref<const Vector<double>>& b) const;

  /// `A <- A + sigma v v^T` on the factor in O(d^2) (sigma < 0 is a downdate), as sequential
  /// editing needs when edited keys join the statistics.
  /// \throws Error (factor unchanged) if v has the wrong size or a non-finite entry, sigma is not
  ///   finite, or a downdate would leave A not numerically positive definite.
  void rank_one_update(const Eigen::Ref<const Vector<double>>& v, double sigma = 1);

  /// The lower-triangular factor L.
  ColMatrix<double> matrix_l() const;
  /// `A = L L^T` as a dense matrix (the matrix actually factored, ridges included).
  ColMatrix<double> reconstructed() const;
  /// The explicit inverse `A^{-1}` (d solves; for callers that apply it to many single vectors
  /// and prefer one matrix-vector product per call).
  ColMatrix<double> inverse() const;

 private:
  void require(const char* fn, Index rows) const;
  Eigen::LLT<ColMatrix<double>> llt_;
  Index dim_ = 0;
  double scale_ = 1, ridge_ = 0, extra_ = 0, max_diag_ = 0;
  int escalations_ = 0;
  Index updates_ = 0;
};

}  // namespace linalg

LOWRANK_END_NAMESPACE
