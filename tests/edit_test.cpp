// ROME, MEMIT and EMMET closed forms and factored edits (editing.md sections 8.3 to 8.5), against
// naive fp64 references: constraints, preservation, optimality, the Woodbury path against a dense
// LU of lambda C + K K^T, scale (in)variance, explicit layouts (square Linear vs Conv1D), revert
// bounds, sequential semantics and errors with the weight unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>


#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/edit/factored.hpp"
#include "lowrank/edit/log.hpp"
#include "lowrank/edit/memit.hpp"
#include "lowrank/edit/rome.hpp"
#include "lowrank/linalg/moments.hpp"
#include "lowrank/linalg/spd.hpp"
#include "edit_util.hpp"
#include "reference_linalg.hpp"
#include "test_util.hpp"

namespace {

using namespace lowrank_test;
using lowrank::ColMatrix;
using lowrank::Layout;
using lowrank::RowMatrix;
using lowrank::Vector;
using lowrank::WeightView;
using lowrank::edit::FactoredEdit;
using lowrank::linalg::SecondMoment;
using lowrank::linalg::SpdFactor;
using lowrank::linalg::SpdOptions;
namespace edit = lowrank::edit;

using Stats = KeyStats;
Stats make_stats(Index d, std::mt19937_64& rng) { return make_key_stats(d, rng); }

// ---- ROME ----------------------------------------------------------------------------------------

TEST(Rome, ConstraintPreservationAndPaperForm) {
  std::mt19937_64 rng(1);
  const Index in = 40, out = 24;
  const Stats s = make_stats(in, rng);
  const ColMatrix<double> W = random_matrix(out, in, rng);
  const Vector<double> k = random_vector(in, rng), v_star = random_vector(out, rng);
  const FactoredEdit e = edit::rome(k, k, v_star, W * k, s.factor);
  ASSERT_EQ(e.rank(), 1);
  EXPECT_NEAR(e.U.col(0).norm(), 1.0, 1e-14);
  const ColMatrix<double> W1 = W + e.dense();
  EXPECT_LT((W1 * k - v_star).norm() / v_star.norm(), 1e-12);
  // Preservation: x with x^T C^-1 k = 0.
  const Vector<double> cinv_k = reference_solve(s.C, k);
  for (int trial = 0; trial < 5; ++trial) {
    Vector<double> x = random_vector(in, rng);
    x -= (x.dot(cinv_k) / cinv_k.squaredNorm()) * cinv_k;
    EXPECT_LT((W1 * x - W * x).norm(), 1e-11 * (W * x).norm());
  }
  // The paper's closed form.
  const ColMatrix<double> paper = (v_star - W * k) * cinv_k.transpose() / k.dot(cinv_k);
  EXPECT_LT((e.dense() - paper).norm() / paper.norm(), 1e-11);
  // Optimality: adding Z with Z k = 0 does not decrease tr(dW C dW^T).
  const auto cost = [&](const ColMatrix<double>& d) { return (d * s.C * d.transpose()).trace(); };
  for (int trial = 0; trial < 5; ++trial) {
    ColMatrix<double> Z = random_matrix(out, in, rng);
    Z -= (Z * k) * k.transpose() / k.squaredNorm();
    EXPECT_GE(cost(e.dense() + 1e-3 * Z), cost(e.dense()));
  }
}

TEST(Rome, KeyAsymmetryScaleInvarianceAndIdentityStatistics) {
  std::mt19937_64 rng(2);
  const Index in = 30, out = 12;
  const Stats s = make_stats(in, rng);
  const ColMatrix<double> W = random_matrix(out, in, rng);
  const Vector<double> k_dir = random_vector(in, rng), k_eq = k_dir + 0.3 * random_vector(in, rng);
  const Vector<double> v_star = random_vector(out, rng);
  const FactoredEdit e = edit::rome(k_dir, k_eq, v_star, W * k_eq, s.factor);
  const ColMatrix<double> W1 = W + e.dense();
  EXPECT_LT((W1 * k_eq - v_star).norm() / v_star.norm(), 1e-12);  // holds for k_eq
  EXPECT_GT((W1 * k_dir - v_star).norm() / v_star.norm(), 1e-3);  // not for k_dir
  // Scaling C leaves (u, v) unchanged.
  SpdOptions scaled;
  scaled.scale = 123.0;
  const FactoredEdit e2 = edit::rome(k_dir, k_eq, v_star, W * k_eq, SpdFactor(s.C, scaled));
  EXPECT_LT((e2.U - e.U).norm(), 1e-12);
  EXPECT_LT((e2.V - e.V).norm() / e.V.norm(), 1e-12);
  // C = I: u = k / |k| and dW = (v* - W k) k^T / |k|^2.
  const SpdFactor identity(ColMatrix<double>::Identity(in, in));
  const FactoredEdit e3 = edit::rome(k_eq, k_eq, v_star, W * k_eq, identity);
  EXPECT_LT((e3.U.col(0) - k_eq.normalized()).norm(), 1e-14);
  const ColMatrix<double> min_norm = (v_star - W * k_eq) * k_eq.transpose() / k_eq.squaredNorm();
  EXPECT_LT((e3.dense() - min_norm).norm() / min_norm.norm(), 1e-13);
}

// Square weight: the Linear flag meets the constraint; the same (u, v) applied with the Conv1D rule
// (what shape inference does for square matrices) does not.
template <class TW>
void check_layouts(double tol) {
  SCOPED_TRACE(type_name<TW>());
  std::mt19937_64 rng(3);
  const Index d = 32;
  const Stats s = make_stats(d, rng);
  const ColMatrix<double> W = random_matrix(d, d, rng);  // out x in
  const Vector<double> k = random_vector(d, rng), v_star = random_vector(d, rng);
  for (Layout layout : {Layout::out_in, Layout::in_out}) {
    SCOPED_TRACE(lowrank::to_string(layout));
    RowMatrix<TW> stored(d, d);
    for (Index i = 0; i < d; ++i)
      for (Index j = 0; j < d; ++j)
        stored(i, j) = from_double<TW>(layout == Layout::out_in ? W(i, j) : W(j, i));
    const WeightView<TW> wv{lowrank::view(stored), layout};
    const FactoredEdit e =
        edit::rome<TW>(k, k, v_star, WeightView<const TW>{wv.matrix, layout}, nullptr, s.factor);
    edit::apply(wv, e);
    // Read back out x in and check the constraint in fp64.
    ColMatrix<double> W1(d, d);
    for (Index i = 0; i < d; ++i)
      for (Index j = 0; j < d; ++j) W1(i, j) = to_double(layout == Layout::out_in ? stored(i, j) : stored(j, i));
    EXPECT_LT((W1 * k - v_star).norm() / v_star.norm(), tol);
    // The wrong rule: W + u v^T as out x in.
    ColMatrix<double> Wq(d, d);
    for (Index i = 0; i < d; ++i)
      for (Index j = 0; j < d; ++j) Wq(i, j) = to_double(from_double<TW>(W(i, j)));
    const ColMatrix<double> wrong = Wq + e.U * e.V.transpose();
    EXPECT_GT((wrong * k - v_star).norm() / v_star.norm(), 0.1);
  }
}

TEST(Rome, ExplicitLayoutsOnSquareWeights) {
  check_layouts<double>(1e-12);
  check_layouts<float>(1e-4);
  check_layouts<bf16>(5e-2);
}

TEST(Rome, RevertBoundAndSequentialSemantics) {
  std::mt19937_64 rng(4);
  const Index in = 48, out = 20;
  const Stats s = make_stats(in, rng);
  RowMatrix<float> w(out, in);
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) w(i, j) = static_cast<float>(random_vector(1, rng)(0));
  const RowMatrix<float> original = w;
  const WeightView<float> wv{lowrank::view(w), Layout::out_in};
  const Vector<double> k1 = random_vector(in, rng), k2 = random_vector(in, rng);
  const Vector<double> v1 = random_vector(out, rng), v2 = random_vector(out, rng);
  // Sequential: the second edit is computed on the edited weight.
  const FactoredEdit e1 = edit::rome<float>(k1, k1, v1, WeightView<const float>{wv.matrix, wv.layout}, nullptr, s.factor);
  edit::apply(wv, e1);
  const FactoredEdit e2 = edit::rome<float>(k2, k2, v2, WeightView<const float>{wv.matrix, wv.layout}, nullptr, s.factor);
  edit::apply(wv, e2);
  const ColMatrix<double> W2 = w.cast<double>();
  EXPECT_LT((W2 * k2 - v2).norm() / v2.norm(), 1e-5);  // the last constraint holds
  // The first survives iff k1^T C^-1 k2 = 0; here it does not.
  EXPECT_GT((W2 * k1 - v1).norm() / v1.norm(), 1e-3);
  // Not the same as two edits computed on the original weight and summed.
  const ColMatrix<double> W0 = original.cast<double>();
  const FactoredEdit f2 = edit::rome(k2, k2, v2, W0 * k2, s.factor);
  EXPECT_GT((e2.dense() - f2.dense()).norm(), 1e-6 * f2.dense().norm());
  // Revert in reverse order: within a few ulps of |W| + |dW|.
  edit::revert(wv, e2);
  edit::revert(wv, e1);
  const ColMatrix<double> bound_scale = W0.cwiseAbs() + e1.dense().cwiseAbs() + e2.dense().cwiseAbs();
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j)
      EXPECT_LE(std::abs(double{w(i, j)} - W0(i, j)), 4 * 0x1.0p-24 * bound_scale(i, j)) << i << ", " << j;
}

