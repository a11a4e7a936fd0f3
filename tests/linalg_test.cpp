// linalg::truncated_svd and the subspace metrics against float64 references (matrices built from
// a known SVD, so that no reference SVD has to run in Debug builds) and the properties of a
// truncated SVD: orthonormal factors, Eckart-Young optimality, the residual identity,
// determinism, the benefit of power iterations, every shape and storage order.
// Sizes stay <= 160 x 120 so that the Debug and sanitizer builds run in a few seconds.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include "lowrank/core/error.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/linalg/subspace.hpp"
#include "lowrank/linalg/svd.hpp"

namespace {

using Eigen::Index;
using MatD = Eigen::MatrixXd;
using VecD = Eigen::VectorXd;
using lowrank::linalg::SvdMethod;
using lowrank::linalg::SvdOptions;
using lowrank::linalg::truncated_svd;

// Gaussian matrix from the library's counter-based generator (test data only).
MatD gaussian(Index rows, Index cols, std::uint64_t seed) {
  const lowrank::RandomStream rng(seed, 12345);
  MatD g(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) g(i, j) = rng.normal(static_cast<std::uint64_t>(j * rows + i));
  return g;
}

MatD orthonormal(Index rows, Index cols, std::uint64_t seed) {
  const Eigen::HouseholderQR<MatD> qr(gaussian(rows, cols, seed));
  return qr.householderQ() * MatD::Identity(rows, cols);
}

// M = U diag(s) V^T with random orthonormal U (m x r), V (n x r), r = s.size(): a matrix whose
// exact SVD is known without computing one (Debug builds of Eigen's SVDs are slow).
struct Known {
  MatD m, u, v;
  VecD s;
};
Known known_svd(Index m, Index n, const VecD& s, std::uint64_t seed) {
  const Index r = s.size();
  Known k{MatD(), orthonormal(m, r, seed), orthonormal(n, r, seed + 1000), s};
  k.m = k.u * s.asDiagonal() * k.v.transpose();
  return k;
}
MatD with_spectrum(Index m, Index n, const VecD& s, std::uint64_t seed) { return known_svd(m, n, s, seed).m; }

VecD decaying(Index r, double rate) {  // s_i = exp(-rate i)
  VecD s(r);
  for (Index i = 0; i < r; ++i) s(i) = std::exp(-rate * static_cast<double>(i));
  return s;
}

VecD harmonic(Index r, double power) {  // s_i = (i + 1)^-power
  VecD s(r);
  for (Index i = 0; i < r; ++i) s(i) = std::pow(static_cast<double>(i + 1), -power);
  return s;
}

double top_energy(const VecD& s, Index k) { return s.head(k).squaredNorm() / s.squaredNorm(); }

template <class T>
double eps() {
  return static_cast<double>(std::numeric_limits<T>::epsilon());
}

template <class T>
double orthonormality_error(const lowrank::ColMatrix<T>& q) {
  const MatD qd = q.template cast<double>();
  return (qd.transpose() * qd - MatD::Identity(q.cols(), q.cols())).cwiseAbs().maxCoeff();
}

template <class T>
MatD reconstruct(const lowrank::linalg::TruncatedSvd<T>& r) {
  return r.U.template cast<double>() * r.S.template cast<double>().asDiagonal() * r.V.template cast<double>().transpose();
}

SvdOptions randomized(int niter = 2, Index oversample = 10, std::uint64_t seed = 7) {
  SvdOptions o;
  o.method = SvdMethod::randomized;
  o.power_iterations = niter;
  o.oversample = oversample;
  o.seed = seed;
  return o;
}

template <class T>
class TruncatedSvdTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(TruncatedSvdTyped, Scalars);

// The properties every result must have, checked against the float64 matrix `md`.
template <class T>
void check_result(const lowrank::linalg::TruncatedSvd<T>& r, const MatD& md, Index k) {
  const Index m = md.rows(), n = md.cols();
  ASSERT_EQ(r.U.rows(), m);
  ASSERT_EQ(r.U.cols(), k);
  ASSERT_EQ(r.V.rows(), n);
  ASSERT_EQ(r.V.cols(), k);
  ASSERT_EQ(r.S.size(), k);
  const double tol = 50 * eps<T>() * std::sqrt(static_cast<double>(std::max(m, n)));
  EXPECT_LE(orthonormality_error(r.U), tol);
  EXPECT_LE(orthonormality_error(r.V), tol);
  for (Index i = 0; i < k; ++i) {
    EXPECT_GE(r.S(i), T(0));
    if (i > 0) {
      EXPECT_LE(r.S(i), r.S(i - 1));
    }
  }
  // residual_norm is the actual Frobenius error of the returned factors.
  const double norm = md.norm();
  const double actual = (md - reconstruct(r)).norm();
  // ||M||^2 - sum S^2 carries an absolute error delta of a few eps ||M||^2; its square root is off
  // by at most about delta / (residual + sqrt(delta)).
  const double delta = 50 * eps<T>() * norm * norm;
  EXPECT_NEAR(r.residual_norm, actual, delta / (actual + std::sqrt(delta)) + 1e-12)
      << "m " << m << " n " << n << " k " << k;
  if (norm > 0) {
    EXPECT_NEAR(r.captured_energy, r.S.template cast<double>().squaredNorm() / (norm * norm), 100 * eps<T>());
  }
}

TYPED_TEST(TruncatedSvdTyped, DecayingSpectrumMatchesExactSingularValues) {
  using T = TypeParam;
  const Known known = known_svd(160, 120, decaying(120, 0.3), 1);
  const MatD& md = known.m;
  const lowrank::ColMatrix<T> m = md.cast<T>();
  const VecD& exact = known.s;
  const Index k = 12;
  const auto r = truncated_svd(m, k, randomized());
  EXPECT_FALSE(r.exact);
  EXPECT_EQ(r.range_width, 22);
  check_result(r, md, k);
  // Gap s_22 / s_11 = exp(-3.3) = 0.037, raised to 2 niter + 1 = 5 (HMT 2011, section 10): the
  // top-k values are recovered to rounding.
  for (Index i = 0; i < k; ++i) EXPECT_NEAR(static_cast<double>(r.S(i)), exact(i), 100 * eps<T>() * exact(0)) << i;
  EXPECT_NEAR(r.captured_energy, top_energy(exact, k), 100 * eps<T>());
  // Leading singular vectors match up to sign.
  for (Index i = 0; i < 4; ++i) {
    EXPECT_NEAR(std::abs(r.U.col(i).template cast<double>().dot(known.u.col(i))), 1.0, 1e3 * eps<T>()) << i;
    EXPECT_NEAR(std::abs(r.V.col(i).template cast<double>().dot(known.v.col(i))), 1.0, 1e3 * eps<T>()) << i;
  }
}

TYPED_TEST(TruncatedSvdTyped, EckartYoungCapturedEnergyCloseToExactTopK) {
  using T = TypeParam;
  // Slow decay s_i = 1/(i+1): the hard case for a range finder; still within 1% of the optimum.
  const Known known = known_svd(150, 100, harmonic(100, 1.0), 3);
  const MatD& md = known.m;
  const lowrank::ColMatrix<T> m = md.cast<T>();
  const VecD& exact = known.s;
  for (Index k : {1, 5, 20}) {
    SCOPED_TRACE(k);
    const auto r = truncated_svd(m, k, randomized());
    check_result(r, md, k);
    const double best = top_energy(exact, k);
    EXPECT_LE(r.captured_energy, best + 10 * eps<T>());  // Eckart-Young: nothing beats the exact SVD
    EXPECT_GE(r.captured_energy, 0.99 * best);
    // The optimal residual is sqrt(sum of the discarded s_i^2).
    EXPECT_GE(r.residual_norm, std::sqrt(exact.tail(exact.size() - k).squaredNorm()) * (1 - 10 * eps<T>()));
  }
}

TEST(TruncatedSvd, MorePowerIterationsNeverWorseOnFlatSpectrum) {
  // s_i = (i+1)^-0.25: nearly flat, so without power iterations the range finder misses much of
  // the top-k energy. Per seed and on average, each added iteration must not lose energy beyond
  // a small statistical margin, and three iterations must close most of the gap to the optimum.
  const Known known = known_svd(120, 90, harmonic(90, 0.25), 5);
  const MatD& md = known.m;
  const VecD& exact = known.s;
  const Index k = 8;
  const double best = top_energy(exact, k);
  std::vector<double> mean(4, 0.0);
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    double previous = 0;
    for (int niter = 0; niter <= 3; ++niter) {
      const auto r = truncated_svd(md, k, randomized(niter, 4, seed));
      EXPECT_LE(r.captured_energy, best + 1e-12);
      EXPECT_GE(r.captured_energy, previous - 0.002 * best) << "seed " << seed << " niter " << niter;
      previous = r.captured_energy;
      mean[static_cast<std::size_t>(niter)] += r.captured_energy / 4;
    }
  }
  for (std::size_t i = 1; i < mean.size(); ++i) EXPECT_GT(mean[i], mean[i - 1]) << i;
  EXPECT_LT(best - mean[3], 0.5 * (best - mean[0]));
}

