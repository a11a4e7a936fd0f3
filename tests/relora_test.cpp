// Tests of the merge-based training primitives: ReLoRA (adapt/relora.hpp), moment pruning
// (optim/prune.hpp), the jagged cosine schedule and triggers (optim/schedule.hpp) and SwitchLoRA
// (adapt/switchlora.hpp), against naive float64 references and the oracles of
// ../shared/reference/optimizers.md sections 9.5 and 9.8.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numbers>
#include <random>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "lowrank/adapt/init.hpp"
#include "lowrank/adapt/lora.hpp"
#include "lowrank/adapt/relora.hpp"
#include "lowrank/adapt/switchlora.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/optim/adam.hpp"
#include "lowrank/optim/prune.hpp"
#include "lowrank/optim/schedule.hpp"
#include "test_util.hpp"
#include "weight_util.hpp"

namespace {

using lowrank::bf16;
using lowrank::Error;
using lowrank::Index;
using lowrank::Layout;
using lowrank::RandomStream;
using lowrank::RowMatrix;
using lowrank::adapt::LoraAdapter;
using lowrank_test::from_double;
using lowrank_test::to_double;
using lowrank_test::unit_roundoff;
namespace adapt = lowrank::adapt;
namespace optim = lowrank::optim;

using lowrank_test::bitwise_equal;
using lowrank_test::delta_ref;
using lowrank_test::gaussian;
using lowrank_test::load;
using lowrank_test::M64;
using lowrank_test::store;

template <class T>
LoraAdapter<T> random_adapter(Index out, Index in, Index r, double alpha, Layout layout, std::uint64_t seed) {
  LoraAdapter<T> a;
  a.A = gaussian(r, in, seed, 0.5).cast<T>();
  a.B = gaussian(out, r, seed + 1, 0.5).cast<T>();
  a.alpha = alpha;
  a.layout = layout;
  return a;
}

// |s| |B| |A| (out x in): scale of the rounding error of the delta.
template <class T>
M64 abs_delta_ref(const LoraAdapter<T>& a) {
  LoraAdapter<T> b = a;
  b.A = a.A.cwiseAbs();
  b.B = a.B.cwiseAbs();
  b.alpha = std::abs(a.alpha);
  return delta_ref(b);
}

bool bitwise_equal(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

// Runs f, expects a lowrank::Error whose message contains every fragment.
template <class F>
void expect_error(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
    ADD_FAILURE() << "no lowrank::Error thrown";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* frag : fragments) EXPECT_NE(msg.find(frag), std::string::npos) << "message: " << msg << "\nmissing: " << frag;
  }
}

// Accumulation unit roundoff of a storage type in rank_update (fp64 for fp64, fp32 otherwise).
template <class TW>
constexpr double accum_roundoff() {
  return std::is_same_v<TW, double> ? 0x1.0p-53 : 0x1.0p-24;
}

// ============================================================================================
// ReLoRA
// ============================================================================================

// A linear layer y = W x + s B A x with squared loss L = 0.5 sum ||y - target||^2 over a batch
// (rows of X): the naive fp64 gradients dL/dA = s B^T E^T X and dL/dB = s E^T (X A^T), E = Y - T.
struct LoraGrads {
  M64 dA, dB;
};
template <class T>
LoraGrads lora_grads(const M64& W, const LoraAdapter<T>& a, const M64& X, const M64& target) {
  const double s = a.alpha / double(a.rank());
  const Index n = X.rows(), out = W.rows(), in = W.cols(), r = a.rank();
  M64 E(n, out);
  for (Index b = 0; b < n; ++b)
    for (Index o = 0; o < out; ++o) {
      double y = 0;
      for (Index j = 0; j < in; ++j) {
        double ba = 0;
        for (Index k = 0; k < r; ++k) ba += double(a.B(o, k)) * double(a.A(k, j));
        y += (W(o, j) + s * ba) * X(b, j);
      }
      E(b, o) = y - target(b, o);
    }
  LoraGrads g{M64::Zero(r, in), M64::Zero(out, r)};
  for (Index b = 0; b < n; ++b)
    for (Index k = 0; k < r; ++k) {
      double ax = 0, bte = 0;
      for (Index j = 0; j < in; ++j) ax += double(a.A(k, j)) * X(b, j);
      for (Index o = 0; o < out; ++o) bte += double(a.B(o, k)) * E(b, o);
      for (Index j = 0; j < in; ++j) g.dA(k, j) += s * bte * X(b, j);
      for (Index o = 0; o < out; ++o) g.dB(o, k) += s * E(b, o) * ax;
    }
  return g;
}

template <class TW>
class ReloraMergeTyped : public ::testing::Test {};
using MergeTypes = ::testing::Types<double, float, bf16>;
TYPED_TEST_SUITE(ReloraMergeTyped, MergeTypes);

// §9.5: the forward before the merge equals the forward after (B = 0), within W's rounding; A is
// re-drawn exactly as init_default; both layouts.
TYPED_TEST(ReloraMergeTyped, PreservesFunctionAndReinitialises) {
  using TW = TypeParam;
  for (Layout layout : {Layout::out_in, Layout::in_out}) {
    SCOPED_TRACE(std::string(lowrank_test::type_name<TW>()) + " " + std::string(lowrank::to_string(layout)));
    const Index out = 9, in = 7, r = 3;
    auto a = random_adapter<float>(out, in, r, 6.0, layout, 11);
    const M64 W0 = gaussian(out, in, 5);
    RowMatrix<TW> Ws = store<TW>(W0, layout);
    const M64 Wq = load(Ws, layout);  // W as stored
    const M64 effective = Wq + delta_ref(a);
    const M64 bound_scale = Wq.cwiseAbs() + abs_delta_ref(a);
    const M64 X = gaussian(4, in, 21);

    adapt::merge_and_reinit(lowrank::weight(Ws, layout), a, /*seed=*/77, /*stream=*/3);
    const M64 W1 = load(Ws, layout);
    // One rounding into storage plus fp32/fp64 accumulation of r + 1 terms.
    const double u = unit_roundoff<TW>(), acc = 4.0 * (r + 2) * accum_roundoff<TW>();
    for (Index i = 0; i < out; ++i)
      for (Index j = 0; j < in; ++j)
        EXPECT_LE(std::abs(W1(i, j) - effective(i, j)), u * std::abs(effective(i, j)) + acc * bound_scale(i, j))
            << i << "," << j;
    // Forward: X (W + s B A)^T before, X W1^T + s X A'^T B'^T after.
    const M64 y_before = X * effective.transpose();
    const M64 y_after = X * W1.transpose() + (a.alpha / r) * X * (a.B.template cast<double>() * a.A.template cast<double>()).transpose();
    const M64 y_bound = X.cwiseAbs() * bound_scale.transpose() * (u + acc) * 2;
    for (Index b = 0; b < X.rows(); ++b)
      for (Index o = 0; o < out; ++o) EXPECT_LE(std::abs(y_after(b, o) - y_before(b, o)), y_bound(b, o));

    EXPECT_TRUE(a.B.isZero(0));
    EXPECT_EQ(a.A.rows(), r);
    EXPECT_EQ(a.A.cols(), in);
    const auto expect = adapt::init_default<float>(out, in, r, 6.0, layout, 77, 3);
    EXPECT_TRUE(bitwise_equal(a.A, expect.A));
    EXPECT_FALSE(a.A.isZero(0));
    EXPECT_LE(a.A.cwiseAbs().maxCoeff(), 1.0 / std::sqrt(double(in)));
    EXPECT_EQ(a.layout, layout);
    EXPECT_EQ(a.alpha, 6.0);
  }
}