TEST(Rome, ErrorsLeaveWeightUnchanged) {
  std::mt19937_64 rng(5);
  const Index in = 10, out = 6;
  const Stats s = make_stats(in, rng);
  const Vector<double> k = random_vector(in, rng), v = random_vector(out, rng), wk = random_vector(out, rng);
  expect_error([&] { (void)edit::rome(Vector<double>(Vector<double>::Zero(in)), k, v, wk, s.factor); }, "norm 0");
  expect_error([&] { (void)edit::rome(random_vector(in + 1, rng), k, v, wk, s.factor); }, "k_dir has 11 entries");
  expect_error([&] { (void)edit::rome(k, k, v, random_vector(out + 2, rng), s.factor); }, "w_k_eq has 8 entries");
  Vector<double> bad = k;
  bad(3) = INFINITY;
  expect_error([&] { (void)edit::rome(k, bad, v, wk, s.factor); }, "k_eq");
  // k_eq C^-1-orthogonal to k_dir: degenerate denominator.
  const Vector<double> u = s.factor.solve(k);
  Vector<double> orth = random_vector(in, rng);
  orth -= (orth.dot(u) / u.squaredNorm()) * u;
  expect_error([&] { (void)edit::rome(k, orth, v, wk, s.factor); }, "degenerate");
  // A mismatched edit is refused before anything is written.
  RowMatrix<float> w = RowMatrix<float>::Ones(out, in);
  const RowMatrix<float> before = w;
  FactoredEdit e = edit::rome(k, k, v, wk, s.factor);
  const WeightView<float> transposed{lowrank::view(w), Layout::in_out};  // in x out = 6 x 10: wrong
  expect_error([&] { edit::apply(transposed, e); }, "weight is out x in = 10x6");
  e.V.resize(out, 2);
  expect_error([&] { edit::apply(WeightView<float>{lowrank::view(w), Layout::out_in}, e); }, "ranks");
  EXPECT_EQ(w, before);
}

