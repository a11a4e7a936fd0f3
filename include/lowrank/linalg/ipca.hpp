/// \file
/// Incremental PCA over mini-batches (scikit-learn's `IncrementalPCA`, as PEFT's EVA uses it:
/// `peft/utils/incremental_pca.py`): fp64 running mean and variance, the low-rank state
/// `diag(S) components` carried from batch to batch, and a merge of two states.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/linalg/svd.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace linalg {

/// How `IncrementalPca` computes each SVD. The defaults are PEFT's EVA settings
/// (`IncrementalPCA(lowrank=True, lowrank_seed=42)`: `torch.svd_lowrank(X, q=2 n_components,
/// niter=4)` under seed 42). Bit parity with torch's generator is not attempted; the same seed
/// gives the same test matrix on every call, as re-seeding does in PEFT.
struct IpcaOptions {
  /// `SvdMethod::randomized` (PEFT's `lowrank=True`) or `SvdMethod::exact` (`lowrank=False`);
  /// `automatic` lets `truncated_svd` choose by size.
  SvdMethod method = SvdMethod::randomized;
  /// Range width of the randomized SVD; 0 means 2 * n_components. Clamped to the matrix's smaller
  /// dimension. Must be 0 or >= n_components.
  Index q = 0;
  /// Power iterations of the randomized SVD (torch's niter); >= 0.
  int power_iterations = 4;
  /// Key of the randomized SVD's Gaussian test matrix (`SvdOptions::seed`, `stream`).
  std::uint64_t seed = 42;
  std::uint64_t stream = 0;
};

/// What one `IncrementalPca::partial_fit` did.
enum class IpcaFit {
  fitted,   ///< the batch was absorbed
  skipped,  ///< fewer rows than n_components (PEFT's EVA hook skips such batches): state unchanged
};