// §9.5: after the re-init dL/dA = 0 and dL/dB != 0 at the first step; the relora#18 state
// (A = B = 0) has both gradients zero and is refused.
TEST(Relora, GradientsAfterReinitAndTheZeroZeroDeadEnd) {
  const Index out = 6, in = 5, r = 2;
  auto a = random_adapter<double>(out, in, r, 4.0, Layout::out_in, 3);
  RowMatrix<double> W = gaussian(out, in, 4);
  const M64 X = gaussian(8, in, 5), target = gaussian(8, out, 6);

  adapt::merge_and_reinit(lowrank::weight(W, Layout::out_in), a, 9);
  const LoraGrads g = lora_grads(W, a, X, target);
  EXPECT_TRUE(g.dA.isZero(0)) << g.dA;
  EXPECT_GT(g.dB.norm(), 1e-3);

  // relora_wrap: the same live start.
  adapt::ReloraConfig cfg;
  cfg.rank = r;
  cfg.alpha = 4;
  const auto w = adapt::relora_wrap<double>(out, in, Layout::out_in, cfg, 10);
  EXPECT_TRUE(w.B.isZero(0));
  EXPECT_FALSE(w.A.isZero(0));
  EXPECT_NO_THROW(adapt::check_relora_trainable(w));
  EXPECT_GT(lora_grads(W, w, X, target).dB.norm(), 1e-3);

  // The reference's keep_original_weights=True wrap: A = B = 0, both gradients vanish.
  LoraAdapter<double> dead = w;
  dead.A.setZero();
  const LoraGrads gd = lora_grads(W, dead, X, target);
  EXPECT_TRUE(gd.dA.isZero(0));
  EXPECT_TRUE(gd.dB.isZero(0));
  expect_error([&] { adapt::check_relora_trainable(dead); }, {"check_relora_trainable", "both zero", "relora#18", "2x5"});
  // One merge_and_reinit brings it back to life.
  adapt::merge_and_reinit(lowrank::weight(W, Layout::out_in), dead, 12);
  EXPECT_NO_THROW(adapt::check_relora_trainable(dead));
  EXPECT_GT(lora_grads(W, dead, X, target).dB.norm(), 1e-3);
}

// §9.5: trainable_scaling (tanh(s_param) with s_param = 0 after a merge) is refused.
TEST(Relora, TrainableScalingIsRefused) {
  adapt::ReloraConfig cfg;
  cfg.rank = 4;
  cfg.trainable_scaling = true;
  expect_error([&] { (void)adapt::relora_wrap<float>(16, 8, Layout::out_in, cfg, 1); },
               {"relora_wrap", "trainable_scaling", "tanh(0) = 0"});
  cfg.trainable_scaling = false;
  cfg.rank = 9;
  expect_error([&] { (void)adapt::relora_wrap<float>(16, 8, Layout::out_in, cfg, 1); }, {"relora_wrap", "rank r = 9"});
}

TEST(Relora, MergeAndReinitRefusesBadInputAndChangesNothing) {
  const Index out = 5, in = 4, r = 2;
  const auto good = random_adapter<float>(out, in, r, 2.0, Layout::out_in, 8);
  const RowMatrix<float> W0 = gaussian(out, in, 9).cast<float>();
  auto check = [&](LoraAdapter<float> a, RowMatrix<float> W, Layout layout, std::initializer_list<const char*> frags) {
    const LoraAdapter<float> a0 = a;
    const RowMatrix<float> Wsaved = W;
    expect_error([&] { adapt::merge_and_reinit(lowrank::weight(W, layout), a, 1); }, frags);
    EXPECT_TRUE(bitwise_equal(W, Wsaved));
    EXPECT_TRUE(bitwise_equal(a.A, a0.A));
    EXPECT_TRUE(bitwise_equal(a.B, a0.B));
  };
  // W of the wrong shape.
  check(good, gaussian(out, in + 1, 1).cast<float>(), Layout::out_in, {"merge_and_reinit", "5x5"});
  // Layout mismatch.
  check(good, RowMatrix<float>(W0.transpose()), Layout::in_out, {"merge_and_reinit", "layout"});
  // B's columns disagree with A's rows.
  {
    auto a = good;
    a.B = gaussian(out, r + 1, 2).cast<float>();
    check(a, W0, Layout::out_in, {"merge_and_reinit", "B is 5x3", "A is 2x4"});
  }
  // rank > min(out, in).
  {
    auto a = random_adapter<float>(out, 3, 4, 2.0, Layout::out_in, 3);
    check(a, gaussian(out, 3, 4).cast<float>(), Layout::out_in, {"merge_and_reinit", "rank r = 4", "min(out, in) = 3"});
  }
  // Non-finite factors.
  {
    auto a = good;
    a.A(1, 2) = std::numeric_limits<float>::quiet_NaN();
    check(a, W0, Layout::out_in, {"merge_and_reinit", "adapter.A (2x4)", "(1, 2)"});
    a = good;
    a.B(3, 0) = std::numeric_limits<float>::infinity();
    check(a, W0, Layout::out_in, {"merge_and_reinit", "adapter.B (5x2)", "(3, 0)"});
  }
}

// ============================================================================================
// Moment pruning
// ============================================================================================

std::vector<float> random_values(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(n);
  for (auto& e : x) e = d(rng);
  return x;
}

// Naive fp64 p-quantile of |x| with linear interpolation (full sort).
double quantile_ref(const std::vector<float>& x, double p) {
  std::vector<double> a;
  for (float e : x) a.push_back(std::abs(double(e)));
  std::sort(a.begin(), a.end());
  const double h = p * double(a.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(h));
  const std::size_t hi = std::min(lo + 1, a.size() - 1);
  return a[lo] + (h - double(lo)) * (a[hi] - a[lo]);
}

// §9.5: random pruning keeps ~(1 - p), exactly where the Philox uniform exceeds p, values intact.
TEST(Prune, RandomKeepsAboutOneMinusP) {
  const std::size_t n = 200000;
  for (double p : {0.999, 0.5, 0.9}) {
    SCOPED_TRACE(p);
    const auto x0 = random_values(n, 1);
    auto x = x0;
    const std::size_t kept = optim::prune_random(x, p, 42, 7);
    const double mean = double(n) * (1 - p), sd = std::sqrt(double(n) * p * (1 - p));
    EXPECT_LE(std::abs(double(kept) - mean), 5 * sd) << kept;
    const RandomStream rng(42, 7);
    std::size_t count = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const bool keep = double(rng.uniform(i)) > p;
      count += keep;
      if (keep) {
        EXPECT_EQ(std::memcmp(&x[i], &x0[i], sizeof(float)), 0) << i;
      } else {
        EXPECT_EQ(x[i], 0.0f) << i;
      }
    }
    EXPECT_EQ(count, kept);
  }
  // p = 1 keeps nothing.
  auto y = random_values(1000, 2);
  EXPECT_EQ(optim::prune_random(y, 1.0, 1), 0u);
  EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](float e) { return e == 0.0f; }));
}

