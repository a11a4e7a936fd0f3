#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lowrank/core/philox.hpp"

namespace {

using lowrank::Philox4x32Block;
using lowrank::Philox4x32Key;

struct KnownAnswer {
  Philox4x32Block counter;
  Philox4x32Key key;
  Philox4x32Block expected;
};

// Random123's kat_vectors, "philox4x32 10" lines (counter[4], key[2] -> output[4]).
TEST(Philox4x32, Random123KnownAnswers) {
  const KnownAnswer cases[] = {
      {{{0, 0, 0, 0}}, {{0, 0}}, {{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}}},
      {{{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}},
       {{0xffffffff, 0xffffffff}},
       {{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}}},
      {{{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}},
       {{0xa4093822, 0x299f31d0}},
       {{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}}},
  };
  for (const auto& c : cases) {
    const Philox4x32Block out = lowrank::philox4x32<10>(c.counter, c.key);
    for (int w = 0; w < 4; ++w) EXPECT_EQ(out.v[w], c.expected.v[w]) << "word " << w;
  }
}

TEST(RandomStream, KeyAndCounterLayout) {
  const std::uint64_t seed = 0x299f31d0a4093822ull;
  const std::uint64_t stream = 0x0370734413198a2eull;
  const lowrank::RandomStream rs(seed, stream);
  // Block 0x85a308d3243f6a88 of this stream is the third known answer.
  const auto b = rs.block(0x85a308d3243f6a88ull);
  EXPECT_EQ(b.v[0], 0xd16cfe09u);
  EXPECT_EQ(b.v[3], 0x24126ea1u);
  for (std::uint64_t i : {0ull, 1ull, 6ull, 4000000001ull}) EXPECT_EQ(rs.bits(i), rs.block(i / 4).v[i % 4]);
}

TEST(RandomStream, SameKeySameNumbersOtherKeysDiffer) {
  const lowrank::RandomStream a(42, 7), b(42, 7), other_stream(42, 8), other_seed(43, 7);
  int differ_stream = 0, differ_seed = 0;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    ASSERT_EQ(a.bits(i), b.bits(i));
    ASSERT_EQ(a.normal(i), b.normal(i));
    differ_stream += a.bits(i) != other_stream.bits(i);
    differ_seed += a.bits(i) != other_seed.bits(i);
  }
  EXPECT_GT(differ_stream, 990);
  EXPECT_GT(differ_seed, 990);
}

TEST(RandomStream, UniformMoments) {
  const lowrank::RandomStream rs(123, 0);
  const int n = 1 << 20;
  double sum = 0, sum2 = 0;
  float lo = 1, hi = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rs.uniform(static_cast<std::uint64_t>(i));
    sum += u;
    sum2 += u * u;
    lo = std::min<float>(lo, u);
    hi = std::max<float>(hi, u);
  }
  const double mean = sum / n, var = sum2 / n - mean * mean;
  EXPECT_GE(lo, 0.0f);
  EXPECT_LT(hi, 1.0f);
  // Standard errors: mean 0.29/sqrt(n) = 2.8e-4; variance about 8.7e-5.
  EXPECT_NEAR(mean, 0.5, 6 * 2.8e-4);
  EXPECT_NEAR(var, 1.0 / 12.0, 6 * 8.7e-5);
}

TEST(RandomStream, NormalMoments) {
  const lowrank::RandomStream rs(2024, 3);
  const int n = 1 << 20;
  std::vector<float> z(n);
  rs.fill_normal(z.data(), n);
  double m1 = 0, m2 = 0, m3 = 0, m4 = 0;
  for (float x : z) {
    ASSERT_TRUE(std::isfinite(x));
    m1 += x, m2 += double(x) * x, m3 += double(x) * x * x, m4 += double(x) * x * x * x;
  }
  m1 /= n, m2 /= n, m3 /= n, m4 /= n;
  // Standard errors of the raw moments of N(0,1): sqrt(1/n), sqrt(2/n), sqrt(15/n), sqrt(96/n).
  const double se = 1.0 / std::sqrt(double(n));
  EXPECT_NEAR(m1, 0.0, 6 * se);
  EXPECT_NEAR(m2, 1.0, 6 * std::sqrt(2.0) * se);
  EXPECT_NEAR(m3, 0.0, 6 * std::sqrt(15.0) * se);
  EXPECT_NEAR(m4, 3.0, 6 * std::sqrt(96.0) * se);
  // Neighbouring draws (cosine/sine branch of one pair) are uncorrelated.
  double cross = 0;
  for (int i = 0; i + 1 < n; i += 2) cross += double(z[i]) * z[i + 1];
  EXPECT_NEAR(cross / (n / 2), 0.0, 6 * std::sqrt(2.0) * se);
}

TEST(RandomStream, FillMatchesPointwise) {
  const lowrank::RandomStream rs(9, 1);
  std::vector<float> u(37);
  rs.fill_uniform(u.data(), u.size(), 1000);
  for (std::size_t i = 0; i < u.size(); ++i) EXPECT_EQ(u[i], rs.uniform(1000 + i));
}

// normal_pair against a float64 Box-Muller of the same words: every radius input from a stride
// through all 2^24 (plus the ends and both sides of the sqrt(2) fold), angles spread over all four
// quadrants. fp32 rounding of a value below 5.8 bounds the error at a few 1e-7.
TEST(NormalPair, MatchesFloat64BoxMuller) {
  double worst = 0;
  auto check = [&](std::uint32_t k, std::uint32_t j) {
    const std::uint32_t w0 = k << 8, w1 = (j << 8) | 0xffu;
    const lowrank::NormalPair z = lowrank::normal_pair(w0, w1);
    const double u1 = (k + 1.0) * 0x1.0p-24, u2 = j * 0x1.0p-24;
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double c = r * std::cos(6.283185307179586 * u2), s = r * std::sin(6.283185307179586 * u2);
    worst = std::max({worst, std::abs(c - z.c), std::abs(s - z.s)});
  };
  for (std::uint32_t k = 0; k < (1u << 24); k += 97) check(k, (k * 2654435761u) >> 8);
  for (std::uint32_t k : {0u, 1u, (1u << 24) - 1, 0x3504f3u, 0x3504f4u, 0xb504f3u, 0xb504f4u})
    for (std::uint32_t j : {0u, 1u, (1u << 22) - 1, 1u << 22, (1u << 23) + 5, (1u << 24) - 1}) check(k, j);
  EXPECT_LT(worst, 1e-6);
  // The largest value: u1 = 2^-24 gives radius sqrt(48 ln 2).
  EXPECT_NEAR(lowrank::normal_pair(0, 0).c, std::sqrt(48 * std::log(2.0)), 1e-6);
  EXPECT_EQ(lowrank::normal_pair(0xffffffffu, 0).c, 0.0f);  // u1 = 1: radius 0
}

}  // namespace
