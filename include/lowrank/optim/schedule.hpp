/// \file
/// Learning-rate multipliers as pure functions of the step: ReLoRA's jagged cosine
/// ("cosine_restarts", `../shared/reference/optimizers.md` §3.3), GaLore's cosine with linear
/// warmup, and the ReLoRA trigger arithmetic (when to merge, when to reset the optimizer).
///
/// Every function returns a multiplier of the peak learning rate (`lr_t = lr_peak * mult(t)`);
/// the caller owns the step counter. Pure, thread-safe and deterministic (libm `cos` only).
#pragma once

#include <cstdint>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace optim {

/// Parameters of ReLoRA's jagged cosine schedule. Steps are optimizer (update) steps counted
/// from the scheduler start.
struct JaggedCosine {
  std::int64_t num_training_steps = 0;    ///< N >= 1, a multiple of `cycle_length`
  std::int64_t first_warmup_steps = 0;    ///< W1 >= 0 (`--warmup_steps`)
  std::int64_t restart_warmup_steps = 0;  ///< Wr in [0, C] (`--restart_warmup_steps`; 50-100 in practice)
  std::int64_t cycle_length = 0;          ///< C >= 1 (`--cycle_length`, the reference's `restart_every`)
  double min_lr_ratio = 0.1;              ///< eta_min in [0, 1]: the cosine's floor
  std::int64_t adjust_step = 0;           ///< delta >= 0: shifts the cycles (warm-started runs)
};

/// Validates a `JaggedCosine`: the reference's assertions `N % C == 0`, `delta + W1 <= C` and
/// `delta + W1 <= N`, plus (stricter than the reference, which would misbehave silently)
/// `N >= 1`, `C >= 1`, `W1 >= 0`, `delta >= 0`, `0 <= Wr <= C` (a longer ramp never reaches the
/// cosine) and a finite `eta_min` in [0, 1].
/// \throws Error naming `lowrank::optim::jagged_cosine` (or `fn` when given), the parameter and
///   the values.
void check_jagged_cosine(const JaggedCosine& schedule, const char* fn = nullptr);

/// ReLoRA's jagged cosine multiplier at step `t >= 0`. With `c(p) = eta_min + (1 - eta_min)
/// (1 + cos(pi p)) / 2`, `D = max(1, N - W1)`, `t' = t + delta`, `k = t' mod C`, `j = t' div C`:
///
/// - `t < W1`: `t / W1` (linear first warmup from 0);
/// - `k < Wr` and `t >= C`: `(k / Wr) c((j C + Wr - W1) / D)`, a linear ramp from 0 at every
///   restart up to the global cosine's value at the ramp's end, so the schedule is continuous at
///   `t = j C + Wr`;
/// - otherwise `c((t' - W1) / D)`.
///
/// Hence (delta = 0): `mult(0) = 0`, `mult(W1) = 1` when `W1 < C`, `mult(j C) = 0` for `j >= 1`
/// (when Wr > 0), never above 1, and close to `eta_min` at `t = N - 1`. Steps past N are
/// evaluated by the same formula (the cosine argument exceeds 1), as in the reference.
/// Cost: O(1).
/// \throws Error for an invalid schedule (see `check_jagged_cosine`) or `t < 0`.
[[nodiscard]] double jagged_cosine(const JaggedCosine& schedule, std::int64_t t);

/// GaLore's "cosine" multiplier: linear warmup `t / W` for `t < W`, then
/// `eta_min + (1 - eta_min) (1 + cos(pi p)) / 2` with `p = (t - W) / max(1, N - W)`, which decays
/// from 1 to `eta_min` (GaLore's default 0.1: 10% of the peak) at `t = N`. Unlike the reference,
/// `p` is clamped to 1, so steps past N stay at `eta_min`.
/// \param t                   step >= 0
/// \param num_training_steps  N >= 1
/// \param warmup_steps        W in [0, N]
/// \param min_lr_ratio        eta_min, finite, in [0, 1]
/// \throws Error for t < 0 or invalid parameters.
[[nodiscard]] double cosine_with_warmup(std::int64_t t, std::int64_t num_training_steps, std::int64_t warmup_steps,
                                        double min_lr_ratio = 0.1);

/// ReLoRA's merge trigger: true when `(step - start) % every == 1`, i.e. one step after each
/// multiple of `every` counted from the scheduler start `start` (with `every = C` this is the first
/// step of each restart warmup, when the learning rate is 0 or nearly so). The condition also
/// holds at `start + 1`; the reference's loop merges only once `every` update steps have passed
/// since the run (re)started, so guard with `step - start > every` to match it.
/// \param step   the current update step, `>= start`
/// \param every  `--relora`, at least 2 (with 1 the condition can never hold)
/// \throws Error for `step < start` or `every < 2`.
[[nodiscard]] bool relora_merge_due(std::int64_t step, std::int64_t start, std::int64_t every);

/// ReLoRA's optimizer-reset trigger: true when `(step - start) % cycle_length == 1`.
/// \throws Error for `step < start` or `cycle_length < 2`.
[[nodiscard]] bool relora_reset_due(std::int64_t step, std::int64_t start, std::int64_t cycle_length);

}  // namespace optim

LOWRANK_END_NAMESPACE