// §9.5: magnitude pruning keeps exactly the entries above the p-quantile of |x|.
TEST(Prune, MagnitudeKeepsExactlyAboveTheQuantile) {
  for (std::size_t n : {std::size_t{1}, std::size_t{2}, std::size_t{10}, std::size_t{1000}, std::size_t{1001}}) {
    for (double p : {0.0, 0.1, 0.5, 0.8, 0.9, 0.999, 1.0}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " p " << p);
      const auto x0 = random_values(n, 100 + n);
      auto x = x0;
      const std::size_t kept = optim::prune_magnitude(x, p);
      const double q = quantile_ref(x0, p);
      std::size_t expect_kept = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const bool keep = std::abs(double(x0[i])) > q;
        expect_kept += keep;
        EXPECT_EQ(x[i], keep ? x0[i] : 0.0f) << i;
      }
      EXPECT_EQ(kept, expect_kept);
      if (p == 0.0) {
        EXPECT_EQ(kept, n - 1);  // distinct magnitudes: all but the smallest
      }
      if (p == 1.0) {
        EXPECT_EQ(kept, 0u);
      }
    }
  }
  // Ties: the quantile falls on a repeated magnitude; all ties are pruned.
  std::vector<float> t = {1, -1, 1, 2, -2, 3, 0, -3, 1};
  // |t| sorted: 0 1 1 1 1 2 2 3 3; p = 0.5 -> h = 4 -> q = 1.
  EXPECT_EQ(optim::prune_magnitude(t, 0.5), 4u);
  EXPECT_EQ(t, (std::vector<float>{0, 0, 0, 2, -2, 3, 0, -3, 0}));
  // Interpolation: |x| = 0 1 2 3, p = 0.5 -> h = 1.5 -> q = 1.5.
  std::vector<float> u = {3, -1, 0, 2};
  EXPECT_EQ(optim::prune_magnitude(u, 0.5), 2u);
  EXPECT_EQ(u, (std::vector<float>{3, 0, 0, 2}));
  std::vector<float> empty;
  EXPECT_EQ(optim::prune_magnitude(empty, 0.5), 0u);
}

// §9.5: separate masks for m and v; step untouched unless asked.
TEST(Prune, MomentsUseIndependentMasksAndKeepTheStep) {
  const Index rows = 200, cols = 500;
  optim::AdamState s(rows, cols);
  s.m.setOnes();
  s.v.setOnes();
  s.step = 1234;
  optim::PruneOptions o;
  o.mode = optim::PruneMode::random;
  o.ratio = 0.5;
  o.seed = 5;
  o.stream = 2;
  const auto rep = optim::prune_moments(s, o);
  const double n = double(rows * cols);
  EXPECT_EQ(rep.size, std::size_t(rows * cols));
  EXPECT_EQ(s.step, 1234);
  EXPECT_LE(std::abs(double(rep.kept_m) - n / 2), 5 * std::sqrt(n / 4));
  EXPECT_LE(std::abs(double(rep.kept_v) - n / 2), 5 * std::sqrt(n / 4));
  std::size_t both = 0, km = 0, kv = 0;
  for (Index i = 0; i < s.m.size(); ++i) {
    km += s.m.data()[i] != 0;
    kv += s.v.data()[i] != 0;
    both += s.m.data()[i] != 0 && s.v.data()[i] != 0;
  }
  EXPECT_EQ(km, rep.kept_m);
  EXPECT_EQ(kv, rep.kept_v);
  // Independent masks: P(both kept) = 1/4 (identical masks would give 1/2).
  EXPECT_LE(std::abs(double(both) - n / 4), 5 * std::sqrt(n * 0.25 * 0.75));
  // m's mask is stream 2 * stream, v's 2 * stream + 1.
  std::vector<float> ones(static_cast<std::size_t>(n), 1.0f);
  optim::prune_random(ones, 0.5, 5, 4);
  EXPECT_TRUE(bitwise_equal(ones, std::span<const float>(s.m.data(), ones.size())));
  std::fill(ones.begin(), ones.end(), 1.0f);
  optim::prune_random(ones, 0.5, 5, 5);
  EXPECT_TRUE(bitwise_equal(ones, std::span<const float>(s.v.data(), ones.size())));

  // Magnitude: per-tensor quantiles.
  optim::AdamState t(30, 40);
  const auto mv = random_values(1200, 8), vv = random_values(1200, 9);
  std::vector<float> vv_scaled = vv;
  for (auto& e : vv_scaled) e = e * e * 1e-3f;  // v-like: positive, another scale
  std::copy(mv.begin(), mv.end(), t.m.data());
  std::copy(vv_scaled.begin(), vv_scaled.end(), t.v.data());
  t.step = 77;
  o.mode = optim::PruneMode::magnitude;
  o.ratio = 0.8;
  const auto r2 = optim::prune_moments(t, o);
  auto expect_m = mv, expect_v = vv_scaled;
  EXPECT_EQ(r2.kept_m, optim::prune_magnitude(expect_m, 0.8));
  EXPECT_EQ(r2.kept_v, optim::prune_magnitude(expect_v, 0.8));
  EXPECT_EQ(r2.kept_m, 240u);  // 1200 distinct magnitudes: h = 959.2, entries 960..1199 survive
  EXPECT_TRUE(bitwise_equal(expect_m, std::span<const float>(t.m.data(), 1200)));
  EXPECT_TRUE(bitwise_equal(expect_v, std::span<const float>(t.v.data(), 1200)));
  EXPECT_EQ(t.step, 77);

  // Full zero, and the step reset on request.
  o.mode = optim::PruneMode::zero;
  o.reset_step = true;
  const auto r3 = optim::prune_moments(t, o);
  EXPECT_EQ(r3.kept_m, 0u);
  EXPECT_EQ(r3.kept_v, 0u);
  EXPECT_TRUE(t.m.isZero(0));
  EXPECT_TRUE(t.v.isZero(0));
  EXPECT_EQ(t.step, 0);
}

TEST(Prune, RefusesBadInputAndChangesNothing) {
  auto x0 = random_values(50, 3);
  for (double p : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    auto x = x0;
    expect_error([&] { (void)optim::prune_random(x, p, 1); }, {"prune_random", "ratio p", "50 entries"});
    expect_error([&] { (void)optim::prune_magnitude(x, p); }, {"prune_magnitude", "ratio p"});
    EXPECT_TRUE(bitwise_equal(x, x0));
  }
  auto x = x0;
  x[17] = std::numeric_limits<float>::quiet_NaN();
  const auto xnan = x;
  expect_error([&] { (void)optim::prune_magnitude(x, 0.5); }, {"prune_magnitude", "non-finite", "at 17"});
  EXPECT_TRUE(bitwise_equal(x, xnan));

  optim::AdamState s(4, 5);
  s.m.setConstant(1.0f);
  s.v.setConstant(2.0f);
  s.v(3, 4) = std::numeric_limits<float>::infinity();
  s.step = 9;
  const optim::AdamState s0 = s;
  optim::PruneOptions o;
  o.mode = optim::PruneMode::magnitude;
  o.ratio = 0.5;
  o.reset_step = true;
  expect_error([&] { (void)optim::prune_moments(s, o); }, {"prune_moments", "state.v", "non-finite"});
  EXPECT_TRUE(bitwise_equal(s.m, s0.m));  // m, checked first, was not pruned either
  EXPECT_TRUE(bitwise_equal(s.v, s0.v));
  EXPECT_EQ(s.step, 9);
  o.ratio = 2;
  o.mode = optim::PruneMode::random;
  expect_error([&] { (void)optim::prune_moments(s, o); }, {"prune_moments", "ratio p is 2"});
  EXPECT_TRUE(bitwise_equal(s.m, s0.m));
  EXPECT_EQ(s.step, 9);
  // Random pruning does not read values: a non-finite moment is fine (it is a reset).
  o.ratio = 1;
  EXPECT_NO_THROW((void)optim::prune_moments(s, o));
  EXPECT_TRUE(s.v.isZero(0));

  optim::AdamState bad;
  bad.m = RowMatrix<float>::Ones(3, 4);
  bad.v = RowMatrix<float>::Ones(4, 3);
  o.ratio = 0.5;
  expect_error([&] { (void)optim::prune_moments(bad, o); }, {"prune_moments", "3x4", "4x3"});
  EXPECT_TRUE(bad.m.isOnes(0));
}