TEST(Edit, FactoredForwardEqualsDense) {
  std::mt19937_64 rng(6);
  const Index in = 21, out = 13, tokens = 5, r = 3;
  FactoredEdit e{random_matrix(in, r, rng), random_matrix(out, r, rng)};
  const RowMatrix<float> x = random_matrix(tokens, in, rng).cast<float>();
  RowMatrix<float> y = random_matrix(tokens, out, rng).cast<float>();
  const RowMatrix<float> y0 = y;
  edit::forward_add(lowrank::view(x), e, lowrank::view(y));
  const ColMatrix<double> expect = y0.cast<double>() + x.cast<double>() * e.dense().transpose();
  EXPECT_LT((y.cast<double>() - expect).norm() / expect.norm(), 1e-6);
}

// ---- EditLog ----------------------------------------------------------------------------------------

template <class TW>
void check_log(double u) {
  SCOPED_TRACE(type_name<TW>());
  std::mt19937_64 rng(12);
  const Index in = 36, out = 18;
  const Stats s = make_stats(in, rng);
  RowMatrix<TW> w(in, out);  // Conv1D storage: in x out
  for (Index i = 0; i < in; ++i)
    for (Index j = 0; j < out; ++j) w(i, j) = from_double<TW>(random_vector(1, rng)(0));
  const RowMatrix<TW> original = w;
  const WeightView<TW> wv{lowrank::view(w), Layout::in_out};
  edit::EditLogOptions options;
  options.snapshot = true;
  edit::EditLog<TW> log(wv, options);
  ColMatrix<double> max_abs = ColMatrix<double>::Zero(out, in);
  auto track = [&] {
    for (Index o = 0; o < out; ++o)
      for (Index i = 0; i < in; ++i) max_abs(o, i) = std::max(max_abs(o, i), std::abs(to_double(w(i, o))));
  };
  track();
  ColMatrix<double> total = ColMatrix<double>::Zero(out, in);
  for (int e = 0; e < 3; ++e) {
    const Vector<double> k = random_vector(in, rng), v = random_vector(out, rng);
    FactoredEdit fe = edit::rome<TW>(k, k, v, WeightView<const TW>{wv.matrix, wv.layout}, nullptr, s.factor);
    total += fe.dense();
    log.apply(std::move(fe), "edit " + std::to_string(e));
    track();
  }
  EXPECT_EQ(log.size(), 3);
  EXPECT_EQ(log.label(1), "edit 1");
  EXPECT_LT((log.combined().dense() - total).norm(), 1e-12 * total.norm());
  // A mismatched edit is refused; the log and the weight are unchanged.
  const RowMatrix<TW> before = w;
  expect_error([&] { log.apply(FactoredEdit{random_matrix(out, 1, rng), random_matrix(in, 1, rng)}); }, "out x in");
  EXPECT_EQ(log.size(), 3);
  EXPECT_TRUE(w == before);
  log.revert_all();
  track();
  EXPECT_TRUE(log.empty());
  for (Index i = 0; i < in; ++i)
    for (Index o = 0; o < out; ++o)
      EXPECT_LE(std::abs(to_double(w(i, o)) - to_double(original(i, o))), 2 * 3 * u * max_abs(o, i)) << i << ", " << o;
  expect_error([&] { log.revert_last(); }, "empty");
  // The snapshot restores the exact bits.
  log.apply(FactoredEdit{random_matrix(in, 2, rng), random_matrix(out, 2, rng)});
  log.restore();
  EXPECT_TRUE(w == original);
  EXPECT_TRUE(log.empty());
  edit::EditLog<TW> plain(wv);
  expect_error([&] { plain.restore(); }, "without a snapshot");
}

