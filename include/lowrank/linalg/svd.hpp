/// \file
/// Truncated SVD \f$ M \approx U\,\mathrm{diag}(S)\,V^\top \f$ of rank k: a randomized range finder
/// with power iterations (Halko, Martinsson and Tropp, SIAM Review 2011, algorithms 4.4 and 5.1;
/// the algorithm of `torch.svd_lowrank`) for large problems, Eigen's exact SVD for small ones.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace linalg {

/// Which algorithm `truncated_svd` uses.
enum class SvdMethod {
  automatic,   ///< `exact` when the problem is small (min(m, n) <= 64, or q >= min(m, n) / 2), else `randomized`
  randomized,  ///< range finder + power iterations + the SVD of the small projected matrix
  exact,       ///< Eigen's `BDCSVD` (`JacobiSVD` when min(m, n) <= 16) of the whole matrix, truncated
};

/// Options of `truncated_svd`.
struct SvdOptions {
  /// Randomized method: the range width is q = rank + oversample, clamped to min(m, n). >= 0.
  Index oversample = 10;
  /// If > 0: the total range width q (`torch.svd_lowrank`'s q; PEFT's PiSSA "pissa_niter_K" uses
  /// q = rank), overriding `oversample`; must be >= rank, clamped to min(m, n).
  Index q = 0;
  /// Power (subspace) iterations, `torch.svd_lowrank`'s niter; >= 0. Each multiplication by M or
  /// M^T is followed by a QR re-orthonormalisation.
  int power_iterations = 2;
  /// Key of the Gaussian test matrix: `RandomStream(seed, stream)` (index scheme: `truncated_svd`).
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
  /// Algorithm choice; see `SvdMethod`.
  SvdMethod method = SvdMethod::automatic;
};

/// A rank-k truncated SVD \f$ M \approx U\,\mathrm{diag}(S)\,V^\top \f$ of an m x n matrix.
template <class Scalar>
struct TruncatedSvd {
  ColMatrix<Scalar> U;  ///< m x k, orthonormal columns (left singular vectors)
  Vector<Scalar> S;     ///< k singular values, non-increasing, >= 0
  ColMatrix<Scalar> V;  ///< n x k, orthonormal columns (right singular vectors)
  /// sum(S^2) / ||M||_F^2, in [0, 1] up to rounding; 1 for M == 0.
  double captured_energy = 0;
  /// ||M - U diag(S) V^T||_F. Exact method: sqrt of the sum of the discarded S_i^2. Randomized:
  /// sqrt(max(0, ||M||_F^2 - sum S^2)) in double, exact in exact arithmetic because U diag(S) V^T
  /// is an orthogonal projection of M; its absolute error is about
  /// sqrt(eps(Scalar)) * ||M||_F at worst (cancellation when the residual is tiny).
  double residual_norm = 0;
  /// Whether the exact SVD was used (always for `SvdMethod::exact`; for `automatic`, small problems).
  bool exact = false;
  /// The range width q used by the randomized method (0 for the exact one).
  Index range_width = 0;
};

