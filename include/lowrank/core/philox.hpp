/// \file
/// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11; Random123), written so that
/// the same functions compile for the CPU and for CUDA device code.
///
/// Determinism: a number depends only on (seed, stream, index). The raw bits and the uniform
/// draws are bitwise identical on every thread count, ISA and device. Normal draws use
/// `logf`/`sqrtf`/`cosf`/`sinf` and are bitwise identical on one platform's math library; across
/// math libraries (host vs device) they agree to a few ulp.
#pragma once

#include <cmath>
#include <cstdint>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE

/// The 128-bit counter and the 128-bit output block of Philox4x32.
struct Philox4x32Block {
  std::uint32_t v[4];
};

/// The 64-bit key of Philox4x32.
struct Philox4x32Key {
  std::uint32_t v[2];
};

namespace detail {
LOWRANK_HOST_DEVICE void mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  lo = static_cast<std::uint32_t>(p);
}
}  // namespace detail

/// Philox4x32 with `Rounds` rounds (10 is the standard, Crush-resistant choice).
/// \return the 4 output words for counter `ctr` under key `key`.
template <int Rounds = 10>
LOWRANK_HOST_DEVICE Philox4x32Block philox4x32(Philox4x32Block ctr, Philox4x32Key key) {
  constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
  constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  for (int round = 0; round < Rounds; ++round) {
    if (round > 0) {
      key.v[0] += kW0;
      key.v[1] += kW1;
    }
    std::uint32_t hi0, lo0, hi1, lo1;
    detail::mulhilo32(kM0, ctr.v[0], hi0, lo0);
    detail::mulhilo32(kM1, ctr.v[2], hi1, lo1);
    ctr = Philox4x32Block{{hi1 ^ ctr.v[1] ^ key.v[0], lo1, hi0 ^ ctr.v[3] ^ key.v[1], lo0}};
  }
  return ctr;
}

/// Uniform float in [0, 1) from the top 24 bits of `bits` (every value a multiple of 2^-24).
LOWRANK_HOST_DEVICE float uniform_from_bits(std::uint32_t bits) {
  return static_cast<float>(bits >> 8) * 0x1.0p-24f;
}

/// A keyed stream of random numbers: `(seed, stream)` select the stream, `index` the position in
/// it. Block `b` of the stream is Philox4x32-10 with key `(seed_lo, seed_hi)` and counter
/// `(b_lo, b_hi, stream_lo, stream_hi)`; word `index` is word `index % 4` of block `index / 4`.
class RandomStream {
 public:
  LOWRANK_HOST_DEVICE constexpr RandomStream(std::uint64_t seed, std::uint64_t stream = 0) noexcept
      : key_{{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}},
        stream_lo_(static_cast<std::uint32_t>(stream)),
        stream_hi_(static_cast<std::uint32_t>(stream >> 32)) {}

  /// The four words of block `block`.
  LOWRANK_HOST_DEVICE Philox4x32Block block(std::uint64_t block) const {
    return philox4x32<10>(Philox4x32Block{{static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
                                           stream_lo_, stream_hi_}},
                          key_);
  }

  /// 32 random bits at position `index`.
  LOWRANK_HOST_DEVICE std::uint32_t bits(std::uint64_t index) const { return block(index / 4).v[index % 4]; }

  /// Uniform in [0, 1) at position `index` (24 bits of resolution).
  LOWRANK_HOST_DEVICE float uniform(std::uint64_t index) const { return uniform_from_bits(bits(index)); }

  /// Standard normal at position `index`: Box-Muller on the word pair (0, 1) of block `index / 4`
  /// for indices 0 and 1 mod 4 (cosine, sine branch), on the pair (2, 3) for 2 and 3 mod 4.
  LOWRANK_HOST_DEVICE float normal(std::uint64_t index) const {
    const Philox4x32Block b = block(index / 4);
    const unsigned lane = static_cast<unsigned>(index % 4);
    const unsigned pair = lane & 2u;
    // u1 in (0, 1] so that log(u1) is finite; u2 in [0, 1).
    const float u1 = static_cast<float>((b.v[pair] >> 8) + 1u) * 0x1.0p-24f;
    const float u2 = uniform_from_bits(b.v[pair + 1]);
    const float radius = sqrtf(-2.0f * logf(u1));
    const float angle = 6.283185307179586f * u2;
    return radius * ((lane & 1u) ? sinf(angle) : cosf(angle));
  }

  /// Fills `out[0..count)` with `uniform(first + i)`.
  LOWRANK_HOST_DEVICE void fill_uniform(float* out, std::uint64_t count, std::uint64_t first = 0) const {
    for (std::uint64_t i = 0; i < count; ++i) out[i] = uniform(first + i);
  }
  /// Fills `out[0..count)` with `normal(first + i)`.
  LOWRANK_HOST_DEVICE void fill_normal(float* out, std::uint64_t count, std::uint64_t first = 0) const {
    for (std::uint64_t i = 0; i < count; ++i) out[i] = normal(first + i);
  }

 private:
  Philox4x32Key key_;
  std::uint32_t stream_lo_;
  std::uint32_t stream_hi_;
};

LOWRANK_END_NAMESPACE
