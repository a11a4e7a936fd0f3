// EGGROLL (es/): noise streams, population forward, fitness shaping, update contraction, ask/tell.
// References are naive float64 code built from es::noise_normal element by element, and the
// identities of ../shared/reference/evolution.md (section 10).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "lowrank/core/error.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/es/eggroll.hpp"
#include "lowrank/kernels/lora_forward.hpp"
#include "lowrank/kernels/rank_update.hpp"
#include "lowrank/kernels/targets.hpp"

// Allocation tracking (es_alloc_track.cpp replaces the global operator new): the largest single
// allocation while armed.
extern std::atomic<bool> g_track;
extern std::atomic<std::size_t> g_largest;
// Allocations of more than this many bytes fail (std::bad_alloc) while it is below SIZE_MAX.
extern std::atomic<std::size_t> g_fail_above;

namespace {

using namespace lowrank;
using es::Antithetic;
using es::NoiseKey;
using es::Perturbation;

bool supported(Target t) { return (supported_targets() & static_cast<std::uint32_t>(t)) != 0; }

struct TargetGuard {
  ~TargetGuard() { reset_target(); }
};

std::vector<float> gaussian(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}

// Member i's signed perturbation eps_i (out x in, float64) from noise_normal, element by element.
std::vector<double> eps_ref(const Perturbation& p, std::int64_t member, Index out, Index in) {
  const es::MemberNoise mn = es::member_noise(member, p.population, p.antithetic);
  const int r = p.rank;
  std::vector<double> e(static_cast<std::size_t>(out * in), 0.0);
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) {
      double acc = 0;
      for (int c = 0; c < r; ++c) {
        const double a = es::noise_normal(p.key, mn.index, static_cast<std::uint64_t>(in * r + i * r + c));
        const double b = es::noise_normal(p.key, mn.index, static_cast<std::uint64_t>(j * r + c));
        acc += a * b;
      }
      e[static_cast<std::size_t>(i * in + j)] = mn.sign * acc / std::sqrt(double(r));
    }
  return e;
}

Perturbation make_p(int rank, std::int64_t n, Antithetic a = Antithetic::interleaved, double sigma = 0.1,
                    std::uint64_t seed = 7, std::uint32_t layer = 3, std::uint32_t epoch = 5) {
  Perturbation p;
  p.key = NoiseKey{seed, layer, epoch};
  p.rank = rank;
  p.sigma = sigma;
  p.population = n;
  p.antithetic = a;
  return p;
}

// ---- noise ------------------------------------------------------------------------------------

TEST(EsNoise, FactorsFollowTheStreamLayoutOnEveryTarget) {
  TargetGuard guard;
  const NoiseKey key{0xfeedbeefcafe1234ull, 11, 2};
  for (int r : {1, 3, 4}) {
    const Index out = 37, in = 21;
    std::vector<float> ref_a(out * r), ref_b(in * r);
    for (Index i = 0; i < in * r; ++i) ref_b[i] = es::noise_normal(key, 9, static_cast<std::uint64_t>(i));
    for (Index i = 0; i < out * r; ++i) ref_a[i] = es::noise_normal(key, 9, static_cast<std::uint64_t>(in * r + i));
    for (Target t : {Target::scalar, Target::avx2, Target::avx2_128, Target::avx512}) {
      if (!supported(t)) continue;
      force_target(t);
      std::vector<float> a(out * r, NAN), b(in * r, NAN);
      es::eggroll_factors(key, 9, out, in, r, a.data(), b.data());
      EXPECT_EQ(0, std::memcmp(a.data(), ref_a.data(), a.size() * 4)) << to_string(t) << " r " << r;
      EXPECT_EQ(0, std::memcmp(b.data(), ref_b.data(), b.size() * 4)) << to_string(t) << " r " << r;
    }
  }
}

TEST(EsNoise, DenseNoiseIsTheStreamAndTargetsAgreeBitwise) {
  TargetGuard guard;
  const NoiseKey key{42, 1, 0};
  const std::int64_t len = 1003;  // not a multiple of 4 or 32
  std::vector<float> ref(len);
  for (std::int64_t i = 0; i < len; ++i) ref[i] = es::noise_normal(key, 77, static_cast<std::uint64_t>(i));
  for (Target t : {Target::scalar, Target::avx2, Target::avx2_128, Target::avx512}) {
    if (!supported(t)) continue;
    force_target(t);
    std::vector<float> z(len, NAN);
    es::dense_noise(key, 77, len, z.data());
    EXPECT_EQ(0, std::memcmp(z.data(), ref.data(), len * 4)) << to_string(t);
  }
}

TEST(EsNoise, KeysSelectIndependentStreams) {
  // Same shape, different layer (the eggroll-trainer bug), seed, epoch or index: different noise.
  const NoiseKey base{5, 0, 0};
  const NoiseKey others[] = {{6, 0, 0}, {5, 1, 0}, {5, 0, 1}};
  for (const NoiseKey& o : others) {
    int same = 0;
    for (std::uint64_t e = 0; e < 256; ++e) same += es::noise_normal(base, 0, e) == es::noise_normal(o, 0, e);
    EXPECT_LT(same, 3);
  }
  int same = 0;
  for (std::uint64_t e = 0; e < 256; ++e) same += es::noise_normal(base, 0, e) == es::noise_normal(base, 1, e);
  EXPECT_LT(same, 3);
  // Repeatable.
  for (std::uint64_t e = 0; e < 64; ++e) EXPECT_EQ(es::noise_normal(base, 3, e), es::noise_normal(base, 3, e));
}

TEST(EsNoise, AntitheticLayouts) {
  for (std::int64_t i = 0; i < 10; ++i) {
    const auto il = es::member_noise(i, 10, Antithetic::interleaved);
    EXPECT_EQ(il.index, static_cast<std::uint32_t>(i / 2));
    EXPECT_EQ(il.sign, i % 2 ? -1.0f : 1.0f);
    const auto h = es::member_noise(i, 10, Antithetic::halves);
    EXPECT_EQ(h.index, static_cast<std::uint32_t>(i % 5));
    EXPECT_EQ(h.sign, i < 5 ? 1.0f : -1.0f);
    const auto n = es::member_noise(i, 10, Antithetic::none);
    EXPECT_EQ(n.index, static_cast<std::uint32_t>(i));
    EXPECT_EQ(n.sign, 1.0f);
  }
  // Members 2k and 2k+1 perturb by exactly opposite matrices.
  const Perturbation p = make_p(2, 8);
  std::vector<float> e0(6 * 5), e1(6 * 5);
  es::dense_perturbation(p, 4, row_major(e0.data(), 6, 5));
  es::dense_perturbation(p, 5, row_major(e1.data(), 6, 5));
  for (std::size_t i = 0; i < e0.size(); ++i) EXPECT_EQ(e0[i], -e1[i]);
}

TEST(EsNoise, NoiseReuseEpochs) {
  EXPECT_EQ(es::noise_epoch(7, 1), 7u);
  EXPECT_EQ(es::noise_epoch(7, 4), 1u);
  EXPECT_EQ(es::noise_epoch(8, 4), 2u);
  EXPECT_EQ(es::noise_epoch(123, 0), 0u);
}

