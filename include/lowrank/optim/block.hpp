/// \file
/// FRUGAL's block optimizer (`philip-zmushko/FRUGAL` `BlockOptimizer`, BAdam-like; its
/// pre-training "frugal"): a group of weight tensors of which a window of
/// `round(density x count)` is active at a time (`../shared/reference/optimizers.md` §2.2 (c)).
///
/// Each step, for every block i of the group (the counter s = steps taken before this one):
///   1. if s is a multiple of the gap T, every block is deactivated (Adam state freed, step 0)
///      and the next window, chosen by `BlockOrder`, is activated with zero moments;
///   2. weight decay on every block at its placement, with the unscaled lr;
///   3. active blocks: AdamW at `lr_a = lr * active_lr_scale` (torch eps by default);
///      inactive blocks: `W -= lr_f sign(G)` (sign_sgd), `W -= lr_f G` (sgd) or nothing (none),
///      with `lr_f = lr_a * inactive_lr_scale`.
///
/// Every block's state is the whole tensor's Adam moments, so the memory held is the window's
/// `2 x 4 x elements` bytes and moves with the window; `state_bytes_for` gives the largest the
/// order can reach.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/optim/adam.hpp"
#include "lowrank/optim/subspace.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace optim {

/// How the active window moves at each switch (FRUGAL `block_order`; L blocks, k active).
enum class BlockOrder {
  /// k distinct blocks drawn uniformly at each switch (Philox keyed by `BlockConfig::seed`, stream =
  /// the switch number; not torch's `randperm` stream, so the draws differ from the reference's).
  random,
  /// Cyclic window `s, s+1, ..., s+k-1 (mod L)` starting at 0, then `s += k (mod L)`.
  ascending,
  /// Cyclic window `s, s-1, ..., s-k+1 (mod L)` starting at L-1, then `s -= k (mod L)` (FRUGAL's
  /// C4 pre-training scripts).
  descending,
  /// k/2 pairs `(j, L-1-j)` with `j = s, ..., s+k/2-1 (mod floor(L/2))` starting at 0, then
  /// `s += k/2 (mod floor(L/2))`; k must be even (the middle block of an odd L is never active).
  mirror,
};

/// Configuration of a `BlockOptimizer`.
struct BlockConfig {
  double density = 0.25;          ///< rho: `round(rho L)` blocks active (ties to even, as Python's round)
  std::int64_t update_gap = 200;  ///< T: steps between switches
  BlockOrder order = BlockOrder::random;  ///< FRUGAL's code default
  std::uint64_t seed = 0;                 ///< Philox key of `BlockOrder::random`
  /// FRUGAL's AdamW: torch eps 1e-8, decay before the update (its scripts use wd 0).
  AdamConfig adam{0.9, 0.999, 1e-8, EpsConvention::torch, 0.0, DecayPlacement::before_update, true};
  ResidualRule inactive = ResidualRule::sign_sgd;  ///< none, sign_sgd or sgd (fira is rejected)
  double active_lr_scale = 1.0;                    ///< FRUGAL `proj_params_lr_scale`
  double inactive_lr_scale = 1.0;                  ///< FRUGAL `inactive_lr_scale`
  NonFinitePolicy non_finite = NonFinitePolicy::error;
};

/// FRUGAL's pre-training recipe (`scripts/benchmark_c4`): density 0.25, gap 200, descending
/// order, sign-SGD on the inactive blocks, torch AdamW with eps 1e-8 and no weight decay.
[[nodiscard]] BlockConfig frugal_block_config(double density = 0.25, BlockOrder order = BlockOrder::descending);

/// The `rows x cols` shape of one block (a vector parameter is `1 x n`).
struct BlockShape {
  Index rows = 0;
  Index cols = 0;
};

/// What one `BlockOptimizer::step` did.
struct BlockStepReport {
  bool taken = false;     ///< false: skipped (non-finite gradient under `NonFinitePolicy::skip`)
  bool switched = false;  ///< a new window was activated before the update
};

/// FRUGAL's block optimizer over a fixed, ordered group of fp32 weight tensors.
class BlockOptimizer {
 public:
  /// \throws Error on an empty group, an empty shape, density outside [0, 1], gap < 1, an odd
  ///   active count with `BlockOrder::mirror`, negative or non-finite lr scales, an invalid Adam
  ///   config, or `ResidualRule::fira`.
  BlockOptimizer(std::vector<BlockShape> shapes, const BlockConfig& config);

  /// One step over the whole group: `W[i]` and `G[i]` are block i's weight and gradient (any
  /// positive strides), in the order of the shapes given at construction.
  /// \throws Error (every W and the state unchanged) on a count or shape mismatch, a null view or
  ///   a stride that is not positive, a negative or non-finite lr or one whose step sizes overflow
  ///   fp32, or a non-finite gradient under `NonFinitePolicy::error`.
  BlockStepReport step(std::span<const MatrixView<float>> W, std::span<const MatrixView<const float>> G, double lr);

  [[nodiscard]] Index blocks() const noexcept { return static_cast<Index>(shapes_.size()); }
  [[nodiscard]] const std::vector<BlockShape>& shapes() const noexcept { return shapes_; }
  [[nodiscard]] const BlockConfig& config() const noexcept { return config_; }
  /// k = `round(density x blocks())`.
  [[nodiscard]] Index active_count() const noexcept { return active_count_; }
  /// The active blocks in activation order (empty before the first step).
  [[nodiscard]] const std::vector<Index>& active_blocks() const noexcept { return active_list_; }
  [[nodiscard]] bool is_active(Index block) const;
  /// Block i's Adam state (empty moments while inactive; step = steps since its activation).
  [[nodiscard]] const AdamState& state(Index block) const;
  /// Steps taken.
  [[nodiscard]] std::int64_t steps() const noexcept { return steps_; }
  /// Windows activated so far.
  [[nodiscard]] std::int64_t switches() const noexcept { return switches_; }

  /// Optimizer-state bytes held now (the active blocks' m and v).
  [[nodiscard]] std::size_t state_bytes() const noexcept;
  /// The most state bytes any window of this order can hold: the k largest blocks for `random`;
  /// the largest window the cyclic orders reach. \throws Error as the constructor.
  [[nodiscard]] static std::size_t state_bytes_for(const std::vector<BlockShape>& shapes, const BlockConfig& config);

 private:
  // The window activated at switch number `n`, given the window start `start` (updated).
  static std::vector<Index> next_window(const BlockConfig& config, Index count, Index k, std::int64_t n,
                                        Index& start);

  std::vector<BlockShape> shapes_;
  BlockConfig config_;
  Index active_count_ = 0;
  Index start_ = 0;
  std::vector<AdamState> states_;  // moments allocated exactly for the active blocks
  std::vector<Index> active_list_;
  std::int64_t steps_ = 0;
  std::int64_t switches_ = 0;
};

}  // namespace optim

LOWRANK_END_NAMESPACE