// §3.2 (derived) / §9.5: the first step after a full reset late in training moves every entry by
// about lr (1 - b1) / sqrt(1 - b2).
TEST(Prune, PostResetFirstStepMagnitude) {
  for (double beta2 : {0.999, 0.95}) {
    SCOPED_TRACE(beta2);
    optim::AdamConfig cfg;
    cfg.beta1 = 0.9;
    cfg.beta2 = beta2;
    cfg.eps = 1e-8;
    optim::AdamState s(3, 4);
    s.m = gaussian(3, 4, 1).cast<float>();
    s.v = gaussian(3, 4, 2).cwiseAbs().cast<float>();
    s.step = 100000;  // bias correction ~ 1
    optim::PruneOptions o;
    o.mode = optim::PruneMode::zero;
    (void)optim::prune_moments(s, o);
    RowMatrix<float> W = RowMatrix<float>::Zero(3, 4);
    // |g| >= 0.5, so that eps is negligible next to sqrt(1 - b2) |g|.
    RowMatrix<float> G = gaussian(3, 4, 3).unaryExpr([](double g) { return g < 0 ? g - 0.5 : g + 0.5; }).cast<float>();
    ASSERT_TRUE(optim::adam_step(lowrank::view(W), lowrank::view(std::as_const(G)), s, cfg, 1.0));
    const double expect = (1 - cfg.beta1) / std::sqrt(1 - beta2);
    for (Index i = 0; i < 3; ++i)
      for (Index j = 0; j < 4; ++j) {
        EXPECT_NEAR(std::abs(double(W(i, j))), expect, 1e-4 * expect);
        EXPECT_EQ(W(i, j) < 0, G(i, j) > 0);
      }
  }
}

// ============================================================================================
// Schedules
// ============================================================================================

// Independent restatement of §3.3 (the piecewise definition, evaluated with fmod / floor).
double jagged_ref(double t, double N, double W1, double Wr, double C, double eta, double delta) {
  auto c = [&](double p) { return eta + (1 - eta) * 0.5 * (1 + std::cos(std::numbers::pi * p)); };
  if (t < W1) return t / W1;
  const double tp = t + delta;
  const double k = std::fmod(tp, C), j = std::floor(tp / C);
  const double D = std::max(1.0, N - W1);
  if (k < Wr && t >= C) return (k / Wr) * c((j * C + Wr - W1) / D);
  return c((tp - W1) / D);
}

TEST(Schedule, JaggedCosineOracles) {
  optim::JaggedCosine s;
  s.num_training_steps = 1000;
  s.cycle_length = 250;
  s.first_warmup_steps = 50;
  s.restart_warmup_steps = 20;
  s.min_lr_ratio = 0.1;
  EXPECT_EQ(optim::jagged_cosine(s, 0), 0.0);
  EXPECT_DOUBLE_EQ(optim::jagged_cosine(s, 25), 0.5);
  EXPECT_DOUBLE_EQ(optim::jagged_cosine(s, 50), 1.0);                 // mult(W1) = 1
  EXPECT_NEAR(optim::jagged_cosine(s, 525), 0.55, 1e-15);            // p = 1/2
  for (int j = 1; j <= 3; ++j) EXPECT_EQ(optim::jagged_cosine(s, j * 250), 0.0) << j;  // mult(jC) = 0
  // Mid-ramp: half of the cosine value at the ramp's end.
  const double c_end = 0.1 + 0.9 * 0.5 * (1 + std::cos(std::numbers::pi * 220.0 / 950.0));
  EXPECT_NEAR(optim::jagged_cosine(s, 260), 0.5 * c_end, 1e-15);
  // Continuity at t = jC + Wr: the ramp's end value k / Wr * c_end -> c_end equals the cosine there,
  // and the last ramp step is one ramp increment below it.
  for (int j = 1; j <= 3; ++j) {
    const std::int64_t t = j * 250 + 20;
    const double at = optim::jagged_cosine(s, t), before = optim::jagged_cosine(s, t - 1);
    const double end = 0.1 + 0.9 * 0.5 * (1 + std::cos(std::numbers::pi * double(t - 50) / 950.0));
    EXPECT_NEAR(at, end, 1e-15) << j;
    EXPECT_NEAR(before, end * 19.0 / 20.0, 1e-15) << j;
  }
  double mx = 0;
  for (std::int64_t t = 0; t <= 1000; ++t) {
    const double v = optim::jagged_cosine(s, t);
    EXPECT_NEAR(v, jagged_ref(double(t), 1000, 50, 20, 250, 0.1, 0), 1e-14) << t;
    EXPECT_GE(v, 0.0);
    mx = std::max(mx, v);
  }
  EXPECT_LE(mx, 1.0);
  EXPECT_NEAR(optim::jagged_cosine(s, 999), 0.1, 1e-4);  // approaches eta_min

  // adjust_step shifts the cycles; values follow the same definition.
  s.adjust_step = 100;
  for (std::int64_t t = 0; t <= 1000; t += 7) EXPECT_NEAR(optim::jagged_cosine(s, t), jagged_ref(double(t), 1000, 50, 20, 250, 0.1, 100), 1e-14) << t;
  EXPECT_EQ(optim::jagged_cosine(s, 400), 0.0);  // t' = 500: a restart
  // No warmups at all: a plain cosine with restarts that start at the cosine value.
  optim::JaggedCosine z;
  z.num_training_steps = 100;
  z.cycle_length = 50;
  z.min_lr_ratio = 0;
  EXPECT_DOUBLE_EQ(optim::jagged_cosine(z, 0), 1.0);
  EXPECT_NEAR(optim::jagged_cosine(z, 50), 0.5, 1e-15);
}

TEST(Schedule, JaggedCosineRejectsInvalidParameters) {
  optim::JaggedCosine good;
  good.num_training_steps = 1000;
  good.cycle_length = 250;
  good.first_warmup_steps = 50;
  good.restart_warmup_steps = 20;
  EXPECT_NO_THROW(optim::check_jagged_cosine(good));
  auto bad = [&](auto edit, std::initializer_list<const char*> frags) {
    auto s = good;
    edit(s);
    expect_error([&] { (void)optim::jagged_cosine(s, 10); }, frags);
  };
  bad([](auto& s) { s.num_training_steps = 1100; }, {"jagged_cosine", "num_training_steps = 1100", "cycle_length = 250"});
  bad([](auto& s) { s.adjust_step = 220; }, {"jagged_cosine", "adjust_step + first_warmup_steps = 220 + 50"});
  bad([](auto& s) { s.first_warmup_steps = 300; }, {"jagged_cosine", "300", "cycle_length = 250"});
  bad([](auto& s) { s.cycle_length = 0; }, {"jagged_cosine", "cycle_length is 0"});
  bad([](auto& s) { s.num_training_steps = 0; }, {"jagged_cosine", "num_training_steps is 0"});
  bad([](auto& s) { s.restart_warmup_steps = 251; }, {"jagged_cosine", "restart_warmup_steps is 251"});
  bad([](auto& s) { s.first_warmup_steps = -1; }, {"jagged_cosine", "first_warmup_steps is -1"});
  bad([](auto& s) { s.adjust_step = -3; }, {"jagged_cosine", "adjust_step is -3"});
  bad([](auto& s) { s.min_lr_ratio = 1.5; }, {"jagged_cosine", "min_lr_ratio is 1.5"});
  bad([](auto& s) { s.min_lr_ratio = std::numeric_limits<double>::quiet_NaN(); }, {"jagged_cosine", "min_lr_ratio"});
  expect_error([&] { (void)optim::jagged_cosine(good, -1); }, {"jagged_cosine", "step t is -1"});
  // delta + W1 <= N with C = N.
  optim::JaggedCosine s;
  s.num_training_steps = 100;
  s.cycle_length = 100;
  s.first_warmup_steps = 60;
  s.adjust_step = 50;
  expect_error([&] { optim::check_jagged_cosine(s); }, {"jagged_cosine", "60"});
}