TEST(EsNoise, PerturbationEntriesHaveUnitVarianceForEveryRankAndRankAtMostR) {
  // E = A B^T / sqrt(r): mean 0, variance 1, uncorrelated neighbours, for r = 1, 2, 8.
  for (int r : {1, 2, 8}) {
    const Index out = 16, in = 16;
    const int members = 600;
    const Perturbation p = make_p(r, members, Antithetic::none);
    double m1 = 0, m2 = 0, cross = 0;
    std::vector<float> e(out * in);
    for (int i = 0; i < members; ++i) {
      es::dense_perturbation(p, i, row_major(e.data(), out, in));
      for (std::size_t q = 0; q < e.size(); ++q) {
        m1 += e[q], m2 += double(e[q]) * e[q];
        if (q + 1 < e.size()) cross += double(e[q]) * e[q + 1];
      }
    }
    const double n = double(members) * out * in;
    // Entries within one matrix are dependent (shared factors), so use a generous 1/sqrt(members) scale.
    const double se = std::sqrt(3.0 * (1 + 2.0 / r) / members) / out;
    EXPECT_NEAR(m1 / n, 0.0, 6 * se) << r;
    EXPECT_NEAR(m2 / n, 1.0, 0.08) << r;
    EXPECT_NEAR(cross / n, 0.0, 0.06) << r;
  }
  // Rank: an r = 2 perturbation of a 6 x 5 matrix has rank 2 (its 3 x 3 minors vanish).
  const Perturbation p = make_p(2, 4);
  const std::vector<double> e = eps_ref(p, 1, 6, 5);
  auto det3 = [&](int r0, int r1, int r2, int c0, int c1, int c2) {
    auto at = [&](int i, int j) { return e[i * 5 + j]; };
    return at(r0, c0) * (at(r1, c1) * at(r2, c2) - at(r1, c2) * at(r2, c1)) -
           at(r0, c1) * (at(r1, c0) * at(r2, c2) - at(r1, c2) * at(r2, c0)) +
           at(r0, c2) * (at(r1, c0) * at(r2, c1) - at(r1, c1) * at(r2, c0));
  };
  EXPECT_NEAR(det3(0, 2, 5, 0, 3, 4), 0.0, 1e-9);
  EXPECT_NEAR(det3(1, 3, 4, 1, 2, 4), 0.0, 1e-9);
  EXPECT_GT(std::abs(e[0] * e[6] - e[1] * e[5]), 1e-6);  // a 2 x 2 minor does not
}

// ---- forward ----------------------------------------------------------------------------------

void check_forward(Layout layout, int r, Antithetic anti, bool strided) {
  const Index out = 29, in = 45, tokens = 13;
  const std::int64_t population = 10;
  const Perturbation p = make_p(r, population, anti, 0.25);
  const std::vector<float> x = gaussian(tokens * in, 1), w = gaussian(out * in, 2), bias = gaussian(out, 3);
  // Stored weight: out x in (out_in) or in x out (in_out).
  std::vector<float> ws(out * in);
  for (Index o = 0; o < out; ++o)
    for (Index i = 0; i < in; ++i) (layout == Layout::out_in ? ws[o * in + i] : ws[i * out + o]) = w[o * in + i];
  const WeightView<const float> W{layout == Layout::out_in ? row_major<const float>(ws.data(), out, in)
                                                          : row_major<const float>(ws.data(), in, out),
                                  layout};
  std::vector<std::int64_t> members(tokens);
  for (Index t = 0; t < tokens; ++t) members[t] = (t * 7 + 3) % population;  // any order, repeats
  const Index ldy = strided ? 2 * out + 1 : out;
  std::vector<float> y(tokens * ldy, NAN);
  const MatrixView<float> Y{y.data(), tokens, out, ldy, strided ? 1 : 1};
  const MatrixView<const float> X = strided ? MatrixView<const float>(x.data(), tokens, in, 1, tokens)  // column-major
                                            : row_major<const float>(x.data(), tokens, in);
  std::vector<float> xs(x);
  if (strided) {  // X given column-major: store transposed data
    for (Index t = 0; t < tokens; ++t)
      for (Index i = 0; i < in; ++i) xs[i * tokens + t] = x[t * in + i];
  }
  const MatrixView<const float> Xv = strided ? MatrixView<const float>(xs.data(), tokens, in, 1, tokens) : X;
  es::ForwardOptions opt;
  opt.bias = bias.data();
  es::population_forward(Xv, W, p, members, Y, opt);
  for (Index t = 0; t < tokens; ++t) {
    const std::vector<double> e = eps_ref(p, members[t], out, in);
    for (Index o = 0; o < out; ++o) {
      double ref = bias[o], mag = std::abs(bias[o]);
      for (Index i = 0; i < in; ++i) {
        const double wp = w[o * in + i] + p.sigma * e[o * in + i];
        ref += double(x[t * in + i]) * wp;
        mag += std::abs(double(x[t * in + i]) * wp);
      }
      ASSERT_NEAR(y[t * ldy + o], ref, 1e-5 * mag + 1e-6) << "t " << t << " o " << o;
    }
  }
}

TEST(EsForward, EqualsTheDenseForwardOfEachMember) {
  for (Layout layout : {Layout::out_in, Layout::in_out})
    for (int r : {1, 4})
      for (Antithetic a : {Antithetic::interleaved, Antithetic::halves, Antithetic::none})
        check_forward(layout, r, a, false);
  check_forward(Layout::out_in, 3, Antithetic::interleaved, true);
}

TEST(EsForward, RowsAreIndependentOfBatchAndThreads) {
  const Index out = 64, in = 96;
  const std::int64_t population = 16;
  const Perturbation p = make_p(2, population);
  const std::vector<float> x = gaussian(population * in, 4), w = gaussian(out * in, 5);
  const WeightView<const float> W{row_major<const float>(w.data(), out, in), Layout::out_in};
  std::vector<std::int64_t> all(population);
  std::iota(all.begin(), all.end(), 0);
  std::vector<float> y1(population * out), y2(population * out);
  es::ForwardOptions one;
  one.max_threads = 1;
  es::population_forward(row_major<const float>(x.data(), population, in), W, p, all, row_major(y1.data(), population, out), one);
  es::population_forward(row_major<const float>(x.data(), population, in), W, p, all, row_major(y2.data(), population, out));
  EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), y1.size() * 4));
  // Member 9 alone gives the same row as in the full batch.
  std::vector<float> y9(out);
  const std::int64_t m9 = 9;
  es::population_forward(row_major<const float>(x.data() + 9 * in, 1, in), W, p, std::span(&m9, 1), row_major(y9.data(), 1, out));
  EXPECT_EQ(0, std::memcmp(y9.data(), y1.data() + 9 * out, out * 4));
}