namespace detail {

// The dense factorizations below are compiled once into the lowrank library
// (src/linalg/dense.cpp): Eigen's BDCSVD, JacobiSVD and HouseholderQR take minutes to compile in
// every translation unit that would otherwise instantiate them.

/// Thin SVD of a dense double matrix A (m x n), k = min(m, n): U m x k, S k (non-increasing),
/// V n x k. Eigen's `BDCSVD`, `JacobiSVD` when k <= 16.
struct DenseSvd {
  ColMatrix<double> U;
  Vector<double> S;
  ColMatrix<double> V;
};
[[nodiscard]] DenseSvd dense_svd(const ColMatrix<double>& A);

/// Orthonormalises the columns of `Y` (p x l, p >= l) in place: Y <- the thin Q of Householder QR.
/// The result has orthonormal columns even when Y is rank-deficient (or zero).
void orthonormalize_columns(ColMatrix<float>& Y);
void orthonormalize_columns(ColMatrix<double>& Y);

/// Thin Householder QR of Y (p x l, p >= l): Y = Q R with Q p x l (orthonormal columns, the
/// same as `orthonormalize_columns`) and R l x l upper triangular.
void thin_qr(const ColMatrix<float>& Y, ColMatrix<float>& Q, ColMatrix<float>& R);
void thin_qr(const ColMatrix<double>& Y, ColMatrix<double>& Q, ColMatrix<double>& R);

/// Randomized SVD of the tall matrix T (p x s, p >= s), range width l <= s, rank k <= l:
/// T ~= U diag(S) V^T with U p x k, V s x k. `T` is a `Ref` or the transpose of one.
template <class Scalar, class Mat>
void randomized_svd_tall(const Mat& T, Index k, Index l, const SvdOptions& options, ColMatrix<Scalar>& U,
                         Vector<Scalar>& S, ColMatrix<Scalar>& V) {
  const Index p = T.rows(), s = T.cols();
  LOWRANK_DASSERT(p >= s && l <= s && k <= l);
  // Gaussian test matrix Omega (s x l): element (i, j) is normal(j * s + i), column by column, so
  // a wider range keeps the first columns.
  const RandomStream rng(options.seed, options.stream);
  ColMatrix<Scalar> omega(s, l);
  for (Index j = 0; j < l; ++j)
    for (Index i = 0; i < s; ++i)
      omega(i, j) = static_cast<Scalar>(rng.normal(static_cast<std::uint64_t>(j) * static_cast<std::uint64_t>(s) +
                                                   static_cast<std::uint64_t>(i)));
  ColMatrix<Scalar> Q(p, l);
  Q.noalias() = T * omega;
  orthonormalize_columns(Q);
  ColMatrix<Scalar> Z(s, l);
  for (int it = 0; it < options.power_iterations; ++it) {
    Z.noalias() = T.transpose() * Q;
    orthonormalize_columns(Z);
    Q.noalias() = T * Z;
    orthonormalize_columns(Q);
  }
  // B = Q^T T (l x s); through its transpose: B^T = T^T Q = Qb Rb, so B = Rb^T Qb^T and the SVD
  // of the l x l matrix Rb^T = Ur S Vr^T gives T ~= (Q Ur) S (Qb Vr)^T.
  Z.noalias() = T.transpose() * Q;
  ColMatrix<Scalar> qb, r_upper;
  thin_qr(Z, qb, r_upper);
  // The small l x l SVD runs in double for either Scalar (no accuracy lost in the step that fixes S).
  const DenseSvd small = dense_svd(r_upper.transpose().template cast<double>());
  U.noalias() = Q * small.U.leftCols(k).template cast<Scalar>();
  V.noalias() = qb * small.V.leftCols(k).template cast<Scalar>();
  S = small.S.head(k).template cast<Scalar>();
}

/// Exact SVD of A (any shape), truncated to k; returns the sum of the discarded S_i^2. Computed in
/// double for either Scalar (float input is widened exactly).
template <class Scalar, class Mat>
double exact_svd(const Mat& A, Index k, ColMatrix<Scalar>& U, Vector<Scalar>& S, ColMatrix<Scalar>& V) {
  const DenseSvd svd = dense_svd(A.template cast<double>());
  U = svd.U.leftCols(k).template cast<Scalar>();
  V = svd.V.leftCols(k).template cast<Scalar>();
  S = svd.S.head(k).template cast<Scalar>();
  return svd.S.tail(svd.S.size() - k).squaredNorm();
}

/// `truncated_svd` on a column-major `A0` that holds M (`stored_transposed == false`) or M^T.
template <class Scalar>
TruncatedSvd<Scalar> truncated_svd_impl(const Eigen::Ref<const ColMatrix<Scalar>, 0, Eigen::OuterStride<>>& A0,
                                        bool stored_transposed, Index rank, const SvdOptions& options) {
  constexpr const char* kFunction = "lowrank::linalg::truncated_svd";
  const Index m = stored_transposed ? A0.cols() : A0.rows();
  const Index n = stored_transposed ? A0.rows() : A0.cols();
  const Index s = std::min(m, n);
  using ::lowrank::detail::fail;
  if (s == 0) fail(kFunction, "M is {}x{} (empty)", m, n);
  if (rank < 1 || rank > s) fail(kFunction, "rank {} is outside [1, min(m, n) = {}] for M {}x{}", rank, s, m, n);
  if (options.oversample < 0) fail(kFunction, "options.oversample is {} (must be >= 0), M {}x{}", options.oversample, m, n);
  if (options.q < 0 || (options.q > 0 && options.q < rank))
    fail(kFunction, "options.q is {} (must be 0 or >= rank {}), M {}x{}", options.q, rank, m, n);
  if (options.power_iterations < 0)
    fail(kFunction, "options.power_iterations is {} (must be >= 0), M {}x{}", options.power_iterations, m, n);
  if (!A0.allFinite()) fail(kFunction, "M ({}x{}) has a non-finite value", m, n);

  const Index l = std::min(options.q > 0 ? options.q : rank + options.oversample, s);
  const bool exact = options.method == SvdMethod::exact ||
                     (options.method == SvdMethod::automatic && (s <= 64 || 2 * l >= s));
  const double norm2 = A0.template cast<double>().squaredNorm();

  TruncatedSvd<Scalar> out;
  out.exact = exact;
  double discarded = 0;
  if (exact) {
    discarded = exact_svd<Scalar>(A0, rank, stored_transposed ? out.V : out.U, out.S, stored_transposed ? out.U : out.V);
  } else {
    out.range_width = l;
    // Work on the tall orientation T = M (m >= n) or M^T (m < n): the test matrix has min(m, n)
    // rows and the small SVD is l x l whatever the shape or storage order.
    const bool t_is_m = m >= n;
    const bool t_is_a0 = (t_is_m != stored_transposed);
    ColMatrix<Scalar>& ut = t_is_m ? out.U : out.V;
    ColMatrix<Scalar>& vt = t_is_m ? out.V : out.U;
    if (t_is_a0) {
      randomized_svd_tall<Scalar>(A0, rank, l, options, ut, out.S, vt);
    } else {
      randomized_svd_tall<Scalar>(A0.transpose(), rank, l, options, ut, out.S, vt);
    }
  }
  const double kept = out.S.template cast<double>().squaredNorm();
  if (norm2 == 0) {
    out.captured_energy = 1;
    out.residual_norm = 0;
  } else {
    out.captured_energy = kept / norm2;
    out.residual_norm = exact ? std::sqrt(discarded) : std::sqrt(std::max(0.0, norm2 - kept));
  }
  return out;
}

// The float and double instantiations are compiled once into the lowrank library
// (src/linalg/svd.cpp): their products take a minute to compile.
extern template TruncatedSvd<float> truncated_svd_impl<float>(
    const Eigen::Ref<const ColMatrix<float>, 0, Eigen::OuterStride<>>&, bool, Index, const SvdOptions&);
extern template TruncatedSvd<double> truncated_svd_impl<double>(
    const Eigen::Ref<const ColMatrix<double>, 0, Eigen::OuterStride<>>&, bool, Index, const SvdOptions&);

template <class T>
concept SvdScalar = std::same_as<T, float> || std::same_as<T, double>;

}  // namespace detail

