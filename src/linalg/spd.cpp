// SpdFactor: Cholesky with ridge escalation (include/lowrank/linalg/spd.hpp). Compiled once into
// the library so that users' translation units do not instantiate Eigen's LLT.
#include "lowrank/linalg/spd.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "lowrank/core/error.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/kernels/rank_update.hpp"
#include "triangular.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace detail {
namespace {

// Blocked triangular solves. The right-hand sides (columns of X) are independent: they are split
// into one slice per thread, and each thread solves its slice alone (single-threaded rank updates),
// so the threads never synchronise. Per slice, right-looking block rows of kBlock rows: once a
// block row is solved, its contribution leaves all the rows below it (above it, transposed) in one
// rank-kBlock update through rank_update (packed fp64 micro-kernel). Each kBlock x kBlock diagonal
// block is split in halves down to kLeaf rows (the off-diagonal half again a rank update), and the
// leaves are solved by substitution, dividing by the diagonal.
// Accuracy: every update accumulates its product in a zeroed buffer and then subtracts it, so each
// element's sum over the m rows is blocked (sums of at most kBlock terms, then one subtraction per
// block) instead of one m-term chain through X: at d = 4096 this halves MEMIT's residual.
// Determinism: every element of X is computed in an order fixed by m alone. rank_update's order
// does not depend on tiling or threads, and a leaf computes x_r = (x_r - sum_c op(L)(r, c) x_c) /
// op(L)(r, r) with the sum in a fixed order (ascending c forward, descending c transposed), the
// same for either layout of X.
constexpr Index kBlock = 256;     // rows per block row: the rank of the off-diagonal updates
constexpr Index kLeaf = 32;       // most rows of a leaf of the diagonal-block recursion
constexpr Index kSliceMin = 64;   // fewest right-hand sides per thread
constexpr Index kChunk = 128;     // columns per pass of a row-major leaf (kLeaf rows stay in L1)
constexpr Index kRowChunk = 1024; // rows per zeroed accumulation buffer of an update

class TriangularSolve {
 public:
  TriangularSolve(const double* L, Index ld, MatrixView<double> X, bool transposed)
      : L_(L), ld_(ld), X_(X), transposed_(transposed) {}

  // tmp: kRowChunk * X.cols doubles of scratch.
  void run(Index m, double* tmp) {
    tmp_ = tmp;
    const Index blocks = (m + kBlock - 1) / kBlock;
    for (Index s = 0; s < blocks; ++s) {
      const Index b = transposed_ ? blocks - 1 - s : s;
      const Index i0 = b * kBlock, ni = std::min(kBlock, m - i0);
      diagonal(i0, ni);
      // Right-looking: the rows still to solve lose this block row's contribution at once.
      if (!transposed_ && i0 + ni < m) update(i0 + ni, m - i0 - ni, i0, ni);
      if (transposed_ && i0 > 0) update(0, i0, i0, ni);
    }
  }

 private:
  // op(L)(i, j): L(i, j) forward, L(j, i) transposed.
  double op(Index i, Index j) const { return transposed_ ? L_[j + i * ld_] : L_[i + j * ld_]; }

  // X_i -= op(L)(i, j) X_j for the row ranges [i0, i0 + ni) and [j0, j0 + nj) (solved rows).
  void update(Index i0, Index ni, Index j0, Index nj) const {
    const MatrixView<const double> U = transposed_ ? MatrixView<const double>(L_ + j0 + i0 * ld_, ni, nj, ld_, 1)
                                                   : MatrixView<const double>(L_ + i0 + j0 * ld_, ni, nj, 1, ld_);
    const Index n = X_.cols;
    const MatrixView<const double> V(X_.data + j0 * X_.row_stride, n, nj, X_.col_stride, X_.row_stride);  // X_j^T
    RankUpdateOptions options;
    options.max_threads = 1;  // the caller threads over slices of the right-hand sides
    // The product goes into a zeroed buffer, then is subtracted: each update's kBlock-term sum
    // starts from zero rather than extending one m-term chain through X (blocked summation).
    double* const acc = tmp_;
    const bool rows_major = X_.col_stride == 1;
    for (Index r0 = 0; r0 < ni; r0 += kRowChunk) {
      const Index nr = std::min(kRowChunk, ni - r0);
      const MatrixView<double> T = rows_major ? MatrixView<double>(acc, nr, n, n, 1) : MatrixView<double>(acc, nr, n, 1, nr);
      std::fill(acc, acc + nr * n, 0.0);
      const MatrixView<const double> Ur(U.data + r0 * U.row_stride, nr, nj, U.row_stride, U.col_stride);
      rank_update(T, Ur, V, 1.0, options);
      double* const x = X_.data + (i0 + r0) * X_.row_stride;
      if (rows_major) {
        for (Index r = 0; r < nr; ++r)
          for (Index c = 0; c < n; ++c) x[r * X_.row_stride + c] -= acc[r * n + c];
      } else {
        for (Index c = 0; c < n; ++c)
          for (Index r = 0; r < nr; ++r) x[r + c * X_.col_stride] -= acc[r + c * nr];
      }
    }
  }

  // The diagonal block [i0, i0 + ni): halves, down to leaves of at most kLeaf rows.
  void diagonal(Index i0, Index ni) const {
    if (ni <= kLeaf) {
      leaf(i0, ni);
      return;
    }
    const Index h = (ni / 2 + kLeaf - 1) / kLeaf * kLeaf;
    if (!transposed_) {
      diagonal(i0, h);
      update(i0 + h, ni - h, i0, h);
      diagonal(i0 + h, ni - h);
    } else {
      diagonal(i0 + h, ni - h);
      update(i0, h, i0 + h, ni - h);
      diagonal(i0, h);
    }
  }