TEST(Schedule, ReloraTriggers) {
  for (std::int64_t step = 0; step < 1100; ++step) {
    EXPECT_EQ(optim::relora_merge_due(step, 0, 250), step % 250 == 1) << step;
    EXPECT_EQ(optim::relora_reset_due(step + 100, 100, 250), step % 250 == 1) << step;
  }
  EXPECT_TRUE(optim::relora_merge_due(251, 0, 250));
  EXPECT_FALSE(optim::relora_merge_due(250, 0, 250));
  EXPECT_FALSE(optim::relora_reset_due(0, 0, 250));
  EXPECT_TRUE(optim::relora_reset_due(1, 0, 250));
  expect_error([] { (void)optim::relora_merge_due(5, 0, 1); }, {"relora_merge_due", "every is 1"});
  expect_error([] { (void)optim::relora_reset_due(5, 10, 100); }, {"relora_reset_due", "step 5", "start 10"});
}

TEST(Schedule, CosineWithWarmup) {
  EXPECT_EQ(optim::cosine_with_warmup(0, 1000, 100), 0.0);
  EXPECT_DOUBLE_EQ(optim::cosine_with_warmup(50, 1000, 100), 0.5);
  EXPECT_DOUBLE_EQ(optim::cosine_with_warmup(100, 1000, 100), 1.0);
  EXPECT_NEAR(optim::cosine_with_warmup(550, 1000, 100), 0.55, 1e-15);
  EXPECT_NEAR(optim::cosine_with_warmup(1000, 1000, 100), 0.1, 1e-15);  // 10% of the peak
  EXPECT_NEAR(optim::cosine_with_warmup(5000, 1000, 100), 0.1, 1e-15);  // clamped past N
  EXPECT_DOUBLE_EQ(optim::cosine_with_warmup(0, 10, 0, 0.0), 1.0);
  double prev = 2;
  for (std::int64_t t = 100; t <= 1000; ++t) {
    const double v = optim::cosine_with_warmup(t, 1000, 100);
    EXPECT_LE(v, prev);
    prev = v;
  }
  expect_error([] { (void)optim::cosine_with_warmup(1, 100, 101); }, {"cosine_with_warmup", "warmup_steps is 101"});
  expect_error([] { (void)optim::cosine_with_warmup(-1, 100, 10); }, {"cosine_with_warmup", "step t is -1"});
  expect_error([] { (void)optim::cosine_with_warmup(1, 100, 10, -0.5); }, {"cosine_with_warmup", "min_lr_ratio"});
}

// ============================================================================================
// SwitchLoRA
// ============================================================================================

adapt::SwitchLoraConfig switch_config(Index r, std::int64_t total_steps = 1000) {
  adapt::SwitchLoraConfig c;
  c.rank = r;
  c.alpha = 2;
  c.total_steps = total_steps;
  return c;
}

// Everything a failed call must leave alone.
template <class T>
struct LayerSnapshot {
  RowMatrix<T> A, B, pA, pB;
  std::vector<Index> sA, sB;
  std::vector<int> fA, fB;
  RowMatrix<float> mA, vA, mB, vB;
  std::vector<std::int64_t> tA, tB;
  explicit LayerSnapshot(const adapt::SwitchLoraLayer<T>& l)
      : A(l.adapter().A), B(l.adapter().B), pA(l.candidates_A()), pB(l.candidates_B()),
        sA(l.selected_A().begin(), l.selected_A().end()), sB(l.selected_B().begin(), l.selected_B().end()),
        fA(l.frozen_A().begin(), l.frozen_A().end()), fB(l.frozen_B().begin(), l.frozen_B().end()),
        mA(l.moments().m_A), vA(l.moments().v_A), mB(l.moments().m_B), vB(l.moments().v_B),
        tA(l.moments().step_A), tB(l.moments().step_B) {}
  bool same(const adapt::SwitchLoraLayer<T>& l) const {
    const LayerSnapshot o(l);
    return bitwise_equal(A, o.A) && bitwise_equal(B, o.B) && bitwise_equal(pA, o.pA) && bitwise_equal(pB, o.pB) &&
           sA == o.sA && sB == o.sB && fA == o.fA && fB == o.fB && bitwise_equal(mA, o.mA) && bitwise_equal(vA, o.vA) &&
           bitwise_equal(mB, o.mB) && bitwise_equal(vB, o.vB) && tA == o.tA && tB == o.tB;
  }
};

// §5.1 / §9.8: the initialisation bounds and the pools.
TEST(SwitchLora, InitialisationBoundsAndPools) {
  const Index out = 24, in = 16, r = 4;
  const double gain = 1 / std::sqrt(3.0);
  const double sA = std::pow(std::sqrt(24.0) * 4 / std::pow(16.0, 1.5), 0.25) * std::sqrt(gain);
  const double sB = std::pow(4 / std::sqrt(24.0 * 16.0), 0.25) * std::sqrt(gain);
  const auto b = adapt::switchlora_init_bounds(out, in, r);
  EXPECT_NEAR(b.A, std::sqrt(3.0) * sA, 1e-15);
  EXPECT_NEAR(b.B, std::sqrt(3.0) * sB, 1e-15);
  EXPECT_EQ(adapt::switchlora_init_bounds(out, in, r, adapt::SwitchLoraInit::switchlora, true).B, 0.0);
  const auto o = adapt::switchlora_init_bounds(out, in, r, adapt::SwitchLoraInit::origin_lora);
  EXPECT_DOUBLE_EQ(o.A, 0.25);
  EXPECT_EQ(o.B, 0.0);
  expect_error([] { (void)adapt::switchlora_init_bounds(8, 4, 5); }, {"switchlora_init_bounds", "rank r = 5", "min(out, in) = 4"});

  adapt::SwitchLoraLayer<float> l(out, in, Layout::out_in, switch_config(r), 3, 1);
  EXPECT_EQ(l.candidate_num(), 16);
  EXPECT_EQ(l.candidates_A().rows(), 16);
  EXPECT_EQ(l.candidates_A().cols(), in);
  EXPECT_EQ(l.candidates_B().rows(), 16);
  EXPECT_EQ(l.candidates_B().cols(), out);
  EXPECT_LE(l.candidates_A().cwiseAbs().maxCoeff(), b.A);
  EXPECT_LE(l.candidates_B().cwiseAbs().maxCoeff(), b.B);
  EXPECT_GT(l.candidates_B().cwiseAbs().maxCoeff(), 0.5 * b.B);  // both non-zero
  EXPECT_DOUBLE_EQ(l.scaling(), 0.5);
  EXPECT_TRUE(l.switches_B());
  // Philox indices of the documented scheme, and the last r candidates selected.
  const RandomStream rng(3, 1);
  EXPECT_EQ(l.candidates_A()(2, 5), float((2.0 * rng.uniform(2 * in + 5) - 1.0) * b.A));
  EXPECT_EQ(l.candidates_B()(3, 7), float((2.0 * rng.uniform(16 * in + 3 * out + 7) - 1.0) * b.B));
  for (Index i = 0; i < r; ++i) {
    EXPECT_EQ(l.selected_A()[static_cast<std::size_t>(i)], 12 + i);
    EXPECT_EQ(l.selected_B()[static_cast<std::size_t>(i)], 12 + i);
    EXPECT_TRUE(bitwise_equal(RowMatrix<float>(l.adapter().A.row(i)), RowMatrix<float>(l.candidates_A().row(12 + i))));
    EXPECT_TRUE(bitwise_equal(RowMatrix<float>(l.adapter().B.col(i).transpose()), RowMatrix<float>(l.candidates_B().row(12 + i))));
  }

  auto c = switch_config(r);
  c.init = adapt::SwitchLoraInit::origin_lora;
  adapt::SwitchLoraLayer<float> lo(out, in, Layout::out_in, c, 3);
  EXPECT_TRUE(lo.adapter().B.isZero(0));
  EXPECT_LE(lo.adapter().A.cwiseAbs().maxCoeff(), 0.25);
  EXPECT_FALSE(lo.adapter().A.isZero(0));
  EXPECT_FALSE(lo.switches_B());
  RowMatrix<float> W = RowMatrix<float>::Zero(out, in);
  expect_error([&] { lo.switch_B_col(lowrank::weight(W, Layout::out_in), 0, 0); }, {"switch_B_col", "never switched"});
}

