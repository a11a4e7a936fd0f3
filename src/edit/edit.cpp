// Factored edits, ROME, MEMIT and EMMET (include/lowrank/edit/*.hpp). Compiled once into the
// library: the Eigen decompositions they use stay out of users' translation units.
#include <algorithm>
#include <cmath>
#include <string>

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>

#include "../core/widen.hpp"
#include "../linalg/triangular.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/edit/factored.hpp"
#include "lowrank/edit/memit.hpp"
#include "lowrank/edit/rome.hpp"
#include "lowrank/linalg/moments.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace edit {
namespace {

using detail::fail;

template <class Derived>
void require_finite(const char* fn, const char* name, const Eigen::MatrixBase<Derived>& m) {
  if (!m.allFinite()) fail(fn, "{} ({}x{}) has a NaN or infinity", name, m.rows(), m.cols());
}

using detail::widen;

// Checks K (in x n) and R (out x n) against the factor; returns n.
Index check_batch(const char* fn, const Eigen::Ref<const ColMatrix<double>>& K,
                  const Eigen::Ref<const ColMatrix<double>>& R, const linalg::SpdFactor& C) {
  if (C.dim() == 0) fail(fn, "C is an empty factor (default-constructed)");
  if (K.rows() != C.dim())
    fail(fn, "K is {}x{} but C is {}x{}: K must be in x n (one key per column)", K.rows(), K.cols(), C.dim(), C.dim());
  if (K.cols() == 0) fail(fn, "K is {}x0: no requests", K.rows());
  if (R.cols() != K.cols())
    fail(fn, "R is {}x{} but K is {}x{}: one residual column per key column", R.rows(), R.cols(), K.rows(), K.cols());
  if (R.rows() == 0) fail(fn, "R is 0x{}: the output dimension must be >= 1", R.cols());
  require_finite(fn, "K", K);
  require_finite(fn, "R", R);
  return K.cols();
}

}  // namespace

void check_edit(const char* fn, const FactoredEdit& edit, Index out, Index in) {
  if (edit.U.cols() != edit.V.cols())
    fail(fn, "the edit's U is {}x{} and V is {}x{}: their ranks (columns) differ", edit.U.rows(), edit.U.cols(),
         edit.V.rows(), edit.V.cols());
  if (edit.U.cols() == 0) fail(fn, "the edit has rank 0 (U is {}x0)", edit.U.rows());
  if (edit.U.rows() != in || edit.V.rows() != out)
    fail(fn, "the edit is out x in = {}x{} (V {}x{}, U {}x{}) but the weight is out x in = {}x{}", edit.V.rows(),
         edit.U.rows(), edit.V.rows(), edit.V.cols(), edit.U.rows(), edit.U.cols(), out, in);
}

template <SupportedScalar TW>
  requires(!std::is_const_v<TW>)
void apply(WeightView<TW> W, const FactoredEdit& edit, double sign, const RankUpdateOptions& options) {
  constexpr const char* fn = "lowrank::edit::apply";
  check_edit(fn, edit, W.out_features(), W.in_features());
  if (!std::isfinite(sign)) fail(fn, "sign is {}; it must be finite", sign);
  // W_out_in += sign * V U^T: V on the output side, U on the input side.
  rank_update(W, MatrixView<const double>(view(edit.V)), MatrixView<const double>(view(edit.U)), sign, options);
}

void forward_add(MatrixView<const float> X, const FactoredEdit& edit, MatrixView<float> Y) {
  constexpr const char* fn = "lowrank::edit::forward_add";
  check_edit(fn, edit, edit.V.rows(), edit.U.rows());
  if (X.cols != edit.in_features())
    fail(fn, "X is {}x{} but the edit has {} input features", X.rows, X.cols, edit.in_features());
  if (Y.rows != X.rows || Y.cols != edit.out_features())
    fail(fn, "Y is {}x{} but must be tokens x out = {}x{}", Y.rows, Y.cols, X.rows, edit.out_features());
  if (X.rows > 0 && (X.data == nullptr || Y.data == nullptr)) fail(fn, "X or Y has a null data pointer");
  const Index r = edit.rank();
  Vector<double> xu(r);
  for (Index t = 0; t < X.rows; ++t) {
    xu.setZero();
    for (Index i = 0; i < X.cols; ++i) {
      const double x = X(t, i);
      for (Index k = 0; k < r; ++k) xu(k) += x * edit.U(i, k);
    }
    for (Index o = 0; o < Y.cols; ++o) {
      double add = 0;
      for (Index k = 0; k < r; ++k) add += edit.V(o, k) * xu(k);
      Y(t, o) = static_cast<float>(static_cast<double>(Y(t, o)) + add);
    }
  }
}

// ---- ROME -----------------------------------------------------------------------------------------

