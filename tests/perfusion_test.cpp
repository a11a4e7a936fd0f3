// Perfusion's gated rank-1 edit (editing.md 8.6) against naive fp64 references written here: the
// direct form W (e - s(e) i*) + sigmoid((s(e) - beta) / tau) o* per token with an explicit C^-1
// (full-pivoting LU), the exact multi-concept form with the oblique projector
// I* (I*^T C^-1 I*)^-1 I*^T C^-1 (basis-free), ROME's closed form, scale invariance, the fused
// forward for every storage type, both layouts and both lora_forward paths, merging, inference-time
// gates and errors with Y unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/edit/perfusion.hpp"
#include "lowrank/edit/rome.hpp"
#include "lowrank/kernels/lora_forward.hpp"
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
using lowrank::edit::MultiConcept;
using lowrank::edit::Perfusion;
using lowrank::edit::PerfusionConcept;
using lowrank::linalg::SecondMoment;
using lowrank::linalg::SpdFactor;
using lowrank::linalg::SpdOptions;
namespace edit = lowrank::edit;

using Stats = KeyStats;
Stats make_stats(Index d, std::mt19937_64& rng) { return make_key_stats(d, rng); }

// Entries representable in fp32, so a row of X can hold the vector exactly.
Vector<double> random_float_vector(Index n, std::mt19937_64& rng) {
  return random_vector(n, rng).cast<float>().cast<double>();
}

ColMatrix<double> random_matrix(Index r, Index c, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  ColMatrix<double> m(r, c);
  for (Index j = 0; j < c; ++j)
    for (Index i = 0; i < r; ++i) m(i, j) = normal(rng);
  return m;
}

// Concept c gets its own gate, so that a mix-up of per-concept gates shows.
std::vector<PerfusionConcept> make_concepts(Index m, Index in, Index out, std::mt19937_64& rng) {
  std::vector<PerfusionConcept> cs;
  for (Index c = 0; c < m; ++c)
    cs.push_back({random_float_vector(in, rng), random_vector(out, rng), 0.75 - 0.05 * static_cast<double>(c),
                  0.1 + 0.02 * static_cast<double>(c)});
  return cs;
}