template <class TW>
class SwitchLoraTyped : public ::testing::Test {};
using SwitchTypes = ::testing::Types<double, float, bf16>;
TYPED_TEST_SUITE(SwitchLoraTyped, SwitchTypes);

// §9.8: switching preserves W + s B A to the rounding of W's storage, for A rows and B columns,
// in both layouts; the outgoing vector goes back into the pool.
TYPED_TEST(SwitchLoraTyped, SwitchPreservesTheEffectiveWeight) {
  using TW = TypeParam;
  for (Layout layout : {Layout::out_in, Layout::in_out}) {
    SCOPED_TRACE(std::string(lowrank_test::type_name<TW>()) + " " + std::string(lowrank::to_string(layout)));
    const Index out = 12, in = 9, r = 3;
    adapt::SwitchLoraLayer<double> l(out, in, layout, switch_config(r), 17, 2);
    RowMatrix<TW> Ws = store<TW>(gaussian(out, in, 4), layout);
    const double u = unit_roundoff<TW>(), acc = 8 * accum_roundoff<TW>();

    auto check_preserved = [&](const M64& before, const M64& scale) {
      const M64 after = load(Ws, layout) + delta_ref(l.adapter());
      for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j)
          EXPECT_LE(std::abs(after(i, j) - before(i, j)), (u + acc) * scale(i, j) + 1e-300) << i << "," << j;
    };
    // A row 1 -> candidate 4.
    {
      const M64 before = load(Ws, layout) + delta_ref(l.adapter());
      const RowMatrix<double> a_old = l.adapter().A.row(1), c_val = l.candidates_A().row(4);
      const Index old_slot = l.selected_A()[1];
      const M64 scale = load(Ws, layout).cwiseAbs() + 4 * abs_delta_ref(l.adapter()) + M64::Constant(out, in, 1.0);
      l.switch_A_row(lowrank::weight(Ws, layout), 1, 4);
      check_preserved(before, scale);
      EXPECT_TRUE(bitwise_equal(RowMatrix<double>(l.adapter().A.row(1)), c_val));
      EXPECT_TRUE(bitwise_equal(RowMatrix<double>(l.candidates_A().row(old_slot)), a_old));
      EXPECT_EQ(l.selected_A()[1], 4);
    }
    // B column 2 -> candidate 0.
    {
      const M64 before = load(Ws, layout) + delta_ref(l.adapter());
      const RowMatrix<double> b_old = l.adapter().B.col(2).transpose(), c_val = l.candidates_B().row(0);
      const Index old_slot = l.selected_B()[2];
      const M64 scale = load(Ws, layout).cwiseAbs() + 4 * abs_delta_ref(l.adapter()) + M64::Constant(out, in, 1.0);
      l.switch_B_col(lowrank::weight(Ws, layout), 2, 0);
      check_preserved(before, scale);
      EXPECT_TRUE(bitwise_equal(RowMatrix<double>(l.adapter().B.col(2).transpose()), c_val));
      EXPECT_TRUE(bitwise_equal(RowMatrix<double>(l.candidates_B().row(old_slot)), b_old));
      EXPECT_EQ(l.selected_B()[2], 0);
    }
    // The per-step schedule: many switches, W + s B A still preserved (errors add per switch).
    {
      auto c = switch_config(r, 1'000'000'000);
      c.interval0 = 10;  // 0.3 expected switches of each kind per step
      adapt::SwitchLoraLayer<double> m(out, in, layout, c, 5, 9);
      const M64 before = load(Ws, layout) + delta_ref(m.adapter());
      Index switches = 0;
      for (std::int64_t t = 0; t < 40; ++t) {
        const auto rep = m.switch_step(lowrank::weight(Ws, layout), t);
        switches += static_cast<Index>(rep.A.size() + rep.B.size());
      }
      EXPECT_GT(switches, 5);
      const M64 after = load(Ws, layout) + delta_ref(m.adapter());
      const double scale = before.cwiseAbs().maxCoeff() + 4;
      EXPECT_LE((after - before).cwiseAbs().maxCoeff(), double(switches + 1) * (u + acc) * scale * 4);
    }
  }
}

// §9.8: after a switch of A row i, B[:, i] gets zero gradient for 5 steps, its m, v and step
// are zero, the switched row's own state is untouched; symmetric for a B column.
TEST(SwitchLora, SwitchFreezesTheCounterpartAndZeroesItsState) {
  const Index out = 10, in = 8, r = 3;
  adapt::SwitchLoraLayer<float> l(out, in, Layout::out_in, switch_config(r), 21);
  auto& mo = l.moments();
  mo.m_A.setConstant(0.5f);
  mo.v_A.setConstant(0.25f);
  mo.m_B.setConstant(-0.5f);
  mo.v_B.setConstant(0.75f);
  std::fill(mo.step_A.begin(), mo.step_A.end(), 7);
  std::fill(mo.step_B.begin(), mo.step_B.end(), 7);
  RowMatrix<float> W = gaussian(out, in, 2).cast<float>();

  l.switch_A_row(lowrank::weight(W, Layout::out_in), 2, 1);
  EXPECT_TRUE(mo.m_B.col(2).isZero(0));
  EXPECT_TRUE(mo.v_B.col(2).isZero(0));
  EXPECT_EQ(mo.step_B[2], 0);
  for (Index j : {0, 1}) {
    EXPECT_TRUE((mo.m_B.col(j).array() == -0.5f).all());
    EXPECT_EQ(mo.step_B[static_cast<std::size_t>(j)], 7);
  }
  EXPECT_TRUE((mo.m_A.array() == 0.5f).all());  // the switched row's own state untouched
  EXPECT_TRUE((mo.v_A.array() == 0.25f).all());
  EXPECT_EQ(mo.step_A[2], 7);
  EXPECT_EQ(l.frozen_B()[2], 5);
  EXPECT_EQ(l.frozen_A()[2], 0);

  // Training steps: the frozen column's gradient is zeroed at the switch step and the next 4.
  optim::AdamConfig cfg;
  cfg.eps = 1e-8;
  for (int step = 0; step < 7; ++step) {
    SCOPED_TRACE(step);
    if (step > 0) l.tick();
    RowMatrix<float> gA = gaussian(r, in, 100 + step).cast<float>(), gB = gaussian(out, r, 200 + step).cast<float>();
    const RowMatrix<float> gB0 = gB;
    l.zero_frozen_gradients(lowrank::view(gA), lowrank::view(gB));
    const bool frozen = step < 5;
    EXPECT_EQ(gB.col(2).isZero(0), frozen);
    EXPECT_TRUE(bitwise_equal(RowMatrix<float>(gB.leftCols(2)), RowMatrix<float>(gB0.leftCols(2))));
    const RowMatrix<float> B0 = l.adapter().B;
    ASSERT_TRUE(l.adam_step(lowrank::view(std::as_const(gA)), lowrank::view(std::as_const(gB0)), cfg, 1e-2));
    // adam_step applies the freeze by itself (it was given the unmasked gB0): with a zeroed state
    // the frozen column does not move.
    EXPECT_EQ(bitwise_equal(RowMatrix<float>(l.adapter().B.col(2)), RowMatrix<float>(B0.col(2))), frozen);
    EXPECT_FALSE(bitwise_equal(RowMatrix<float>(l.adapter().B.col(0)), RowMatrix<float>(B0.col(0))));
    if (frozen) {
      EXPECT_TRUE(mo.m_B.col(2).isZero(0));
    }
  }
  EXPECT_EQ(mo.step_B[2], 7);  // the counter restarted at the switch (zeroed gradients still count, as the reference)
  EXPECT_EQ(mo.step_B[0], 14);

  // B column 0 -> candidate 2: A row 0 frozen and its state zeroed.
  l.switch_B_col(lowrank::weight(W, Layout::out_in), 0, 2);
  EXPECT_TRUE(mo.m_A.row(0).isZero(0));
  EXPECT_TRUE(mo.v_A.row(0).isZero(0));
  EXPECT_EQ(mo.step_A[0], 0);
  EXPECT_EQ(l.frozen_A()[0], 5);
  EXPECT_NE(mo.step_B[0], 0);  // the switched column's own step untouched
  EXPECT_EQ(mo.step_B[0], 14);

  // --remain_switch_state / --remain_switch_step_state.
  auto c = switch_config(r);
  c.zero_switched_state = false;
  c.zero_switched_step = false;
  adapt::SwitchLoraLayer<float> keep(out, in, Layout::out_in, c, 21);
  keep.moments().m_B.setConstant(1.0f);
  keep.moments().step_B[1] = 3;
  keep.switch_A_row(lowrank::weight(W, Layout::out_in), 1, 0);
  EXPECT_TRUE((keep.moments().m_B.col(1).array() == 1.0f).all());
  EXPECT_EQ(keep.moments().step_B[1], 3);
  EXPECT_EQ(keep.frozen_B()[1], 5);
}