// A row's output does not depend on how many rows share its noise. On the SIMD targets a noise
// index with at most 8 rows (contiguous X and Y) takes the fused rank-4 kernel, which generates
// the factors and applies them in one pass; more rows take factors_t4 + row_term. Both must give
// the same bits, for every group size the fused kernel takes (1 to 8 rows, every row its own
// input), including the tails past the last 16-row chunk of B and A (in, out not multiples of 16
// or 8, in < 16 <= out), and must match the float64 reference. Every batch has at least
// lora_forward_gemm_tokens rows (the base product's bits depend on that side of the threshold).
TEST(EsForward, RankFourRowsAreBitwiseTheSameHoweverManyShareTheirNoise) {
  TargetGuard guard;
  const std::int64_t population = 8, compared = 6;  // members 6 and 7 fill the batches up
  for (Target t : {Target::scalar, Target::avx2}) {
    if (!supported(t)) continue;
    force_target(t);
    for (Antithetic anti : {Antithetic::interleaved, Antithetic::none}) {
      const Perturbation p = make_p(4, population, anti, 0.5);
      const Index shares = anti == Antithetic::none ? 1 : 2;  // members per noise index
      const std::pair<Index, Index> shapes[] = {{53, 37}, {64, 48}, {40, 24}, {7, 5}, {7, 37}, {16, 9}};
      for (const auto& shape : shapes) {
        const Index in = shape.first, out = shape.second;  // (Clang 14's lambdas cannot capture bindings)
        const std::vector<float> w = gaussian(out * in, 21);
        const WeightView<const float> W{row_major<const float>(w.data(), out, in), Layout::out_in};
        // Rows [0, tokens): member q % compared, input x's row q. With `pad`, 10 more rows for
        // each compared member (their noise groups then have more than 8 rows: the two-step
        // path). Then rows of member 6 up to lora_forward_gemm_tokens rows in all.
        auto forward = [&](const std::vector<float>& x, Index tokens, bool pad) {
          const Index padded = tokens + (pad ? 10 * compared : 0);
          const Index rows = std::max<Index>(padded, lora_forward_gemm_tokens);
          std::vector<float> xr(x), y(rows * out);
          xr.resize(rows * in, 0.5f);
          std::vector<std::int64_t> members(rows);
          for (Index q = 0; q < rows; ++q) members[q] = q < padded ? q % compared : compared;
          es::population_forward(row_major<const float>(xr.data(), rows, in), W, p, members,
                                 row_major(y.data(), rows, out));
          y.resize(tokens * out);
          return y;
        };
        for (Index reps = 1; reps * shares <= 8; ++reps) {  // noise groups of 1 to 8 rows
          const Index tokens = reps * compared;
          const std::vector<float> x = gaussian(tokens * in, 22 + static_cast<unsigned>(reps));
          const std::vector<float> y = forward(x, tokens, false), ref = forward(x, tokens, true);
          for (Index q = 0; q < tokens; ++q) {
            ASSERT_EQ(0, std::memcmp(y.data() + q * out, ref.data() + q * out, out * sizeof(float)))
                << "target " << static_cast<int>(t) << " in " << in << " out " << out << " rows per noise "
                << reps * shares << " row " << q;
          }
        }
        const std::vector<float> x = gaussian(compared * in, 22);
        const std::vector<float> ref = forward(x, compared, true);
        for (std::int64_t m = 0; m < compared; ++m) {
          const std::vector<double> e = eps_ref(p, m, out, in);
          for (Index o = 0; o < out; ++o) {
            double sum = 0, mag = 0;
            for (Index i = 0; i < in; ++i) {
              const double v = double(x[m * in + i]) * (w[o * in + i] + p.sigma * e[o * in + i]);
              sum += v, mag += std::abs(v);
            }
            ASSERT_NEAR(ref[m * out + o], sum, 1e-5 * mag + 1e-6) << "member " << m << " o " << o;
          }
        }
      }
    }
  }
}

TEST(EsForward, Bf16Weights) {
  const Index out = 33, in = 40, tokens = 6;
  const Perturbation p = make_p(1, 6, Antithetic::interleaved, 0.5);
  const std::vector<float> x = gaussian(tokens * in, 6), w = gaussian(out * in, 7);
  std::vector<bf16> wb(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) wb[i] = bf16(w[i]);
  std::vector<float> y(tokens * out);
  std::vector<std::int64_t> members = {0, 1, 2, 3, 4, 5};
  es::population_forward(row_major<const float>(x.data(), tokens, in),
                         WeightView<const bf16>{row_major<const bf16>(wb.data(), out, in), Layout::out_in}, p, members,
                         row_major(y.data(), tokens, out));
  for (Index t = 0; t < tokens; ++t) {
    const std::vector<double> e = eps_ref(p, t, out, in);
    for (Index o = 0; o < out; ++o) {
      double ref = 0, mag = 0;
      for (Index i = 0; i < in; ++i) {
        const double wp = double(static_cast<float>(wb[o * in + i])) + p.sigma * e[o * in + i];
        ref += x[t * in + i] * wp, mag += std::abs(x[t * in + i] * wp);
      }
      ASSERT_NEAR(y[t * out + o], ref, 1e-5 * mag);
    }
  }
}

TEST(EsForward, BadInputThrowsAndLeavesYUnchanged) {
  const Index out = 8, in = 6;
  const std::vector<float> x = gaussian(4 * in, 8), w = gaussian(out * in, 9);
  const WeightView<const float> W{row_major<const float>(w.data(), out, in), Layout::out_in};
  std::vector<float> y(4 * out, 3.0f);
  const std::vector<std::int64_t> members = {0, 1, 2, 3};
  const auto X = row_major<const float>(x.data(), 4, in);
  const auto Y = row_major(y.data(), 4, out);
  auto expect_error = [&](Perturbation p, std::vector<std::int64_t> m, const char* what) {
    try {
      es::population_forward(X, W, p, m, Y);
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("population_forward"), std::string::npos) << e.what();
    }
    for (float v : y) ASSERT_EQ(v, 3.0f) << what;
  };
  expect_error(make_p(1, 0), members, "population 0");
  expect_error(make_p(1, 5), members, "odd population with pairs");
  expect_error(make_p(0, 4), members, "rank 0");
  expect_error(make_p(1, 4, Antithetic::interleaved, 0.0), members, "sigma 0");
  expect_error(make_p(1, 4, Antithetic::interleaved, -1.0), members, "sigma < 0");
  expect_error(make_p(1, 4, Antithetic::interleaved, NAN), members, "sigma NaN");
  expect_error(make_p(1, 4), {0, 1, 2, 4}, "member out of range");
  expect_error(make_p(1, 4), {0, 1, 2}, "members size");
  try {
    es::population_forward(row_major<const float>(x.data(), 4, in - 1), W, make_p(1, 4), members, Y);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("X is 4x5"), std::string::npos) << e.what();
  }
}

// ---- shaping ----------------------------------------------------------------------------------