TYPED_TEST(TruncatedSvdTyped, DeterministicForEqualSeeds) {
  using T = TypeParam;
  const lowrank::ColMatrix<T> m = with_spectrum(120, 90, harmonic(90, 0.5), 8).cast<T>();
  const auto a = truncated_svd(m, 6, randomized(2, 5, 42));
  const auto b = truncated_svd(m, 6, randomized(2, 5, 42));
  EXPECT_TRUE(a.U == b.U);
  EXPECT_TRUE(a.S == b.S);
  EXPECT_TRUE(a.V == b.V);
  EXPECT_EQ(a.captured_energy, b.captured_energy);
  EXPECT_EQ(a.residual_norm, b.residual_norm);
  // Another seed or stream gives another test matrix (the result is close, not bitwise equal).
  SvdOptions other = randomized(2, 5, 43);
  EXPECT_FALSE(truncated_svd(m, 6, other).U == a.U);
  other = randomized(2, 5, 42);
  other.stream = 1;
  EXPECT_FALSE(truncated_svd(m, 6, other).U == a.U);
}

TYPED_TEST(TruncatedSvdTyped, ExactPathForSmallProblems) {
  using T = TypeParam;
  for (auto [m, n] : {std::pair<Index, Index>{30, 20}, {20, 30}, {12, 9}, {80, 70}}) {
    SCOPED_TRACE(testing::Message() << m << "x" << n);
    const Known known = known_svd(m, n, harmonic(std::min(m, n), 0.5), static_cast<std::uint64_t>(m * 100 + n));
    const MatD& md = known.m;
    const VecD& exact = known.s;
    const Index k = std::min(m, n) / 2;
    const auto r = truncated_svd(md.cast<T>().eval(), k);  // automatic: small -> exact
    EXPECT_TRUE(r.exact);
    EXPECT_EQ(r.range_width, 0);
    check_result(r, md, k);
    // Both SVDs are backward stable: singular values agree to about eps max(m, n) s_0.
    const double tol = 10 * eps<T>() * static_cast<double>(std::max(m, n)) * exact(0);
    for (Index i = 0; i < k; ++i) EXPECT_NEAR(static_cast<double>(r.S(i)), exact(i), tol);
    EXPECT_NEAR(r.residual_norm, std::sqrt(exact.tail(exact.size() - k).squaredNorm()), tol);
  }
}

