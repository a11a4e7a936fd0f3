// The statistics under model editing (editing.md sections 8.1 and 8.2): the second-moment
// accumulator against a naive fp64 sum of outer products (any batch split, merge, centring, masks,
// storage types and strides, serialisation), and the SPD factor with its ridge escalation against
// explicit fp64 references (solves, rank deficiency, scaling, rank-1 update and downdate).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <type_traits>
#include <vector>


#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/linalg/moments.hpp"
#include "lowrank/linalg/spd.hpp"
#include "edit_util.hpp"
#include "reference_linalg.hpp"
#include "test_util.hpp"
#if defined(LOWRANK_TEST_HAVE_IO)
#include "lowrank/io/moments.hpp"
#endif

namespace {

using namespace lowrank_test;
using lowrank::ColMatrix;
using lowrank::MatrixView;
using lowrank::RowMatrix;
using lowrank::Vector;
using lowrank::linalg::SecondMoment;
using lowrank::linalg::SpdFactor;
using lowrank::linalg::SpdOptions;

// Keys with a non-isotropic covariance and a non-zero mean: rows of G * diag(decay) + mu.
RowMatrix<double> make_keys(Index n, Index d, std::mt19937_64& rng, double mean = 0.5, double scale = 1.0) {
  std::normal_distribution<double> normal;
  RowMatrix<double> k(n, d);
  for (Index t = 0; t < n; ++t)
    for (Index i = 0; i < d; ++i) k(t, i) = scale * (normal(rng) / (1.0 + 0.05 * i) + mean * (1 + (i % 3)));
  return k;
}

template <class T>
RowMatrix<T> stored(const RowMatrix<double>& k) {
  RowMatrix<T> s(k.rows(), k.cols());
  for (Index t = 0; t < k.rows(); ++t)
    for (Index i = 0; i < k.cols(); ++i) s(t, i) = from_double<T>(k(t, i));
  return s;
}

// Naive fp64 references from the values as stored. The triple loops run on plain arrays: in the
// sanitized Debug build (the check preset) Eigen's element access costs a call and an assertion
// per element, minutes for these sizes.
template <class T>
ColMatrix<double> naive_sum_outer(const RowMatrix<T>& k) {
  const Index n = k.cols();
  std::vector<double> row(static_cast<std::size_t>(n));
  std::vector<double> s(static_cast<std::size_t>(n * n), 0.0);  // column-major
  for (Index t = 0; t < k.rows(); ++t) {
    for (Index i = 0; i < n; ++i) row[static_cast<std::size_t>(i)] = to_double(k(t, i));
    for (Index j = 0; j < n; ++j) {
      const double kj = row[static_cast<std::size_t>(j)];
      double* col = s.data() + j * n;
      for (Index i = 0; i < n; ++i) col[i] += row[static_cast<std::size_t>(i)] * kj;
    }
  }
  return Eigen::Map<const ColMatrix<double>>(s.data(), n, n);
}

template <class T>
Vector<double> naive_mean(const RowMatrix<T>& k) {
  Vector<double> m = Vector<double>::Zero(k.cols());
  for (Index t = 0; t < k.rows(); ++t)
    for (Index i = 0; i < k.cols(); ++i) m(i) += to_double(k(t, i));
  return m / static_cast<double>(k.rows());
}

template <class T>
ColMatrix<double> naive_covariance(const RowMatrix<T>& k) {  // two-pass, population
  const Vector<double> mu = naive_mean(k);
  ColMatrix<double> s = ColMatrix<double>::Zero(k.cols(), k.cols());
  for (Index t = 0; t < k.rows(); ++t)
    for (Index i = 0; i < k.cols(); ++i)
      for (Index j = 0; j < k.cols(); ++j) s(i, j) += (to_double(k(t, i)) - mu(i)) * (to_double(k(t, j)) - mu(j));
  return s / static_cast<double>(k.rows());
}

double rel_diff(const ColMatrix<double>& a, const ColMatrix<double>& b) { return (a - b).norm() / b.norm(); }

// Feeds rows [0, n) of `k` in the batches given by `cuts` (increasing cut points).
template <class T>
void feed(SecondMoment& m, const RowMatrix<T>& k, const std::vector<Index>& cuts) {
  Index begin = 0;
  for (Index end : cuts) {
    m.add(MatrixView<const T>(k.data() + begin * k.cols(), end - begin, k.cols(), k.cols(), 1));
    begin = end;
  }
}

// d = 260 spans two block rows of the kernel (256) and n = 300 two key chunks (256).
constexpr Index kDim = 260, kKeys = 300;

template <class T>
void check_uncentred(std::uint64_t seed) {
  SCOPED_TRACE(type_name<T>());
  std::mt19937_64 rng(seed);
  const RowMatrix<T> k = stored<T>(make_keys(kKeys, kDim, rng));
  const ColMatrix<double> ref = naive_sum_outer(k) / static_cast<double>(kKeys);
  std::vector<std::vector<Index>> splits{{kKeys}};
  if (std::is_same_v<T, float>) splits.insert(splits.end(), {{7, 200, kKeys}, {1, 2, 256, 257, kKeys}});
  for (const std::vector<Index>& cuts : splits) {
    SecondMoment m(kDim);
    feed(m, k, cuts);
    EXPECT_EQ(m.count(), kKeys);
    EXPECT_LT(rel_diff(m.moment(), ref), 1e-13);
    EXPECT_LT((m.mean() - naive_mean(k)).norm() / naive_mean(k).norm(), 1e-14);
    const ColMatrix<double> c = m.moment();
    EXPECT_EQ(c, ColMatrix<double>(c.transpose())) << "moment() must be exactly symmetric";
  }
}

TEST(SecondMoment, UncentredEqualsNaiveForAnyBatchSplitAndType) {
  check_uncentred<double>(1);
  check_uncentred<float>(2);
  check_uncentred<bf16>(3);
  check_uncentred<f16>(4);
}

TEST(SecondMoment, StridedKeysAndEigenInput) {
  std::mt19937_64 rng(5);
  const RowMatrix<double> k = make_keys(40, 33, rng);
  const ColMatrix<double> ref = naive_sum_outer(k) / 40.0;
  const ColMatrix<float> kc = k.cast<float>();  // column-major: unit row stride
  SecondMoment a(33), b(33);
  a.add(kc);
  const auto s = make_matrix<double>(40, 33, Order::both_strided, rng);
  for (Index t = 0; t < 40; ++t)
    for (Index i = 0; i < 33; ++i) s.view(t, i) = k(t, i);
  b.add(MatrixView<const double>(s.view));
  EXPECT_LT(rel_diff(a.moment(), naive_sum_outer(RowMatrix<float>(kc)) / 40.0), 1e-14);
  EXPECT_LT(rel_diff(b.moment(), ref), 1e-14);
}

TEST(SecondMoment, MergeEqualsSinglePass) {
  for (bool centred : {false, true}) {
    SCOPED_TRACE(centred ? "centred" : "uncentred");
    std::mt19937_64 rng(6);
    const RowMatrix<float> k = stored<float>(make_keys(300, 50, rng, 2.0));
    SecondMoment all(50, centred), a(50, centred), b(50, centred), empty(50, centred);
    all.add(k);
    a.add(k.topRows(120));
    b.add(k.bottomRows(180));
    a.merge(b);
    a.merge(empty);
    EXPECT_EQ(a.count(), 300);
    EXPECT_LT(rel_diff(a.moment(), all.moment()), 1e-13);
    empty.merge(all);  // merging into an empty accumulator copies
    EXPECT_LT(rel_diff(empty.moment(), all.moment()), 1e-15);
  }
}

TEST(SecondMoment, CentredEqualsTwoPassCovarianceAndShowsTheMeanTerm) {
  std::mt19937_64 rng(7);
  const RowMatrix<double> k = make_keys(400, 40, rng, 3.0);
  const ColMatrix<double> cov = naive_covariance(k);
  for (const std::vector<Index>& cuts : {std::vector<Index>{400}, std::vector<Index>{1, 100, 399, 400}}) {
    SecondMoment centred(40, true), raw(40);
    feed(centred, k, cuts);
    feed(raw, k, cuts);
    EXPECT_LT(rel_diff(centred.moment(), cov), 1e-12);
    // Uncentred = covariance + mu mu^T, and the mu mu^T term is not small here.
    const Vector<double> mu = naive_mean(k);
    const ColMatrix<double> outer = mu * mu.transpose();
    EXPECT_LT(rel_diff(raw.moment(), cov + outer), 1e-13);
    EXPECT_GT(outer.norm(), 0.5 * cov.norm());
  }
}

TEST(SecondMoment, PsdAndPositiveDefiniteFromLargeKeys) {
  // larql PR#339: keys of magnitude ~1e3 and n close to d. fp64 accumulation keeps the moment
  // positive definite: Cholesky succeeds with no ridge.
  std::mt19937_64 rng(8);
  const Index d = 120, n = 130;
  const RowMatrix<float> k = stored<float>(make_keys(n, d, rng, 1.0, 1e3));
  SecondMoment m(d);
  m.add(k);
  EXPECT_GT(reference_symmetric_eigenvalues(m.moment()).minCoeff(), 0.0);
  SpdOptions no_ridge;
  no_ridge.policy.escalate = false;
  const SpdFactor f(m.moment(), no_ridge);
  EXPECT_EQ(f.escalations(), 0);
}

TEST(SecondMoment, MaskSkipsPaddingTokens) {
  std::mt19937_64 rng(9);
  const RowMatrix<bf16> k = stored<bf16>(make_keys(30, 12, rng));
  std::vector<std::uint8_t> mask(30);
  for (std::size_t t = 0; t < mask.size(); ++t) mask[t] = (t % 4 == 3) ? 0 : 1;
  SecondMoment masked(12), kept(12);
  masked.add(MatrixView<const bf16>(k.data(), 30, 12, 12, 1), mask);
  RowMatrix<bf16> rows(0, 12);
  for (Index t = 0; t < 30; ++t)
    if (mask[static_cast<std::size_t>(t)] != 0) {
      rows.conservativeResize(rows.rows() + 1, 12);
      rows.row(rows.rows() - 1) = k.row(t);
    }
  kept.add(rows);
  EXPECT_EQ(masked.count(), rows.rows());
  EXPECT_EQ(masked.scatter(), kept.scatter());
}

TEST(SecondMoment, SameBitsOnAnyThreadCount) {
  std::mt19937_64 rng(10);
  const RowMatrix<float> k = stored<float>(make_keys(kKeys, kDim, rng));
  lowrank::set_num_threads(1);
  SecondMoment one(kDim);
  one.add(k);
  lowrank::set_num_threads(2);
  SecondMoment two(kDim);
  two.add(k);
  lowrank::set_num_threads(0);
  EXPECT_EQ(one.scatter(), two.scatter());
}

TEST(SecondMoment, BadInputThrowsAndLeavesStateUnchanged) {
  std::mt19937_64 rng(11);
  const RowMatrix<double> k = make_keys(10, 6, rng);
  SecondMoment m(6);
  m.add(k);
  const ColMatrix<double> before = m.scatter();
  RowMatrix<double> bad = k;
  bad(4, 2) = std::nan("");
  expect_error([&] { m.add(bad); }, "keys(4, 2) is nan");
  expect_error([&] { m.add(RowMatrix<double>(3, 5)); }, "keys is 3x5 but the accumulator has dimension 6");
  const std::vector<std::uint8_t> short_mask(3, 1);
  expect_error([&] { m.add(MatrixView<const double>(k.data(), 10, 6, 6, 1), short_mask); }, "mask has 3 entries");
  expect_error([&] { m.merge(SecondMoment(7)); }, "dimension 7");
  expect_error([&] { m.merge(SecondMoment(6, true)); }, "differ in mode");
  expect_error([&] { (void)SecondMoment(6).moment(); }, "no keys");
  expect_error([] { SecondMoment(0); }, "dim is 0");
  EXPECT_EQ(m.count(), 10);
  EXPECT_EQ(m.scatter(), before);
}

#if defined(LOWRANK_TEST_HAVE_IO)
TEST(SecondMoment, SafetensorsRoundTripIsBitExact) {
  const auto dir = std::filesystem::temp_directory_path() / ("lowrank_stats_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  for (bool centred : {false, true}) {
    std::mt19937_64 rng(12);
    SecondMoment m(17, centred);
    m.add(stored<float>(make_keys(50, 17, rng)));
    const auto file = dir / (centred ? "c.safetensors" : "u.safetensors");
    lowrank::io::write_second_moment(file, m);
    const SecondMoment r = lowrank::io::read_second_moment(file);
    EXPECT_EQ(r.count(), m.count());
    EXPECT_EQ(r.centered(), centred);
    EXPECT_EQ(r.scatter(), m.scatter());
    EXPECT_EQ(r.sum(), m.sum());
    // And it keeps accumulating like the original.
    SecondMoment a = m, b = r;
    const RowMatrix<float> more = stored<float>(make_keys(20, 17, rng));
    a.add(more);
    b.add(more);
    EXPECT_EQ(a.scatter(), b.scatter());
  }
  expect_error([&] { (void)lowrank::io::read_second_moment(dir / "missing.safetensors"); }, "missing.safetensors");
  std::filesystem::remove_all(dir);
}
#endif

// ---- SpdFactor ---------------------------------------------------------------------------------

ColMatrix<double> spd_matrix(Index d, std::mt19937_64& rng, Index samples) {
  SecondMoment m(d);
  m.add(make_keys(samples, d, rng, 0.3));
  return m.moment();
}

TEST(SpdFactor, SolvesMatchExplicitInverse) {
  std::mt19937_64 rng(20);
  const Index d = 60;
  const ColMatrix<double> C = spd_matrix(d, rng, 200);
  const SpdFactor f(C);
  EXPECT_EQ(f.escalations(), 0);
  EXPECT_EQ(f.extra_ridge(), 0.0);
  const ColMatrix<double> inv = reference_inverse(C);
  const double cond = C.norm() * inv.norm();
  const ColMatrix<double> B = ColMatrix<double>::Random(d, 5);
  const double tol = 50 * cond * 0x1.0p-52;
  EXPECT_LT(rel_diff(f.solve_many(B), inv * B), tol);
  const Vector<double> b = B.col(0);
  EXPECT_LT((f.solve(b) - inv * b).norm() / (inv * b).norm(), tol);
  EXPECT_NEAR(f.inverse_quadratic(b), b.dot(inv * b), tol * b.dot(inv * b));
  EXPECT_LT(rel_diff(f.half_solve_transposed(f.half_solve(B)), inv * B), tol);
  EXPECT_LT(rel_diff(f.inverse(), inv), tol);
  EXPECT_LT(rel_diff(f.reconstructed(), C), 1e-14);
}

// Many right-hand sides (>= 16) go through the blocked, threaded solves (blocks of 256 rows):
// d = 300 has two blocks; compared with the explicit inverse and with the factor's own L.
TEST(SpdFactor, BlockedSolvesWithManyRightHandSides) {
  std::mt19937_64 rng(25);
  const Index d = 300;
  const ColMatrix<double> C = spd_matrix(d, rng, 900);
  const SpdFactor f(C);
  const ColMatrix<double> inv = reference_inverse(C);
  const ColMatrix<double> L = f.matrix_l();
  const double tol = 100 * (C.norm() * inv.norm()) * 0x1.0p-52;
  // 200 right-hand sides: two per-thread column slices with 2 threads.
  for (Index n : {16, 37, 200}) {
    SCOPED_TRACE(n);
    const ColMatrix<double> B = ColMatrix<double>::Random(d, n);
    EXPECT_LT(rel_diff(f.solve_many(B), inv * B), tol);
    const ColMatrix<double> Z = f.half_solve(B);
    EXPECT_LT(rel_diff(L * Z, B), 1e-13);
    const ColMatrix<double> Y = f.half_solve_transposed(B);
    EXPECT_LT(rel_diff(L.transpose() * Y, B), 1e-13);
    // Thread count does not change the bits.
    lowrank::set_num_threads(1);
    const ColMatrix<double> one = f.solve_many(B);
    lowrank::set_num_threads(2);
    const ColMatrix<double> two = f.solve_many(B);
    const ColMatrix<double> half_two = f.half_solve(B), half_t_two = f.half_solve_transposed(B);
    lowrank::set_num_threads(3);
    const ColMatrix<double> three = f.solve_many(B), half_three = f.half_solve(B),
                            half_t_three = f.half_solve_transposed(B);
    lowrank::set_num_threads(0);
    EXPECT_EQ(one, two);
    EXPECT_EQ(one, three);
    EXPECT_EQ(half_two, half_three);
    EXPECT_EQ(half_t_two, half_t_three);
  }
  EXPECT_EQ(f.solve_many(ColMatrix<double>(d, 0)).cols(), 0);
}

TEST(SpdFactor, ScaleAndRidge) {
  std::mt19937_64 rng(21);
  const Index d = 30;
  const ColMatrix<double> C = spd_matrix(d, rng, 100);
  const Vector<double> b = Vector<double>::Random(d);
  const SpdFactor f(C);
  SpdOptions scaled;
  scaled.scale = 37.5;
  // Scaling C by c scales C^{-1} b by 1/c (to rounding).
  EXPECT_LT((SpdFactor(C, scaled).solve(b) * 37.5 - f.solve(b)).norm() / f.solve(b).norm(), 1e-13);
  SpdOptions ridge;
  ridge.ridge = 0.25;
  const ColMatrix<double> A = C + 0.25 * ColMatrix<double>::Identity(d, d);
  const Vector<double> expect = reference_solve(A, b);
  EXPECT_LT((SpdFactor(C, ridge).solve(b) - expect).norm() / expect.norm(), 1e-12);
}

TEST(SpdFactor, RankDeficientStatisticsEscalateOrFail) {
  std::mt19937_64 rng(22);
  const Index d = 50;
  const ColMatrix<double> C = spd_matrix(d, rng, 20);  // 20 samples: rank 20 < 50
  SpdOptions strict;
  strict.policy.escalate = false;
  expect_error([&] { SpdFactor f(C, strict); }, "not numerically positive definite");
  const SpdFactor f(C);
  EXPECT_GE(f.escalations(), 1);
  EXPECT_GT(f.extra_ridge(), 0.0);
  const double mean_diag = C.diagonal().mean();
  EXPECT_NEAR(f.extra_ridge(), 1e-10 * mean_diag * std::pow(10.0, f.escalations() - 1), 1e-9 * f.extra_ridge());
  const Vector<double> b = Vector<double>::Random(d);
  const Vector<double> x = f.solve(b);
  EXPECT_TRUE(x.allFinite());
  // It solves the matrix it reports: (C + extra I) x = b.
  const ColMatrix<double> A = C + f.extra_ridge() * ColMatrix<double>::Identity(d, d);
  // Backward stable: the residual is at rounding level relative to |A| |x| (A is ill-conditioned).
  EXPECT_LT((A * x - b).norm(), 1e-12 * A.norm() * x.norm());
  // An indefinite matrix is refused after the last step, naming it.
  ColMatrix<double> indefinite = C;
  indefinite(0, 0) = -mean_diag;
  expect_error([&] { SpdFactor g(indefinite); }, "not positive definite even with an extra ridge");
}

TEST(SpdFactor, RankOneUpdateAndDowndateEqualRefactoring) {
  std::mt19937_64 rng(23);
  const Index d = 40;
  const ColMatrix<double> C = spd_matrix(d, rng, 120);
  const Vector<double> v = Vector<double>::Random(d);
  SpdFactor f(C);
  const ColMatrix<double> L0 = f.matrix_l();
  f.rank_one_update(v, 2.0);
  const ColMatrix<double> C1 = C + 2.0 * v * v.transpose();
  EXPECT_LT(rel_diff(f.matrix_l(), SpdFactor(C1).matrix_l()), 1e-12);
  EXPECT_EQ(f.updates(), 1);
  f.rank_one_update(v, -2.0);
  EXPECT_LT(rel_diff(f.matrix_l(), L0), 1e-12);
  // A downdate that would break definiteness is refused; the factor keeps its bits.
  const ColMatrix<double> before = f.matrix_l();
  const Vector<double> big = 100 * Vector<double>::Ones(d);
  expect_error([&] { f.rank_one_update(big, -1.0); }, "not positive definite");
  EXPECT_EQ(f.matrix_l(), before);
  EXPECT_EQ(f.updates(), 2);
}

TEST(SpdFactor, BadInput) {
  std::mt19937_64 rng(24);
  const ColMatrix<double> C = spd_matrix(8, rng, 30);
  expect_error([] { SpdFactor f(ColMatrix<double>(3, 4)); }, "C is 3x4");
  ColMatrix<double> nan = C;
  nan(5, 1) = std::nan("");
  expect_error([&] { SpdFactor f(nan); }, "NaN or infinity");
  SpdOptions bad;
  bad.scale = 0;
  expect_error([&] { SpdFactor f(C, bad); }, "options.scale is 0");
  bad = {};
  bad.ridge = -1;
  expect_error([&] { SpdFactor f(C, bad); }, "options.ridge is -1");
  bad = {};
  bad.policy.factor = 1;
  expect_error([&] { SpdFactor f(C, bad); }, "options.policy is invalid");
  const SpdFactor f(C);
  expect_error([&] { (void)f.solve(Vector<double>(Vector<double>::Ones(7))); }, "7 rows; the factor is 8x8");
  expect_error([] { (void)SpdFactor().solve(Vector<double>(Vector<double>::Ones(2))); }, "empty");
}

}  // namespace