// Per-vector bias correction: a vector whose state and step were zeroed takes a fresh first Adam
// step (|update| = lr to eps), while the other vectors continue with their own counters.
TEST(SwitchLora, PerVectorAdamRestartsBiasCorrection) {
  const Index out = 7, in = 6, r = 2;
  auto c = switch_config(r);
  c.adam_warm_step = 0;  // no freeze, so the restart is visible at the next step
  adapt::SwitchLoraLayer<double> l(out, in, Layout::out_in, c, 4);
  optim::AdamConfig cfg;
  cfg.eps = 1e-12;
  const double lr = 1e-3;
  RowMatrix<double> W = gaussian(out, in, 1);
  // Naive fp64 per-vector Adam reference (hf eps), tracked alongside.
  M64 A = l.adapter().A, B = l.adapter().B;
  M64 mA = M64::Zero(r, in), vA = M64::Zero(r, in), mB = M64::Zero(out, r), vB = M64::Zero(out, r);
  std::vector<int> tA(r, 0), tB(r, 0);
  auto ref_update = [&](double& w, double& m, double& v, double g, int t) {
    m = 0.9 * m + 0.1 * g;
    v = 0.999 * v + 0.001 * g * g;
    const double step = lr * std::sqrt(1 - std::pow(0.999, t)) / (1 - std::pow(0.9, t));
    w -= step * m / (std::sqrt(v) + 1e-12);
  };
  for (int step = 0; step < 6; ++step) {
    SCOPED_TRACE(step);
    if (step == 3) {
      l.switch_B_col(lowrank::weight(W, Layout::out_in), 1, 0);  // zeroes A row 1's state and step
      B.col(1) = l.adapter().B.col(1);
      mA.row(1).setZero();
      vA.row(1).setZero();
      tA[1] = 0;
    }
    const RowMatrix<double> gA = gaussian(r, in, 10 + step), gB = gaussian(out, r, 20 + step);
    const M64 A_before = l.adapter().A;
    ASSERT_TRUE(l.adam_step(lowrank::view(gA), lowrank::view(gB), cfg, lr));
    for (Index i = 0; i < r; ++i) {
      ++tA[static_cast<std::size_t>(i)];
      for (Index j = 0; j < in; ++j) ref_update(A(i, j), mA(i, j), vA(i, j), gA(i, j), tA[static_cast<std::size_t>(i)]);
    }
    for (Index j = 0; j < r; ++j) {
      ++tB[static_cast<std::size_t>(j)];
      for (Index i = 0; i < out; ++i) ref_update(B(i, j), mB(i, j), vB(i, j), gB(i, j), tB[static_cast<std::size_t>(j)]);
    }
    // fp32 moments: agreement to a few fp32 ulps of the update.
    EXPECT_LE((l.adapter().A - A).cwiseAbs().maxCoeff(), 1e-9);
    EXPECT_LE((l.adapter().B - B).cwiseAbs().maxCoeff(), 1e-9);
    if (step == 3) {
      // The restarted row moves by lr * sign(g) (a fresh first step); the other row does not.
      const M64 d = (l.adapter().A - A_before).cwiseAbs();
      for (Index j = 0; j < in; ++j) EXPECT_NEAR(d(1, j), lr, 1e-9);
      EXPECT_GT((d.row(0).array() - lr).abs().maxCoeff(), 1e-5);
    }
  }
  EXPECT_EQ(l.moments().step_A[0], 6);
  EXPECT_EQ(l.moments().step_A[1], 3);
  EXPECT_EQ(l.moments().step_B[1], 6);
}

// §9.8: interval(t) = 40 / 0.3^((t+1)/E), about 133.3 at t + 1 = E; below 2 adam_warm_step raises.
TEST(SwitchLora, ScheduleInterval) {
  EXPECT_NEAR(adapt::switchlora_interval(40, 99, 100), 40 / 0.3, 1e-12);
  EXPECT_NEAR(adapt::switchlora_interval(40, 99, 100), 133.333333, 1e-5);
  EXPECT_NEAR(adapt::switchlora_interval(40, 0, 100), 40 / std::pow(0.3, 0.01), 1e-12);
  EXPECT_NEAR(adapt::switchlora_interval(40, 199, 100), 40 / 0.09, 1e-10);
  // The layer: E = 0.1 * total_steps.
  adapt::SwitchLoraLayer<float> l(16, 16, Layout::out_in, switch_config(4, 1000), 1);
  EXPECT_NEAR(l.interval(99), 40 / 0.3, 1e-12);
  // r = 256: about 6.4 vectors per step at the start.
  EXPECT_NEAR(256 / adapt::switchlora_interval(40, 0, 4000), 6.4, 0.01);

  auto c = switch_config(4);
  c.interval0 = 9.5;  // < 2 * 5
  expect_error([&] { adapt::SwitchLoraLayer<float>(16, 16, Layout::out_in, c, 1); },
               {"SwitchLoraLayer", "interval0 is 9.5", "2 * adam_warm_step = 10"});
  c.interval0 = 10;
  EXPECT_NO_THROW(adapt::SwitchLoraLayer<float>(16, 16, Layout::out_in, c, 1));
  expect_error([] { (void)adapt::switchlora_interval(40, -1, 100); }, {"switchlora_interval", "step t is -1"});
  expect_error([] { (void)adapt::switchlora_interval(40, 1, 0); }, {"switchlora_interval", "E is 0"});
}

