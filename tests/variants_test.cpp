// LoRA variants (lowrank/adapt/variants.hpp) against naive float64 references and the oracles of
// ../shared/reference/adapters.md sections 11.2 (DoRA), 11.6 (LoRA-XS, LoRA-SB) and 11.7
// (SingLoRA, MoRA), plus selector sums and error handling.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "lowrank/adapt/variants.hpp"
#include "reference_linalg.hpp"

namespace {

using lowrank::Error;
using lowrank::Index;
using lowrank::Layout;
using lowrank::RowMatrix;
using lowrank::Vector;
namespace adapt = lowrank::adapt;

using MatD = RowMatrix<double>;
using MatF = RowMatrix<float>;

MatD random_matrix(Index rows, Index cols, std::uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  MatD M(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) M(i, j) = dist(gen);
  return M;
}

double max_abs(const Eigen::Ref<const Eigen::MatrixXd>& M) { return M.size() == 0 ? 0.0 : M.cwiseAbs().maxCoeff(); }

// Best rank-r approximation by a full Jacobi SVD (independent of lowrank::linalg).
MatD best_rank(const MatD& M, Index r) {
  const lowrank_test::ReferenceSvd svd = lowrank_test::reference_svd(M);
  return svd.U.leftCols(r) * svd.S.head(r).asDiagonal() * svd.V.leftCols(r).transpose();
}

Eigen::VectorXd singular_values(const MatD& M) { return lowrank_test::reference_svd(M, false).S; }

// Orthogonal projector onto the column span of P (full column rank).
Eigen::MatrixXd projector(const Eigen::MatrixXd& P) {
  return P * lowrank_test::reference_solve(P.transpose() * P, P.transpose());
}

template <class F>
void expect_error_containing(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected lowrank::Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// LoRA-XS / LoRA-SB

TEST(LoraXs, InitShapesOrthogonalityTinyDelta) {
  const Index out = 24, in = 16, r = 4;
  const MatD W = random_matrix(out, in, 1);
  const MatD W_before = W;
  const auto a = adapt::init_lora_xs<double>(lowrank::weight(W, Layout::out_in), r);
  EXPECT_EQ(W, W_before);  // base weight not modified
  ASSERT_EQ(a.B.rows(), out);
  ASSERT_EQ(a.B.cols(), r);
  ASSERT_EQ(a.A.rows(), r);
  ASSERT_EQ(a.A.cols(), in);
  ASSERT_EQ(a.R.rows(), r);
  ASSERT_EQ(a.R.cols(), r);
  EXPECT_EQ(a.rank(), r);
  // B orthonormal columns; A orthogonal rows with norms S_r.
  EXPECT_LT(max_abs(a.B.transpose() * a.B - Eigen::MatrixXd::Identity(r, r)), 1e-12);
  const Eigen::VectorXd S = singular_values(W);
  const MatD AAt = a.A * a.A.transpose();
  for (Index i = 0; i < r; ++i)
    for (Index j = 0; j < r; ++j) {
      if (i == j)
        EXPECT_NEAR(AAt(i, i), S(i) * S(i), 1e-10 * S(0) * S(0));
      else
        EXPECT_NEAR(AAt(i, j), 0.0, 1e-10 * S(0) * S(0));
    }
  // B A is the best rank-r approximation of W (B = U_r, A = S_r V_r^T).
  EXPECT_LT(max_abs(a.B * a.A - best_rank(W, r)), 1e-10 * S(0));
  // R ~ N(0, 1e-5^2): tiny, non-zero; dW tiny.
  EXPECT_GT(max_abs(a.R), 0.0);
  EXPECT_LT(max_abs(a.R), 1e-4);
  const MatD d = adapt::dense_delta(a);
  EXPECT_LT(max_abs(d), 1e-4 * S(0) * r);
  // Deterministic for a given seed.
  const auto b = adapt::init_lora_xs<double>(lowrank::weight(W, Layout::out_in), r);
  EXPECT_EQ(a.R, b.R);
}

TEST(LoraXs, InitInOutLayout) {
  const Index out = 10, in = 14, r = 3;
  const MatD W_oi = random_matrix(out, in, 2);
  const MatD W_io = W_oi.transpose();
  const auto a = adapt::init_lora_xs<double>(lowrank::weight(W_io, Layout::in_out), r);
  EXPECT_EQ(a.layout, Layout::in_out);
  EXPECT_EQ(a.out_features(), out);
  EXPECT_EQ(a.in_features(), in);
  EXPECT_LT(max_abs(a.B * a.A - best_rank(W_oi, r)), 1e-10 * singular_values(W_oi)(0));
  const MatD d = adapt::dense_delta(a);
  EXPECT_EQ(d.rows(), in);
  EXPECT_EQ(d.cols(), out);
  EXPECT_LT(max_abs(d - (a.scale * a.B * a.R * a.A).transpose()), 1e-18);
}

TEST(LoraXs, RandomizedSvdPath) {
  // q = r, niter = 10 (the reference's svd_lowrank parameters) on a matrix with a spectral gap.
  const Index out = 90, in = 70, r = 4;
  const MatD W = random_matrix(out, r, 25) * random_matrix(r, in, 26) + random_matrix(out, in, 27, 1e-3);
  adapt::LoraXsOptions opt;
  opt.method = lowrank::linalg::SvdMethod::randomized;
  const auto a = adapt::init_lora_xs<double>(lowrank::weight(W, Layout::out_in), r, opt);
  EXPECT_LT(max_abs(a.B.transpose() * a.B - Eigen::MatrixXd::Identity(r, r)), 1e-12);
  const MatD best = best_rank(W, r);
  EXPECT_LT((a.B * a.A - best).norm(), 1e-6 * best.norm());
  adapt::LoraSbOptions sb;
  sb.method = lowrank::linalg::SvdMethod::randomized;
  sb.step = adapt::LoraSbStep::raw;
  const auto b = adapt::init_lora_sb<double>(lowrank::weight(W, Layout::out_in), r, 2.0, sb);
  EXPECT_LT(max_abs(b.A * b.A.transpose() - Eigen::MatrixXd::Identity(r, r)), 1e-12);
  EXPECT_LT((adapt::dense_delta(b) + 2.0 * best).norm(), 1e-6 * best.norm());
}

TEST(LoraSb, InitIsBestRankApproxOfSignStep) {
  const Index out = 20, in = 12, r = 3;
  const double eta = 1e-3;
  MatD G = random_matrix(out, in, 3);
  G(0, 0) = 0.0;  // sign(0) = 0
  const MatD G_before = G;
  const MatD W0 = random_matrix(out, in, 4);
  const MatD W0_before = W0;
  const auto a = adapt::init_lora_sb<double>(lowrank::weight(G, Layout::out_in), r, eta);
  EXPECT_EQ(G, G_before);
  EXPECT_EQ(W0, W0_before);
  MatD step = -eta * G.unaryExpr([](double g) { return g > 0 ? 1.0 : (g < 0 ? -1.0 : 0.0); });
  const MatD trunc = best_rank(step, r);
  EXPECT_LT(max_abs(adapt::dense_delta(a) - trunc), 1e-12);
  EXPECT_LT(max_abs(a.B.transpose() * a.B - Eigen::MatrixXd::Identity(r, r)), 1e-12);
  EXPECT_LT(max_abs(a.A * a.A.transpose() - Eigen::MatrixXd::Identity(r, r)), 1e-12);
  // R = diag(S_r) with s = 1.
  const Eigen::VectorXd S = singular_values(step);
  for (Index i = 0; i < r; ++i) EXPECT_NEAR(a.R(i, i), S(i), 1e-12);
  EXPECT_NEAR(max_abs(a.R - MatD(a.R.diagonal().asDiagonal())), 0.0, 0.0);
  // The initial model is W0 + trunc_r(dW1); merging builds it, W0 itself stays as it was.
  MatD W = W0;
  adapt::merge(lowrank::weight(W, Layout::out_in), a);
  EXPECT_LT(max_abs(W - (W0 + trunc)), 1e-12);
}

TEST(LoraSb, RawGradientScaleAndLayout) {
  const Index out = 9, in = 15, r = 2;
  const double eta = 0.5;
  const MatD G_oi = random_matrix(out, in, 5);
  const MatD G_io = G_oi.transpose();
  adapt::LoraSbOptions opt;
  opt.step = adapt::LoraSbStep::raw;
  opt.scale = 4.0;
  const auto a = adapt::init_lora_sb<double>(lowrank::weight(G_io, Layout::in_out), r, eta, opt);
  EXPECT_EQ(a.layout, Layout::in_out);
  const MatD trunc = best_rank(-eta * G_oi, r);
  const MatD d = adapt::dense_delta(a);  // in x out
  EXPECT_EQ(d.rows(), in);
  EXPECT_LT(max_abs(d.transpose() - trunc), 1e-12);
  const Eigen::VectorXd S = singular_values(-eta * G_oi);
  EXPECT_NEAR(a.R(0, 0), S(0) / 4.0, 1e-12);
}

// L(W) = 0.5 ||W - T||_F^2 + sum(C .* W): dL/dW = W - T + C.
struct Quadratic {
  MatD T, C;
  double loss(const MatD& W) const { return 0.5 * (W - T).squaredNorm() + (C.array() * W.array()).sum(); }
  MatD grad(const MatD& W) const { return W - T + C; }
};

TEST(LoraXs, GradRMatchesFiniteDifferences) {
  const Index out = 8, in = 6, r = 3;
  adapt::LoraXsAdapter<double> a;
  a.B = random_matrix(out, r, 6);
  a.A = random_matrix(r, in, 7);
  a.R = random_matrix(r, r, 8);
  a.scale = 1.7;
  const MatD W0 = random_matrix(out, in, 9);
  const Quadratic q{random_matrix(out, in, 10), random_matrix(out, in, 11)};
  auto eff = [&](const MatD& R) { return MatD(W0 + a.scale * a.B * R * a.A); };
  const MatD G = q.grad(eff(a.R));
  const MatD gR = adapt::grad_R(a, lowrank::weight(G, Layout::out_in));
  EXPECT_LT(max_abs(gR - a.scale * a.B.transpose() * G * a.A.transpose()), 1e-12);
  const double h = 1e-5;
  for (Index i = 0; i < r; ++i)
    for (Index j = 0; j < r; ++j) {
      MatD Rp = a.R, Rm = a.R;
      Rp(i, j) += h;
      Rm(i, j) -= h;
      const double fd = (q.loss(eff(Rp)) - q.loss(eff(Rm))) / (2 * h);
      EXPECT_NEAR(gR(i, j), fd, 1e-6 * (1 + std::abs(fd))) << i << "," << j;
    }
  // The same gradient given in the in_out layout.
  const MatD Gt = G.transpose();
  adapt::LoraXsAdapter<double> b = a;
  b.layout = Layout::in_out;
  EXPECT_LT(max_abs(adapt::grad_R(b, lowrank::weight(Gt, Layout::in_out)) - gR), 1e-12);
}

TEST(LoraXs, ImpliedStepLiesInSpanBxA) {
  const Index out = 14, in = 10, r = 3;
  const MatD Gacc = random_matrix(out, in, 12);
  auto a = adapt::init_lora_sb<double>(lowrank::weight(Gacc, Layout::out_in), r, 1e-2);
  a.scale = 0.8;
  const MatD G = random_matrix(out, in, 13);
  const MatD gR = adapt::grad_R(a, lowrank::weight(G, Layout::out_in));
  const MatD step = adapt::full_space_update(a, gR);
  const double s = a.scale;
  // s B (dL/dR) A = s^2 B B^T G A^T A for orthonormal B, A.
  EXPECT_LT(max_abs(step - s * s * a.B * a.B.transpose() * G * a.A.transpose() * a.A), 1e-12);
  const Eigen::MatrixXd PB = projector(a.B), PA = projector(a.A.transpose());
  EXPECT_LT(max_abs(PB * step * PA - step), 1e-12);
  // The complement of span(B) x span(A) gets nothing; the step is a descent direction.
  EXPECT_LT(max_abs((Eigen::MatrixXd::Identity(out, out) - PB) * step), 1e-12);
  EXPECT_GT((G.array() * step.array()).sum(), 0.0);
  // Also for LoRA-XS factors (A not orthonormal): the step stays in the span.
  const MatD W = random_matrix(out, in, 14);
  const auto x = adapt::init_lora_xs<double>(lowrank::weight(W, Layout::out_in), r);
  const MatD stepx = adapt::full_space_update(x, adapt::grad_R(x, lowrank::weight(G, Layout::out_in)));
  EXPECT_LT(max_abs(projector(x.B) * stepx * projector(x.A.transpose()) - stepx), 1e-10 * (1 + max_abs(stepx)));
}

TEST(LoraXs, ForwardAndMergeUnmerge) {
  const Index out = 11, in = 7, r = 2, tokens = 5;
  adapt::LoraXsAdapter<float> a;
  a.B = random_matrix(out, r, 15).cast<float>();
  a.A = random_matrix(r, in, 16).cast<float>();
  a.R = random_matrix(r, r, 17).cast<float>();
  a.scale = 0.5;
  const MatF W = random_matrix(out, in, 18).cast<float>();
  const MatF X = random_matrix(tokens, in, 19).cast<float>();
  const std::vector<float> bias = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const MatD ref = X.cast<double>() * (W.cast<double>() + 0.5 * a.B.cast<double>() * a.R.cast<double>() * a.A.cast<double>()).transpose();
  const MatF Y = adapt::forward(lowrank::weight(W, Layout::out_in), a, X, bias.data());
  for (Index t = 0; t < tokens; ++t)
    for (Index j = 0; j < out; ++j) EXPECT_NEAR(Y(t, j), ref(t, j) + bias[static_cast<std::size_t>(j)], 1e-4);
  MatF Wm = W;
  adapt::merge(lowrank::weight(Wm, Layout::out_in), a);
  EXPECT_LT(max_abs((Wm.cast<double>() - W.cast<double>() - adapt::dense_delta(a).cast<double>())), 1e-5);
  adapt::unmerge(lowrank::weight(Wm, Layout::out_in), a);
  EXPECT_LT(max_abs((Wm - W).cast<double>()), 1e-5);
}

TEST(LoraXs, Errors) {
  const MatD W = random_matrix(6, 4, 20);
  expect_error_containing([&] { (void)adapt::init_lora_xs<double>(lowrank::weight(W, Layout::out_in), 5); }, "init_lora_xs");
  expect_error_containing([&] { (void)adapt::init_lora_xs<double>(lowrank::weight(W, Layout::out_in), 0); }, "rank r = 0");
  MatD G = W;
  G(1, 1) = std::nan("");
  expect_error_containing([&] { (void)adapt::init_lora_sb<double>(lowrank::weight(G, Layout::out_in), 2, 1e-3); }, "non-finite");
  expect_error_containing([&] { (void)adapt::init_lora_sb<double>(lowrank::weight(W, Layout::out_in), 2, INFINITY); }, "eta_eff");
  adapt::LoraXsAdapter<double> a;
  a.B = random_matrix(6, 2, 21);
  a.A = random_matrix(2, 4, 22);
  a.R = random_matrix(3, 3, 23);
  expect_error_containing([&] { (void)adapt::dense_delta(a); }, "R is 3x3");
  a.R = random_matrix(2, 2, 23);
  MatD Wbad = random_matrix(4, 6, 24);
  const MatD Wbad_before = Wbad;
  expect_error_containing([&] { adapt::merge(lowrank::weight(Wbad, Layout::out_in), a); }, "W is 4x6");
  EXPECT_EQ(Wbad, Wbad_before);
  expect_error_containing([&] { (void)adapt::grad_R(a, lowrank::weight(Wbad, Layout::out_in)); }, "grad_R");
  expect_error_containing([&] { (void)adapt::full_space_update(a, MatD::Zero(3, 2)); }, "dR is 3x2");
}

// ---------------------------------------------------------------------------------------------
// SingLoRA

TEST(SingLora, Ramp) {
  EXPECT_EQ(adapt::singlora_ramp(0, 100), 0.0);
  EXPECT_EQ(adapt::singlora_ramp(50, 100), 0.5);
  EXPECT_EQ(adapt::singlora_ramp(100, 100), 1.0);
  EXPECT_EQ(adapt::singlora_ramp(1000, 100), 1.0);
  EXPECT_EQ(adapt::singlora_ramp(0, 0), 1.0);
  EXPECT_THROW((void)adapt::singlora_ramp(-1, 10), Error);
}

TEST(SingLora, InitAndZeroAtStart) {
  const Index out = 12, in = 12, r = 4;
  const auto a = adapt::init_singlora<double>(out, in, r, 8.0, 100, Layout::out_in, 7);
  ASSERT_EQ(a.A.rows(), 12);
  ASSERT_EQ(a.A.cols(), r);
  const double bound = 1.0 / std::sqrt(static_cast<double>(r));
  EXPECT_LE(max_abs(a.A), bound);
  EXPECT_GT(max_abs(a.A), 0.5 * bound);
  EXPECT_EQ(max_abs(adapt::dense_delta(a, 0)), 0.0);
  const MatD X = random_matrix(3, in, 30);
  EXPECT_EQ(max_abs(adapt::adapter_output(a, X, 0)), 0.0);
  // u = 1 for t >= T: the delta at T and later equals (alpha/r) A A^T.
  const MatD full = (8.0 / r) * a.A * a.A.transpose();
  EXPECT_LT(max_abs(adapt::dense_delta(a, 100) - full), 1e-14);
  EXPECT_LT(max_abs(adapt::dense_delta(a, 5000) - full), 1e-14);
  EXPECT_LT(max_abs(adapt::dense_delta(a, 25) - 0.25 * full), 1e-14);
}

TEST(SingLora, SquareSymmetricPsd) {
  const auto a = adapt::init_singlora<double>(10, 10, 3, 4.0, 10, Layout::out_in, 8);
  const MatD d = adapt::dense_delta(a, 10);
  EXPECT_LT(max_abs(d - d.transpose()), 1e-15);
  EXPECT_GE(lowrank_test::reference_symmetric_eigenvalues(d).minCoeff(), -1e-12);
}

TEST(SingLora, NonSquareShapeIsOutByIn) {
  // Regression test for the transposed branch (A[:in] A^T, in x out) of the reference code.
  for (auto [out, in] : {std::pair<Index, Index>{12, 5}, std::pair<Index, Index>{5, 12}}) {
    SCOPED_TRACE(std::to_string(out) + "x" + std::to_string(in));
    const Index r = 3;
    const auto a = adapt::init_singlora<double>(out, in, r, 6.0, 0, Layout::out_in, 9);
    ASSERT_EQ(a.A.rows(), std::max(out, in));
    const MatD d = adapt::dense_delta(a, 0);  // T = 0: u = 1
    ASSERT_EQ(d.rows(), out);
    ASSERT_EQ(d.cols(), in);
    for (Index i = 0; i < out; ++i)
      for (Index j = 0; j < in; ++j) {
        double ref = 0;
        for (Index k = 0; k < r; ++k) ref += a.A(i, k) * a.A(j, k);
        EXPECT_NEAR(d(i, j), 2.0 * ref, 1e-14);
      }
    // Operator form, forward and merge agree with the dense delta; in_out layout gives the transpose.
    const MatD X = random_matrix(4, in, 31);
    const MatD W = random_matrix(out, in, 32);
    EXPECT_LT(max_abs(adapt::adapter_output(a, X, 0) - X * d.transpose()), 1e-13);
    EXPECT_LT(max_abs(adapt::forward(lowrank::weight(W, Layout::out_in), a, X, 0) - X * (W + d).transpose()), 1e-13);
    MatD Wm = W;
    adapt::merge(lowrank::weight(Wm, Layout::out_in), a, 0);
    EXPECT_LT(max_abs(Wm - (W + d)), 1e-14);
    auto b = a;
    b.layout = Layout::in_out;
    EXPECT_EQ(adapt::dense_delta(b, 0), MatD(d.transpose()));
    MatD Wt = W.transpose();
    adapt::merge(lowrank::weight(Wt, Layout::in_out), b, 0);
    EXPECT_LT(max_abs(Wt - (W + d).transpose()), 1e-14);
    adapt::unmerge(lowrank::weight(Wt, Layout::in_out), b, 0);
    EXPECT_LT(max_abs(Wt - W.transpose()), 1e-14);
  }
}

TEST(SingLora, Errors) {
  expect_error_containing([] { (void)adapt::init_singlora<float>(0, 4, 2, 1.0, 10); }, "init_singlora");
  expect_error_containing([] { (void)adapt::init_singlora<float>(4, 4, 2, 1.0, -1); }, "ramp_up_steps");
  auto a = adapt::init_singlora<float>(6, 4, 2, 1.0, 10);
  expect_error_containing([&] { (void)adapt::dense_delta(a, -3); }, "step t = -3");
  MatF W = MatF::Zero(4, 6);
  expect_error_containing([&] { adapt::merge(lowrank::weight(W, Layout::out_in), a, 1); }, "W is 4x6");
  EXPECT_EQ(max_abs(W.cast<double>()), 0.0);
  a.A.resize(4, 2);
  expect_error_containing([&] { (void)adapt::dense_delta(a, 0); }, "A is 4x2");
}

// ---------------------------------------------------------------------------------------------
// MoRA

constexpr adapt::MoraType kMoraTypes[] = {adapt::MoraType::sharing, adapt::MoraType::segment_interleave,
                                          adapt::MoraType::segment_tile, adapt::MoraType::cyclic_interleave,
                                          adapt::MoraType::rope};

TEST(Mora, Rank) {
  EXPECT_EQ(adapt::mora_rank(4096, 4096, 8, adapt::MoraType::sharing), 256);
  EXPECT_EQ(adapt::mora_rank(4096, 4096, 8, adapt::MoraType::rope), 256);
  // sqrt(25 * 2) = 7.07 -> 7; type 6 rounds down to 6.
  EXPECT_EQ(adapt::mora_rank(12, 13, 2, adapt::MoraType::sharing), 7);
  EXPECT_EQ(adapt::mora_rank(12, 13, 2, adapt::MoraType::rope), 6);
  // sqrt(14 * 1) = 3.74 -> 4 (the + 0.5 rounds to nearest).
  EXPECT_EQ(adapt::mora_rank(7, 7, 1, adapt::MoraType::segment_tile), 4);
  for (Index out : {5, 9, 64}) {
    for (Index in : {7, 30, 100}) {
      for (Index r : {1, 2, 3, 8}) {
        const Index rh = adapt::mora_rank(out, in, r, adapt::MoraType::rope);
        EXPECT_EQ(rh % 2, 0);
        EXPECT_EQ(rh, static_cast<Index>(std::floor(std::sqrt(double((in + out) * r)) + 0.5)) / 2 * 2);
      }
    }
  }
}

TEST(Mora, ZeroInitGivesZeroDelta) {
  for (auto type : kMoraTypes) {
    const auto a = adapt::init_mora<double>(20, 30, 2, type);
    EXPECT_EQ(a.M.rows(), adapt::mora_rank(20, 30, 2, type));
    EXPECT_EQ(max_abs(a.M), 0.0);
    EXPECT_EQ(max_abs(adapt::dense_delta(a)), 0.0);
    EXPECT_EQ(max_abs(adapt::adapter_output(a, random_matrix(3, 30, 40))), 0.0);
  }
}

TEST(Mora, DenseDeltaEqualsOperatorFormOnIdentityColumns) {
  const std::pair<Index, Index> shapes[] = {{24, 24}, {20, 30}, {30, 20}, {17, 23}, {9, 40}, {40, 13}, {5, 50}};
  for (auto type : kMoraTypes) {
    for (auto [out, in] : shapes) {
      for (Index r : {1, 2, 3}) {
        const Index rh = adapt::mora_rank(out, in, r, type);
        if ((type == adapt::MoraType::sharing || type == adapt::MoraType::cyclic_interleave ||
             type == adapt::MoraType::rope) &&
            in < rh)
          continue;
        SCOPED_TRACE("type " + std::to_string(static_cast<int>(type)) + " out " + std::to_string(out) + " in " +
                     std::to_string(in) + " r " + std::to_string(r));
        auto a = adapt::init_mora<double>(out, in, r, type);
        a.M = random_matrix(rh, rh, static_cast<std::uint32_t>(100 + out + in + r));
        const MatD d = adapt::dense_delta(a);
        ASSERT_EQ(d.rows(), out);
        ASSERT_EQ(d.cols(), in);
        const MatD I = MatD::Identity(in, in);
        const MatD Y = adapt::adapter_output(a, I);  // row j = f_decomp(M f_comp(e_j))
        EXPECT_LT(max_abs(Y.transpose() - d), 1e-12);
        // ... and on random inputs, by linearity.
        const MatD X = random_matrix(3, in, 41);
        EXPECT_LT(max_abs(adapt::adapter_output(a, X) - X * d.transpose()), 1e-11);
      }
    }
  }
}

TEST(Mora, NaiveOperatorReferences) {
  const Index rh = 4;
  const MatD M = random_matrix(rh, rh, 50);
  auto make = [&](adapt::MoraType type, Index out, Index in) {
    adapt::MoraAdapter<double> a;
    a.M = M;
    a.out = out;
    a.in = in;
    a.type = type;
    return a;
  };
  // Type 1 with in, out multiples of r_hat: dW(i, j) = M(i mod r_hat, j mod r_hat).
  {
    const MatD d = adapt::dense_delta(make(adapt::MoraType::sharing, 8, 12));
    for (Index i = 0; i < 8; ++i)
      for (Index j = 0; j < 12; ++j) EXPECT_DOUBLE_EQ(d(i, j), M(i % rh, j % rh));
  }
  // Type 1, in = 6: features 0, 1 are also the padding (positions 6, 7 -> indices 2, 3).
  {
    const MatD d = adapt::dense_delta(make(adapt::MoraType::sharing, 4, 6));
    for (Index i = 0; i < 4; ++i) {
      EXPECT_DOUBLE_EQ(d(i, 0), M(i, 0) + M(i, 2));
      EXPECT_DOUBLE_EQ(d(i, 1), M(i, 1) + M(i, 3));
      EXPECT_DOUBLE_EQ(d(i, 5), M(i, 1));
    }
  }
  // Type 2 with in = out = 2 r_hat: dW = kron(M, ones(2, 2)).
  {
    const MatD d = adapt::dense_delta(make(adapt::MoraType::segment_interleave, 8, 8));
    for (Index i = 0; i < 8; ++i)
      for (Index j = 0; j < 8; ++j) EXPECT_DOUBLE_EQ(d(i, j), M(i / 2, j / 2));
  }
  // Type 2, in = 6: segments of sizes 2, 2, 1, 1.
  {
    const MatD d = adapt::dense_delta(make(adapt::MoraType::segment_interleave, 4, 6));
    const Index seg[] = {0, 0, 1, 1, 2, 3};
    for (Index i = 0; i < 4; ++i)
      for (Index j = 0; j < 6; ++j) EXPECT_DOUBLE_EQ(d(i, j), M(i, seg[j]));
  }
  // Type 6 with in = out = 2 r_hat: blockdiag(M R_0, M R_1), R_0 = I.
  {
    const MatD d = adapt::dense_delta(make(adapt::MoraType::rope, 8, 8));
    Eigen::MatrixXd R1 = Eigen::MatrixXd::Zero(rh, rh);
    for (Index j = 0; j < rh / 2; ++j) {
      const double th = std::pow(10000.0, -2.0 * double(j) / double(rh));
      R1(j, j) = std::cos(th);
      R1(j, j + rh / 2) = -std::sin(th);
      R1(j + rh / 2, j + rh / 2) = std::cos(th);
      R1(j + rh / 2, j) = std::sin(th);
    }
    EXPECT_LT(max_abs(d.block(0, 0, rh, rh) - M), 1e-15);
    EXPECT_LT(max_abs(d.block(rh, rh, rh, rh) - M * R1), 1e-14);
    EXPECT_EQ(max_abs(d.block(0, rh, rh, rh)), 0.0);
    EXPECT_EQ(max_abs(d.block(rh, 0, rh, rh)), 0.0);
  }
}

TEST(Mora, MergeUnmergeAndLayouts) {
  auto a = adapt::init_mora<float>(10, 14, 2, adapt::MoraType::rope, Layout::in_out);
  a.M = random_matrix(a.rank(), a.rank(), 60).cast<float>();
  const MatD d_oi = adapt::dense_delta(adapt::MoraAdapter<double>{a.M.cast<double>(), 10, 14, a.type, Layout::out_in});
  const MatF d = adapt::dense_delta(a);
  ASSERT_EQ(d.rows(), 14);
  ASSERT_EQ(d.cols(), 10);
  EXPECT_LT(max_abs(d.cast<double>() - d_oi.transpose()), 1e-5);
  const MatF W = random_matrix(14, 10, 61).cast<float>();  // in_out storage
  MatF Wm = W;
  adapt::merge(lowrank::weight(Wm, Layout::in_out), a);
  // One rounding of the fp64 sum.
  const MatD expect = W.cast<double>() + d_oi.transpose();
  EXPECT_EQ(Wm, expect.cast<float>());
  const MatF X = random_matrix(3, 10 + 4, 62).cast<float>();
  const MatF Y = adapt::forward(lowrank::weight(W, Layout::in_out), a, X);
  EXPECT_LT(max_abs(Y.cast<double>() - X.cast<double>() * expect), 1e-4);
  adapt::unmerge(lowrank::weight(Wm, Layout::in_out), a);
  EXPECT_LT(max_abs((Wm - W).cast<double>()), 1e-5);
}

TEST(Mora, Errors) {
  expect_error_containing([] { (void)adapt::init_mora<float>(4096, 4096, 0, adapt::MoraType::sharing); }, "mora_rank");
  // in = 3 < r_hat = floor(sqrt(43 * 1) + 0.5) = 7 for cyclic padding.
  expect_error_containing([] { (void)adapt::init_mora<float>(40, 3, 1, adapt::MoraType::sharing); }, "in >= r_hat");
  EXPECT_NO_THROW((void)adapt::init_mora<float>(40, 3, 1, adapt::MoraType::segment_tile));
  expect_error_containing([] { (void)adapt::init_mora<float>(4, 4, 1, static_cast<adapt::MoraType>(5)); }, "unknown MoRA type 5");
  auto a = adapt::init_mora<double>(12, 12, 2, adapt::MoraType::rope);
  a.M = MatD::Zero(5, 5);
  expect_error_containing([&] { (void)adapt::dense_delta(a); }, "even r_hat");
  a.M = MatD::Zero(4, 5);
  expect_error_containing([&] { (void)adapt::dense_delta(a); }, "square");
  a = adapt::init_mora<double>(12, 12, 2, adapt::MoraType::rope);
  MatD W = MatD::Ones(12, 13);
  expect_error_containing([&] { adapt::merge(lowrank::weight(W, Layout::out_in), a); }, "W is 12x13");
  EXPECT_EQ(W, MatD::Ones(12, 13));
  expect_error_containing([&] { (void)adapt::adapter_output(a, MatD::Zero(2, 13)); }, "X is 2x13");
}

// ---------------------------------------------------------------------------------------------
// DoRA

MatD naive_dora_forward(const MatD& W, const MatD& A, const MatD& B, double s, const Eigen::VectorXd& m, const MatD& X,
                        const Eigen::VectorXd& bias) {
  const MatD V = W + s * B * A;
  MatD Y(X.rows(), W.rows());
  for (Index i = 0; i < W.rows(); ++i) {
    const double k = m(i) / V.row(i).norm();
    for (Index t = 0; t < X.rows(); ++t) Y(t, i) = k * V.row(i).dot(X.row(t)) + bias(i);
  }
  return Y;
}

TEST(Dora, InitOutputEqualsBase) {
  const Index out = 9, in = 7, r = 2;
  const MatD W = random_matrix(out, in, 70);
  adapt::DoraAdapter<double> a;
  a.A = random_matrix(r, in, 71);
  a.B = MatD::Zero(out, r);
  a.scale = 2.0;
  adapt::init_magnitude(a, lowrank::weight(W, Layout::out_in));
  for (Index i = 0; i < out; ++i) EXPECT_NEAR(a.magnitude(i), W.row(i).norm(), 1e-14);
  const MatD X = random_matrix(4, in, 72);
  const Eigen::VectorXd bias = Eigen::VectorXd::LinSpaced(out, -1, 1);
  const MatD Y = adapt::forward(lowrank::weight(W, Layout::out_in), a, X, bias.data());
  const MatD base = (X * W.transpose()).rowwise() + bias.transpose();
  EXPECT_LT(max_abs(Y - base), 1e-13);
  // Per-output-row norm, also for the in_out layout (norm over the input dimension, not the rows of storage).
  const MatD Wt = W.transpose();
  auto b = a;
  b.layout = Layout::in_out;
  const Vector<double> n = adapt::dora_weight_norm(lowrank::weight(Wt, Layout::in_out), b);
  for (Index i = 0; i < out; ++i) EXPECT_NEAR(n(i), W.row(i).norm(), 1e-14);
}

TEST(Dora, ForwardFormula) {
  const Index out = 8, in = 10, r = 3;
  const MatD W = random_matrix(out, in, 73);
  adapt::DoraAdapter<double> a;
  a.A = random_matrix(r, in, 74);
  a.B = random_matrix(out, r, 75, 0.3);
  a.scale = 0.5;
  a.magnitude = random_matrix(out, 1, 76).cwiseAbs().col(0);
  const MatD X = random_matrix(5, in, 77);
  const Eigen::VectorXd bias = random_matrix(out, 1, 78).col(0);
  const MatD ref = naive_dora_forward(W, a.A, a.B, a.scale, a.magnitude, X, bias);
  EXPECT_LT(max_abs(adapt::forward(lowrank::weight(W, Layout::out_in), a, X, bias.data()) - ref), 1e-12);
  // PEFT's split form: base + (k - 1) (X W^T) + k (s X A^T B^T).
  const Vector<double> n = adapt::dora_weight_norm(lowrank::weight(W, Layout::out_in), a);
  MatD split = (X * W.transpose()).rowwise() + bias.transpose();
  for (Index i = 0; i < out; ++i) {
    const double k = a.magnitude(i) / n(i);
    split.col(i) += (k - 1) * (X * W.row(i).transpose()) + k * a.scale * (X * a.A.transpose() * a.B.row(i).transpose());
  }
  EXPECT_LT(max_abs(split - ref), 1e-12);
  // in_out layout gives the same outputs.
  const MatD Wt = W.transpose();
  auto b = a;
  b.layout = Layout::in_out;
  EXPECT_LT(max_abs(adapt::forward(lowrank::weight(Wt, Layout::in_out), b, X, bias.data()) - ref), 1e-12);
}

template <class TW>
void dora_round_trip(Layout layout, double tol_ulps) {
  const Index out = 12, in = 9, r = 2;
  const MatD W64 = random_matrix(out, in, 80);
  adapt::DoraAdapter<float> a;
  a.A = random_matrix(r, in, 81).cast<float>();
  a.B = random_matrix(out, r, 82, 0.2).cast<float>();
  a.scale = 1.5;
  a.layout = layout;
  a.magnitude = (random_matrix(out, 1, 83).cwiseAbs().array() + 0.5).col(0).cast<float>();
  using Store = RowMatrix<TW>;
  const Store W0 = (layout == Layout::out_in ? MatD(W64) : MatD(W64.transpose())).template cast<TW>();
  Store W = W0;
  const auto cache = adapt::merge(lowrank::weight(W, layout), a);
  // W' = diag(m / n)(W + s B A), computed from the stored W0.
  const MatD W0oi = layout == Layout::out_in ? MatD(W0.template cast<double>()) : MatD(W0.template cast<double>().transpose());
  const MatD V = W0oi + a.scale * a.B.cast<double>() * a.A.cast<double>();
  const MatD Wm = layout == Layout::out_in ? MatD(W.template cast<double>()) : MatD(W.template cast<double>().transpose());
  const double eps = std::is_same_v<TW, float> ? 0x1.0p-24 : 0x1.0p-8;
  for (Index i = 0; i < out; ++i) {
    EXPECT_NEAR(cache.weight_norm(i), V.row(i).norm(), 1e-9 * V.row(i).norm());
    for (Index j = 0; j < in; ++j) {
      const double e = V(i, j) * a.magnitude(i) / V.row(i).norm();
      EXPECT_NEAR(Wm(i, j), e, 2 * eps * std::abs(e) + 1e-30);
    }
  }
  adapt::unmerge(lowrank::weight(W, layout), a, cache);
  const MatD back = W.template cast<double>(), orig = W0.template cast<double>();
  double worst = 0;
  for (Index i = 0; i < back.rows(); ++i)
    for (Index j = 0; j < back.cols(); ++j)
      worst = std::max(worst, std::abs(back(i, j) - orig(i, j)) / (eps * (std::abs(orig(i, j)) + max_abs(V))));
  EXPECT_LT(worst, tol_ulps);
}

TEST(Dora, MergeUnmergeRoundTrip) {
  dora_round_trip<float>(Layout::out_in, 8);
  dora_round_trip<float>(Layout::in_out, 8);
  dora_round_trip<lowrank::bf16>(Layout::out_in, 8);
}

TEST(Dora, Errors) {
  const Index out = 4, in = 3;
  MatD W = random_matrix(out, in, 90);
  W.row(2).setZero();
  const MatD W_before = W;
  adapt::DoraAdapter<double> a;
  a.A = MatD::Zero(1, in);
  a.B = MatD::Zero(out, 1);
  adapt::init_magnitude(a, lowrank::weight(W, Layout::out_in));
  expect_error_containing([&] { (void)adapt::merge(lowrank::weight(W, Layout::out_in), a); }, "row 2 of W + s B A has norm 0");
  EXPECT_EQ(W, W_before);
  W.row(2).setOnes();
  a.magnitude.resize(3);
  expect_error_containing([&] { (void)adapt::forward(lowrank::weight(W, Layout::out_in), a, MatD::Zero(1, in)); },
                          "magnitude has 3 entries");
  adapt::init_magnitude(a, lowrank::weight(W, Layout::out_in));
  adapt::DoraMergeCache bad{Eigen::VectorXd::Ones(2)};
  const MatD W2 = W;
  expect_error_containing([&] { adapt::unmerge(lowrank::weight(W, Layout::out_in), a, bad); }, "cache.weight_norm has 2");
  EXPECT_EQ(W, W2);
  MatD Wt = random_matrix(in, out + 1, 91);
  expect_error_containing([&] { adapt::init_magnitude(a, lowrank::weight(Wt, Layout::in_out)); }, "W is 3x5");
}

// ---------------------------------------------------------------------------------------------
// Selector sums

TEST(Selector, SumsMergeAndFrozenPrefix) {
  const Index out = 7, in = 5;
  adapt::RankOneSum<double> sum(out, in);
  std::vector<Eigen::VectorXd> us, vs;
  const double coef[] = {0.5, -1.0, 2.0, 0.25};
  for (int i = 0; i < 4; ++i) {
    us.push_back(random_matrix(out, 1, 100 + i).col(0));
    vs.push_back(random_matrix(in, 1, 200 + i).col(0));
    EXPECT_EQ(sum.append(us.back(), vs.back(), coef[i]), i);
  }
  sum.set_active(1, false);
  sum.freeze_prefix(2);
  EXPECT_EQ(sum.size(), 4);
  EXPECT_EQ(sum.active_count(), 3);
  EXPECT_FALSE(sum.trainable(0));
  EXPECT_FALSE(sum.trainable(1));
  EXPECT_TRUE(sum.trainable(2));
  MatD ref = MatD::Zero(out, in);
  for (int i : {0, 2, 3}) ref += coef[i] * us[static_cast<std::size_t>(i)] * vs[static_cast<std::size_t>(i)].transpose();
  EXPECT_LT(max_abs(adapt::dense_delta(sum) - ref), 1e-14);
  const MatD X = random_matrix(3, in, 300);
  EXPECT_LT(max_abs(adapt::adapter_output(sum, X) - X * ref.transpose()), 1e-13);
  // Merge through rank_update, both layouts; unmerge restores.
  const MatD W = random_matrix(out, in, 301);
  MatD Wm = W;
  adapt::merge(lowrank::weight(Wm, Layout::out_in), sum);
  EXPECT_LT(max_abs(Wm - (W + ref)), 1e-14);
  adapt::unmerge(lowrank::weight(Wm, Layout::out_in), sum);
  EXPECT_LT(max_abs(Wm - W), 1e-14);
  auto t = sum;
  t.layout = Layout::in_out;
  MatD Wt = W.transpose();
  adapt::merge(lowrank::weight(Wt, Layout::in_out), t);
  EXPECT_LT(max_abs(Wt - (W + ref).transpose()), 1e-14);
  EXPECT_EQ(adapt::dense_delta(t), MatD(adapt::dense_delta(sum).transpose()));
  // Nothing active: merge is a no-op.
  auto none = sum;
  for (Index i = 0; i < none.size(); ++i) none.set_active(i, false);
  MatD Wn = W;
  adapt::merge(lowrank::weight(Wn, Layout::out_in), none);
  EXPECT_EQ(Wn, W);
}

TEST(Selector, GradientsZeroForFrozenAndInactive) {
  const Index out = 6, in = 4;
  adapt::RankOneSum<double> sum(out, in);
  for (int i = 0; i < 4; ++i) sum.append(random_matrix(out, 1, 400 + i).col(0), random_matrix(in, 1, 500 + i).col(0), 0.3 * (i + 1));
  sum.freeze_prefix(1);
  sum.set_active(3, false);
  const MatD W0 = random_matrix(out, in, 600);
  const Quadratic q{random_matrix(out, in, 601), random_matrix(out, in, 602)};
  auto eff = [&](const adapt::RankOneSum<double>& s) { return MatD(W0 + adapt::dense_delta(s)); };
  const MatD G = q.grad(eff(sum));
  const auto g = adapt::gradients(sum, lowrank::weight(G, Layout::out_in));
  for (Index i : {0, 3}) {
    EXPECT_EQ(g.s(i), 0.0);
    EXPECT_EQ(max_abs(g.U.col(i)), 0.0);
    EXPECT_EQ(max_abs(g.V.col(i)), 0.0);
  }
  const double h = 1e-5;
  for (Index i : {1, 2}) {
    auto p = sum, m = sum;
    p.s(i) += h;
    m.s(i) -= h;
    EXPECT_NEAR(g.s(i), (q.loss(eff(p)) - q.loss(eff(m))) / (2 * h), 1e-6);
    for (Index k = 0; k < out; ++k) {
      auto pu = sum, mu = sum;
      pu.U(k, i) += h;
      mu.U(k, i) -= h;
      EXPECT_NEAR(g.U(k, i), (q.loss(eff(pu)) - q.loss(eff(mu))) / (2 * h), 1e-6);
    }
    for (Index k = 0; k < in; ++k) {
      auto pv = sum, mv = sum;
      pv.V(k, i) += h;
      mv.V(k, i) -= h;
      EXPECT_NEAR(g.V(k, i), (q.loss(eff(pv)) - q.loss(eff(mv))) / (2 * h), 1e-6);
    }
  }
}

TEST(Selector, Errors) {
  adapt::RankOneSum<float> sum(3, 2);
  expect_error_containing([&] { sum.append(Eigen::VectorXf::Ones(2), Eigen::VectorXf::Ones(2), 1.0); }, "u has 2 entries");
  EXPECT_EQ(sum.size(), 0);
  expect_error_containing([&] { sum.append(Eigen::VectorXf::Ones(3), Eigen::VectorXf::Ones(2), NAN); }, "coefficient");
  EXPECT_EQ(sum.size(), 0);
  sum.append(Eigen::VectorXf::Ones(3), Eigen::VectorXf::Ones(2), 1.0);
  expect_error_containing([&] { sum.freeze_prefix(2); }, "k = 2");
  expect_error_containing([&] { sum.set_active(1, true); }, "index 1");
  MatF W = MatF::Zero(2, 3);
  expect_error_containing([&] { adapt::merge(lowrank::weight(W, Layout::out_in), sum); }, "W is 2x3");
  EXPECT_EQ(max_abs(W.cast<double>()), 0.0);
  auto broken = sum;
  broken.s.resize(3);
  expect_error_containing([&] { (void)adapt::dense_delta(broken); }, "K = 1");
}

}  // namespace