TEST(EditLog, RevertWithinBoundAndSnapshotRestoreIsExact) {
  check_log<float>(0x1.0p-24);
  check_log<bf16>(0x1.0p-8);
  check_log<double>(0x1.0p-53);
}

// ---- MEMIT ---------------------------------------------------------------------------------------

TEST(Memit, NormalEquationsWoodburyAndResidual) {
  std::mt19937_64 rng(7);
  const Index in = 50, out = 20, n = 8;
  const Stats s = make_stats(in, rng);
  const ColMatrix<double> K = random_matrix(in, n, rng), R = random_matrix(out, n, rng);
  const double lambda = 3.5;
  const FactoredEdit e = edit::memit(K, R, s.factor, lambda);
  ASSERT_EQ(e.rank(), n);
  const ColMatrix<double> M = lambda * s.C + K * K.transpose();
  // Normal equations: dW (lambda C + K K^T) = R K^T.
  EXPECT_LT((e.dense() * M - R * K.transpose()).norm() / (R * K.transpose()).norm(), 1e-10);
  // The reference's dense LU path.
  const ColMatrix<double> adj_k = reference_solve(M, K);
  EXPECT_LT((e.U - adj_k).norm() / adj_k.norm(), 1e-10);
  // Remaining residual: dW K - R = -lambda R (lambda I + K^T C^-1 K)^-1.
  const ColMatrix<double> G = K.transpose() * reference_solve(s.C, K);
  const ColMatrix<double> expected = -lambda * R * reference_inverse(lambda * ColMatrix<double>::Identity(n, n) + G);
  EXPECT_LT((e.dense() * K - R - expected).norm() / expected.norm(), 1e-9);
  // Preservation: dW x = 0 when K^T C^-1 x = 0.
  const ColMatrix<double> cinvK = reference_solve(s.C, K);
  Vector<double> x = random_vector(in, rng);
  x -= cinvK * reference_solve(cinvK.transpose() * cinvK, cinvK.transpose() * x);
  EXPECT_LT((e.dense() * x).norm(), 1e-10 * (e.dense().norm() * x.norm()));
}