TEST(EsShaping, ZScore) {
  std::vector<double> f = {1, 5, 2, 8, 3, 3};
  std::vector<double> s(f.size());
  es::ShapingConfig c;
  es::shape_fitness(f, c, Antithetic::interleaved, s);
  double mean = 0, var = 0, fm = 0, fv = 0;
  for (double v : f) fm += v / f.size();
  for (double v : f) fv += (v - fm) * (v - fm) / f.size();
  for (double v : s) mean += v / s.size();
  for (double v : s) var += (v - mean) * (v - mean) / s.size();
  EXPECT_NEAR(mean, 0, 1e-15);
  EXPECT_NEAR(var, fv / (fv + 1e-5), 1e-12);
}

TEST(EsShaping, CenteredRanksWithMidranksAndMonotoneInvariance) {
  const std::vector<double> f = {0.3, -2, 7, 0.3, 1e6, 0.3};
  std::vector<double> s(f.size()), s2(f.size());
  es::ShapingConfig c;
  c.shaping = es::Shaping::centered_ranks;
  es::shape_fitness(f, c, Antithetic::interleaved, s);
  // Sorted: -2 (rank 0), 0.3 x3 (ranks 1, 2, 3 -> midrank 2), 7 (4), 1e6 (5); value rank/5 - 1/2.
  const std::vector<double> expect = {2.0 / 5 - 0.5, -0.5, 4.0 / 5 - 0.5, 2.0 / 5 - 0.5, 0.5, 2.0 / 5 - 0.5};
  for (std::size_t i = 0; i < f.size(); ++i) EXPECT_DOUBLE_EQ(s[i], expect[i]);
  double sum = 0;
  for (double v : s) {
    sum += v;
    EXPECT_LE(std::abs(v), 0.5);
  }
  EXPECT_NEAR(sum, 0, 1e-15);
  std::vector<double> g(f.size());
  for (std::size_t i = 0; i < f.size(); ++i) g[i] = std::exp(f[i] / 1e6) * 3 + std::atan(f[i]);  // strictly increasing
  es::shape_fitness(g, c, Antithetic::interleaved, s2);
  EXPECT_EQ(s, s2);
}

TEST(EsShaping, GroupedZScoreUsesTheGlobalStd) {
  // Two groups of different spread: each sums to 0; both divided by the same (global) std.
  const std::vector<double> f = {1, 2, 3, 10, 30, 50};
  std::vector<double> s(f.size());
  es::ShapingConfig c;
  c.shaping = es::Shaping::grouped_z_score;
  c.group_size = 3;
  es::shape_fitness(f, c, Antithetic::none, s);
  double fm = 0, fv = 0;
  for (double v : f) fm += v / 6;
  for (double v : f) fv += (v - fm) * (v - fm) / 6;
  const double sd = std::sqrt(fv + 1e-5);
  EXPECT_NEAR(s[0], (1 - 2) / sd, 1e-14);
  EXPECT_NEAR(s[5], (50 - 30) / sd, 1e-14);
  EXPECT_NEAR(s[0] + s[1] + s[2], 0, 1e-14);
  EXPECT_NEAR(s[3] + s[4] + s[5], 0, 1e-14);
  c.group_size = 4;
  EXPECT_THROW(es::shape_fitness(f, c, Antithetic::none, s), Error);
}

TEST(EsShaping, AntitheticSignAndMinimizeAndNonFinite) {
  es::ShapingConfig c;
  c.shaping = es::Shaping::antithetic_sign;
  const std::vector<double> f = {3, 1, 2, 2, 0, 5};
  std::vector<double> s(6);
  es::shape_fitness(f, c, Antithetic::interleaved, s);
  EXPECT_EQ(s, (std::vector<double>{0.5, -0.5, 0, 0, -0.5, 0.5}));
  es::shape_fitness(f, c, Antithetic::halves, s);  // pairs (0,3), (1,4), (2,5)
  EXPECT_EQ(s, (std::vector<double>{0.5, 0.5, -0.5, -0.5, -0.5, 0.5}));
  EXPECT_THROW(es::shape_fitness(f, c, Antithetic::none, s), Error);
  // Minimize negates.
  c.shaping = es::Shaping::none;
  c.objective = es::Objective::minimize;
  es::shape_fitness(f, c, Antithetic::none, s);
  EXPECT_EQ(s[1], -1.0);
  // Non-finite: error leaves `shaped` alone; worst replaces by the worst finite value.
  c.objective = es::Objective::maximize;
  std::vector<double> g = {1, NAN, 4, INFINITY};
  std::vector<double> out(4, 9.0);
  try {
    es::shape_fitness(g, c, Antithetic::none, out);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("member 1"), std::string::npos) << e.what();
  }
  EXPECT_EQ(out, std::vector<double>(4, 9.0));
  c.non_finite = es::NonFiniteFitness::worst;
  EXPECT_EQ(es::shape_fitness(g, c, Antithetic::none, out), 2);
  EXPECT_EQ(out, (std::vector<double>{1, 1, 4, 1}));
  std::vector<double> empty;
  EXPECT_THROW(es::shape_fitness(empty, c, Antithetic::none, empty), Error);
}

// ---- update -----------------------------------------------------------------------------------

std::vector<double> update_ref(const Perturbation& p, const std::vector<double>& f, double c, Index out, Index in) {
  std::vector<double> g(out * in, 0.0);
  for (std::int64_t i = 0; i < p.population; ++i) {
    const std::vector<double> e = eps_ref(p, i, out, in);
    for (std::size_t q = 0; q < g.size(); ++q) g[q] += c * f[i] * e[q];
  }
  return g;
}

TEST(EsUpdate, EqualsTheExplicitSumOfFitnessTimesPerturbation) {
  const Index out = 23, in = 17;
  for (Antithetic a : {Antithetic::interleaved, Antithetic::halves, Antithetic::none})
    for (int r : {1, 3, 4}) {
      const Perturbation p = make_p(r, 12, a);
      std::vector<double> f(12);
      for (int i = 0; i < 12; ++i) f[i] = std::sin(1.7 * i) + 0.3;
      const double c = 1.0 / 12;
      const std::vector<double> ref = update_ref(p, f, c, out, in);
      for (std::int64_t chunk : {0, 1, 4}) {
        std::vector<float> g(out * in, 0.5f);  // accumulates into G
        es::AggregateOptions o;
        o.chunk = chunk;
        es::aggregate_update(p, f, c, row_major(g.data(), out, in), o);
        for (std::size_t q = 0; q < g.size(); ++q) ASSERT_NEAR(g[q] - 0.5, ref[q], 2e-5) << q << " r " << r;
      }
    }
}

TEST(EsUpdate, AntitheticCollapseIgnoresAConstantShift) {
  const Index out = 19, in = 11;
  const Perturbation p = make_p(2, 16);
  std::vector<double> f(16), f2(16);
  for (int i = 0; i < 16; ++i) f[i] = std::cos(0.9 * i), f2[i] = f[i] + 1000.0;
  std::vector<float> g1(out * in, 0.0f), g2(out * in, 0.0f);
  es::aggregate_update(p, f, 1.0 / 16, row_major(g1.data(), out, in));
  es::aggregate_update(p, f2, 1.0 / 16, row_major(g2.data(), out, in));
  for (std::size_t q = 0; q < g1.size(); ++q) ASSERT_NEAR(g1[q], g2[q], 1e-4 * (1 + std::abs(g1[q])));
}