FactoredEdit rome(const Eigen::Ref<const Vector<double>>& k_dir, const Eigen::Ref<const Vector<double>>& k_eq,
                  const Eigen::Ref<const Vector<double>>& v_star, const Eigen::Ref<const Vector<double>>& w_k_eq,
                  const linalg::SpdFactor& C, const RomeOptions& options) {
  constexpr const char* fn = "lowrank::edit::rome";
  if (C.dim() == 0) fail(fn, "C is an empty factor (default-constructed)");
  const Index in = C.dim();
  if (k_dir.size() != in) fail(fn, "k_dir has {} entries but C is {}x{}", k_dir.size(), in, in);
  if (k_eq.size() != in) fail(fn, "k_eq has {} entries but C is {}x{}", k_eq.size(), in, in);
  if (v_star.size() == 0) fail(fn, "v_star is empty");
  if (w_k_eq.size() != v_star.size())
    fail(fn, "w_k_eq has {} entries but v_star has {} (both are outputs)", w_k_eq.size(), v_star.size());
  if (!(options.min_denominator >= 0) || !std::isfinite(options.min_denominator))
    fail(fn, "options.min_denominator is {}; it must be finite and >= 0", options.min_denominator);
  require_finite(fn, "k_dir", k_dir);
  require_finite(fn, "k_eq", k_eq);
  require_finite(fn, "v_star", v_star);
  require_finite(fn, "w_k_eq", w_k_eq);
  const Vector<double> direction = C.solve(k_dir);
  const double norm = direction.norm();
  if (!(norm > 0) || !std::isfinite(norm)) fail(fn, "C^-1 k_dir has norm {} (k_dir of size {} is zero?)", norm, in);
  FactoredEdit edit;
  edit.U = direction / norm;
  const double denominator = k_eq.dot(edit.U.col(0));
  if (!(std::abs(denominator) > options.min_denominator * k_eq.norm())) {
    fail(fn, "the denominator k_eq^T u = {} is degenerate (|k_eq| = {}, threshold {} |k_eq|): k_eq is nearly "
         "C^-1-orthogonal to k_dir", denominator, k_eq.norm(), options.min_denominator);
  }
  edit.V = (v_star - w_k_eq) / denominator;
  return edit;
}

template <SupportedScalar TW>
Vector<double> weight_times(WeightView<const TW> W, const Eigen::Ref<const Vector<double>>& k, const float* bias) {
  const MatrixView<const TW> w = W.as_out_in();
  if (k.size() != w.cols)
    fail("lowrank::edit::weight_times", "k has {} entries but W is out x in = {}x{}", k.size(), w.rows, w.cols);
  Vector<double> y(w.rows);
  for (Index o = 0; o < w.rows; ++o) {
    double s = 0;
    for (Index i = 0; i < w.cols; ++i) s += widen(w(o, i)) * k(i);
    y(o) = bias != nullptr ? s + static_cast<double>(bias[o]) : s;
  }
  return y;
}

template <SupportedScalar TW>
FactoredEdit rome(const Eigen::Ref<const Vector<double>>& k_dir, const Eigen::Ref<const Vector<double>>& k_eq,
                  const Eigen::Ref<const Vector<double>>& v_star, WeightView<const TW> W, const float* bias,
                  const linalg::SpdFactor& C, const RomeOptions& options) {
  constexpr const char* fn = "lowrank::edit::rome";
  if (W.in_features() != C.dim())
    fail(fn, "W is out x in = {}x{} but C is {}x{}", W.out_features(), W.in_features(), C.dim(), C.dim());
  if (v_star.size() != W.out_features())
    fail(fn, "v_star has {} entries but W is out x in = {}x{}", v_star.size(), W.out_features(), W.in_features());
  if (k_eq.size() != W.in_features())
    fail(fn, "k_eq has {} entries but W is out x in = {}x{}", k_eq.size(), W.out_features(), W.in_features());
  return rome(k_dir, k_eq, v_star, weight_times(W, k_eq, bias), C, options);
}

// ---- MEMIT and EMMET ------------------------------------------------------------------------------

FactoredEdit memit(const Eigen::Ref<const ColMatrix<double>>& K, const Eigen::Ref<const ColMatrix<double>>& R,
                   const linalg::SpdFactor& C, double lambda) {
  constexpr const char* fn = "lowrank::edit::memit";
  const Index n = check_batch(fn, K, R, C);
  if (!(lambda > 0) || !std::isfinite(lambda)) fail(fn, "lambda is {}; it must be finite and > 0", lambda);
  // U = A^-1 K (lambda I + K^T A^-1 K)^-1 with A = L L^T: Z = L^-1 K, M = lambda I + Z^T Z =
  // Lm Lm^T, U = L^-T (Z M^-1). Z M^-1 is computed in place: Z (d x n, column-major) is Z^T seen
  // row-major, and M^-1 Z^T = Lm^-T Lm^-1 Z^T. M's product is a SYRK on the fp64 rank-update
  // kernel (SecondMoment: the rows of Z are its keys); the solves are blocked and threaded.
  const Index d = K.rows();
  ColMatrix<double> Z = C.half_solve(K);
  // Blocked summation: each kKeys-row slab of Z starts its sums from zero, then joins M.
  constexpr Index kKeys = 128;
  ColMatrix<double> M = ColMatrix<double>::Zero(n, n);  // lower triangle of Z^T Z
  for (Index k0 = 0; k0 < d; k0 += kKeys) {
    linalg::SecondMoment slab(n);
    slab.add(MatrixView<const double>(Z.data() + k0, std::min(kKeys, d - k0), n, 1, d));
    M.triangularView<Eigen::Lower>() += slab.scatter_lower();
  }
  M.diagonal().array() += lambda;
  const Eigen::LLT<ColMatrix<double>> small(M);  // >= lambda I: positive definite
  if (small.info() != Eigen::Success) fail(fn, "lambda I + K^T A^-1 K ({}x{}) is not positive definite", n, n);
  const MatrixView<double> Zt(Z.data(), n, d, d, 1);
  lowrank::detail::triangular_solve(small.matrixLLT().data(), n, n, Zt, false);
  lowrank::detail::triangular_solve(small.matrixLLT().data(), n, n, Zt, true);
  FactoredEdit edit;
  edit.U = C.half_solve_transposed(Z);
  edit.V = R;
  return edit;
}