// A weight stored as TW in the given layout, and its fp64 out x in copy widened from the storage.
template <class TW>
struct Stored {
  RowMatrix<TW> data;
  Layout layout = Layout::out_in;
  ColMatrix<double> W;
  WeightView<const TW> view() const { return {lowrank::view(data), layout}; }
};
template <class TW>
Stored<TW> store(const ColMatrix<double>& W, Layout layout) {
  Stored<TW> s;
  s.layout = layout;
  const Index out = W.rows(), in = W.cols();
  s.data.resize(layout == Layout::out_in ? out : in, layout == Layout::out_in ? in : out);
  s.W.resize(out, in);
  for (Index o = 0; o < out; ++o)
    for (Index i = 0; i < in; ++i) {
      const TW x = from_double<TW>(W(o, i));
      (layout == Layout::out_in ? s.data(o, i) : s.data(i, o)) = x;
      s.W(o, i) = to_double(x);
    }
  return s;
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// ---- naive fp64 references ------------------------------------------------------------------------

double naive_similarity(const ColMatrix<double>& Cinv, const Vector<double>& i_star, const Vector<double>& e) {
  return e.dot(Cinv * i_star) / i_star.dot(Cinv * i_star);
}

// The oblique projector onto span(I) along its C^-1-orthogonal complement (I of full column rank):
// sum_k u_k u_k^T C^-1 for any C^-1-orthonormal basis {u_k} of span(I).
ColMatrix<double> naive_projector(const ColMatrix<double>& Cinv, const ColMatrix<double>& I) {
  const ColMatrix<double> G = I.transpose() * Cinv * I;
  return I * reference_solve(G, I.transpose() * Cinv);
}

ColMatrix<double> concept_inputs(const std::vector<PerfusionConcept>& cs, Index in) {
  ColMatrix<double> I(in, static_cast<Index>(cs.size()));
  for (std::size_t c = 0; c < cs.size(); ++c) I.col(static_cast<Index>(c)) = cs[c].i_star;
  return I;
}

// Direct forms of editing.md 3.1 and 3.3. `span` (exact form only): the columns spanning the
// concepts' inputs, by default all of them.
Vector<double> naive_output(const ColMatrix<double>& W, const ColMatrix<double>& Cinv,
                            const std::vector<PerfusionConcept>& cs, MultiConcept mode, const Vector<double>& e,
                            const ColMatrix<double>* span = nullptr) {
  Vector<double> y;
  if (mode == MultiConcept::additive) {
    Vector<double> projected = e;
    for (const auto& k : cs) projected -= naive_similarity(Cinv, k.i_star, e) * k.i_star;
    y = W * projected;
  } else if (cs.empty()) {
    y = W * e;
  } else {
    const ColMatrix<double> I = span != nullptr ? *span : concept_inputs(cs, W.cols());
    y = W * (e - naive_projector(Cinv, I) * e);
  }
  for (const auto& k : cs) y += sigmoid((naive_similarity(Cinv, k.i_star, e) - k.beta) / k.tau) * k.o_star;
  return y;
}

double rel_diff(const Vector<double>& a, const Vector<double>& b) { return (a - b).norm() / b.norm(); }

// ---- single concept ------------------------------------------------------------------------------

TEST(Perfusion, SimilarityAndOutputAtTheTargetInput) {
  std::mt19937_64 rng(1);
  const Index in = 40, out = 24;
  const Stats s = make_stats(in, rng);
  const Stored<double> w = store<double>(random_matrix(out, in, rng), Layout::out_in);
  const std::vector<PerfusionConcept> cs = make_concepts(1, in, out, rng);
  const PerfusionConcept& k = cs[0];
  const Perfusion p(w.view(), s.factor, cs);
  ASSERT_EQ(p.concepts(), 1);
  ASSERT_EQ(p.rank(), 1);
  EXPECT_EQ(p.in_features(), in);
  EXPECT_EQ(p.out_features(), out);
  EXPECT_NEAR(p.energies()(0), k.i_star.dot(s.Cinv * k.i_star), 1e-10 * p.energies()(0));
  EXPECT_NEAR(p.similarity(k.i_star)(0), 1.0, 1e-13);
  // out(i*) = sigmoid((1 - beta) / tau) o*: the W term vanishes.
  const Vector<double> at_target = p.output(w.view(), k.i_star);
  const Vector<double> expect = sigmoid((1 - k.beta) / k.tau) * k.o_star;
  const double scale = w.W.cwiseAbs().sum() * k.i_star.cwiseAbs().maxCoeff() + k.o_star.norm();
  EXPECT_LT((at_target - expect).norm(), 1e-13 * scale);
  EXPECT_NEAR(sigmoid((1 - 0.75) / 0.1), 0.9241418199787566, 1e-15);
}

TEST(Perfusion, PreservationLeaksTheClosedGate) {
  std::mt19937_64 rng(2);
  const Index in = 36, out = 20;
  const Stats s = make_stats(in, rng);
  const Stored<double> w = store<double>(random_matrix(out, in, rng), Layout::out_in);
  const std::vector<PerfusionConcept> cs = make_concepts(1, in, out, rng);
  const PerfusionConcept& k = cs[0];
  const Perfusion p(w.view(), s.factor, cs);
  const double leak = sigmoid(-k.beta / k.tau);
  EXPECT_NEAR(leak, 5.5e-4, 0.05e-4);
  const Vector<double> cinv_i = s.Cinv * k.i_star;
  for (int trial = 0; trial < 5; ++trial) {
    Vector<double> e = random_vector(in, rng);
    e -= (e.dot(cinv_i) / cinv_i.squaredNorm()) * cinv_i;  // e^T C^-1 i* = 0
    EXPECT_LT(std::abs(p.similarity(e)(0)), 1e-13 * e.norm() * p.similarity_vectors().norm());
    const Vector<double> y = p.output(w.view(), e);
    const Vector<double> expect = w.W * e + leak * k.o_star;
    EXPECT_LT(rel_diff(y, expect), 1e-13);
    // Not exactly W e: the closed gate still lets sigmoid(-beta / tau) of o* through.
    EXPECT_NEAR((y - w.W * e).norm(), leak * k.o_star.norm(), 1e-10 * leak * k.o_star.norm());
  }
}

// With the gate replaced by the identity, the edit is ROME's with k_dir = k_eq = i*, v* = o*.
TEST(Perfusion, IdentityGateIsRome) {
  std::mt19937_64 rng(3);
  const Index in = 30, out = 18;
  const Stats s = make_stats(in, rng);
  const Stored<double> w = store<double>(random_matrix(out, in, rng), Layout::out_in);
  const std::vector<PerfusionConcept> cs = make_concepts(1, in, out, rng);
  const PerfusionConcept& k = cs[0];
  const Perfusion p(w.view(), s.factor, cs);
  const edit::FactoredEdit rome = edit::rome(k.i_star, k.i_star, k.o_star, w.view(), nullptr, s.factor);
  // Lambda = (o* - W i*) / energy: dW = Lambda (C^-1 i*)^T.
  const double energy = k.i_star.dot(s.Cinv * k.i_star);
  const ColMatrix<double> paper = (k.o_star - w.W * k.i_star) * (s.Cinv * k.i_star).transpose() / energy;
  EXPECT_LT((rome.dense() - paper).norm() / paper.norm(), 1e-11);
  // The prepared pieces: dW = (o* - b) a^T.
  const ColMatrix<double> from_perfusion =
      (k.o_star - p.projected_outputs().col(0)) * p.similarity_vectors().col(0).transpose();
  EXPECT_LT((from_perfusion - paper).norm() / paper.norm(), 1e-11);
  for (int trial = 0; trial < 5; ++trial) {
    const Vector<double> e = random_vector(in, rng);
    const double sim = p.similarity(e)(0);
    // Naive direct form with gate(s) = s, against (W + dW_ROME) e.
    const Vector<double> linear_gate = w.W * (e - naive_similarity(s.Cinv, k.i_star, e) * k.i_star) +
                                       naive_similarity(s.Cinv, k.i_star, e) * k.o_star;
    const Vector<double> edited = (w.W + rome.dense()) * e;
    EXPECT_LT(rel_diff(linear_gate, edited), 1e-11);
    // The cheap form's pieces with the identity gate.
    const Vector<double> cheap = w.W * e - sim * p.projected_outputs().col(0) + sim * k.o_star;
    EXPECT_LT(rel_diff(cheap, edited), 1e-11);
  }
}

TEST(Perfusion, CheapFormEqualsDirectFormAndScaleOfCDoesNotMatter) {
  std::mt19937_64 rng(4);
  const Index in = 32, out = 26;
  const Stats s = make_stats(in, rng);
  const Stored<double> w = store<double>(random_matrix(out, in, rng), Layout::in_out);
  for (const MultiConcept mode : {MultiConcept::additive, MultiConcept::exact}) {
    SCOPED_TRACE(mode == MultiConcept::additive ? "additive" : "exact");
    for (const Index m : {1, 3}) {
      const std::vector<PerfusionConcept> cs = make_concepts(m, in, out, rng);
      const Perfusion p(w.view(), s.factor, cs, mode);
      for (const double c : {123.0, 1e-3}) {
        SpdOptions scaled;
        scaled.scale = c;
        const Perfusion q(w.view(), SpdFactor(s.C, scaled), cs, mode);
        EXPECT_LT((q.similarity_vectors() - p.similarity_vectors()).norm() / p.similarity_vectors().norm(), 1e-12);
        EXPECT_LT((q.projected_outputs() * q.dual_basis().transpose() -
                   p.projected_outputs() * p.dual_basis().transpose()).norm(),
                  1e-12 * (p.projected_outputs() * p.dual_basis().transpose()).norm());
        for (int trial = 0; trial < 3; ++trial) {
          // Tokens near a concept's input open its gate part way.
          const Vector<double> e = trial == 0 ? random_vector(in, rng)
                                              : Vector<double>(cs[0].i_star + 0.1 * random_vector(in, rng));
          EXPECT_LT((q.similarity(e) - p.similarity(e)).norm(), 1e-12 * (1 + p.similarity(e).norm()));
          EXPECT_LT(rel_diff(q.output(w.view(), e), p.output(w.view(), e)), 1e-12);
        }
      }
      for (int trial = 0; trial < 4; ++trial) {
        const Vector<double> e =
            trial % 2 == 0 ? random_vector(in, rng)
                           : Vector<double>(cs[static_cast<std::size_t>(trial) % cs.size()].i_star +
                                            0.05 * random_vector(in, rng));
        EXPECT_LT(rel_diff(p.output(w.view(), e), naive_output(w.W, s.Cinv, cs, mode, e)), 1e-11);
      }
    }
  }
}

TEST(Perfusion, LockKeyIsTheUneditedProjectionOfTheSuperclass) {
  std::mt19937_64 rng(5);
  const Index in = 24, out = 16;
  const Stats s = make_stats(in, rng);
  const ColMatrix<double> W = random_matrix(out, in, rng);
  const Vector<double> i_super = random_vector(in, rng);
  for (const Layout layout : {Layout::out_in, Layout::in_out}) {
    const Stored<float> wf = store<float>(W, layout);
    const Stored<bf16> wb = store<bf16>(W, layout);
    const Vector<double> kf = edit::lock_key(wf.view(), i_super), kb = edit::lock_key(wb.view(), i_super);
    EXPECT_LT(rel_diff(kf, wf.W * i_super), 1e-14);
    EXPECT_LT(rel_diff(kb, wb.W * i_super), 1e-14);
    // Key path: o*_K = W_K i_super, so the concept's token maps to a gated superclass key.
    std::vector<PerfusionConcept> cs = make_concepts(1, in, out, rng);
    cs[0].o_star = kf;
    const Perfusion p(wf.view(), s.factor, cs);
    EXPECT_LT(rel_diff(p.output(wf.view(), cs[0].i_star), sigmoid((1 - cs[0].beta) / cs[0].tau) * kf), 1e-12);
  }
  expect_error([&] { (void)edit::lock_key(store<float>(W, Layout::out_in).view(), random_vector(in + 1, rng)); },
               "i_super has 25 entries but W is out x in = 16x24");
}

// ---- the fused forward ---------------------------------------------------------------------------

// Forward of `tokens` rows against the naive direct form, elementwise within a bound of fp32
// accumulation over in + r terms of the absolute values involved.
template <class TW>
void check_forward(Layout layout, Index tokens, MultiConcept mode, std::uint64_t seed) {
  SCOPED_TRACE(std::string(type_name<TW>()) + " " + std::string(lowrank::to_string(layout)) + " tokens " +
               std::to_string(tokens) + (mode == MultiConcept::additive ? " additive" : " exact"));
  std::mt19937_64 rng(seed);
  const Index in = 48, out = 40, m = 3;
  const Stats s = make_stats(in, rng);
  const Stored<TW> w = store<TW>(random_matrix(out, in, rng), layout);
  const std::vector<PerfusionConcept> cs = make_concepts(m, in, out, rng);
  const Perfusion p(w.view(), s.factor, cs, mode);
  ASSERT_EQ(p.rank(), m);
  // X with padding between rows; a third of the tokens sit near a concept's input (gates open).
  Strided<float> x = make_matrix<float>(tokens, in, Order::padded_row, rng);
  for (Index t = 0; t < tokens; t += 3) {
    const Vector<double> e = cs[static_cast<std::size_t>(t / 3 % m)].i_star + 0.05 * random_vector(in, rng);
    for (Index i = 0; i < in; ++i) x.view(t, i) = static_cast<float>(e(i));
  }
  if (tokens > 1)  // and one token is exactly i*_1
    for (Index i = 0; i < in; ++i) x.view(1, i) = static_cast<float>(cs[1].i_star(i));
  RowMatrix<float> y = RowMatrix<float>::Constant(tokens, out, 7.0f);
  p.forward(lowrank::MatrixView<const float>(x.view), w.view(), lowrank::view(y));
  const double u = 0x1.0p-24;
  const ColMatrix<double> D = p.dual_basis(), P = p.projected_outputs();
  for (Index t = 0; t < tokens; ++t) {
    Vector<double> e(in);
    for (Index i = 0; i < in; ++i) e(i) = x.view(t, i);
    const Vector<double> expect = naive_output(w.W, s.Cinv, cs, mode, e);
    const Vector<double> abs_de = D.cwiseAbs().transpose() * e.cwiseAbs();
    for (Index o = 0; o < out; ++o) {
      double scale = w.W.row(o).cwiseAbs().dot(e.cwiseAbs()) + P.row(o).cwiseAbs().dot(abs_de);
      for (const auto& k : cs) scale += std::abs(k.o_star(o));
      const double tol = static_cast<double>(in + m + 4) * u * scale;
      EXPECT_NEAR(y(t, o), expect(o), tol) << "token " << t << " output " << o;
    }
  }
}

TEST(Perfusion, ForwardEqualsNaiveFp32AndBf16BothLayouts) {
  std::uint64_t seed = 100;
  for (const MultiConcept mode : {MultiConcept::additive, MultiConcept::exact})
    for (const Layout layout : {Layout::out_in, Layout::in_out})
      for (const Index tokens : {1, 5, 70}) {  // 70 >= lora_forward_gemm_tokens: the packed GEMM path
        check_forward<float>(layout, tokens, mode, ++seed);
        check_forward<bf16>(layout, tokens, mode, ++seed);
      }
  static_assert(lowrank::lora_forward_gemm_tokens <= 70);
}

TEST(Perfusion, ForwardEqualsNaiveFp16AndFp64) {
  std::uint64_t seed = 200;
  for (const Layout layout : {Layout::out_in, Layout::in_out})
    for (const Index tokens : {3, 70}) {
      check_forward<f16>(layout, tokens, MultiConcept::exact, ++seed);
      check_forward<double>(layout, tokens, MultiConcept::additive, ++seed);
    }
}

TEST(Perfusion, NoConceptsIsTheBaseForward) {
  std::mt19937_64 rng(6);
  const Index in = 20, out = 12, tokens = 7;
  const Stats s = make_stats(in, rng);
  const Stored<float> w = store<float>(random_matrix(out, in, rng), Layout::out_in);
  for (const MultiConcept mode : {MultiConcept::additive, MultiConcept::exact}) {
    const Perfusion p(w.view(), s.factor, std::vector<PerfusionConcept>{}, mode);
    EXPECT_EQ(p.concepts(), 0);
    EXPECT_EQ(p.rank(), 0);
    const RowMatrix<float> x = random_matrix(tokens, in, rng).cast<float>();
    RowMatrix<float> y(tokens, out), base(tokens, out);
    p.forward(lowrank::view(x), w.view(), lowrank::view(y));
    lowrank::linear_forward(lowrank::view(x), w.view(), lowrank::view(base));
    EXPECT_EQ(y, base);
  }
}

// ---- several concepts ----------------------------------------------------------------------------

TEST(Perfusion, ExactBasisIsCInverseOrthonormalAndSpansTheInputs) {
  std::mt19937_64 rng(7);
  const Index in = 30, out = 22, m = 4;
  const Stats s = make_stats(in, rng);
  const Stored<double> w = store<double>(random_matrix(out, in, rng), Layout::out_in);
  const std::vector<PerfusionConcept> cs = make_concepts(m, in, out, rng);
  const Perfusion p(w.view(), s.factor, cs, MultiConcept::exact);
  ASSERT_EQ(p.rank(), m);
  const ColMatrix<double>& U = p.basis();
  EXPECT_LT((U.transpose() * s.Cinv * U - ColMatrix<double>::Identity(m, m)).norm(), 1e-12);
  EXPECT_LT((p.dual_basis() - s.Cinv * U).norm(), 1e-11 * (s.Cinv * U).norm());
  // span{u_k} = span{i*_c}: [U I*] has rank m.
  const ColMatrix<double> I = concept_inputs(cs, in);
  ColMatrix<double> both(in, 2 * m);
  both << U, I;
  const Eigen::VectorXd sv = reference_svd(both, false).S;
  EXPECT_GT(sv(m - 1), 1e-3 * sv(0));
  EXPECT_LT(sv(m), 1e-12 * sv(0));
  // The projector is the basis-free one.
  const ColMatrix<double> projector = naive_projector(s.Cinv, I);
  EXPECT_LT((U * p.dual_basis().transpose() - projector).norm(), 1e-11 * projector.norm());
  // W (e - sum_k u_k u_k^T C^-1 e) = 0 at e = i*_c; the output there is the gates' sum alone.
  for (const auto& k : cs) {
    const Vector<double> removed = w.W * (k.i_star - U * (p.dual_basis().transpose() * k.i_star));
    EXPECT_LT(removed.norm(), 1e-12 * (w.W * k.i_star).norm());
    Vector<double> gates_only = Vector<double>::Zero(out);
    for (const auto& j : cs)
      gates_only += sigmoid((naive_similarity(s.Cinv, j.i_star, k.i_star) - j.beta) / j.tau) * j.o_star;
    EXPECT_LT(rel_diff(p.output(w.view(), k.i_star), gates_only), 1e-12);
  }
  // The additive form does not vanish there when the inputs are not C^-1-orthogonal.
  const Perfusion a(w.view(), s.factor, cs, MultiConcept::additive);
  EXPECT_GT(rel_diff(a.output(w.view(), cs[0].i_star), p.output(w.view(), cs[0].i_star)), 1e-3);
}

TEST(Perfusion, ExactWithOneConceptIsTheSingleConceptOp) {
  std::mt19937_64 rng(8);
  const Index in = 28, out = 15;
  const Stats s = make_stats(in, rng);
  const Stored<float> w = store<float>(random_matrix(out, in, rng), Layout::in_out);
  const std::vector<PerfusionConcept> cs = make_concepts(1, in, out, rng);
  const Perfusion add(w.view(), s.factor, cs, MultiConcept::additive);
  const Perfusion exact(w.view(), s.factor, cs, MultiConcept::exact);
  // u = i* / sqrt(energy), C^-1 u = a sqrt(energy): the same rank-1 term.
  EXPECT_LT((exact.projected_outputs() * exact.dual_basis().transpose() -
             add.projected_outputs() * add.dual_basis().transpose()).norm(),
            1e-12 * (add.projected_outputs() * add.dual_basis().transpose()).norm());
  for (int trial = 0; trial < 4; ++trial) {
    const Vector<double> e = trial == 0 ? cs[0].i_star : Vector<double>(cs[0].i_star + 0.3 * random_vector(in, rng));
    EXPECT_LT(rel_diff(exact.output(w.view(), e), add.output(w.view(), e)), 1e-12);
    EXPECT_LT(rel_diff(exact.output(w.view(), e), naive_output(w.W, s.Cinv, cs, MultiConcept::additive, e)), 1e-11);
  }
}

TEST(Perfusion, OrthogonalInputsMakeExactAndAdditiveAgree) {
  std::mt19937_64 rng(9);
  const Index in = 26, out = 19, m = 3;
  const Stats s = make_stats(in, rng);
  const Stored<float> w = store<float>(random_matrix(out, in, rng), Layout::out_in);
  std::vector<PerfusionConcept> cs = make_concepts(m, in, out, rng);
  // Gram-Schmidt in the C^-1 metric with the naive inverse.
  for (Index c = 1; c < m; ++c)
    for (Index j = 0; j < c; ++j) {
      Vector<double>& ic = cs[static_cast<std::size_t>(c)].i_star;
      const Vector<double>& ij = cs[static_cast<std::size_t>(j)].i_star;
      ic -= (ic.dot(s.Cinv * ij) / ij.dot(s.Cinv * ij)) * ij;
    }
  const ColMatrix<double> I = concept_inputs(cs, in);
  const ColMatrix<double> G = I.transpose() * s.Cinv * I;
  EXPECT_LT((G - ColMatrix<double>(G.diagonal().asDiagonal())).norm(), 1e-12 * G.norm());
  const Perfusion add(w.view(), s.factor, cs, MultiConcept::additive);
  const Perfusion exact(w.view(), s.factor, cs, MultiConcept::exact);
  const RowMatrix<float> x = random_matrix(6, in, rng).cast<float>();
  RowMatrix<float> ya(6, out), ye(6, out);
  add.forward(lowrank::view(x), w.view(), lowrank::view(ya));
  exact.forward(lowrank::view(x), w.view(), lowrank::view(ye));
  EXPECT_LT((ya - ye).norm(), 1e-5 * ya.norm());
  for (int trial = 0; trial < 4; ++trial) {
    const Vector<double> e = trial < m ? cs[static_cast<std::size_t>(trial)].i_star : random_vector(in, rng);
    EXPECT_LT(rel_diff(exact.output(w.view(), e), add.output(w.view(), e)), 1e-11);
  }
}

TEST(Perfusion, ExactWithDependentInputsUsesTheirSpan) {
  std::mt19937_64 rng(10);
  const Index in = 24, out = 14;
  const Stats s = make_stats(in, rng);
  const Stored<double> w = store<double>(random_matrix(out, in, rng), Layout::out_in);
  std::vector<PerfusionConcept> cs = make_concepts(3, in, out, rng);
  cs[2].i_star = 2.0 * cs[0].i_star;  // the same direction twice (e.g. one module merged twice)
  const Perfusion p(w.view(), s.factor, cs, MultiConcept::exact);
  EXPECT_EQ(p.rank(), 2);
  EXPECT_EQ(p.concepts(), 3);
  ColMatrix<double> span(in, 2);
  span << cs[0].i_star, cs[1].i_star;
  for (int trial = 0; trial < 3; ++trial) {
    const Vector<double> e = trial == 0 ? cs[2].i_star : random_vector(in, rng);
    EXPECT_LT(rel_diff(p.output(w.view(), e), naive_output(w.W, s.Cinv, cs, MultiConcept::exact, e, &span)), 1e-11);
  }
}

TEST(Perfusion, MergingIsConcatenationInAnyOrder) {
  std::mt19937_64 rng(11);
  const Index in = 32, out = 20;
  const Stats s = make_stats(in, rng);
  const Stored<bf16> w = store<bf16>(random_matrix(out, in, rng), Layout::in_out);
  const std::vector<PerfusionConcept> all = make_concepts(3, in, out, rng);
  const std::vector<PerfusionConcept> first(all.begin(), all.begin() + 2), second(all.begin() + 2, all.end());
  for (const MultiConcept mode : {MultiConcept::additive, MultiConcept::exact}) {
    SCOPED_TRACE(mode == MultiConcept::additive ? "additive" : "exact");
    const Perfusion a(w.view(), s.factor, first, mode), b(w.view(), s.factor, second, mode);
    const Perfusion together(w.view(), s.factor, all, mode);
    const Perfusion ab = Perfusion::merge(w.view(), s.factor, a, b, mode);
    const Perfusion ba = Perfusion::merge(w.view(), s.factor, b, a, mode);
    ASSERT_EQ(ab.concepts(), 3);
    ASSERT_EQ(ba.concepts(), 3);
    // Concatenation in the order given, gates included.
    EXPECT_EQ(ab.concept_list()[2].i_star, all[2].i_star);
    EXPECT_EQ(ba.concept_list()[0].i_star, all[2].i_star);
    EXPECT_EQ(ba.beta(0), all[2].beta);
    EXPECT_EQ(ba.tau(0), all[2].tau);
    for (int trial = 0; trial < 4; ++trial) {
      const Vector<double> e =
          trial < 3 ? Vector<double>(all[static_cast<std::size_t>(trial)].i_star + 0.05 * random_vector(in, rng))
                    : random_vector(in, rng);
      const Vector<double> ref = naive_output(w.W, s.Cinv, all, mode, e);
      EXPECT_LT(rel_diff(together.output(w.view(), e), ref), 1e-11);
      EXPECT_LT(rel_diff(ab.output(w.view(), e), ref), 1e-11);
      EXPECT_LT(rel_diff(ba.output(w.view(), e), ref), 1e-11);
    }
    const RowMatrix<float> x = random_matrix(5, in, rng).cast<float>();
    RowMatrix<float> y_ab(5, out), y_ba(5, out);
    ab.forward(lowrank::view(x), w.view(), lowrank::view(y_ab));
    ba.forward(lowrank::view(x), w.view(), lowrank::view(y_ba));
    EXPECT_LT((y_ab - y_ba).norm(), 1e-5 * y_ab.norm());
  }
  // A span of pointers, and a gate changed before merging travels with its concept.
  Perfusion a(w.view(), s.factor, first), b(w.view(), s.factor, second);
  a.set_gate(1, 0.6, 0.2);
  const Perfusion* modules[] = {&b, &a};
  const Perfusion m = Perfusion::merge(w.view(), s.factor, std::span<const Perfusion* const>(modules));
  EXPECT_EQ(m.beta(2), 0.6);
  EXPECT_EQ(m.tau(2), 0.2);
  expect_error([&] {
    const Perfusion* bad[] = {&a, nullptr};
    (void)Perfusion::merge(w.view(), s.factor, std::span<const Perfusion* const>(bad));
  }, "modules[1] is a null pointer");
  const Stats s2 = make_stats(in - 1, rng);
  const Stored<bf16> w2 = store<bf16>(random_matrix(out, in - 1, rng), Layout::in_out);
  expect_error([&] { (void)Perfusion::merge(w2.view(), s2.factor, a, b); },
               "modules[0] was prepared for out x in = 20x32 but W is out x in = 20x31");
}

TEST(Perfusion, SetGateChangesOnlyTheGates) {
  std::mt19937_64 rng(12);
  const Index in = 34, out = 21, tokens = 9;
  const Stats s = make_stats(in, rng);
  const Stored<float> w = store<float>(random_matrix(out, in, rng), Layout::out_in);
  std::vector<PerfusionConcept> cs = make_concepts(2, in, out, rng);
  Perfusion p(w.view(), s.factor, cs, MultiConcept::exact);
  const ColMatrix<double> basis = p.basis(), dual = p.dual_basis(), projected = p.projected_outputs();
  const ColMatrix<double> a = p.similarity_vectors();
  RowMatrix<float> x(tokens, in);
  for (Index t = 0; t < tokens; ++t) {
    const Vector<double> e = cs[static_cast<std::size_t>(t % 2)].i_star * (0.5 + 0.1 * static_cast<double>(t)) +
                             0.05 * random_vector(in, rng);
    x.row(t) = e.transpose().cast<float>();
  }
  RowMatrix<float> y_train(tokens, out), y_eval(tokens, out);
  p.forward(lowrank::view(x), w.view(), lowrank::view(y_train));
  // lucidrains' eval gate on concept 0 (trained with 0.75 / 0.1).
  p.set_gate(0, 0.70, 0.15);
  EXPECT_EQ(p.beta(0), 0.70);
  EXPECT_EQ(p.tau(0), 0.15);
  EXPECT_EQ(p.beta(1), cs[1].beta);
  EXPECT_EQ(p.tau(1), cs[1].tau);
  EXPECT_EQ(p.basis(), basis);
  EXPECT_EQ(p.dual_basis(), dual);
  EXPECT_EQ(p.projected_outputs(), projected);
  EXPECT_EQ(p.similarity_vectors(), a);
  p.forward(lowrank::view(x), w.view(), lowrank::view(y_eval));
  cs[0].beta = 0.70;
  cs[0].tau = 0.15;
  for (Index t = 0; t < tokens; ++t) {
    const Vector<double> e = x.row(t).cast<double>().transpose();
    const Vector<double> expect = naive_output(w.W, s.Cinv, cs, MultiConcept::exact, e);
    EXPECT_LT(rel_diff(y_eval.row(t).cast<double>().transpose(), expect), 1e-5) << t;
    // The change is (g_new - g_old) o*_0 and nothing else.
    const double sim = naive_similarity(s.Cinv, cs[0].i_star, e);
    const Vector<double> delta = (sigmoid((sim - 0.70) / 0.15) - sigmoid((sim - 0.75) / 0.1)) * cs[0].o_star;
    const Vector<double> got = (y_eval.row(t) - y_train.row(t)).cast<double>().transpose();
    EXPECT_LT((got - delta).norm(), 1e-5 * (1 + expect.norm())) << t;
  }
  // Bad gates leave the state unchanged.
  expect_error([&] { p.set_gate(2, 0.7, 0.15); }, "concept 2 is out of range: there are 2 concepts");
  expect_error([&] { p.set_gate(-1, 0.7, 0.15); }, "concept -1 is out of range");
  expect_error([&] { p.set_gate(0, 0.7, 0.0); }, "tau is 0");
  expect_error([&] { p.set_gate(0, 0.7, -0.1); }, "tau is -0.1");
  expect_error([&] { p.set_gate(0, NAN, 0.1); }, "beta is nan");
  expect_error([&] { p.set_gate(0, 0.5, INFINITY); }, "tau is inf");
  EXPECT_EQ(p.beta(0), 0.70);
  EXPECT_EQ(p.tau(0), 0.15);
  expect_error([&] { (void)p.beta(3); }, "concept 3 is out of range");
}

// ---- errors --------------------------------------------------------------------------------------

TEST(Perfusion, BadInputThrowsWithYUnchanged) {
  std::mt19937_64 rng(13);
  const Index in = 10, out = 6;
  const Stats s = make_stats(in, rng);
  const Stored<float> w = store<float>(random_matrix(out, in, rng), Layout::out_in);
  const std::vector<PerfusionConcept> good = make_concepts(2, in, out, rng);
  const auto prepare = [&](std::vector<PerfusionConcept> cs) {
    (void)Perfusion(w.view(), s.factor, cs, MultiConcept::exact);
  };
  {
    auto cs = good;
    cs[1].i_star = random_vector(in - 1, rng);
    expect_error([&] { prepare(cs); }, "concepts[1].i_star has 9 entries but C is 10x10");
  }
  {
    auto cs = good;
    cs[0].o_star = random_vector(out + 1, rng);
    expect_error([&] { prepare(cs); }, "concepts[0].o_star has 7 entries but W is out x in = 6x10");
  }
  {
    auto cs = good;
    cs[1].tau = 0;
    expect_error([&] { prepare(cs); }, "concept 1: tau is 0; it must be finite and > 0");
    cs[1].tau = -0.1;
    expect_error([&] { prepare(cs); }, "tau is -0.1");
    cs[1].tau = NAN;
    expect_error([&] { prepare(cs); }, "tau is nan");
  }
  {
    auto cs = good;
    cs[0].beta = INFINITY;
    expect_error([&] { prepare(cs); }, "concept 0: beta is inf");
  }
  {
    auto cs = good;
    cs[1].i_star.setZero();
    expect_error([&] { prepare(cs); }, "concepts[1]: the energy i*^T C^-1 i* is 0");
    cs[1].i_star = good[1].i_star;
    cs[1].i_star(3) = NAN;
    expect_error([&] { prepare(cs); }, "concepts[1].i_star (10 entries) has a NaN");
    cs[1].i_star = good[1].i_star;
    cs[1].o_star(0) = -INFINITY;
    expect_error([&] { prepare(cs); }, "concepts[1].o_star (6 entries) has a NaN");
  }
  {
    RowMatrix<float> bad = w.data;
    bad(2, 4) = NAN;
    expect_error([&] { (void)Perfusion(WeightView<const float>{lowrank::view(bad), Layout::out_in}, s.factor, good); },
                 "W i* is not finite");
  }
  const WeightView<const float> transposed{lowrank::view(w.data), Layout::in_out};  // in x out = 10 x 6: wrong
  expect_error([&] { (void)Perfusion(transposed, s.factor, good); }, "W is out x in = 10x6 but C is 10x10");
  expect_error([&] { (void)Perfusion(w.view(), SpdFactor{}, good); }, "C is an empty factor");
  expect_error([&] { (void)Perfusion(w.view(), s.factor, good, static_cast<MultiConcept>(7)); }, "mode is 7");

  const Perfusion p(w.view(), s.factor, good);
  RowMatrix<float> x = random_matrix(4, in, rng).cast<float>();
  RowMatrix<float> y = RowMatrix<float>::Constant(4, out, 3.0f);
  const RowMatrix<float> before = y;
  expect_error([&] { p.forward(lowrank::view(x).transposed(), w.view(), lowrank::view(y)); },
               "X is 10x4 but the edit has 10 input features");
  RowMatrix<float> y_short(3, out);
  y_short.setConstant(3.0f);
  expect_error([&] { p.forward(lowrank::view(x), w.view(), lowrank::view(y_short)); },
               "Y is 3x6 but must be tokens x out = 4x6");
  EXPECT_TRUE((y_short.array() == 3.0f).all());
  expect_error([&] { p.forward(lowrank::view(x), transposed, lowrank::view(y)); },
               "W is out x in = 10x6 but the edit was prepared for out x in = 6x10");
  // Errors found by lora_forward come before any write too.
  RowMatrix<float> xy = random_matrix(4, in, rng).cast<float>();
  const RowMatrix<float> xy_before = xy;
  expect_error([&] { p.forward(lowrank::view(xy), w.view(), lowrank::row_major(xy.data(), 4, out, in)); },
               "overlaps X");
  EXPECT_EQ(xy, xy_before);
  EXPECT_EQ(y, before);
  expect_error([&] { (void)p.similarity(random_vector(in + 2, rng)); }, "e has 12 entries but the edit has 10");
  expect_error([&] { (void)p.output(w.view(), random_vector(in + 2, rng)); }, "e has 12 entries");
}

}  // namespace