TEST(EsUpdate, BitwiseIndependentOfThreadsAndIdenticalOnEveryTarget) {
  TargetGuard guard;
  const Index out = 70, in = 50;
  const Perturbation p = make_p(2, 64);
  std::vector<double> f(64);
  for (int i = 0; i < 64; ++i) f[i] = std::sin(0.37 * i * i);
  auto run = [&](int threads) {
    std::vector<float> g(out * in, 0.0f);
    es::AggregateOptions o;
    o.max_threads = threads;
    es::aggregate_update(p, f, 0.1, row_major(g.data(), out, in), o);
    return g;
  };
  const std::vector<float> base = run(1);
  EXPECT_EQ(base, run(2));
  EXPECT_EQ(base, run(3));
  std::vector<std::vector<float>> simd;
  for (Target t : {Target::avx2, Target::avx2_128, Target::avx512}) {
    if (!supported(t)) continue;
    force_target(t);
    simd.push_back(run(2));
  }
  for (std::size_t i = 1; i < simd.size(); ++i) EXPECT_EQ(0, std::memcmp(simd[0].data(), simd[i].data(), simd[0].size() * 4));
  // The scalar target accumulates with the same fused multiply-adds: bitwise the same too.
  force_target(Target::scalar);
  const std::vector<float> sc = run(2);
  if (!simd.empty()) {
    EXPECT_EQ(0, std::memcmp(sc.data(), simd[0].data(), sc.size() * 4));
  }
  EXPECT_EQ(sc, run(1));
}

void check_packed_factors(Index out, Index in, std::int64_t n, std::initializer_list<int> ranks,
                          std::initializer_list<std::int64_t> chunks, int threads) {
  std::vector<double> f(n);
  for (std::int64_t i = 0; i < n; ++i) f[i] = i == 4 ? 0.0 : std::sin(1.3 * double(i)) + 0.2;  // index 4 skipped
  const double c = 0.37;
  for (int r : ranks)
    for (std::int64_t chunk : chunks) {
      SCOPED_TRACE(testing::Message() << out << "x" << in << " N " << n << " r " << r << " chunk " << chunk
                                      << " threads " << threads);
      const Perturbation p = make_p(r, n, Antithetic::none);
      // The collapsed fitness and the active indices, as aggregate_update forms them.
      std::vector<double> w(n, 0.0);
      for (std::int64_t i = 0; i < n; ++i) {
        const auto mn = lowrank::es::member_noise(i, n, p.antithetic);
        w[mn.index] += mn.sign * f[i];
      }
      std::vector<std::uint32_t> active;
      for (std::int64_t k = 0; k < n; ++k)
        if (w[k] != 0) active.push_back(static_cast<std::uint32_t>(k));
      const std::size_t per = chunk > 0 ? std::size_t(chunk) : std::size_t(std::max(1, 256 / r));
      std::vector<float> ref(out * in);
      for (std::size_t q = 0; q < ref.size(); ++q) ref[q] = 0.01f * float(q % 7);
      const std::vector<float> g0 = ref;
      for (std::size_t c0 = 0; c0 < active.size(); c0 += per) {
        const std::size_t cnt = std::min(per, active.size() - c0);
        const Index cols = Index(cnt) * r;
        std::vector<float> U(out * cols), V(in * cols), A(out * r), B(in * r);
        for (std::size_t q = 0; q < cnt; ++q) {
          const std::uint32_t k = active[c0 + q];
          lowrank::es::eggroll_factors(p.key, k, out, in, r, A.data(), B.data());
          const auto a = static_cast<float>(c / std::sqrt(double(r)) * w[k]);
          for (int j = 0; j < r; ++j) {
            for (Index i = 0; i < out; ++i) U[(q * r + j) * out + i] = a * A[i * r + j];
            for (Index i = 0; i < in; ++i) V[(q * r + j) * in + i] = B[i * r + j];
          }
        }
        lowrank::rank_update(row_major(ref.data(), out, in), MatrixView<const float>(U.data(), out, cols, 1, out),
                             MatrixView<const float>(V.data(), in, cols, 1, in), 1.0);
      }
      ASSERT_NE(ref, g0);
      es::AggregateOptions o;
      o.chunk = chunk;
      o.max_threads = threads;
      std::vector<float> g = g0;
      es::aggregate_update(p, f, c, row_major(g.data(), out, in), o);
      EXPECT_EQ(0, std::memcmp(g.data(), ref.data(), g.size() * sizeof(float)));
      // Column-major G, and G with a column stride of 2 (the unpacked paths).
      std::vector<float> gc(out * in), gs(out * in * 2, -7.0f);
      for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j) gc[j * out + i] = g0[i * in + j], gs[i * in * 2 + j * 2] = g0[i * in + j];
      es::aggregate_update(p, f, c, MatrixView<float>(gc.data(), out, in, 1, out), o);
      es::aggregate_update(p, f, c, MatrixView<float>(gs.data(), out, in, in * 2, 2), o);
      for (Index i = 0; i < out; ++i)
        for (Index j = 0; j < in; ++j) {
          ASSERT_EQ(std::bit_cast<std::uint32_t>(gc[j * out + i]), std::bit_cast<std::uint32_t>(ref[i * in + j]));
          ASSERT_EQ(std::bit_cast<std::uint32_t>(gs[i * in * 2 + j * 2]),
                    std::bit_cast<std::uint32_t>(ref[i * in + j]));
          ASSERT_EQ(gs[i * in * 2 + j * 2 + 1], -7.0f);
        }
    }
}

// SIMD targets generate the factors straight into the rank update's packed operands: bitwise the
// same as rank_update(G, U, V, 1) on the explicit U = [a_k A_k ...], V = [B_k ...] of each chunk
// (ragged panel and block edges, a short last chunk), and the layouts that take the unpacked path
// (column-major, strided G) agree with it bitwise too. (The scalar target's rank_update rounds
// a * b + c twice, so the comparison runs on the SIMD targets.)
TEST(EsUpdate, PackedFactorsEqualRankUpdateOfExplicitFactors) {
  TargetGuard guard;
  int targets = 0;
  for (Target t : {Target::avx2, Target::avx2_128, Target::avx512}) {
    if (!supported(t)) continue;
    ++targets;
    force_target(t);
    SCOPED_TRACE(lowrank::to_string(t));
    check_packed_factors(23, 37, 14, {1, 3, 4}, {0, 1, 3}, 0);
    // Several groups at r = 1, several threads, several chunks (256, 256, 87 indices) and, with
    // 300 columns, several column blocks of the rank update.
    for (int threads : {1, 2, 3}) check_packed_factors(70, 300, 600, {1}, {0}, threads);
  }
  if (targets == 0) GTEST_SKIP() << "no SIMD target here";
}

