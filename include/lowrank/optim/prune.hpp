/// \file
/// Pruning of Adam moments at a ReLoRA restart (`../shared/reference/optimizers.md` §3.2): random
/// pruning (keep where a uniform draw exceeds p), magnitude pruning (keep the entries whose
/// magnitude is above the p-quantile), and full zeroing. Masks are drawn separately for m and v;
/// the step counter is left alone unless asked (the reference does not reset it).
///
/// Randomness comes only from `lowrank::RandomStream`; entry `i` of a span uses
/// `RandomStream(seed, stream).uniform(i)`, so a (seed, stream) pair prunes the same entries on
/// every machine and thread count. `prune_moments` keys m with stream `2 stream` and v with
/// `2 stream + 1`, so the two masks are independent; give every tensor its own `stream`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "lowrank/core/config.hpp"
#include "lowrank/optim/adam.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace optim {

/// How `prune_moments` prunes.
enum class PruneMode {
  /// Keep entry i where `uniform(i) > ratio`: about `1 - ratio` of the entries survive (ReLoRA's
  /// default reset is random pruning with ratio 0.999, keeping about 0.1%).
  random,
  /// Keep exactly the entries with `|x| > quantile(|x|, ratio)` (linear interpolation between
  /// order statistics, as `torch.quantile`), per tensor (ReLoRA's `optimizer_magnitude_pruning`;
  /// 0.8-0.9 in practice).
  magnitude,
  /// Zero everything (a plain reset).
  zero,
};

/// Options of `prune_moments`.
struct PruneOptions {
  PruneMode mode = PruneMode::random;
  double ratio = 0.999;  ///< p in [0, 1]; ignored by `PruneMode::zero`
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;  ///< m uses stream `2 stream`, v `2 stream + 1` (random mode only)
  bool reset_step = false;   ///< also set `state.step = 0` (the reference keeps it)
};

/// What `prune_moments` kept.
struct PruneReport {
  std::size_t kept_m = 0;  ///< entries of m left unchanged (the others are now 0)
  std::size_t kept_v = 0;  ///< entries of v left unchanged
  std::size_t size = 0;    ///< entries per moment (`rows * cols`)
};

/// Random pruning in place: `x[i] = 0` unless `RandomStream(seed, stream).uniform(i) > p`.
/// Values are not read (NaN and infinity are pruned like any other value). As the reference's
/// `rand > p`, p = 0 still prunes an entry whose draw is exactly 0 (probability 2^-24).
/// Cost: one Philox draw per entry. Determinism: bitwise, any thread count.
/// \returns the number of entries kept.
/// \throws Error (x unchanged) if p is not a finite value in [0, 1].
std::size_t prune_random(std::span<float> x, double p, std::uint64_t seed, std::uint64_t stream = 0);

/// Magnitude pruning in place: with `q` the p-quantile of `|x|` (sorted magnitudes `a_0 <= ... <=
/// a_{n-1}`, position `h = p (n - 1)`, `q = a_floor(h) + (h - floor(h)) (a_floor(h)+1 - a_floor(h))`
/// in fp64), every entry with `|x[i]| <= q` is set to 0 and every entry with `|x[i]| > q` kept:
/// p = 0 keeps all but the smallest magnitude(s), p = 1 keeps nothing, ties at q are all pruned.
/// Cost: O(n) expected (two `std::nth_element` on a copy of |x|), n floats of scratch.
/// \returns the number of entries kept.
/// \throws Error (x unchanged) if p is not a finite value in [0, 1] or x holds a NaN or infinity
///   (the quantile is undefined).
std::size_t prune_magnitude(std::span<float> x, double p);

/// Sets every entry to 0. \returns 0 (entries kept).
std::size_t prune_zero(std::span<float> x) noexcept;

/// Prunes both Adam moments of `state` as `options` says, m and v with independent masks
/// (random: separate streams; magnitude: separate quantiles), and resets `state.step` only with
/// `options.reset_step`.
/// \throws Error (state unchanged) if m and v differ in shape, the ratio is invalid, or (magnitude
///   mode) a moment holds a non-finite value.
PruneReport prune_moments(AdamState& state, const PruneOptions& options);

}  // namespace optim

LOWRANK_END_NAMESPACE
