// lowrank's own bf16/fp16 conversions (used by the scalar kernels and the gather/scatter path)
// against Eigen's independent implementation.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <random>

#include <Eigen/Core>

namespace lowrank_test_bits {
#include "float_bits-inl.hpp"
}

namespace {
using namespace lowrank_test_bits;

std::uint16_t bits_of(Eigen::bfloat16 x) { return std::bit_cast<std::uint16_t>(x); }
std::uint16_t bits_of(Eigen::half x) { return std::bit_cast<std::uint16_t>(x); }

TEST(FloatBits, Widening16To32IsExactForEveryPattern) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto b = std::bit_cast<Eigen::bfloat16>(static_cast<std::uint16_t>(h));
    const auto f = std::bit_cast<Eigen::half>(static_cast<std::uint16_t>(h));
    const float fb = bf16_bits_to_f32(static_cast<std::uint16_t>(h));
    const float ff = f16_bits_to_f32(static_cast<std::uint16_t>(h));
    if (std::isnan(static_cast<float>(b))) {
      EXPECT_TRUE(std::isnan(fb));
    } else {
      EXPECT_EQ(std::bit_cast<std::uint32_t>(fb), std::bit_cast<std::uint32_t>(static_cast<float>(b))) << h;
    }
    if (std::isnan(static_cast<float>(f))) {
      EXPECT_TRUE(std::isnan(ff));
    } else {
      EXPECT_EQ(std::bit_cast<std::uint32_t>(ff), std::bit_cast<std::uint32_t>(static_cast<float>(f))) << h;
    }
  }
}

void check_narrowing(float x) {
  if (std::isnan(x)) {
    EXPECT_TRUE(std::isnan(bf16_bits_to_f32(f32_to_bf16_bits(x))));
    EXPECT_TRUE(std::isnan(f16_bits_to_f32(f32_to_f16_bits(x))));
    return;
  }
  EXPECT_EQ(f32_to_bf16_bits(x), bits_of(Eigen::bfloat16(x))) << x;
  EXPECT_EQ(f32_to_f16_bits(x), bits_of(Eigen::half(x))) << x;
}

TEST(FloatBits, NarrowingRoundsToNearestEvenLikeEigen) {
  // Edges: ties, overflow thresholds, subnormals, signed zeros, infinities.
  const float edges[] = {0.0f, -0.0f, 1.0f, -1.0f, 1.0f + 0x1.0p-8f, 1.0f + 3 * 0x1.0p-8f, 1.0f + 0x1.0p-11f,
                         1.0f + 3 * 0x1.0p-11f, 65504.0f, 65519.996f, 65520.0f, 70000.0f, 0x1.0p-14f, 0x1.0p-24f,
                         0x1.0p-25f, 0x1.8p-25f, 0x1.0p-26f, 3.0f * 0x1.0p-25f, 0x1.ffcp-15f, 0x1.ffep-15f,
                         3.4e38f, -3.4e38f, 0x1.fffffep127f, INFINITY, -INFINITY, 1e-40f, -1e-45f, NAN};
  for (float x : edges) check_narrowing(x);
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const float x = std::bit_cast<float>(static_cast<std::uint32_t>(rng()));
    check_narrowing(x);
  }
  std::uniform_real_distribution<float> moderate(-70000.0f, 70000.0f);
  for (int i = 0; i < 200000; ++i) check_narrowing(moderate(rng));
}

}  // namespace