TEST(EsUpdate, RankOfTheSumIsAtMostNR) {
  // 3 pairs, r = 2 -> rank <= 6 < min(out, in): the residual after projecting on 6 directions is 0.
  const Index out = 12, in = 10;
  const Perturbation p = make_p(2, 6);
  const std::vector<double> f = {1, -0.5, 2, 0.25, -1, 3};
  const std::vector<double> g = update_ref(p, f, 1.0, out, in);
  // Gram-Schmidt on the columns in double.
  std::vector<std::vector<double>> basis;
  for (Index j = 0; j < in; ++j) {
    std::vector<double> v(out);
    for (Index i = 0; i < out; ++i) v[i] = g[i * in + j];
    for (const auto& b : basis) {
      double d = 0;
      for (Index i = 0; i < out; ++i) d += b[i] * v[i];
      for (Index i = 0; i < out; ++i) v[i] -= d * b[i];
    }
    double nrm = 0;
    for (double x : v) nrm += x * x;
    if (std::sqrt(nrm) > 1e-9) {
      for (double& x : v) x /= std::sqrt(nrm);
      basis.push_back(v);
    }
  }
  EXPECT_EQ(basis.size(), 6u);
}

TEST(EsUpdate, DenseUpdateEqualsExplicitSum) {
  const NoiseKey key{3, 2, 1};
  const std::int64_t len = 301;
  for (Antithetic a : {Antithetic::interleaved, Antithetic::halves, Antithetic::none}) {
    std::vector<double> f(10);
    for (int i = 0; i < 10; ++i) f[i] = i * 0.1 - 0.3;
    std::vector<float> g(len, 0.0f);
    es::aggregate_dense_update(key, 10, a, f, 0.5, g);
    for (std::int64_t e = 0; e < len; ++e) {
      double ref = 0;
      for (int i = 0; i < 10; ++i) {
        const auto mn = es::member_noise(i, 10, a);
        ref += 0.5 * f[i] * mn.sign * es::noise_normal(key, mn.index, e);
      }
      ASSERT_NEAR(g[e], ref, 1e-5);
    }
  }
}

// The mirrored estimator on a quadratic f(W) = -||W - T||^2 / 2: per pair, (f+ - f-) = 2 sigma <grad, E>
// exactly, so (1/N) sum f_i eps_i (paper scale) has mean sigma * grad. Its standard error per entry
// is estimated from the same samples; the test allows 5 of them.
TEST(EsUpdate, QuadraticExpectedUpdateIsSigmaTimesGradient) {
  const Index out = 6, in = 5;
  const std::int64_t n = 4000;
  const double sigma = 0.05;
  const std::vector<float> w = gaussian(out * in, 10), target = gaussian(out * in, 11);
  std::vector<double> grad(out * in);
  for (std::size_t q = 0; q < grad.size(); ++q) grad[q] = -(double(w[q]) - target[q]);
  for (int r : {1, 4}) {
    const Perturbation p = make_p(r, n, Antithetic::interleaved, sigma, 99);
    std::vector<double> f(n);
    std::vector<double> sum(out * in, 0.0), sum2(out * in, 0.0);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::vector<double> e = eps_ref(p, i, out, in);
      double fi = 0;
      for (std::size_t q = 0; q < e.size(); ++q) {
        const double d = w[q] + sigma * e[q] - target[q];
        fi -= 0.5 * d * d;
      }
      f[i] = fi;
    }
    // Per-pair samples of the update: (f+ - f-) E_k, whose mean over pairs times 2/N*(N/2)... = update.
    for (std::int64_t k = 0; k < n / 2; ++k) {
      const std::vector<double> e = eps_ref(p, 2 * k, out, in);
      for (std::size_t q = 0; q < e.size(); ++q) {
        const double s = (f[2 * k] - f[2 * k + 1]) * e[q] / 2;  // mean over pairs = (1/N) sum_i f_i eps_i
        sum[q] += s, sum2[q] += s * s;
      }
    }
    std::vector<float> g(out * in, 0.0f);
    es::aggregate_update(p, f, es::update_scale(es::UpdateScale::paper, n, sigma), row_major(g.data(), out, in));
    const double pairs = n / 2.0;
    for (std::size_t q = 0; q < g.size(); ++q) {
      const double mean = sum[q] / pairs, var = sum2[q] / pairs - mean * mean;
      const double se = std::sqrt(var / pairs);
      EXPECT_NEAR(g[q], mean, 1e-4 * (std::abs(mean) + se)) << "library vs explicit, entry " << q;
      EXPECT_NEAR(g[q], sigma * grad[q], 5 * se) << "r " << r << " entry " << q;
    }
  }
}

// The rank-r noise approaches full-rank Gaussian noise as r grows (kurtosis of E's entries is
// 3 + 6 / r). On the quadratic above, the mean squared error of the update at a fixed population,
// averaged over fixed seeds, exceeds full-rank ES's by a gap that shrinks as r grows.
TEST(EsUpdate, GapToFullRankEsShrinksWithRank) {
  const Index out = 4, in = 4;
  const std::int64_t n = 16;
  const double sigma = 0.05;
  const std::vector<float> w = gaussian(out * in, 12), target = gaussian(out * in, 13);
  auto fitness = [&](const std::vector<float>& wp) {
    double f = 0;
    for (std::size_t q = 0; q < wp.size(); ++q) f -= 0.5 * (wp[q] - target[q]) * (wp[q] - target[q]);
    return f;
  };
  std::vector<double> grad(out * in);
  for (std::size_t q = 0; q < grad.size(); ++q) grad[q] = -(double(w[q]) - target[q]);
  const int seeds = 400;
  auto mse_of = [&](int r) {  // r == 0: full-rank (dense) noise
    double mse = 0;
    for (int s = 0; s < seeds; ++s) {
      std::vector<double> f(n);
      std::vector<float> g(out * in, 0.0f), wp(out * in);
      const NoiseKey key{1000u + static_cast<unsigned>(s), 0, 0};
      for (std::int64_t i = 0; i < n; ++i) {
        if (r == 0) {
          const auto mn = es::member_noise(i, n, Antithetic::interleaved);
          for (Index q = 0; q < out * in; ++q) wp[q] = w[q] + float(sigma * mn.sign * es::noise_normal(key, mn.index, q));
        } else {
          Perturbation p = make_p(r, n, Antithetic::interleaved, sigma);
          p.key = key;
          std::vector<float> e(out * in);
          es::dense_perturbation(p, i, row_major(e.data(), out, in));
          for (Index q = 0; q < out * in; ++q) wp[q] = w[q] + float(sigma * e[q]);
        }
        f[i] = fitness(wp);
      }
      if (r == 0) {
        es::aggregate_dense_update(key, n, Antithetic::interleaved, f, 1.0 / (n * sigma), g);
      } else {
        Perturbation p = make_p(r, n, Antithetic::interleaved, sigma);
        p.key = key;
        es::aggregate_update(p, f, 1.0 / (n * sigma), row_major(g.data(), out, in));
      }
      for (std::size_t q = 0; q < g.size(); ++q) mse += (g[q] - grad[q]) * (g[q] - grad[q]);
    }
    return mse / seeds;
  };
  const double full = mse_of(0), r1 = mse_of(1), r4 = mse_of(4), r16 = mse_of(16);
  RecordProperty("mse_full", std::to_string(full));
  std::printf("MSE full %.4f r1 %.4f r4 %.4f r16 %.4f\n", full, r1, r4, r16);
  EXPECT_GT(r1 - full, r4 - full);
  EXPECT_GT(r4 - full, r16 - full);
  EXPECT_LT(std::abs(r16 - full), 0.5 * (r1 - full));
}

