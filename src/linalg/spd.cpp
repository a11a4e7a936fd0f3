// SpdFactor: Cholesky with ridge escalation (include/lowrank/linalg/spd.hpp). Compiled once into
// the library so that users' translation units do not instantiate Eigen's LLT.
#include "lowrank/linalg/spd.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "lowrank/core/error.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace linalg {
namespace {

using detail::fail;

constexpr const char* kFactor = "lowrank::linalg::SpdFactor";

// Smallest pivot L(j, j)^2, or -1 when the factorisation failed.
double smallest_pivot(const Eigen::LLT<ColMatrix<double>>& llt) {
  if (llt.info() != Eigen::Success) return -1;
  const auto diag = llt.matrixLLT().diagonal();
  if (!diag.allFinite()) return -1;
  return diag.size() == 0 ? 0 : diag.cwiseAbs2().minCoeff();
}

// Blocked triangular solves with many right-hand sides, X (m x n, row-major, in place):
//   lower:      X <- L^-1 X        (forward, block rows top to bottom)
//   transposed: X <- L^-T X        (backward, bottom to top)
// L is the lower triangle of a column-major m x m matrix (leading dimension ld). The updates from
// the finished block rows are rank-kBlock products through rank_update (packed fp64
// micro-kernel, threaded); the kBlock x kBlock diagonal solves are Eigen's. Each element is
// computed in a fixed order whatever the thread count.
constexpr Index kBlock = 256;
constexpr Index kBlockedFrom = 16;  // right-hand sides from which the blocked form is used

void blocked_solve(const double* L, Index ld, Index m, double* X, Index n, bool transposed) {
  using RowMap = Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  using ColMap = Eigen::Map<const ColMatrix<double>, 0, Eigen::OuterStride<>>;
  const Index blocks = (m + kBlock - 1) / kBlock;
  for (Index s = 0; s < blocks; ++s) {
    const Index b = transposed ? blocks - 1 - s : s;
    const Index i0 = b * kBlock, ni = std::min(kBlock, m - i0);
    const MatrixView<double> Xi(X + i0 * n, ni, n, n, 1);
    // Subtract the contributions of the finished block rows j.
    for (Index t = 0; t < s; ++t) {
      const Index c = transposed ? blocks - 1 - t : t;
      const Index j0 = c * kBlock, nj = std::min(kBlock, m - j0);
      // lower: X_i -= L(i, j) X_j; transposed: X_i -= L(j, i)^T X_j.
      const MatrixView<const double> U = transposed ? MatrixView<const double>(L + j0 + i0 * ld, ni, nj, ld, 1)
                                                    : MatrixView<const double>(L + i0 + j0 * ld, ni, nj, 1, ld);
      const MatrixView<const double> V(X + j0 * n, n, nj, 1, n);  // X_j^T
      rank_update(Xi, U, V, -1.0);
    }
    const ColMap Lii(L + i0 + i0 * ld, ni, ni, Eigen::OuterStride<>(ld));
    RowMap xi(X + i0 * n, ni, n);
    if (transposed) {
      Lii.triangularView<Eigen::Lower>().transpose().solveInPlace(xi);
    } else {
      Lii.triangularView<Eigen::Lower>().solveInPlace(xi);
    }
  }
}

// A^-1 B, L^-1 B or L^-T B for column-major B through the blocked solves (row-major copy).
ColMatrix<double> solve_blocked(const ColMatrix<double>& Lfull, const Eigen::Ref<const ColMatrix<double>>& B, bool lower,
                                bool upper) {
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> X = B;
  if (lower) blocked_solve(Lfull.data(), Lfull.rows(), Lfull.rows(), X.data(), X.cols(), false);
  if (upper) blocked_solve(Lfull.data(), Lfull.rows(), Lfull.rows(), X.data(), X.cols(), true);
  return X;
}

}  // namespace

SpdFactor::SpdFactor(const Eigen::Ref<const ColMatrix<double>>& C, const SpdOptions& options) {
  const Index d = C.rows();
  if (d == 0 || C.cols() != d) fail(kFactor, "C is {}x{}; it must be square and non-empty", C.rows(), C.cols());
  if (!(std::isfinite(options.scale) && options.scale > 0))
    fail(kFactor, "options.scale is {}; it must be finite and > 0 (C {}x{})", options.scale, d, d);
  if (!(std::isfinite(options.ridge) && options.ridge >= 0))
    fail(kFactor, "options.ridge is {}; it must be finite and >= 0 (C {}x{})", options.ridge, d, d);
  const RidgePolicy& policy = options.policy;
  if (policy.escalate && !(std::isfinite(policy.initial) && policy.initial > 0 && std::isfinite(policy.factor) &&
                           policy.factor > 1 && policy.max_steps >= 1)) {
    fail(kFactor, "options.policy is invalid (initial {}, factor {}, max_steps {}): need initial > 0, factor > 1, "
         "max_steps >= 1", policy.initial, policy.factor, policy.max_steps);
  }
  if (!C.triangularView<Eigen::Lower>().toDenseMatrix().allFinite())
    fail(kFactor, "C ({}x{}) has a NaN or infinity in its lower triangle", d, d);

  ColMatrix<double> A = options.scale * C.triangularView<Eigen::Lower>().toDenseMatrix();
  A.diagonal().array() += options.ridge;
  const double max_diag = A.diagonal().maxCoeff();
  const double mean_diag = A.diagonal().mean();
  // Pivots below d * eps * max diag are rank deficiency, not information.
  const double threshold = static_cast<double>(d) * std::numeric_limits<double>::epsilon() * std::max(max_diag, 0.0);
  auto passes = [&](double pivot) { return pivot > 0 && pivot >= threshold; };

  llt_.compute(A);
  double pivot = smallest_pivot(llt_);
  double extra = 0;
  int steps = 0;
  if (!passes(pivot) && policy.escalate) {
    const double base = mean_diag > 0 ? mean_diag : 1.0;
    extra = policy.initial * base;
    for (steps = 1; steps <= policy.max_steps; ++steps, extra *= policy.factor) {
      ColMatrix<double> B = A;
      B.diagonal().array() += extra;
      llt_.compute(B);
      pivot = smallest_pivot(llt_);
      if (passes(pivot)) break;
    }
    if (steps > policy.max_steps) {
      fail(kFactor, "scale * C + ridge * I (C {}x{}, scale {}, ridge {}) is not positive definite even with an extra "
           "ridge of {} after {} escalation steps (smallest pivot {})", d, d, options.scale, options.ridge,
           extra / policy.factor, policy.max_steps, pivot);
    }
  } else if (!passes(pivot)) {
    fail(kFactor, "scale * C + ridge * I (C {}x{}, scale {}, ridge {}) is not numerically positive definite "
         "(smallest pivot {}, threshold {}) and the ridge policy does not escalate", d, d, options.scale,
         options.ridge, pivot, threshold);
  }
  dim_ = d;
  scale_ = options.scale;
  ridge_ = options.ridge;
  extra_ = extra;
  escalations_ = steps;
  max_diag_ = max_diag + extra;
}