TEST(TruncatedSvd, AutomaticChoice) {
  const MatD md = with_spectrum(80, 66, decaying(66, 0.1), 9);
  EXPECT_FALSE(truncated_svd(md, 5).exact);  // q = 15 < 66 / 2
  EXPECT_TRUE(truncated_svd(md, 23).exact);  // q = 33 >= 33
  SvdOptions o;
  o.q = 32;
  EXPECT_FALSE(truncated_svd(md, 5, o).exact);
  o.q = 33;
  EXPECT_TRUE(truncated_svd(md, 5, o).exact);
  o.method = SvdMethod::exact;
  o.q = 0;
  EXPECT_TRUE(truncated_svd(md, 3, o).exact);
  EXPECT_TRUE(truncated_svd(gaussian(70, 64, 1), 3).exact);  // min(m, n) <= 64
}

TEST(TruncatedSvd, ExplicitRangeWidthLikeTorchSvdLowrank) {
  const Known known = known_svd(120, 80, decaying(80, 0.3), 10);
  const MatD& md = known.m;
  SvdOptions o = randomized(4);
  o.q = 8;  // PiSSA "pissa_niter_4": q = r, niter = 4
  const auto r = truncated_svd(md, 8, o);
  EXPECT_EQ(r.range_width, 8);
  check_result(r, md, 8);
  // No oversampling: the gap s_8 / s_7 = 0.74 per iteration limits accuracy, still within 1%.
  const double best = top_energy(known.s, 8);
  EXPECT_LE(r.captured_energy, best + 1e-14);
  EXPECT_GE(r.captured_energy, 0.99 * best);
}

