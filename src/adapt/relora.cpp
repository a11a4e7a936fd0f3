// Compiled parts of the merge-based training primitives: the jagged cosine and cosine schedules
// and the ReLoRA triggers (include/lowrank/optim/schedule.hpp), moment pruning
// (include/lowrank/optim/prune.hpp) and SwitchLoRA's scalar helpers
// (include/lowrank/adapt/switchlora.hpp). ReLoRA's merge itself is a header template
// (include/lowrank/adapt/relora.hpp).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <span>
#include <vector>

#include "lowrank/adapt/switchlora.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/optim/adam.hpp"
#include "lowrank/optim/prune.hpp"
#include "lowrank/optim/schedule.hpp"

LOWRANK_BEGIN_NAMESPACE

using detail::fail;

// ---------------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------------
namespace optim {
namespace {

double cosine_floor(double p, double min_lr_ratio) {
  return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
}

void check_ratio(const char* fn, double min_lr_ratio) {
  if (!std::isfinite(min_lr_ratio) || min_lr_ratio < 0 || min_lr_ratio > 1) {
    fail(fn, "min_lr_ratio is {}; it must be a finite value in [0, 1]", min_lr_ratio);
  }
}

}  // namespace

void check_jagged_cosine(const JaggedCosine& s, const char* fn) {
  if (fn == nullptr) fn = "lowrank::optim::jagged_cosine";
  const std::int64_t N = s.num_training_steps, C = s.cycle_length, W1 = s.first_warmup_steps,
                     Wr = s.restart_warmup_steps, d = s.adjust_step;
  if (N < 1) fail(fn, "num_training_steps is {}; it must be at least 1", N);
  if (C < 1) fail(fn, "cycle_length is {}; it must be at least 1", C);
  if (W1 < 0) fail(fn, "first_warmup_steps is {}; it must be >= 0", W1);
  if (d < 0) fail(fn, "adjust_step is {}; it must be >= 0", d);
  if (Wr < 0 || Wr > C) fail(fn, "restart_warmup_steps is {}; it must be in [0, cycle_length = {}]", Wr, C);
  if (N % C != 0) {
    fail(fn, "num_training_steps = {} is not a multiple of cycle_length = {} (remainder {})", N, C, N % C);
  }
  if (d + W1 > C) {
    fail(fn, "adjust_step + first_warmup_steps = {} + {} exceeds cycle_length = {}: the first restart would come "
             "before the warmup ends", d, W1, C);
  }
  if (d + W1 > N) {
    fail(fn, "adjust_step + first_warmup_steps = {} + {} exceeds num_training_steps = {}", d, W1, N);
  }
  check_ratio(fn, s.min_lr_ratio);
}

double jagged_cosine(const JaggedCosine& s, std::int64_t t) {
  constexpr const char* fn = "lowrank::optim::jagged_cosine";
  check_jagged_cosine(s, fn);
  if (t < 0) fail(fn, "step t is {}; it must be >= 0", t);
  const std::int64_t W1 = s.first_warmup_steps, Wr = s.restart_warmup_steps, C = s.cycle_length;
  if (t < W1) return static_cast<double>(t) / static_cast<double>(W1);
  const std::int64_t shifted = t + s.adjust_step;
  const std::int64_t k = shifted % C, j = shifted / C;
  const double denom = static_cast<double>(std::max<std::int64_t>(1, s.num_training_steps - W1));
  if (k < Wr && t >= C) {
    const double end = cosine_floor(static_cast<double>(j * C + Wr - W1) / denom, s.min_lr_ratio);
    return static_cast<double>(k) / static_cast<double>(Wr) * end;
  }
  return cosine_floor(static_cast<double>(shifted - W1) / denom, s.min_lr_ratio);
}

double cosine_with_warmup(std::int64_t t, std::int64_t N, std::int64_t W, double min_lr_ratio) {
  constexpr const char* fn = "lowrank::optim::cosine_with_warmup";
  if (N < 1) fail(fn, "num_training_steps is {}; it must be at least 1", N);
  if (W < 0 || W > N) fail(fn, "warmup_steps is {}; it must be in [0, num_training_steps = {}]", W, N);
  check_ratio(fn, min_lr_ratio);
  if (t < 0) fail(fn, "step t is {}; it must be >= 0", t);
  if (t < W) return static_cast<double>(t) / static_cast<double>(W);
  const double p = std::min(1.0, static_cast<double>(t - W) / static_cast<double>(std::max<std::int64_t>(1, N - W)));
  return cosine_floor(p, min_lr_ratio);
}

namespace {
bool trigger(const char* fn, const char* name, std::int64_t step, std::int64_t start, std::int64_t every) {
  if (every < 2) fail(fn, "{} is {}; it must be at least 2 (x % {} == 1 never holds)", name, every, every);
  if (step < start) fail(fn, "step {} is before the scheduler start {}", step, start);
  return (step - start) % every == 1;
}
}  // namespace

bool relora_merge_due(std::int64_t step, std::int64_t start, std::int64_t every) {
  return trigger("lowrank::optim::relora_merge_due", "every", step, start, every);
}

bool relora_reset_due(std::int64_t step, std::int64_t start, std::int64_t cycle_length) {
  return trigger("lowrank::optim::relora_reset_due", "cycle_length", step, start, cycle_length);
}

// ---------------------------------------------------------------------------------------------
// Moment pruning
// ---------------------------------------------------------------------------------------------
namespace {

void check_p(const char* fn, double p, std::size_t n) {
  if (!std::isfinite(p) || p < 0 || p > 1) fail(fn, "ratio p is {}; it must be a finite value in [0, 1] ({} entries)", p, n);
}

void check_finite(const char* fn, const char* what, std::span<const float> x) {
  for (std::size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i])) {
      fail(fn, "{} ({} entries) has a non-finite value {} at {}: its magnitude quantile is undefined", what, x.size(),
           x[i], i);
    }
}