  // Substitution on rows [i0, i0 + ni), ni <= kLeaf: row r (in solve order) gets
  // x_r = (x_r - sum_c a(r, c) x_c) / a(r, r), c over the rows solved before it, in solve order.
  void leaf(Index i0, Index ni) const {
    double a[kLeaf][kLeaf];  // a[r][c] = op(L)(i0 + r, i0 + c)
    for (Index r = 0; r < ni; ++r)
      for (Index c = 0; c < ni; ++c) a[r][c] = transposed_ ? (c >= r ? op(i0 + r, i0 + c) : 0.0)
                                                           : (c <= r ? op(i0 + r, i0 + c) : 0.0);
    const Index n = X_.cols;
    if (X_.col_stride == 1) {
      const Index rs = X_.row_stride;
      double* const x0 = X_.data + i0 * rs;
      for (Index j0 = 0; j0 < n; j0 += kChunk) {
        const Index w = std::min(kChunk, n - j0);
        for (Index k = 0; k < ni; ++k) {
          const Index r = transposed_ ? ni - 1 - k : k;
          double* const xr = x0 + r * rs + j0;
          const double* const ar = a[r];
          Index j = 0;
          for (; j + 8 <= w; j += 8) {
            double acc[8];
            for (int t = 0; t < 8; ++t) acc[t] = xr[j + t];
            for (Index q = 0; q < k; ++q) {
              const Index c = transposed_ ? ni - 1 - q : q;
              const double l = ar[c];
              const double* const xc = x0 + c * rs + j0 + j;
              for (int t = 0; t < 8; ++t) acc[t] -= l * xc[t];
            }
            for (int t = 0; t < 8; ++t) xr[j + t] = acc[t] / ar[r];
          }
          for (; j < w; ++j) {
            double acc = xr[j];
            for (Index q = 0; q < k; ++q) {
              const Index c = transposed_ ? ni - 1 - q : q;
              acc -= ar[c] * x0[c * rs + j0 + j];
            }
            xr[j] = acc / ar[r];
          }
        }
      }
    } else {
      // Column-major: four right-hand sides at a time for independent dependency chains.
      const Index cs = X_.col_stride;
      Index j = 0;
      for (; j + 4 <= n; j += 4) {
        double* const x[4] = {X_.data + i0 + j * cs, X_.data + i0 + (j + 1) * cs, X_.data + i0 + (j + 2) * cs,
                              X_.data + i0 + (j + 3) * cs};
        for (Index k = 0; k < ni; ++k) {
          const Index r = transposed_ ? ni - 1 - k : k;
          const double* const ar = a[r];
          double acc[4] = {x[0][r], x[1][r], x[2][r], x[3][r]};
          for (Index q = 0; q < k; ++q) {
            const Index c = transposed_ ? ni - 1 - q : q;
            const double l = ar[c];
            for (int t = 0; t < 4; ++t) acc[t] -= l * x[t][c];
          }
          for (int t = 0; t < 4; ++t) x[t][r] = acc[t] / ar[r];
        }
      }
      for (; j < n; ++j) {
        double* const x = X_.data + i0 + j * cs;
        for (Index k = 0; k < ni; ++k) {
          const Index r = transposed_ ? ni - 1 - k : k;
          const double* const ar = a[r];
          double acc = x[r];
          for (Index q = 0; q < k; ++q) {
            const Index c = transposed_ ? ni - 1 - q : q;
            acc -= ar[c] * x[c];
          }
          x[r] = acc / ar[r];
        }
      }
    }
  }

  const double* L_;
  Index ld_;
  MatrixView<double> X_;
  bool transposed_;
  double* tmp_ = nullptr;
};

}  // namespace

void triangular_solve(const double* L, Index ld, Index m, MatrixView<double> X, bool transposed) {
  const Index n = X.cols;
  if (m == 0 || n == 0) return;
  int threads = static_cast<int>(std::min<Index>(num_threads(), std::max<Index>(1, n / kSliceMin)));
  if (static_cast<double>(m) * static_cast<double>(m) * static_cast<double>(n) < 1 << 22) threads = 1;
  const Index widest = (n + threads - 1) / threads;
  const Index per_thread = kRowChunk * widest;
  std::vector<double> scratch(static_cast<std::size_t>(threads * per_thread));
  auto slice = [&](int t) {
    const Index c0 = n * t / threads, c1 = n * (t + 1) / threads;
    const MatrixView<double> Xt(X.data + c0 * X.col_stride, m, c1 - c0, X.row_stride, X.col_stride);
    TriangularSolve(L, ld, Xt, transposed).run(m, scratch.data() + t * per_thread);
  };
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
  for (int t = 0; t < threads; ++t) slice(t);
}

}  // namespace detail

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

// A^-1 B, L^-1 B or L^-T B for column-major B: a copy of B solved in place.
constexpr Index kBlockedFrom = 16;  // right-hand sides from which the blocked form is used

ColMatrix<double> solve_blocked(const ColMatrix<double>& Lfull, const Eigen::Ref<const ColMatrix<double>>& B, bool lower,
                                bool upper) {
  ColMatrix<double> X = B;
  const Index m = Lfull.rows();
  const MatrixView<double> x(X.data(), X.rows(), X.cols(), 1, X.rows());
  if (lower) detail::triangular_solve(Lfull.data(), m, m, x, false);
  if (upper) detail::triangular_solve(Lfull.data(), m, m, x, true);
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
