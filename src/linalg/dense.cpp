// The dense factorizations of linalg::detail (svd.hpp): Eigen's SVDs and Householder QR,
// instantiated in this one translation unit only.
#include <Eigen/QR>
#include <Eigen/SVD>

#include "lowrank/linalg/svd.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace linalg::detail {

DenseSvd dense_svd(const ColMatrix<double>& A) {
  const auto take = [](const auto& svd) { return DenseSvd{svd.matrixU(), svd.singularValues(), svd.matrixV()}; };
  if (std::min(A.rows(), A.cols()) <= 16) {
    return take(Eigen::JacobiSVD<ColMatrix<double>>(A, Eigen::ComputeThinU | Eigen::ComputeThinV));
  }
  return take(Eigen::BDCSVD<ColMatrix<double>>(A, Eigen::ComputeThinU | Eigen::ComputeThinV));
}

namespace {

template <class Scalar>
void orthonormalize(ColMatrix<Scalar>& Y) {
  if (Y.cols() == 0) return;  // Eigen 3.4's Householder product offsets a null pointer here
  const Eigen::HouseholderQR<ColMatrix<Scalar>> qr(Y);
  Y = qr.householderQ() * ColMatrix<Scalar>::Identity(Y.rows(), Y.cols());
}

template <class Scalar>
void qr_thin(const ColMatrix<Scalar>& Y, ColMatrix<Scalar>& Q, ColMatrix<Scalar>& R) {
  const Index l = Y.cols();
  if (l == 0) {  // as in orthonormalize
    Q.resize(Y.rows(), 0);
    R.resize(0, 0);
    return;
  }
  const Eigen::HouseholderQR<ColMatrix<Scalar>> qr(Y);
  R = qr.matrixQR().topRows(l).template triangularView<Eigen::Upper>();
  Q = qr.householderQ() * ColMatrix<Scalar>::Identity(Y.rows(), l);
}

}  // namespace

void orthonormalize_columns(ColMatrix<float>& Y) { orthonormalize(Y); }
void orthonormalize_columns(ColMatrix<double>& Y) { orthonormalize(Y); }
void thin_qr(const ColMatrix<float>& Y, ColMatrix<float>& Q, ColMatrix<float>& R) { qr_thin(Y, Q, R); }
void thin_qr(const ColMatrix<double>& Y, ColMatrix<double>& Q, ColMatrix<double>& R) { qr_thin(Y, Q, R); }

}  // namespace linalg::detail
LOWRANK_END_NAMESPACE