// The p-quantile of |x| with linear interpolation between order statistics (torch.quantile's
// default), from two nth_element calls on a copy: O(n) expected.
double abs_quantile(std::span<const float> x, double p) {
  std::vector<float> a(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) a[i] = std::fabs(x[i]);
  const double h = p * static_cast<double>(a.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(h));
  const double frac = h - static_cast<double>(lo);
  std::nth_element(a.begin(), a.begin() + static_cast<std::ptrdiff_t>(lo), a.end());
  const double a_lo = a[lo];
  if (frac == 0 || lo + 1 >= a.size()) return a_lo;
  // After nth_element everything right of lo is >= a[lo]; the next order statistic is their minimum.
  const double a_hi = *std::min_element(a.begin() + static_cast<std::ptrdiff_t>(lo) + 1, a.end());
  return a_lo + frac * (a_hi - a_lo);
}

std::size_t keep_random(std::span<float> x, double p, std::uint64_t seed, std::uint64_t stream) {
  const RandomStream rng(seed, stream);
  std::size_t kept = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (static_cast<double>(rng.uniform(i)) > p) {
      ++kept;
    } else {
      x[i] = 0.0f;
    }
  }
  return kept;
}

std::size_t keep_above(std::span<float> x, double thr) {
  std::size_t kept = 0;
  for (float& e : x) {
    if (static_cast<double>(std::fabs(e)) > thr) {
      ++kept;
    } else {
      e = 0.0f;
    }
  }
  return kept;
}

}  // namespace

std::size_t prune_random(std::span<float> x, double p, std::uint64_t seed, std::uint64_t stream) {
  check_p("lowrank::optim::prune_random", p, x.size());
  return keep_random(x, p, seed, stream);
}

std::size_t prune_magnitude(std::span<float> x, double p) {
  constexpr const char* fn = "lowrank::optim::prune_magnitude";
  check_p(fn, p, x.size());
  check_finite(fn, "x", x);
  if (x.empty()) return 0;
  return keep_above(x, abs_quantile(x, p));
}

std::size_t prune_zero(std::span<float> x) noexcept {
  std::fill(x.begin(), x.end(), 0.0f);
  return 0;
}

PruneReport prune_moments(AdamState& state, const PruneOptions& o) {
  constexpr const char* fn = "lowrank::optim::prune_moments";
  if (state.m.rows() != state.v.rows() || state.m.cols() != state.v.cols()) {
    fail(fn, "state.m is {}x{} but state.v is {}x{}; they must have the same shape", state.m.rows(), state.m.cols(),
         state.v.rows(), state.v.cols());
  }
  PruneReport rep;
  rep.size = static_cast<std::size_t>(state.m.size());
  std::span<float> m(state.m.data(), rep.size), v(state.v.data(), rep.size);
  switch (o.mode) {
    case PruneMode::random:
      check_p(fn, o.ratio, rep.size);
      rep.kept_m = keep_random(m, o.ratio, o.seed, 2 * o.stream);
      rep.kept_v = keep_random(v, o.ratio, o.seed, 2 * o.stream + 1);
      break;
    case PruneMode::magnitude: {
      check_p(fn, o.ratio, rep.size);
      check_finite(fn, "state.m", m);
      check_finite(fn, "state.v", v);
      if (rep.size != 0) {
        const double tm = abs_quantile(m, o.ratio), tv = abs_quantile(v, o.ratio);
        rep.kept_m = keep_above(m, tm);
        rep.kept_v = keep_above(v, tv);
      }
      break;
    }
    case PruneMode::zero:
      prune_zero(m);
      prune_zero(v);
      break;
    default:
      fail(fn, "options.mode {} is not a PruneMode", static_cast<int>(o.mode));
  }
  if (o.reset_step) state.step = 0;
  return rep;
}

}  // namespace optim

