// SpdFactor: Cholesky with ridge escalation (include/lowrank/linalg/spd.hpp). Compiled once into
// the library so that users' translation units do not instantiate Eigen's LLT.
#include "lowrank/linalg/spd.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "lowrank/core/error.hpp"

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
  return llt_.solve(B);
}

ColMatrix<double> SpdFactor::half_solve(const Eigen::Ref<const ColMatrix<double>>& B) const {
  require("lowrank::linalg::SpdFactor::half_solve", B.rows());
  return llt_.matrixL().solve(B);
}

ColMatrix<double> SpdFactor::half_solve_transposed(const Eigen::Ref<const ColMatrix<double>>& B) const {
  require("lowrank::linalg::SpdFactor::half_solve_transposed", B.rows());
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
