/// \file
/// Subspace metrics: principal angles between two column spans, and the fraction of a matrix's
/// energy captured by a subspace. Both compute in double whatever the input type.
#pragma once

#include <algorithm>
#include <cmath>

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace linalg {

namespace detail {

/// An orthonormal basis (n x rank, double) of the column span of `X`, from a column-pivoting
/// Householder QR with Eigen's default rank threshold.
template <class Derived>
ColMatrix<double> orthonormal_basis(const Eigen::MatrixBase<Derived>& X, Index& rank) {
  const ColMatrix<double> x = X.template cast<double>();
  const Eigen::ColPivHouseholderQR<ColMatrix<double>> qr(x);
  rank = qr.rank();
  // Rank 0: an empty basis, built directly (Eigen 3.4's Householder product offsets a null
  // pointer for a zero-column result).
  if (rank == 0) return ColMatrix<double>(x.rows(), 0);
  return qr.householderQ() * ColMatrix<double>::Identity(x.rows(), rank);
}

}  // namespace detail

/// Principal angles between span(X) and span(Y), in radians, ascending (0 = a shared direction,
/// pi/2 = orthogonal directions).
///
/// X (n x p) and Y (n x q) need not be orthonormal: each is orthonormalised internally
/// (column-pivoting QR, in double) to Qx, Qy; the cosines are the singular values of
/// Qx^T Qy, clamped to [0, 1], and the angles their arccosines: min(p, q) of them.
///
/// Accuracy: arccos is ill-conditioned near 0, so an angle below about 1e-8 rad reads as
/// ~1e-8 or 0; larger angles are accurate to about 1e-15 / sin(angle).
/// Cost: O(n (p^2 + q^2 + p q)) flops.
/// \throws Error if X or Y is empty, their row counts differ, either has a NaN or infinity, or the
///   columns of either are linearly dependent (numerical rank below its column count), since the
///   span then has fewer than p (or q) dimensions.
template <class D1, class D2>
[[nodiscard]] Vector<double> principal_angles(const Eigen::MatrixBase<D1>& X, const Eigen::MatrixBase<D2>& Y) {
  constexpr const char* kFunction = "lowrank::linalg::principal_angles";
  using ::lowrank::detail::fail;
  if (X.size() == 0 || Y.size() == 0) fail(kFunction, "X is {}x{} and Y is {}x{} (empty)", X.rows(), X.cols(), Y.rows(), Y.cols());
  if (X.rows() != Y.rows())
    fail(kFunction, "X is {}x{} and Y is {}x{}: the row counts differ", X.rows(), X.cols(), Y.rows(), Y.cols());
  if (!X.allFinite()) fail(kFunction, "X ({}x{}) has a non-finite value", X.rows(), X.cols());
  if (!Y.allFinite()) fail(kFunction, "Y ({}x{}) has a non-finite value", Y.rows(), Y.cols());
  Index rx = 0, ry = 0;
  const ColMatrix<double> qx = detail::orthonormal_basis(X, rx);
  if (rx < X.cols()) fail(kFunction, "X ({}x{}) has numerical rank {}: its columns are linearly dependent", X.rows(), X.cols(), rx);
  const ColMatrix<double> qy = detail::orthonormal_basis(Y, ry);
  if (ry < Y.cols()) fail(kFunction, "Y ({}x{}) has numerical rank {}: its columns are linearly dependent", Y.rows(), Y.cols(), ry);
  const ColMatrix<double> c = qx.transpose() * qy;
  const Eigen::JacobiSVD<ColMatrix<double>> svd(c);  // singular values only, descending
  Vector<double> angles = svd.singularValues();
  for (Index i = 0; i < angles.size(); ++i) angles(i) = std::acos(std::clamp(angles(i), 0.0, 1.0));
  return angles;  // cosines descending -> angles ascending
}

/// Fraction of M's energy in span(P): \f$ \|Q^\top M\|_F^2 / \|M\|_F^2 \f$ with Q an orthonormal
/// basis of the column span of P (column-pivoting QR in double; dependent columns of P are
/// allowed, the span is what counts). In [0, 1]; 1 for M == 0. For P = U from
/// `truncated_svd(M, k)` it equals that result's `captured_energy` up to rounding.
///
/// \param P n x p (p >= 1), any float or double expression
/// \param M n x c (c >= 1)
/// Cost: O(n p^2 + n p c) flops.
/// \throws Error if P or M is empty, their row counts differ, or either has a NaN or infinity.
template <class D1, class D2>
[[nodiscard]] double captured_energy(const Eigen::MatrixBase<D1>& P, const Eigen::MatrixBase<D2>& M) {
  constexpr const char* kFunction = "lowrank::linalg::captured_energy";
  using ::lowrank::detail::fail;
  if (P.size() == 0 || M.size() == 0) fail(kFunction, "P is {}x{} and M is {}x{} (empty)", P.rows(), P.cols(), M.rows(), M.cols());
  if (P.rows() != M.rows())
    fail(kFunction, "P is {}x{} and M is {}x{}: the row counts differ", P.rows(), P.cols(), M.rows(), M.cols());
  if (!P.allFinite()) fail(kFunction, "P ({}x{}) has a non-finite value", P.rows(), P.cols());
  if (!M.allFinite()) fail(kFunction, "M ({}x{}) has a non-finite value", M.rows(), M.cols());
  const ColMatrix<double> m = M.template cast<double>();
  const double total = m.squaredNorm();
  if (total == 0) return 1.0;
  Index rank = 0;
  const ColMatrix<double> q = detail::orthonormal_basis(P, rank);
  if (rank == 0) return 0.0;
  const double inside = (q.transpose() * m).squaredNorm();
  return std::min(1.0, inside / total);
}

}  // namespace linalg

LOWRANK_END_NAMESPACE