TEST(Memit, SingleEditIsDampedRomeAndScaleMovesLambda) {
  std::mt19937_64 rng(8);
  const Index in = 30, out = 10;
  const Stats s = make_stats(in, rng);
  const Vector<double> k = random_vector(in, rng), r = random_vector(out, rng);
  const double lambda = 0.7;
  const FactoredEdit e = edit::memit(ColMatrix<double>(k), ColMatrix<double>(r), s.factor, lambda);
  const Vector<double> cinv_k = reference_solve(s.C, k);
  const ColMatrix<double> damped = r * cinv_k.transpose() / (lambda + k.dot(cinv_k));
  EXPECT_LT((e.dense() - damped).norm() / damped.norm(), 1e-11);
  // lambda -> 0 approaches ROME with symmetric keys (v* - W k = r).
  const ColMatrix<double> rome_like = r * cinv_k.transpose() / k.dot(cinv_k);
  const FactoredEdit tiny = edit::memit(ColMatrix<double>(k), ColMatrix<double>(r), s.factor, 1e-9);
  EXPECT_LT((tiny.dense() - rome_like).norm() / rome_like.norm(), 1e-7);
  // Scaling C by c equals scaling lambda by c.
  SpdOptions scaled;
  scaled.scale = 4.0;
  const FactoredEdit a = edit::memit(ColMatrix<double>(k), ColMatrix<double>(r), SpdFactor(s.C, scaled), lambda);
  const FactoredEdit b = edit::memit(ColMatrix<double>(k), ColMatrix<double>(r), s.factor, 4.0 * lambda);
  EXPECT_LT((a.dense() - b.dense()).norm() / b.dense().norm(), 1e-12);
}

TEST(Memit, ResidualSpreadingMock) {
  // The caller-side loop with a mock in which each layer's update removes exactly its assigned
  // share: the shares are R0 / L and the final residual is 0.
  const Index L = 5;
  ColMatrix<double> R(3, 2);
  R << 5.0, 1.0, -10.0, 2.0, 2.5, -4.0;
  ColMatrix<double> residual = R;
  for (Index i = 0; i < L; ++i) {
    const ColMatrix<double> share = edit::spread_residual(residual, i, L);
    EXPECT_LT((share - R / static_cast<double>(L)).norm(), 1e-14);
    residual -= share;
  }
  EXPECT_LT(residual.norm(), 1e-14);
  expect_error([&] { (void)edit::spread_residual(R, 5, 5); }, "layer is 5");
  expect_error([&] { (void)edit::spread_residual(R, 0, 0); }, "layers is 0");
}

