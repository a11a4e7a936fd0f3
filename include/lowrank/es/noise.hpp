/// \file
/// EGGROLL noise streams: the low-rank factors of every population member, regenerated from
/// (seed, layer, epoch, member) on any thread count, ISA or device, never stored.
///
/// For a matrix parameter of `out x in` (PyTorch `nn.Linear` orientation) and rank r, member i of
/// a population perturbs the weight to
/// \f$ W + \mathrm{sign}_i\, \frac{\sigma}{\sqrt r} A_k B_k^\top \f$, where `k` is the member's noise
/// index (`member_noise`), `A_k` is `out x r` and `B_k` is `in x r`, both standard normal.
/// The factors come from one stream of `(in + out) r` normals of the key and noise index: elements
/// `[0, in r)` are B (row-major, `B(j, c)` = element `j r + c`), elements `[in r, (in + out) r)` are A
/// (`A(i, c)` = element `in r + i r + c`) — the order of the official implementation's
/// `(in + out, r)` draw, B rows first.
#pragma once

#include <cstdint>

#include "lowrank/core/config.hpp"
#include "lowrank/core/philox.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace es {

/// Which members share noise.
enum class Antithetic {
  none,         ///< every member has its own noise, sign +1
  interleaved,  ///< members 2k and 2k+1 share noise k with signs +1 and -1 (EGGROLL, EvoTorch)
  halves,       ///< members k and k + N/2 share noise k with signs +1 and -1 (evosax `[z; -z]`)
};

/// Selects one parameter's noise for one noise epoch.
struct NoiseKey {
  std::uint64_t seed = 0;   ///< the run's seed
  std::uint32_t layer = 0;  ///< the parameter's id: distinct parameters (same shape or not) get independent noise
  std::uint32_t epoch = 0;  ///< noise epoch: `epoch / noise_reuse` (`noise_epoch`)
};

/// The noise epoch of a generation: `epoch / noise_reuse`, or 0 when `noise_reuse == 0` (the same
/// noise forever, the official library's default).
LOWRANK_HOST_DEVICE constexpr std::uint32_t noise_epoch(std::uint64_t epoch, std::uint32_t noise_reuse) noexcept {
  return noise_reuse == 0 ? 0u : static_cast<std::uint32_t>(epoch / noise_reuse);
}

/// A member's noise index and sign.
struct MemberNoise {
  std::uint32_t index;
  float sign;  ///< +1 or -1
};

/// Noise index and sign of `member` (0-based, global) in a population of `population` members.
/// Preconditions (checked by the callers that take user input): `0 <= member < population`, and
/// `population` even unless `Antithetic::none`.
LOWRANK_HOST_DEVICE constexpr MemberNoise member_noise(std::int64_t member, std::int64_t population,
                                                       Antithetic antithetic) noexcept {
  switch (antithetic) {
    case Antithetic::interleaved:
      return {static_cast<std::uint32_t>(member / 2), (member & 1) ? -1.0f : 1.0f};
    case Antithetic::halves: {
      const std::int64_t half = population / 2;
      return member < half ? MemberNoise{static_cast<std::uint32_t>(member), 1.0f}
                           : MemberNoise{static_cast<std::uint32_t>(member - half), -1.0f};
    }
    case Antithetic::none:
    default:
      return {static_cast<std::uint32_t>(member), 1.0f};
  }
}

/// Number of distinct noise indices of a population: N/2 with antithetic pairs, N without.
LOWRANK_HOST_DEVICE constexpr std::int64_t noise_count(std::int64_t population, Antithetic antithetic) noexcept {
  return antithetic == Antithetic::none ? population : population / 2;
}

/// Philox4x32-10 block `block` of the stream of (key, noise index): key `(seed_lo, seed_hi)`,
/// counter `(block, noise_index, key.epoch, key.layer)`.
LOWRANK_HOST_DEVICE Philox4x32Block noise_block(const NoiseKey& key, std::uint32_t noise_index,
                                                std::uint32_t block) {
  return philox4x32<10>(Philox4x32Block{{block, noise_index, key.epoch, key.layer}},
                        Philox4x32Key{{static_cast<std::uint32_t>(key.seed), static_cast<std::uint32_t>(key.seed >> 32)}});
}

/// Normals `4 block .. 4 block + 3` of the stream: `normal_pair` of words (0, 1) gives elements 0
/// (cosine) and 1 (sine), words (2, 3) elements 2 and 3. Bitwise identical on every target and device.
LOWRANK_HOST_DEVICE void noise_normals4(const NoiseKey& key, std::uint32_t noise_index, std::uint32_t block,
                                        float out[4]) {
  const Philox4x32Block b = noise_block(key, noise_index, block);
  const NormalPair z01 = normal_pair(b.v[0], b.v[1]);
  const NormalPair z23 = normal_pair(b.v[2], b.v[3]);
  out[0] = z01.c;
  out[1] = z01.s;
  out[2] = z23.c;
  out[3] = z23.s;
}

/// Normal number `element` of the stream of (key, noise index); `element < 2^34`.
LOWRANK_HOST_DEVICE float noise_normal(const NoiseKey& key, std::uint32_t noise_index, std::uint64_t element) {
  const Philox4x32Block b = noise_block(key, noise_index, static_cast<std::uint32_t>(element / 4));
  const unsigned lane = static_cast<unsigned>(element % 4);
  const unsigned pair = lane & 2u;
  const NormalPair z = normal_pair(b.v[pair], b.v[pair + 1]);
  return (lane & 1u) ? z.s : z.c;
}

/// Largest `(in + out) r` (or vector length) a noise stream covers: 2^34 normals.
inline constexpr std::uint64_t max_stream_normals = std::uint64_t{1} << 34;

}  // namespace es

LOWRANK_END_NAMESPACE