// §9.8: the stochastic rounding's mean is r / interval(t).
TEST(SwitchLora, StochasticRoundingMean) {
  // The helper over a fine grid of u.
  for (double x : {0.0, 0.3, 1.0, 2.7, 6.4}) {
    double sum = 0;
    const int n = 100000;
    for (int k = 0; k < n; ++k) sum += double(adapt::switchlora_round(x, (k + 0.5) / n));
    EXPECT_NEAR(sum / n, x, 1e-4) << x;
  }
  expect_error([] { (void)adapt::switchlora_round(-0.5, 0.1); }, {"switchlora_round", "x is -0.5"});
  // The layer's switch counts: r = 8, interval ~ 10 -> 0.8 per step for A rows and B columns.
  auto c = switch_config(8, 1'000'000'000);
  c.interval0 = 10;
  const Index n_dim = 48;
  adapt::SwitchLoraLayer<double> l(n_dim, n_dim, Layout::in_out, c, 33, 4);
  RowMatrix<double> W = gaussian(n_dim, n_dim, 3);
  const M64 before = load(W, Layout::in_out) + delta_ref(l.adapter());
  const int steps = 1500;
  double nA = 0, nB = 0;
  for (std::int64_t t = 0; t < steps; ++t) {
    const auto rep = l.switch_step(lowrank::weight(W, Layout::in_out), t);
    nA += double(rep.A.size());
    nB += double(rep.B.size());
    EXPECT_NEAR(rep.expected, 8 / adapt::switchlora_interval(10, t, 1e8), 1e-15);
    EXPECT_NEAR(rep.expected, 0.8, 1e-4);
    // Distinct rows; candidates were free before the switch and are held now.
    std::set<Index> rows;
    for (auto [i, cand] : rep.A) {
      rows.insert(i);
      EXPECT_EQ(l.selected_A()[static_cast<std::size_t>(i)], cand);
    }
    EXPECT_EQ(rows.size(), rep.A.size());
  }
  // Selected candidates stay distinct.
  std::set<Index> sel(l.selected_A().begin(), l.selected_A().end());
  EXPECT_EQ(sel.size(), 8u);
  const double sd = std::sqrt(0.8 * 0.2 / steps);
  EXPECT_NEAR(nA / steps, 0.8, 5 * sd);
  EXPECT_NEAR(nB / steps, 0.8, 5 * sd);
  const M64 after = load(W, Layout::in_out) + delta_ref(l.adapter());
  EXPECT_LE((after - before).cwiseAbs().maxCoeff(), 1e-10);
  // Same seed and stream: the same switches.
  adapt::SwitchLoraLayer<double> l2(n_dim, n_dim, Layout::in_out, c, 33, 4);
  RowMatrix<double> W2 = gaussian(n_dim, n_dim, 3);
  for (std::int64_t t = 0; t < 20; ++t) (void)l2.switch_step(lowrank::weight(W2, Layout::in_out), t);
  adapt::SwitchLoraLayer<double> l3(n_dim, n_dim, Layout::in_out, c, 33, 4);
  RowMatrix<double> W3 = gaussian(n_dim, n_dim, 3);
  for (std::int64_t t = 0; t < 20; ++t) (void)l3.switch_step(lowrank::weight(W3, Layout::in_out), t);
  EXPECT_TRUE(bitwise_equal(W2, W3));
  EXPECT_TRUE(bitwise_equal(l2.adapter().A, l3.adapter().A));
}

TEST(SwitchLora, RefusesBadInputAndChangesNothing) {
  const Index out = 10, in = 6, r = 2;
  expect_error([] { adapt::SwitchLoraLayer<float>(10, 6, Layout::out_in, switch_config(7), 1); },
               {"SwitchLoraLayer", "config.rank = 7", "min(out, in) = 6"});
  expect_error([] { adapt::SwitchLoraLayer<float>(10, 6, Layout::out_in, switch_config(0), 1); },
               {"SwitchLoraLayer", "config.rank = 0"});
  expect_error([] { adapt::SwitchLoraLayer<float>(10, 6, Layout::out_in, switch_config(2, 0), 1); },
               {"SwitchLoraLayer", "total_steps is 0"});

  adapt::SwitchLoraLayer<float> l(out, in, Layout::out_in, switch_config(r), 8);
  RowMatrix<float> W = gaussian(out, in, 3).cast<float>();
  const RowMatrix<float> W0 = W;
  const LayerSnapshot<float> snap(l);
  auto unchanged = [&] {
    EXPECT_TRUE(bitwise_equal(W, W0));
    EXPECT_TRUE(snap.same(l));
  };
  // W of another shape / layout.
  RowMatrix<float> Wbad = gaussian(out, in + 1, 3).cast<float>();
  expect_error([&] { l.switch_A_row(lowrank::weight(Wbad, Layout::out_in), 0, 0); }, {"switch_A_row", "10x7"});
  RowMatrix<float> Wt = W.transpose();
  expect_error([&] { l.switch_A_row(lowrank::weight(Wt, Layout::in_out), 0, 0); }, {"switch_A_row", "layout"});
  expect_error([&] { (void)l.switch_step(lowrank::weight(Wt, Layout::in_out), 0); }, {"switch_step", "layout"});
  unchanged();
  // Indices: out of range, candidate in use.
  expect_error([&] { l.switch_A_row(lowrank::weight(W, Layout::out_in), 2, 0); }, {"switch_A_row", "index 2", "r = 2"});
  expect_error([&] { l.switch_A_row(lowrank::weight(W, Layout::out_in), 0, 6); }, {"switch_A_row", "candidate 6", "candidate_num = 6"});
  expect_error([&] { l.switch_A_row(lowrank::weight(W, Layout::out_in), 0, 5); }, {"switch_A_row", "candidate 5", "in use by vector 1"});
  expect_error([&] { l.switch_B_col(lowrank::weight(W, Layout::out_in), 1, 4); }, {"switch_B_col", "candidate 4", "in use by vector 0"});
  expect_error([&] { (void)l.switch_step(lowrank::weight(W, Layout::out_in), -1); }, {"switch_step", "t is -1"});
  unchanged();
  // Non-finite factors.
  const float a00 = l.adapter().A(0, 0);
  l.adapter().A(0, 0) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { l.switch_A_row(lowrank::weight(W, Layout::out_in), 0, 0); }, {"switch_A_row", "adapter.A (2x6)", "(0, 0)"});
  l.adapter().A(0, 0) = a00;
  unchanged();
  // Gradients: shape and non-finite values.
  RowMatrix<float> gA = RowMatrix<float>::Ones(r, in), gB = RowMatrix<float>::Ones(out, r);
  RowMatrix<float> gAbad = RowMatrix<float>::Ones(r + 1, in);
  optim::AdamConfig cfg;
  expect_error([&] { (void)l.adam_step(lowrank::view(std::as_const(gAbad)), lowrank::view(std::as_const(gB)), cfg, 0.1); },
               {"adam_step", "gA is 3x6", "2x6"});
  expect_error([&] { l.zero_frozen_gradients(lowrank::view(gAbad), lowrank::view(gB)); }, {"zero_frozen_gradients", "gA is 3x6"});
  gB(4, 1) = std::numeric_limits<float>::infinity();
  expect_error([&] { (void)l.adam_step(lowrank::view(std::as_const(gA)), lowrank::view(std::as_const(gB)), cfg, 0.1); },
               {"adam_step", "gB (10x2)", "(4, 1)"});
  EXPECT_FALSE(l.adam_step(lowrank::view(std::as_const(gA)), lowrank::view(std::as_const(gB)), cfg, 0.1,
                           optim::NonFinitePolicy::skip));
  gB(4, 1) = 1;
  expect_error([&] { (void)l.adam_step(lowrank::view(std::as_const(gA)), lowrank::view(std::as_const(gB)), cfg, -1.0); },
               {"adam_step", "lr is -1"});
  unchanged();
}

}  // namespace