TEST(EsUpdate, BadInput) {
  const Perturbation p = make_p(1, 4);
  std::vector<float> g(6, 1.0f);
  const auto G = row_major(g.data(), 2, 3);
  std::vector<double> f = {1, 2, 3};
  EXPECT_THROW(es::aggregate_update(p, f, 1.0, G), Error);  // size
  f = {1, 2, NAN, 3};
  EXPECT_THROW(es::aggregate_update(p, f, 1.0, G), Error);  // non-finite
  f = {1, 2, 3, 4};
  EXPECT_THROW(es::aggregate_update(p, f, INFINITY, G), Error);
  EXPECT_THROW(es::aggregate_update(make_p(1, 3), std::vector<double>{1, 2, 3}, 1.0, G), Error);
  for (float v : g) EXPECT_EQ(v, 1.0f);
}

// ---- memory: nothing of size N x out x in ------------------------------------------------------

TEST(EsMemory, NoPopulationSizedAllocation) {
  const Index out = 256, in = 256;
  const std::int64_t n = 512;
  const Perturbation p = make_p(4, n);
  const std::vector<float> x = gaussian(n * in, 14), w = gaussian(out * in, 15);
  std::vector<float> y(n * out), g(out * in, 0.0f);
  std::vector<std::int64_t> members(n);
  std::iota(members.begin(), members.end(), 0);
  std::vector<double> f(n);
  for (std::int64_t i = 0; i < n; ++i) f[i] = std::sin(double(i));
  g_largest = 0;
  g_track = true;
  es::population_forward(row_major<const float>(x.data(), n, in),
                         WeightView<const float>{row_major<const float>(w.data(), out, in), Layout::out_in}, p, members,
                         row_major(y.data(), n, out));
  es::aggregate_update(p, f, 1.0 / n, row_major(g.data(), out, in));
  g_track = false;
  // N m n floats would be 128 MiB; factors for all members N (m + n) r would be 4 MiB. The largest
  // single allocation must stay near one chunk's factors (256 (m + n) floats = 512 KiB, held once:
  // in the rank update's packed operands on SIMD targets, as U and V on the scalar one).
  EXPECT_LT(g_largest.load(), std::size_t(n) * (out + in) * 4 * sizeof(float) / 2);
  EXPECT_LE(g_largest.load(), std::size_t(2) * 256 * (out + in) * sizeof(float));
}