void SpdFactor::require(const char* fn, Index rows) const {
  if (dim_ == 0) fail(fn, "the factor is empty (default-constructed)");
  if (rows != dim_) fail(fn, "the right-hand side has {} rows; the factor is {}x{}", rows, dim_, dim_);
}

Vector<double> SpdFactor::solve(const Eigen::Ref<const Vector<double>>& b) const {
  require("lowrank::linalg::SpdFactor::solve", b.rows());
  return llt_.solve(b);
}

ColMatrix<double> SpdFactor::solve_many(const Eigen::Ref<const ColMatrix<double>>& B) const {
  require("lowrank::linalg::SpdFactor::solve_many", B.rows());
  if (B.cols() == 0) return ColMatrix<double>(dim_, 0);  // Eigen's solvers misbehave on empty input
  if (B.cols() >= kBlockedFrom) return solve_blocked(llt_.matrixLLT(), B, true, true);
  return llt_.solve(B);
}

ColMatrix<double> SpdFactor::half_solve(const Eigen::Ref<const ColMatrix<double>>& B) const {
  require("lowrank::linalg::SpdFactor::half_solve", B.rows());
  if (B.cols() == 0) return ColMatrix<double>(dim_, 0);  // Eigen's solvers misbehave on empty input
  if (B.cols() >= kBlockedFrom) return solve_blocked(llt_.matrixLLT(), B, true, false);
  return llt_.matrixL().solve(B);
}

ColMatrix<double> SpdFactor::half_solve_transposed(const Eigen::Ref<const ColMatrix<double>>& B) const {
  require("lowrank::linalg::SpdFactor::half_solve_transposed", B.rows());
  if (B.cols() == 0) return ColMatrix<double>(dim_, 0);  // Eigen's solvers misbehave on empty input
  if (B.cols() >= kBlockedFrom) return solve_blocked(llt_.matrixLLT(), B, false, true);
  return llt_.matrixU().solve(B);
}

double SpdFactor::inverse_quadratic(const Eigen::Ref<const Vector<double>>& b) const {
  require("lowrank::linalg::SpdFactor::inverse_quadratic", b.rows());
  const Vector<double> z = llt_.matrixL().solve(b);
  return z.squaredNorm();
}

void SpdFactor::rank_one_update(const Eigen::Ref<const Vector<double>>& v, double sigma) {
  constexpr const char* fn = "lowrank::linalg::SpdFactor::rank_one_update";
  require(fn, v.rows());
  if (!std::isfinite(sigma)) fail(fn, "sigma is {}; it must be finite (factor {}x{})", sigma, dim_, dim_);
  if (!v.allFinite()) fail(fn, "v (size {}) has a NaN or infinity", v.size());
  if (sigma == 0) return;
  if (sigma > 0) {
    llt_.rankUpdate(v, sigma);
    max_diag_ += sigma * v.squaredNorm();  // an upper bound of the new largest diagonal entry
  } else {
    // On a copy: a failed downdate leaves the factor exactly as it was.
    Eigen::LLT<ColMatrix<double>> trial = llt_;
    trial.rankUpdate(v, sigma);
    const double pivot = smallest_pivot(trial);
    const double threshold = static_cast<double>(dim_) * std::numeric_limits<double>::epsilon() * max_diag_;
    if (!(pivot > 0 && pivot >= threshold)) {
      fail(fn, "the downdate (sigma {}, ||v|| {}) would leave the matrix not positive definite (smallest pivot {}); "
           "the factor is unchanged", sigma, v.norm(), pivot);
    }
    llt_ = std::move(trial);
  }
  ++updates_;
}

ColMatrix<double> SpdFactor::matrix_l() const {
  require("lowrank::linalg::SpdFactor::matrix_l", dim_);
  return llt_.matrixL().toDenseMatrix();
}

ColMatrix<double> SpdFactor::reconstructed() const {
  require("lowrank::linalg::SpdFactor::reconstructed", dim_);
  return llt_.reconstructedMatrix();
}

ColMatrix<double> SpdFactor::inverse() const {
  require("lowrank::linalg::SpdFactor::inverse", dim_);
  return llt_.solve(ColMatrix<double>::Identity(dim_, dim_));
}

}  // namespace linalg

LOWRANK_END_NAMESPACE