// ---- EMMET ---------------------------------------------------------------------------------------

TEST(Emmet, ExactConstraintsScaleInvarianceAndLinks) {
  std::mt19937_64 rng(9);
  const Index in = 40, out = 15, n = 6;
  const Stats s = make_stats(in, rng);
  const ColMatrix<double> K = random_matrix(in, n, rng), R = random_matrix(out, n, rng);
  const edit::EmmetResult res = edit::emmet(K, R, s.factor);
  EXPECT_FALSE(res.pseudo_inverse);
  EXPECT_LT((res.edit.dense() * K - R).norm() / R.norm(), 1e-11);  // (W + dW) K = W K + R
  SpdOptions scaled;
  scaled.scale = 50.0;
  const edit::EmmetResult res2 = edit::emmet(K, R, SpdFactor(s.C, scaled));
  EXPECT_LT((res2.edit.dense() - res.edit.dense()).norm() / res.edit.dense().norm(), 1e-11);
  // n = 1: ROME with symmetric keys.
  const Vector<double> k = K.col(0), r = R.col(0);
  const edit::EmmetResult one = edit::emmet(ColMatrix<double>(k), ColMatrix<double>(r), s.factor);
  const FactoredEdit rome = edit::rome(k, k, r, Vector<double>::Zero(out), s.factor);
  EXPECT_LT((one.edit.dense() - rome.dense()).norm() / rome.dense().norm(), 1e-11);
  // emmet_lambda = e equals MEMIT with lambda = e.
  edit::EmmetOptions opt;
  opt.lambda = 0.8;
  const edit::EmmetResult damped = edit::emmet(K, R, s.factor, opt);
  const FactoredEdit memit = edit::memit(K, R, s.factor, 0.8);
  EXPECT_LT((damped.edit.dense() - memit.dense()).norm() / memit.dense().norm(), 1e-10);
}

TEST(Emmet, DuplicateKeysUseThePseudoInverse) {
  std::mt19937_64 rng(10);
  const Index in = 25, out = 8;
  const Stats s = make_stats(in, rng);
  const Vector<double> k = random_vector(in, rng), r = random_vector(out, rng);
  ColMatrix<double> K(in, 2), R(out, 2);
  K << k, k;
  R << r, r;
  const edit::EmmetResult dup = edit::emmet(K, R, s.factor);
  EXPECT_TRUE(dup.pseudo_inverse);
  EXPECT_EQ(dup.dropped, 1);
  EXPECT_TRUE(dup.edit.U.allFinite());
  const edit::EmmetResult single = edit::emmet(ColMatrix<double>(k), ColMatrix<double>(r), s.factor);
  EXPECT_LT((dup.edit.dense() - single.edit.dense()).norm() / single.edit.dense().norm(), 1e-8);
}

TEST(MemitEmmet, BadInput) {
  std::mt19937_64 rng(11);
  const Stats s = make_stats(12, rng);
  const ColMatrix<double> K = random_matrix(12, 3, rng), R = random_matrix(5, 3, rng);
  expect_error([&] { (void)edit::memit(K, R, s.factor, 0.0); }, "lambda is 0");
  expect_error([&] { (void)edit::memit(random_matrix(11, 3, rng), R, s.factor, 1.0); }, "K is 11x3 but C is 12x12");
  expect_error([&] { (void)edit::memit(K, random_matrix(5, 2, rng), s.factor, 1.0); }, "R is 5x2 but K is 12x3");
  expect_error([&] { (void)edit::memit(ColMatrix<double>(12, 0), ColMatrix<double>(5, 0), s.factor, 1.0); },
               "no requests");
  ColMatrix<double> bad = K;
  bad(2, 1) = NAN;
  expect_error([&] { (void)edit::memit(bad, R, s.factor, 1.0); }, "K (12x3) has a NaN");
  edit::EmmetOptions opt;
  opt.lambda = -1;
  expect_error([&] { (void)edit::emmet(K, R, s.factor, opt); }, "options.lambda is -1");
}

}  // namespace