ColMatrix<double> spread_residual(const Eigen::Ref<const ColMatrix<double>>& R, Index layer, Index layers) {
  constexpr const char* fn = "lowrank::edit::spread_residual";
  if (layers < 1) fail(fn, "layers is {}; it must be >= 1", layers);
  if (layer < 0 || layer >= layers) fail(fn, "layer is {}; it must be in [0, {})", layer, layers);
  require_finite(fn, "R", R);
  return R / static_cast<double>(layers - layer);
}

EmmetResult emmet(const Eigen::Ref<const ColMatrix<double>>& K, const Eigen::Ref<const ColMatrix<double>>& R,
                  const linalg::SpdFactor& C, const EmmetOptions& options) {
  constexpr const char* fn = "lowrank::edit::emmet";
  const Index n = check_batch(fn, K, R, C);
  if (!(options.lambda >= 0) || !std::isfinite(options.lambda))
    fail(fn, "options.lambda is {}; it must be finite and >= 0", options.lambda);
  if (!(options.pinv_tolerance >= 0) || !std::isfinite(options.pinv_tolerance))
    fail(fn, "options.pinv_tolerance is {}; it must be finite and >= 0", options.pinv_tolerance);
  const ColMatrix<double> Z = C.half_solve(K);  // D = Z^T Z = K^T A^-1 K
  ColMatrix<double> D = Z.transpose() * Z;
  if (n > 1) D.diagonal().array() += options.lambda;
  EmmetResult result{};
  // D^-1 Z^T by Cholesky when D is numerically definite, else by the pseudo-inverse.
  const Eigen::LLT<ColMatrix<double>> llt(D);
  ColMatrix<double> DinvZt;
  const double threshold = static_cast<double>(n) * 0x1.0p-52 * D.diagonal().maxCoeff();
  const bool definite = llt.info() == Eigen::Success &&
                        llt.matrixLLT().diagonal().cwiseAbs2().minCoeff() > threshold;
  if (definite) {
    DinvZt = llt.solve(Z.transpose());
  } else {
    const Eigen::SelfAdjointEigenSolver<ColMatrix<double>> eig(D);
    const Vector<double>& w = eig.eigenvalues();
    const double cut = options.pinv_tolerance * std::max(w.maxCoeff(), 0.0);
    Vector<double> inv(n);
    for (Index i = 0; i < n; ++i) {
      if (w(i) > cut && w(i) > 0) {
        inv(i) = 1.0 / w(i);
      } else {
        inv(i) = 0;
        ++result.dropped;
      }
    }
    DinvZt = eig.eigenvectors() * inv.asDiagonal() * eig.eigenvectors().transpose() * Z.transpose();
    result.pseudo_inverse = true;
  }
  // U = A^-1 K D^-1 = L^-T Z D^-1 = L^-T (D^-1 Z^T)^T (D symmetric).
  result.edit.U = C.half_solve_transposed(DinvZt.transpose());
  result.edit.V = R;
  return result;
}

#define LOWRANK_INSTANTIATE(TW)                                                                                 \
  template void apply<TW>(WeightView<TW>, const FactoredEdit&, double, const RankUpdateOptions&);               \
  template Vector<double> weight_times<TW>(WeightView<const TW>, const Eigen::Ref<const Vector<double>>&,       \
                                           const float*);                                                       \
  template FactoredEdit rome<TW>(const Eigen::Ref<const Vector<double>>&, const Eigen::Ref<const Vector<double>>&, \
                                 const Eigen::Ref<const Vector<double>>&, WeightView<const TW>, const float*,     \
                                 const linalg::SpdFactor&, const RomeOptions&);
LOWRANK_INSTANTIATE(double)
LOWRANK_INSTANTIATE(float)
LOWRANK_INSTANTIATE(bf16)
LOWRANK_INSTANTIATE(f16)
#undef LOWRANK_INSTANTIATE

}  // namespace edit

LOWRANK_END_NAMESPACE