TYPED_TEST(TruncatedSvdTyped, WideAndTallRecoverALowRankMatrix) {
  using T = TypeParam;
  for (auto [m, n] : {std::pair<Index, Index>{70, 220}, {220, 70}, {100, 100}}) {
    SCOPED_TRACE(testing::Message() << m << "x" << n);
    const VecD s = decaying(6, 0.5);
    const MatD md = with_spectrum(m, n, s, static_cast<std::uint64_t>(m + n));
    const auto r = truncated_svd(md.cast<T>().eval(), 6, randomized(1, 4));
    check_result(r, md, 6);
    for (Index i = 0; i < 6; ++i) EXPECT_NEAR(static_cast<double>(r.S(i)), s(i), 50 * eps<T>());
    EXPECT_NEAR(r.captured_energy, 1.0, 50 * eps<T>());
    EXPECT_LE((md - reconstruct(r)).norm(), 100 * eps<T>() * md.norm());
  }
}

TEST(TruncatedSvd, StorageOrderExpressionsAndViewsGiveTheSameDecomposition) {
  const MatD md = with_spectrum(70, 120, decaying(70, 0.2), 12);  // wide
  const SvdOptions o = randomized(2, 6, 3);
  const auto ref = truncated_svd(md, 7, o);
  const lowrank::RowMatrix<double> row = md;
  MatD padded = gaussian(80, 135, 2);
  padded.block(4, 9, 70, 120) = md;
  const auto check = [&](const lowrank::linalg::TruncatedSvd<double>& r) {
    ASSERT_EQ(r.S.size(), 7);
    EXPECT_LE((r.S - ref.S).cwiseAbs().maxCoeff(), 1e-12);
    EXPECT_LE((reconstruct(r) - reconstruct(ref)).norm(), 1e-11);
  };
  check(truncated_svd(row, 7, o));                                            // row-major, in place
  check(truncated_svd(padded.block(4, 9, 70, 120), 7, o));                     // block with outer stride
  check(truncated_svd(2.0 * md - md, 7, o));                                   // an expression
  check(truncated_svd(lowrank::view(row), 7, o));                              // MatrixView, row-major
  check(truncated_svd(lowrank::MatrixView<const double>(lowrank::view(md)), 7, o));  // MatrixView, col-major
  // A strided view (every other row of a 140 x 120 buffer).
  MatD twice = MatD::Zero(140, 120);
  for (Index i = 0; i < 70; ++i) twice.row(2 * i) = md.row(i);
  check(truncated_svd(lowrank::MatrixView<const double>(twice.data(), 70, 120, 2, 140), 7, o));
  // The transpose: same singular values, U and V swapped.
  const auto t = truncated_svd(md.transpose(), 7, o);
  EXPECT_LE((t.S - ref.S).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_LE((reconstruct(t).transpose() - reconstruct(ref)).norm(), 1e-11);
}

TEST(TruncatedSvd, FullRankIsExactForBothMethods) {
  const Known known = known_svd(60, 45, harmonic(45, 0.5), 21);
  const MatD& md = known.m;
  const VecD& exact = known.s;
  for (SvdMethod method : {SvdMethod::automatic, SvdMethod::randomized, SvdMethod::exact}) {
    SvdOptions o;
    o.method = method;
    o.q = 1000;  // clamped to min(m, n)
    const auto r = truncated_svd(md, 45, o);
    EXPECT_EQ(r.exact, method != SvdMethod::randomized);
    EXPECT_EQ(r.range_width, method == SvdMethod::randomized ? 45 : 0);
    check_result(r, md, 45);
    EXPECT_LE((r.S - exact).cwiseAbs().maxCoeff(), 1e-13 * exact(0));
    EXPECT_LE((md - reconstruct(r)).norm(), 1e-12 * md.norm());
    EXPECT_NEAR(r.captured_energy, 1.0, 1e-13);
  }
  // Rank 1 of a column and a row vector.
  const VecD col = gaussian(50, 1, 3);
  const auto c = truncated_svd(col, 1);
  EXPECT_NEAR(c.S(0), col.norm(), 1e-13);
  const auto rrow = truncated_svd(col.transpose(), 1);
  EXPECT_NEAR(rrow.S(0), col.norm(), 1e-13);
  EXPECT_EQ(rrow.V.rows(), 50);
}

TYPED_TEST(TruncatedSvdTyped, ZeroMatrix) {
  using T = TypeParam;
  const lowrank::ColMatrix<T> zero = lowrank::ColMatrix<T>::Zero(120, 80);
  for (SvdMethod method : {SvdMethod::randomized, SvdMethod::exact}) {
    SvdOptions o;
    o.method = method;
    const auto r = truncated_svd(zero, 5, o);
    EXPECT_EQ(r.captured_energy, 1.0);
    EXPECT_EQ(r.residual_norm, 0.0);
    EXPECT_TRUE(r.S.isZero(0));
    EXPECT_LE(orthonormality_error(r.U), 10 * eps<T>());
    EXPECT_LE(orthonormality_error(r.V), 10 * eps<T>());
  }
}

TEST(TruncatedSvd, RankDeficientInputStaysOrthonormal) {
  // Rank 3, asked for 10: the range finder sees a rank-deficient sketch.
  const MatD md = with_spectrum(100, 80, decaying(3, 1.0), 30);
  const auto r = truncated_svd(md, 10, randomized());
  check_result(r, md, 10);
  EXPECT_LE(r.S.tail(7).maxCoeff(), 1e-13);
  EXPECT_NEAR(r.captured_energy, 1.0, 1e-13);
}

TEST(TruncatedSvd, Errors) {
  const MatD md = gaussian(60, 40, 1);
  const auto expect_error = [](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "no error; expected " << needle;
    } catch (const lowrank::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("lowrank::linalg::truncated_svd"), std::string::npos) << what;
      EXPECT_NE(what.find(needle), std::string::npos) << what;
    }
  };
  expect_error([&] { (void)truncated_svd(md, 0); }, "rank 0");
  expect_error([&] { (void)truncated_svd(md, 41); }, "60x40");
  expect_error([&] { (void)truncated_svd(MatD(0, 5), 1); }, "0x5");
  expect_error([&] { (void)truncated_svd(lowrank::MatrixView<const double>(nullptr, 0, 3, 3, 1), 1); }, "0x3");
  expect_error([&] { (void)truncated_svd(lowrank::MatrixView<const double>(nullptr, 2, 3, 3, 1), 1); }, "null");
  SvdOptions o;
  o.q = 3;
  expect_error([&] { (void)truncated_svd(md, 5, o); }, "options.q");
  o = {};
  o.oversample = -1;
  expect_error([&] { (void)truncated_svd(md, 5, o); }, "options.oversample");
  o = {};
  o.power_iterations = -1;
  expect_error([&] { (void)truncated_svd(md, 5, o); }, "options.power_iterations");
  MatD bad = md;
  bad(7, 3) = std::numeric_limits<double>::quiet_NaN();
  expect_error([&] { (void)truncated_svd(bad, 5); }, "non-finite");
  Eigen::MatrixXf badf = md.cast<float>();
  badf(0, 0) = std::numeric_limits<float>::infinity();
  expect_error([&] { (void)truncated_svd(badf, 5); }, "60x40");
  EXPECT_THROW((void)truncated_svd(md, -2), std::invalid_argument);  // Error is an invalid_argument
}

