// Independent fp64 references for the tests (Eigen's JacobiSVD, self-adjoint eigensolver and
// full-pivoting LU, none of them used by lowrank itself), compiled once into the
// lowrank_test_support library so that each test translation unit does not instantiate them again
// (minutes per unit in a Debug or sanitizer build).
#pragma once

#include <Eigen/Core>

namespace lowrank_test {

struct ReferenceSvd {
  Eigen::MatrixXd U;  ///< thin left singular vectors (empty unless asked for)
  Eigen::VectorXd S;  ///< singular values, non-increasing
  Eigen::MatrixXd V;  ///< thin right singular vectors (empty unless asked for)
};

/// SVD of M by Eigen's two-sided Jacobi (thin U and V when `vectors`).
ReferenceSvd reference_svd(const Eigen::MatrixXd& M, bool vectors = true);

/// Eigenvalues of the symmetric matrix S (increasing), by Eigen's self-adjoint eigensolver.
Eigen::VectorXd reference_symmetric_eigenvalues(const Eigen::MatrixXd& S);

/// Eigenvalues (increasing) and eigenvectors (columns) of the symmetric matrix S.
void reference_symmetric_eigen(const Eigen::MatrixXd& S, Eigen::VectorXd& values, Eigen::MatrixXd& vectors);

/// A^{-1} B by full-pivoting LU.
Eigen::MatrixXd reference_solve(const Eigen::MatrixXd& A, const Eigen::MatrixXd& B);

/// A^{-1} by full-pivoting LU.
Eigen::MatrixXd reference_inverse(const Eigen::MatrixXd& A);

}  // namespace lowrank_test