/// Rank-`rank` truncated SVD of `M` (m x n): \f$ M \approx U\,\mathrm{diag}(S)\,V^\top \f$, U m x k,
/// S k, V n x k with k = rank, S non-increasing.
///
/// Randomized method, with T = M if m >= n and T = M^T otherwise (T is p x s, s = min(m, n)):
///  1. Omega (s x q) Gaussian, `Omega(i, j) = RandomStream(seed, stream).normal(j * s + i)`;
///  2. Q = orth(T Omega); then `power_iterations` times: Z = orth(T^T Q), Q = orth(T Z), where
///     orth is the thin Q of a Householder QR;
///  3. T^T Q = Qb Rb (QR), SVD Rb^T = Ur S Vr^T (l x l), T ~= (Q Ur) S (Qb Vr)^T, truncated to k.
/// Exact method: Eigen's `BDCSVD` (`JacobiSVD` if min(m, n) <= 16) with thin U and V, truncated.
/// Both Eigen SVDs (the exact one and the small one of step 3) run in double for float input too.
///
/// \tparam Derived any Eigen expression of float or double; it is evaluated once (a column-major
///   matrix, a row-major one, or a block of either with unit inner stride is used in place,
///   without a copy; other expressions are evaluated into a temporary).
/// \param rank   k in [1, min(m, n)]
/// \param options range width, power iterations, seed and method (`SvdOptions`)
///
/// Cost of the randomized method: (2 + 2 * power_iterations) products of M with a q-column
/// matrix, 4 m n q (1 + power_iterations) flops, plus O((m + n) q^2) for the QRs and O(q^3) for
/// the small SVD; memory O((m + n) q). The exact method costs O(m n min(m, n)).
///
/// Accuracy (HMT 2011, theorem 10.7): with q = k + p, the expected spectral error is within a
/// small factor of sigma_{k+1}, and each power iteration raises the spectrum's decay to a higher
/// power, so flat spectra need more iterations. `captured_energy` and `residual_norm` report what
/// was achieved (both exact in exact arithmetic).
///
/// Determinism: the same input (value, shape and storage order), rank and options give bitwise
/// the same result on one build with the same Eigen thread setting (the test matrix never depends
/// on threads; Eigen's GEMM may round differently when a consumer enables its OpenMP threads);
/// singular vectors are defined up to sign.
///
/// \throws Error (naming the argument and M's shape) if M is empty, rank is outside
///   [1, min(m, n)], options.oversample < 0, options.q < 0 or 0 < options.q < rank,
///   options.power_iterations < 0, or M has a NaN or infinity.
template <class Derived>
  requires detail::SvdScalar<typename Derived::Scalar>