// ---- subspace metrics ----------------------------------------------------------------------

using lowrank::linalg::principal_angles;

TEST(PrincipalAngles, RotationsByKnownAngles) {
  // span(e0, e1) against span(cos a e0 + sin a e2, cos b e1 + sin b e3): angles a and b.
  const double a = 0.3, b = 1.1;
  MatD x = MatD::Zero(6, 2), y = MatD::Zero(6, 2);
  x(0, 0) = 1;
  x(1, 1) = 1;
  y(0, 1) = std::cos(b);  // columns in the "wrong" order: the result is sorted anyway
  y(2, 1) = std::sin(b);
  y(1, 0) = std::cos(a);
  y(3, 0) = std::sin(a);
  VecD angles = principal_angles(x, y);
  ASSERT_EQ(angles.size(), 2);
  EXPECT_NEAR(angles(0), a, 1e-14);
  EXPECT_NEAR(angles(1), b, 1e-14);
  // The same in a random orthonormal frame of R^40, with non-orthonormal spanning sets.
  const MatD frame = orthonormal(40, 6, 77);
  const MatD mix = gaussian(2, 2, 5) + 3 * MatD::Identity(2, 2);
  angles = principal_angles(frame * x * mix, (frame * y * mix.transpose()).cast<float>());
  EXPECT_NEAR(angles(0), a, 1e-6);
  EXPECT_NEAR(angles(1), b, 1e-6);
}