// ---------------------------------------------------------------------------------------------
// SwitchLoRA helpers
// ---------------------------------------------------------------------------------------------
namespace adapt {

SwitchLoraBounds switchlora_init_bounds(Index out, Index in, Index rank, SwitchLoraInit init, bool zero_init_B) {
  constexpr const char* fn = "lowrank::adapt::switchlora_init_bounds";
  if (out < 1 || in < 1) fail(fn, "out = {} and in = {}; both must be at least 1", out, in);
  if (rank < 1 || rank > std::min(out, in)) {
    fail(fn, "rank r = {} is outside [1, min(out, in) = {}] (out {}, in {})", rank, std::min(out, in), out, in);
  }
  SwitchLoraBounds b;
  if (init == SwitchLoraInit::origin_lora) {
    b.A = 1.0 / std::sqrt(static_cast<double>(in));
    b.B = 0;
    return b;
  }
  const double m = static_cast<double>(out), n = static_cast<double>(in), r = static_cast<double>(rank);
  const double sqrt_gain = std::sqrt(1.0 / std::sqrt(3.0));
  const double sigma_A = std::pow(std::sqrt(m) * r / std::pow(n, 1.5), 0.25) * sqrt_gain;
  const double sigma_B = std::pow(r / std::sqrt(m * n), 0.25) * sqrt_gain;
  b.A = std::sqrt(3.0) * sigma_A;
  b.B = zero_init_B ? 0.0 : std::sqrt(3.0) * sigma_B;
  return b;
}

double switchlora_interval(double interval0, std::int64_t t, double descent_steps) {
  constexpr const char* fn = "lowrank::adapt::switchlora_interval";
  if (!std::isfinite(interval0) || !(interval0 > 0)) fail(fn, "interval0 is {}; it must be finite and > 0", interval0);
  if (!std::isfinite(descent_steps) || !(descent_steps > 0)) {
    fail(fn, "descent steps E is {}; it must be finite and > 0", descent_steps);
  }
  if (t < 0) fail(fn, "step t is {}; it must be >= 0", t);
  return interval0 / std::pow(0.3, static_cast<double>(t + 1) / descent_steps);
}

Index switchlora_round(double x, double u) {
  if (!std::isfinite(x) || x < 0) fail("lowrank::adapt::switchlora_round", "x is {}; it must be finite and >= 0", x);
  const double f = std::floor(x);
  return static_cast<Index>(f) + (u < x - f ? 1 : 0);
}

void check_switchlora_config(const char* fn, Index out, Index in, const SwitchLoraConfig& c) {
  if (out < 1 || in < 1) fail(fn, "out = {} and in = {}; both must be at least 1", out, in);
  if (c.rank < 1 || c.rank > std::min(out, in)) {
    fail(fn, "config.rank = {} is outside [1, min(out, in) = {}] (out {}, in {})", c.rank, std::min(out, in), out, in);
  }
  if (!std::isfinite(c.alpha)) fail(fn, "config.alpha is {}; it must be finite", c.alpha);
  if (c.adam_warm_step < 0) fail(fn, "config.adam_warm_step is {}; it must be >= 0", c.adam_warm_step);
  if (!std::isfinite(c.interval0) || c.interval0 < 2.0 * c.adam_warm_step || !(c.interval0 > 0)) {
    fail(fn, "config.interval0 is {}; it must be finite, > 0 and >= 2 * adam_warm_step = {}", c.interval0,
         2 * c.adam_warm_step);
  }
  if (!std::isfinite(c.descent_rate) || !(c.descent_rate > 0)) {
    fail(fn, "config.descent_rate is {}; it must be finite and > 0", c.descent_rate);
  }
  if (c.total_steps < 1) fail(fn, "config.total_steps is {}; it must be at least 1", c.total_steps);
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