// Memory running out inside population_forward or aggregate_update reaches the caller as
// std::bad_alloc with Y (G) unchanged: every buffer of their parallel regions is allocated before
// the region, on the calling thread (an exception leaving an OpenMP region terminates the
// program; this test then dies instead of failing). Each part runs in a fresh thread (empty
// thread-local buffers, which grow from empty to exactly the size asked), where a first call
// sizes every buffer but the one the second call needs more of: the forward's per-thread factor
// scratch (rank 4 after rank 1: 4096 floats against 1024), the update's per-thread stream (rank 3
// after rank 4; on SIMD targets within the group's factor columns, 18912 floats against 16896; on
// the scalar target alone, 3072 against none). Allocations of more than 4 KiB fail in the second
// call; the small per-call vectors (the collapsed fitness, 256 bytes) still succeed.
TEST(EsMemory, AllocationFailureThrowsToTheCallerAndLeavesTheOutputUnchanged) {
  const Index out = 512, in = 512;
  const std::int64_t n = 64;
  const std::vector<float> x = gaussian(n * in, 16), w = gaussian(out * in, 17, 0.05f);
  const auto X = row_major<const float>(x.data(), n, in);
  const WeightView<const float> W{row_major<const float>(w.data(), out, in), Layout::out_in};
  std::vector<std::int64_t> members(n);
  std::iota(members.begin(), members.end(), 0);
  std::vector<double> f(n);
  for (std::int64_t i = 0; i < n; ++i) f[i] = std::cos(double(i));

  std::thread([&] {
    es::ForwardOptions fo;
    fo.max_threads = 2;
    std::vector<float> y(n * out, 0.0f);
    es::population_forward(X, W, make_p(1, n), members, row_major(y.data(), n, out), fo);
    const std::vector<float> y0 = y;
    bool threw = false;
    g_fail_above = 4096;
    try {
      es::population_forward(X, W, make_p(4, n), members, row_major(y.data(), n, out), fo);
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    g_fail_above = static_cast<std::size_t>(-1);
    EXPECT_TRUE(threw);
    EXPECT_EQ(y, y0);
    // With memory back the same call runs: Y then equals the same call into a second buffer (the
    // forward overwrites Y) and no longer the rank-1 result.
    es::population_forward(X, W, make_p(4, n), members, row_major(y.data(), n, out), fo);
    std::vector<float> y_again(n * out, 1.0f);
    es::population_forward(X, W, make_p(4, n), members, row_major(y_again.data(), n, out), fo);
    EXPECT_EQ(y, y_again);
    EXPECT_NE(y, y0);
  }).join();

  std::thread([&] {
    es::AggregateOptions ao;
    ao.max_threads = 2;
    std::vector<float> g(out * in, 0.5f);
    es::aggregate_update(make_p(4, n), f, 1.0 / n, row_major(g.data(), out, in), ao);
    const std::vector<float> g0 = g;
    bool threw = false;
    g_fail_above = 4096;
    try {
      es::aggregate_update(make_p(3, n), f, 1.0 / n, row_major(g.data(), out, in), ao);
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    g_fail_above = static_cast<std::size_t>(-1);
    EXPECT_TRUE(threw);
    EXPECT_EQ(g, g0);
  }).join();
}

// ---- ask / tell -------------------------------------------------------------------------------

es::EggrollConfig small_config() {
  es::EggrollConfig c;
  c.population = 32;
  c.rank = 2;
  c.sigma = 0.05;
  c.seed = 2026;
  c.optimizer.lr = 0.5;
  return c;
}

TEST(EsPopulation, TellEqualsManualUpdateAndAdvancesEpoch) {
  es::EggrollConfig c = small_config();
  es::Population pop(c, {{"w", es::ParamKind::low_rank, 8, 5}, {"b", es::ParamKind::dense, 8, 1},
                         {"frozen", es::ParamKind::frozen, 3, 3}});
  std::vector<float> w = gaussian(40, 16), b = gaussian(8, 17), fz = gaussian(9, 18);
  const std::vector<float> w0 = w, b0 = b, fz0 = fz;
  const es::Generation gen = pop.ask();
  EXPECT_EQ(gen.epoch, 0u);
  std::vector<double> f(c.population);
  for (int i = 0; i < c.population; ++i) f[i] = std::sin(0.3 * i) * 10;
  const es::ParamRef refs[] = {{row_major(w.data(), 8, 5)}, {row_major(b.data(), 1, 8)}, {row_major(fz.data(), 3, 3)}};
  pop.tell(gen, f, refs);
  EXPECT_EQ(pop.epoch(), 1u);
  // Manual: shape, aggregate, SGD.
  std::vector<double> s(f.size());
  es::shape_fitness(f, c.shaping, c.antithetic, s);
  std::vector<float> gw(40, 0.0f), gb(8, 0.0f);
  const double scale = 1.0 / c.population;
  es::aggregate_update(pop.perturbation(0, gen), s, scale, row_major(gw.data(), 8, 5));
  es::aggregate_dense_update(NoiseKey{c.seed, 1, 0}, c.population, c.antithetic, s, scale, gb);
  for (int q = 0; q < 40; ++q) EXPECT_EQ(w[q], w0[q] + float(c.optimizer.lr) * gw[q]);
  for (int q = 0; q < 8; ++q) EXPECT_EQ(b[q], b0[q] + float(c.optimizer.lr) * gb[q]);
  EXPECT_EQ(fz, fz0);
  // The old generation is rejected; nothing changes.
  const std::vector<float> w1 = w;
  EXPECT_THROW(pop.tell(gen, f, refs), Error);
  EXPECT_EQ(w, w1);
  EXPECT_EQ(pop.epoch(), 1u);
}

TEST(EsPopulation, PerturbedMatchesForwardAndNoiseReuse) {
  es::EggrollConfig c = small_config();
  c.noise_reuse = 2;
  es::Population pop(c, {{"w", es::ParamKind::low_rank, 7, 9}});
  const std::vector<float> w = gaussian(63, 19);
  std::vector<float> a(63), b(63);
  es::Generation g0 = pop.ask(), g1{1, c.population}, g2{2, c.population};
  pop.perturbed(0, g0, 5, row_major<const float>(w.data(), 7, 9), row_major(a.data(), 7, 9));
  pop.perturbed(0, g1, 5, row_major<const float>(w.data(), 7, 9), row_major(b.data(), 7, 9));
  EXPECT_EQ(a, b);  // epochs 0 and 1 share noise epoch 0
  pop.perturbed(0, g2, 5, row_major<const float>(w.data(), 7, 9), row_major(b.data(), 7, 9));
  EXPECT_NE(a, b);
  // x (W + sigma eps)^T from perturbed equals population_forward's row.
  const std::vector<float> x = gaussian(9, 20);
  std::vector<float> y(7);
  const std::int64_t m = 5;
  es::population_forward(row_major<const float>(x.data(), 1, 9),
                         WeightView<const float>{row_major<const float>(w.data(), 7, 9), Layout::out_in},
                         pop.perturbation(0, g0), std::span(&m, 1), row_major(y.data(), 1, 7));
  for (int o = 0; o < 7; ++o) {
    double ref = 0;
    for (int i = 0; i < 9; ++i) ref += double(x[i]) * a[o * 9 + i];
    EXPECT_NEAR(y[o], ref, 1e-5);
  }
}

TEST(EsPopulation, SameSeedSameParametersOnAnyThreadCountAndAdamWorks) {
  auto run = [](int threads, es::EsOptimizer::Kind kind) {
    set_num_threads(threads);
    es::EggrollConfig c = small_config();
    c.population = 64;
    c.optimizer.kind = kind;
    c.optimizer.lr = kind == es::EsOptimizer::Kind::adam ? 0.05 : 0.5;
    c.shaping.shaping = es::Shaping::centered_ranks;
    es::Population pop(c, {{"w", es::ParamKind::low_rank, 24, 16}, {"b", es::ParamKind::dense, 24, 1}});
    std::vector<float> w(24 * 16, 0.0f), b(24, 0.0f);
    const std::vector<float> target = gaussian(24 * 16, 21);
    double first = 0, last = 0;
    for (int gen = 0; gen < 30; ++gen) {
      const es::Generation g = pop.ask();
      std::vector<double> f(c.population);
      std::vector<float> wp(w.size());
      for (std::int64_t i = 0; i < c.population; ++i) {
        pop.perturbed(0, g, i, row_major<const float>(w.data(), 24, 16), row_major(wp.data(), 24, 16));
        double fi = 0;
        for (std::size_t q = 0; q < wp.size(); ++q) fi -= (wp[q] - target[q]) * (wp[q] - target[q]);
        f[i] = fi;
      }
      const es::ParamRef refs[] = {{row_major(w.data(), 24, 16)}, {row_major(b.data(), 24, 1)}};
      const es::TellResult r = pop.tell(g, f, refs);
      if (gen == 0) first = r.mean_fitness;
      last = r.mean_fitness;
    }
    set_num_threads(0);
    EXPECT_GT(last, first);  // the loss decreases
    std::vector<float> all(w);
    all.insert(all.end(), b.begin(), b.end());
    return all;
  };
  for (auto kind : {es::EsOptimizer::Kind::sgd, es::EsOptimizer::Kind::adam}) {
    const std::vector<float> t1 = run(1, kind), t2 = run(2, kind), t3 = run(3, kind);
    EXPECT_EQ(t1, t2);
    EXPECT_EQ(t1, t3);
  }
}

TEST(EsPopulation, BadConfigurationsAndInputs) {
  auto make = [](auto edit) {
    es::EggrollConfig c = small_config();
    edit(c);
    es::Population pop(c, {{"w", es::ParamKind::low_rank, 4, 4}});
  };
  EXPECT_THROW(make([](auto& c) { c.population = 0; }), Error);
  EXPECT_THROW(make([](auto& c) { c.population = 7; }), Error);
  EXPECT_THROW(make([](auto& c) { c.sigma = 0; }), Error);
  EXPECT_THROW(make([](auto& c) { c.sigma = -0.1; }), Error);
  EXPECT_THROW(make([](auto& c) { c.rank = 0; }), Error);
  EXPECT_THROW(make([](auto& c) { c.shaping.shaping = es::Shaping::grouped_z_score; c.shaping.group_size = 5; }), Error);
  EXPECT_NO_THROW(make([](auto& c) { c.population = 7; c.antithetic = Antithetic::none; }));
  try {
    make([](auto& c) { c.population = 9; });
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("even"), std::string::npos) << e.what();
  }
  es::Population pop(small_config(), {{"w", es::ParamKind::low_rank, 4, 4}});
  std::vector<float> w(16, 1.0f), wrong(15, 1.0f);
  std::vector<double> f(32, 1.0);
  f[3] = NAN;
  const es::ParamRef good[] = {{row_major(w.data(), 4, 4)}};
  EXPECT_THROW(pop.tell(pop.ask(), f, good), Error);  // non-finite under the default policy
  f[3] = 0;
  const es::ParamRef bad[] = {{row_major(wrong.data(), 3, 5)}};
  EXPECT_THROW(pop.tell(pop.ask(), f, bad), Error);
  EXPECT_THROW(pop.tell(pop.ask(), std::vector<double>(31, 1.0), good), Error);
  EXPECT_EQ(w, std::vector<float>(16, 1.0f));
  EXPECT_EQ(pop.epoch(), 0u);
}

}  // namespace