TEST(PrincipalAngles, SameOrthogonalAndNestedSubspaces) {
  const MatD x = gaussian(50, 4, 1);
  const VecD same = principal_angles(x, x * gaussian(4, 4, 2));
  ASSERT_EQ(same.size(), 4);
  EXPECT_LE(same.maxCoeff(), 1e-7);  // arccos near 1: accurate to ~sqrt(eps)
  MatD e = MatD::Identity(10, 10);
  const VecD orth = principal_angles(e.leftCols(3), e.rightCols(5));
  ASSERT_EQ(orth.size(), 3);
  for (Index i = 0; i < 3; ++i) EXPECT_NEAR(orth(i), std::numbers::pi / 2, 1e-15);
  // span(x) inside span([x, z]): min(4, 7) = 4 zero angles.
  MatD xz(50, 7);
  xz << x, gaussian(50, 3, 3);
  const VecD nested = principal_angles(xz, x);
  ASSERT_EQ(nested.size(), 4);
  EXPECT_LE(nested.maxCoeff(), 1e-7);
  // Ascending order.
  const VecD random = principal_angles(gaussian(30, 5, 4), gaussian(30, 6, 5));
  for (Index i = 1; i < random.size(); ++i) EXPECT_LE(random(i - 1), random(i));
}

TEST(PrincipalAngles, Errors) {
  const MatD x = gaussian(20, 3, 1);
  EXPECT_THROW((void)principal_angles(x, gaussian(21, 3, 2)), lowrank::Error);
  EXPECT_THROW((void)principal_angles(x, MatD(20, 0)), lowrank::Error);
  MatD dependent(20, 3);
  dependent << x.leftCols(2), x.col(0) + x.col(1);
  try {
    (void)principal_angles(x, dependent);
    ADD_FAILURE();
  } catch (const lowrank::Error& e) {
    EXPECT_NE(std::string(e.what()).find("lowrank::linalg::principal_angles: Y (20x3) has numerical rank 2"),
              std::string::npos)
        << e.what();
  }
  MatD bad = x;
  bad(1, 1) = std::numeric_limits<double>::infinity();
  EXPECT_THROW((void)principal_angles(bad, x), lowrank::Error);
}

TEST(CapturedEnergy, Identities) {
  using lowrank::linalg::captured_energy;
  const VecD s = harmonic(40, 0.7);
  const Known known = known_svd(80, 60, s, 40);
  const MatD& m = known.m;
  const MatD& u = known.u;
  for (Index k : {1, 5, 40}) {
    // The top-k left singular vectors capture sum_{i<k} s_i^2 / sum s_i^2 (Eckart-Young).
    EXPECT_NEAR(captured_energy(u.leftCols(k), m), top_energy(s, k), 1e-13) << k;
    // Invariant under a change of basis of P and a scaling of M.
    const MatD mix = gaussian(k, k, 6) + 4 * MatD::Identity(k, k);
    EXPECT_NEAR(captured_energy(u.leftCols(k) * mix, 3.5 * m), top_energy(s, k), 1e-12) << k;
  }
  // The whole space captures everything, the orthogonal complement of M's columns nothing.
  EXPECT_NEAR(captured_energy(gaussian(80, 80, 7), m), 1.0, 1e-12);
  const MatD complement = MatD(Eigen::HouseholderQR<MatD>(u).householderQ()).rightCols(40);
  EXPECT_NEAR(captured_energy(complement, m), 0.0, 1e-13);
  // Dependent columns: the span is what counts.
  MatD repeated(80, 4);
  repeated << u.leftCols(2), u.leftCols(2);
  EXPECT_NEAR(captured_energy(repeated, m), top_energy(s, 2), 1e-13);
  // M == 0 and P == 0.
  EXPECT_EQ(captured_energy(gaussian(80, 3, 1), MatD::Zero(80, 5)), 1.0);
  EXPECT_EQ(captured_energy(MatD::Zero(80, 3), m), 0.0);
  // Agrees with truncated_svd's own report, float and double.
  const auto r = truncated_svd(m, 6, randomized());
  EXPECT_NEAR(captured_energy(r.U, m), r.captured_energy, 1e-12);
  const auto rf = truncated_svd(m.cast<float>().eval(), 6, randomized());
  EXPECT_NEAR(captured_energy(rf.U, m), rf.captured_energy, 1e-5);
  // Errors.
  EXPECT_THROW((void)captured_energy(gaussian(79, 3, 1), m), lowrank::Error);
  EXPECT_THROW((void)captured_energy(MatD(80, 0), m), lowrank::Error);
  MatD bad = m;
  bad(0, 0) = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW((void)captured_energy(gaussian(80, 3, 1), bad), lowrank::Error);
}

}  // namespace