/// Incremental principal component analysis (Ross et al. 2008, as scikit-learn and PEFT implement
/// it). Feed batches of rows (samples x features); after each fit the state holds
///
/// - `mean()`, `var()`: the per-feature mean and (population) variance of every row seen, kept in
///   fp64 with scikit-learn's `_incremental_mean_and_var` update (Chan, Golub and LeVeque);
/// - `components()` (n_components x n_features, orthonormal rows): the principal directions of the
///   mean-centred data, i.e. the top right singular vectors, with scikit-learn's `svd_flip` sign
///   rule (the largest-magnitude entry of each row is positive; +1 for an all-zero row);
/// - `singular_values()` S, `explained_variance()` = S^2 / (n - 1) and
///   `explained_variance_ratio()` = S^2 / sum(var * n) (0 when the data has no variance).
///
/// The first batch X (b x f) is centred by its own mean and decomposed. A later batch is decomposed
/// through the stacked matrix
/// `[ diag(S) C ; X - xbar_b ; sqrt(n b / (n + b)) (mu - xbar_b) ]` (rows stacked)
/// (`n` rows seen before, old mean `mu`, batch mean `xbar_b`), whose Gram matrix is the scatter
/// matrix of all rows about the new mean when the old state is exact (n_components >= rank of the
/// data seen): then the result equals a PCA of all rows at once. Otherwise it is the usual
/// incremental approximation (the discarded directions are lost).
///
/// \tparam Scalar float or double: the precision of the stacked matrix and its SVD (the mean and
///   variance are fp64 either way). PEFT decomposes the first batch in fp32 and later ones in fp64
///   (its fp64 mean correction promotes the stack).
///
/// Cost per batch of b rows: one SVD of a (n_components + b + 1) x f matrix (randomized: about
/// 4 (n_components + b) f q (1 + power_iterations) flops with q = 2 n_components), and O(b f) for
/// the moments. Memory: the state is O(n_components f); a fit allocates the stacked matrix.
template <class Scalar = double>
class IncrementalPca {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "IncrementalPca: Scalar must be float or double");

 public:
  /// A PCA that will keep `n_components` >= 1 components.
  /// \throws Error if n_components < 1, options.power_iterations < 0, or options.q is neither 0 nor
  ///   >= n_components.
  explicit IncrementalPca(Index n_components, const IpcaOptions& options = {})
      : n_components_(n_components), options_(options) {
    constexpr const char* kFunction = "lowrank::linalg::IncrementalPca";
    if (n_components < 1) ::lowrank::detail::fail(kFunction, "n_components is {} (must be >= 1)", n_components);
    if (options.power_iterations < 0)
      ::lowrank::detail::fail(kFunction, "options.power_iterations is {} (must be >= 0)", options.power_iterations);
    if (options.q < 0 || (options.q > 0 && options.q < n_components))
      ::lowrank::detail::fail(kFunction, "options.q is {} (must be 0 or >= n_components {})", options.q, n_components);
  }

  /// Absorbs a batch X (rows = samples, b x n_features; any Eigen expression of float or double,
  /// converted to Scalar). A batch with fewer than n_components rows is skipped (the state is
  /// unchanged and `batches_skipped()` counts it), as PEFT's EVA does.
  ///
  /// \throws Error (state unchanged) if X has no columns, its column count differs from the
  ///   first batch's, n_components > n_features on the first batch, or X has a NaN or infinity.
  template <class Derived>
  IpcaFit partial_fit(const Eigen::MatrixBase<Derived>& X) {
    constexpr const char* kFunction = "lowrank::linalg::IncrementalPca::partial_fit";
    using ::lowrank::detail::fail;
    const Index b = X.rows(), f = X.cols();
    if (f == 0) fail(kFunction, "X is {}x{} (no features)", b, f);
    if (fitted() && f != n_features_)
      fail(kFunction, "X is {}x{} but the PCA was fitted on {} features", b, f, n_features_);
    if (!fitted() && n_components_ > f)
      fail(kFunction, "n_components {} exceeds the {} features of X ({}x{})", n_components_, f, b, f);
    if (b < n_components_) {
      ++batches_skipped_;
      return IpcaFit::skipped;
    }
    const RowMatrix<Scalar> Xs = X.template cast<Scalar>();
    if (!Xs.allFinite()) fail(kFunction, "X ({}x{}) has a non-finite value", b, f);

    // Moments in fp64 (scikit-learn's _incremental_mean_and_var).
    const Vector<double> new_sum = Xs.template cast<double>().colwise().sum().transpose();
    const Vector<double> batch_mean = new_sum / static_cast<double>(b);
    Vector<double> new_unnormalized(f);
    for (Index j = 0; j < f; ++j) {
      double s = 0, s2 = 0;
      for (Index i = 0; i < b; ++i) {
        const double t = static_cast<double>(Xs(i, j)) - batch_mean(j);
        s += t;
        s2 += t * t;
      }
      new_unnormalized(j) = s2 - s * s / static_cast<double>(b);
    }

    if (!fitted()) {
      const std::int64_t total = b;
      Vector<double> var = new_unnormalized / static_cast<double>(total);
      RowMatrix<Scalar> centred = Xs.rowwise() - batch_mean.template cast<Scalar>().transpose();
      decompose(centred, total, batch_mean, var, f);
    } else {
      Vector<double> mean_new, var_new;
      const std::int64_t total = combine_moments(n_samples_seen_, mean_, var_, b, new_sum, new_unnormalized, mean_new, var_new);
      const Index k = components_.rows();
      RowMatrix<Scalar> stacked(k + b + 1, f);
      stacked.topRows(k) = singular_values_.asDiagonal() * components_;
      // PEFT centres the batch by its mean in the data's own precision (torch.mean of fp32 rows).
      const Eigen::Matrix<Scalar, 1, Eigen::Dynamic> mean_b = Xs.colwise().mean();
      stacked.middleRows(k, b) = Xs.rowwise() - mean_b;
      const double factor = std::sqrt(static_cast<double>(n_samples_seen_) / static_cast<double>(total) * static_cast<double>(b));
      stacked.row(k + b) = (factor * (mean_ - mean_b.template cast<double>().transpose())).transpose().template cast<Scalar>();
      decompose(stacked, total, mean_new, var_new, f);
    }
    ++batches_fitted_;
    return IpcaFit::fitted;
  }

  /// Merges another state into this one, as if this PCA had also seen `other`'s rows: counts add,
  /// mean and variance combine exactly (Chan et al.: M2 = M2_a + M2_b + n_a n_b / n (mu_a - mu_b)^2),
  /// and the components are those of
  /// `[ diag(S_a) C_a ; diag(S_b) C_b ; sqrt(n_a n_b / n) (mu_a - mu_b) ]` (rows stacked),
  /// whose Gram matrix C_a^T S_a^2 C_a + C_b^T S_b^2 C_b + (n_a n_b / n) d d^T is the scatter of
  /// the union about its mean whenever each state is exact (n_components >= rank of its centred
  /// data): then the merge equals a PCA of all rows. This lets shards (threads, processes) be
  /// fitted separately. The SVD uses this object's options. Merging an unfitted state is a no-op;
  /// merging into an unfitted state copies `other`'s statistics.
  /// \throws Error (state unchanged) if both are fitted and their feature counts or n_components differ.
  void merge(const IncrementalPca& other) {
    constexpr const char* kFunction = "lowrank::linalg::IncrementalPca::merge";
    if (!other.fitted()) return;
    if (!fitted()) {
      if (other.n_components_ != n_components_)
        ::lowrank::detail::fail(kFunction, "n_components {} and {} differ", n_components_, other.n_components_);
      const auto fitted_before = batches_fitted_, skipped_before = batches_skipped_;
      const IpcaOptions options = options_;
      *this = other;
      options_ = options;
      batches_fitted_ += fitted_before;
      batches_skipped_ += skipped_before;
      return;
    }
    if (other.n_features_ != n_features_ || other.n_components_ != n_components_)
      ::lowrank::detail::fail(kFunction, "this PCA has {} features and {} components, the other {} and {}", n_features_,
                              n_components_, other.n_features_, other.n_components_);
    const Index f = n_features_;
    const Vector<double> other_sum = other.mean_ * static_cast<double>(other.n_samples_seen_);
    const Vector<double> other_unnormalized = other.var_ * static_cast<double>(other.n_samples_seen_);
    Vector<double> mean_new, var_new;
    const std::int64_t total = combine_moments(n_samples_seen_, mean_, var_, other.n_samples_seen_, other_sum,
                                               other_unnormalized, mean_new, var_new);
    const Index ka = components_.rows(), kb = other.components_.rows();
    RowMatrix<Scalar> stacked(ka + kb + 1, f);
    stacked.topRows(ka) = singular_values_.asDiagonal() * components_;
    stacked.middleRows(ka, kb) = other.singular_values_.asDiagonal() * other.components_;
    const double factor = std::sqrt(static_cast<double>(n_samples_seen_) * static_cast<double>(other.n_samples_seen_) /
                                    static_cast<double>(total));
    stacked.row(ka + kb) = (factor * (mean_ - other.mean_)).transpose().template cast<Scalar>();
    decompose(stacked, total, mean_new, var_new, f);
    batches_fitted_ += other.batches_fitted_;
    batches_skipped_ += other.batches_skipped_;
  }

  /// Projects rows onto the components: (X - mean) C^T, b x n_components, computed in fp64 and
  /// returned in Scalar. \throws Error if unfitted or X has the wrong column count.
  template <class Derived>
  [[nodiscard]] RowMatrix<Scalar> transform(const Eigen::MatrixBase<Derived>& X) const {
    if (!fitted()) ::lowrank::detail::fail("lowrank::linalg::IncrementalPca::transform", "the PCA is not fitted");
    if (X.cols() != n_features_)
      ::lowrank::detail::fail("lowrank::linalg::IncrementalPca::transform", "X is {}x{} but the PCA has {} features",
                              X.rows(), X.cols(), n_features_);
    const RowMatrix<double> centred = X.template cast<double>().rowwise() - mean_.transpose();
    return (centred * components_.template cast<double>().transpose()).template cast<Scalar>();
  }

  /// Whether at least one batch was absorbed (the accessors below are empty until then).
  [[nodiscard]] bool fitted() const noexcept { return n_samples_seen_ > 0; }
  /// Number of components requested.
  [[nodiscard]] Index n_components() const noexcept { return n_components_; }
  /// Number of features (0 before the first fit).
  [[nodiscard]] Index n_features() const noexcept { return n_features_; }
  /// Rows absorbed so far (skipped batches not counted).
  [[nodiscard]] std::int64_t n_samples_seen() const noexcept { return n_samples_seen_; }
  /// Batches absorbed / skipped so far (merges add the other state's counts).
  [[nodiscard]] std::int64_t batches_fitted() const noexcept { return batches_fitted_; }
  [[nodiscard]] std::int64_t batches_skipped() const noexcept { return batches_skipped_; }
  /// The options in use.
  [[nodiscard]] const IpcaOptions& options() const noexcept { return options_; }
  /// n_components x n_features, orthonormal rows, sign-normalised (`svd_flip`).
  [[nodiscard]] const RowMatrix<Scalar>& components() const noexcept { return components_; }
  /// The n_components singular values of the centred data, non-increasing.
  [[nodiscard]] const Vector<Scalar>& singular_values() const noexcept { return singular_values_; }
  /// Per-feature mean and population variance of all rows seen (fp64).
  [[nodiscard]] const Vector<double>& mean() const noexcept { return mean_; }
  [[nodiscard]] const Vector<double>& var() const noexcept { return var_; }
  /// S^2 / (n - 1) (S^2 when only one row was seen, where n - 1 = 0), n_components entries.
  [[nodiscard]] const Vector<double>& explained_variance() const noexcept { return explained_variance_; }
  /// S^2 / sum(var * n): non-increasing, sums to <= 1 (1 when n_components >= rank of the data);
  /// all 0 when the data has no variance (PEFT would divide by zero).
  [[nodiscard]] const Vector<double>& explained_variance_ratio() const noexcept { return explained_variance_ratio_; }

 private:
  // Chan et al. combination of (n_a, mean_a, var_a) with a part given by its count, sum and
  // unnormalised variance; written as scikit-learn's _incremental_mean_and_var.
  static std::int64_t combine_moments(std::int64_t n_a, const Vector<double>& mean_a, const Vector<double>& var_a,
                                      std::int64_t n_b, const Vector<double>& sum_b,
                                      const Vector<double>& unnormalized_b, Vector<double>& mean_out,
                                      Vector<double>& var_out) {
    const std::int64_t total = n_a + n_b;
    const double na = static_cast<double>(n_a), nb = static_cast<double>(n_b), n = static_cast<double>(total);
    const Vector<double> last_sum = mean_a * na;
    mean_out = (last_sum + sum_b) / n;
    const double ratio = na / nb;
    const Vector<double> unnormalized =
        var_a * na + unnormalized_b + (ratio / n) * (last_sum / ratio - sum_b).array().square().matrix();
    var_out = unnormalized / n;
    return total;
  }

  // SVD of the (centred or stacked) matrix M, then svd_flip and the derived statistics.
  void decompose(const RowMatrix<Scalar>& M, std::int64_t total, const Vector<double>& mean, const Vector<double>& var,
                 Index f) {
    const Index s = std::min<Index>(M.rows(), M.cols());
    const Index k = std::min(n_components_, s);
    SvdOptions svd;
    svd.method = options_.method;
    svd.q = std::max(k, options_.q > 0 ? options_.q : 2 * n_components_);
    svd.power_iterations = options_.power_iterations;
    svd.seed = options_.seed;
    svd.stream = options_.stream;
    TruncatedSvd<Scalar> r = truncated_svd(M, k, svd);
    RowMatrix<Scalar> comps = r.V.transpose();  // k x f
    for (Index i = 0; i < k; ++i) {
      Index arg = 0;
      Scalar best = -1;
      for (Index j = 0; j < f; ++j) {
        const Scalar a = std::abs(comps(i, j));
        if (a > best) {  // first maximum, as torch.argmax
          best = a;
          arg = j;
        }
      }
      if (comps(i, arg) < 0) comps.row(i) *= Scalar(-1);
    }
    const double n = static_cast<double>(total);
    const double total_var = var.sum() * n;
    Vector<double> s2 = r.S.template cast<double>().array().square().matrix();
    components_ = std::move(comps);
    singular_values_ = r.S;
    explained_variance_ = total > 1 ? Vector<double>(s2 / (n - 1)) : s2;
    explained_variance_ratio_ = total_var > 0 ? Vector<double>(s2 / total_var) : Vector<double>::Zero(k);
    mean_ = mean;
    var_ = var;
    n_samples_seen_ = total;
    n_features_ = f;
  }

  Index n_components_;
  IpcaOptions options_;
  Index n_features_ = 0;
  std::int64_t n_samples_seen_ = 0;
  std::int64_t batches_fitted_ = 0;
  std::int64_t batches_skipped_ = 0;
  RowMatrix<Scalar> components_;
  Vector<Scalar> singular_values_;
  Vector<double> mean_, var_, explained_variance_, explained_variance_ratio_;
};

}  // namespace linalg

LOWRANK_END_NAMESPACE
