#include "reference_linalg.hpp"

#include <Eigen/Eigenvalues>
#include <Eigen/LU>
#include <Eigen/SVD>

namespace lowrank_test {

ReferenceSvd reference_svd(const Eigen::MatrixXd& M, bool vectors) {
  const Eigen::JacobiSVD<Eigen::MatrixXd> svd(M, vectors ? Eigen::ComputeThinU | Eigen::ComputeThinV : 0);
  ReferenceSvd out;
  out.S = svd.singularValues();
  if (vectors) {
    out.U = svd.matrixU();
    out.V = svd.matrixV();
  }
  return out;
}

Eigen::VectorXd reference_symmetric_eigenvalues(const Eigen::MatrixXd& S) {
  return Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(S, Eigen::EigenvaluesOnly).eigenvalues();
}

void reference_symmetric_eigen(const Eigen::MatrixXd& S, Eigen::VectorXd& values, Eigen::MatrixXd& vectors) {
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(S);
  values = es.eigenvalues();
  vectors = es.eigenvectors();
}

Eigen::MatrixXd reference_solve(const Eigen::MatrixXd& A, const Eigen::MatrixXd& B) { return A.fullPivLu().solve(B); }

Eigen::MatrixXd reference_inverse(const Eigen::MatrixXd& A) { return A.fullPivLu().inverse(); }

}  // namespace lowrank_test