[[nodiscard]] TruncatedSvd<typename Derived::Scalar> truncated_svd(const Eigen::MatrixBase<Derived>& M, Index rank,
                                                                   const SvdOptions& options = {}) {
  using Scalar = typename Derived::Scalar;
  using ConstRef = Eigen::Ref<const ColMatrix<Scalar>, 0, Eigen::OuterStride<>>;
  if constexpr (Derived::IsRowMajor) {
    // M^T is column-major: used in place.
    const ConstRef at(M.derived().transpose());
    return detail::truncated_svd_impl<Scalar>(at, true, rank, options);
  } else {
    const ConstRef a(M.derived());
    return detail::truncated_svd_impl<Scalar>(a, false, rank, options);
  }
}

/// `truncated_svd` of a matrix in user memory (float or double, any positive strides); row- or
/// column-major views with unit stride on one side are used without a copy.
/// \throws Error as the Eigen overload, and if a non-empty view has a null pointer or a
///   non-positive stride.
template <class T>
  requires detail::SvdScalar<std::remove_const_t<T>>
[[nodiscard]] TruncatedSvd<std::remove_const_t<T>> truncated_svd(MatrixView<T> M, Index rank,
                                                                  const SvdOptions& options = {}) {
  using Scalar = std::remove_const_t<T>;
  if (!M.empty() && (M.data == nullptr || M.row_stride <= 0 || M.col_stride <= 0))
    ::lowrank::detail::fail("lowrank::linalg::truncated_svd", "M ({}x{}) has a null pointer or strides {}, {} that are not positive",
                 M.rows, M.cols, M.row_stride, M.col_stride);
  if (M.empty()) ::lowrank::detail::fail("lowrank::linalg::truncated_svd", "M is {}x{} (empty)", M.rows, M.cols);
  if (M.col_stride == 1) {
    return truncated_svd(Eigen::Map<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>>(
                             M.data, M.rows, M.cols, Eigen::OuterStride<>(M.row_stride)),
                         rank, options);
  }
  if (M.row_stride == 1) {
    return truncated_svd(Eigen::Map<const ColMatrix<Scalar>, 0, Eigen::OuterStride<>>(
                             M.data, M.rows, M.cols, Eigen::OuterStride<>(M.col_stride)),
                         rank, options);
  }
  using Strided = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
  return truncated_svd(Eigen::Map<const ColMatrix<Scalar>, 0, Strided>(M.data, M.rows, M.cols,
                                                                       Strided(M.col_stride, M.row_stride)),
                       rank, options);
}

}  // namespace linalg

LOWRANK_END_NAMESPACE
