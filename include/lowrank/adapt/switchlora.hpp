/// \file
/// SwitchLoRA (arXiv 2406.06564; `../shared/reference/optimizers.md` §5.1): a LoRA adapter whose
/// rows of A and columns of B are switched, a few per step, for candidate vectors from per-layer
/// pools, with the base weight compensated so that the layer's function is unchanged, the
/// counterpart vector frozen for `adam_warm_step` steps and its Adam state zeroed, and Adam bias
/// correction restarted per vector.
///
/// Per training step (the reference's call order): forward, backward, then
/// `layer.switch_step(W, t)` (switches and advances the freeze counters), then
/// `layer.adam_step(gA, gB, config, lr)` (frozen vectors get a zero gradient), every step.
///
/// Randomness comes only from `lowrank::RandomStream(seed, stream)` of the layer (give each layer
/// its own stream). Indices: candidate k of the A pool, entry j, uses `uniform(k in + j)`;
/// candidate k of the B pool, entry i, `uniform(K in + k out + i)` (K = candidate_num); step t of
/// `switch_step` uses indices from `2^62 + t (2 + 4 r)` on (see `switch_step`). Results are
/// bitwise reproducible for a (seed, stream) pair on one ISA (the compensation goes through
/// `rank_update`, whose SIMD and scalar paths agree to rounding).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "lowrank/adapt/lora.hpp"
#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/rank_update.hpp"
#include "lowrank/optim/adam.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt {

/// How the candidate pools (and hence the initial A and B) are drawn.
enum class SwitchLoraInit {
  /// SwitchLoRA's bounds (`get_init_lora_bound`): A and B both non-zero, see `switchlora_init_bounds`.
  switchlora,
  /// `init_lora_type="origin_lora"`: A kaiming-uniform `U(-1/sqrt(in), 1/sqrt(in))`, B = 0.
  origin_lora,
};

/// Configuration of a `SwitchLoraLayer` (reference defaults).
struct SwitchLoraConfig {
  Index rank = 0;                                    ///< r in [1, min(out, in)]
  double alpha = 1;                                  ///< `lora_alpha` (code default 1); s = alpha / r
  bool use_rslora = false;                           ///< s = alpha / sqrt(r) instead
  SwitchLoraInit init = SwitchLoraInit::switchlora;  ///< pool distribution
  bool zero_init_B = false;                          ///< `--zero_init_B`: B's bound 0, B never switched
  double interval0 = 40;                             ///< `--switch_lora_interval`, >= 2 adam_warm_step
  double descent_rate = 0.1;                         ///< `--switch_lora_descent_rate`: E = rate * total_steps
  std::int64_t total_steps = 0;                      ///< training steps, >= 1
  int adam_warm_step = 5;                            ///< steps a counterpart stays frozen, >= 0
  bool zero_switched_state = true;                   ///< zero the counterpart's m, v (`--remain_switch_state` = false)
  bool zero_switched_step = true;                    ///< zero its step (`--remain_switch_step_state` = false)
};

/// Half-widths of the uniform distributions of A's and B's entries, `U(-bound, bound)`.
struct SwitchLoraBounds {
  double A = 0;
  double B = 0;
};

/// SwitchLoRA's initialisation bounds for a layer with `m = out`, `n = in`, rank r:
/// `gain = 1/sqrt(3)` (leaky_relu gain for a = sqrt(5)),
/// `sigma_A = ((sqrt(m) r) / n^(3/2))^(1/4) sqrt(gain)`, `sigma_B = (r / sqrt(m n))^(1/4) sqrt(gain)`,
/// `bound = sqrt(3) sigma`; `zero_init_B` sets B's bound to 0. `origin_lora`: A's bound
/// `1/sqrt(in)`, B's 0.
/// \throws Error for `out, in < 1` or r outside [1, min(out, in)].
[[nodiscard]] SwitchLoraBounds switchlora_init_bounds(Index out, Index in, Index rank,
                                                      SwitchLoraInit init = SwitchLoraInit::switchlora,
                                                      bool zero_init_B = false);

/// The switching interval at step `t >= 0`: `interval0 / 0.3^((t + 1) / E)` ("exponential"
/// descent; `E = descent_rate * total_steps`). At `t + 1 = E` it is `interval0 / 0.3` (133.3 for
/// the default 40); it grows without bound, so switching fades out.
/// \throws Error for t < 0, a non-finite or non-positive interval0 or E.
[[nodiscard]] double switchlora_interval(double interval0, std::int64_t t, double descent_steps);

/// Stochastic rounding of an expected count `x >= 0` with a uniform `u` in [0, 1):
/// `floor(x) + (u < x - floor(x) ? 1 : 0)`, whose mean over u is x.
/// \throws Error for a negative or non-finite x.
[[nodiscard]] Index switchlora_round(double x, double u);

/// Validates a configuration for an `out x in` layer: features >= 1, rank in [1, min(out, in)],
/// finite alpha, `interval0 >= 2 adam_warm_step` (finite), `adam_warm_step >= 0`, descent_rate
/// finite and > 0, `total_steps >= 1`.
/// \throws Error naming `fn`, the field and the values.
void check_switchlora_config(const char* fn, Index out, Index in, const SwitchLoraConfig& config);

/// Adam state of the LoRA factors with per-vector step counters (the reference's `StepAdamW`):
/// row i of A has its own step `step_A[i]`, column j of B its own `step_B[j]`, so bias correction
/// restarts for a vector whose state was zeroed by a switch.
struct SwitchLoraMoments {
  RowMatrix<float> m_A, v_A;         ///< r x in
  RowMatrix<float> m_B, v_B;         ///< out x r
  std::vector<std::int64_t> step_A;  ///< r counters, one per row of A
  std::vector<std::int64_t> step_B;  ///< r counters, one per column of B
};

/// What one `switch_step` did.
struct SwitchReport {
  double interval = 0;  ///< `switchlora_interval` at this step
  double expected = 0;  ///< `r / interval`: expected switches of A rows (and of B columns)
  /// (row of A, candidate index) of each A switch and (column of B, candidate index) of each B
  /// switch, in the order applied.
  std::vector<std::pair<Index, Index>> A, B;
};

/// One SwitchLoRA layer: the adapter (`A`: r x in, `B`: out x r, scaling s), the candidate pools,
/// which candidate each vector came from, the freeze counters and the factors' Adam state.
///
/// Pools: `candidate_num = min(in, out)` candidate rows for A (length in) and as many candidate
/// columns for B (length out, stored as the rows of `candidates_B()`), drawn from the bounds of
/// `switchlora_init_bounds`. Initially vector i is candidate `candidate_num - r + i` (the
/// reference's contiguous mode: the last r). The pool slot of a candidate in use is stale; a
/// switch writes the outgoing vector back into its slot.
///
/// The base weight W is the caller's; every switch adds its compensation to W in place, so the
/// effective weight `W + s B A` is preserved to the rounding of W's storage.
template <FactorScalar T = float>
class SwitchLoraLayer {
 public:
  /// Draws the pools and the initial factors, zero Adam state, nothing frozen.
  /// \param out, in  features of the base layer; `layout` is stored in the adapter and every W
  ///                 passed later must have it
  /// \throws Error for an invalid configuration (`check_switchlora_config`).
  SwitchLoraLayer(Index out, Index in, Layout layout, const SwitchLoraConfig& config, std::uint64_t seed,
                  std::uint64_t stream = 0)
      : config_(config), seed_(seed), stream_(stream) {
    constexpr const char* fn = "lowrank::adapt::SwitchLoraLayer";
    check_switchlora_config(fn, out, in, config);
    const Index r = config.rank;
    const Index k = std::min(out, in);
    bounds_ = switchlora_init_bounds(out, in, r, config.init, config.zero_init_B);
    const RandomStream rng(seed, stream);
    pool_A_.resize(k, in);
    pool_B_.resize(k, out);
    for (Index c = 0; c < k; ++c)
      for (Index j = 0; j < in; ++j)
        pool_A_(c, j) = static_cast<T>((2.0 * rng.uniform(static_cast<std::uint64_t>(c * in + j)) - 1.0) * bounds_.A);
    for (Index c = 0; c < k; ++c)
      for (Index i = 0; i < out; ++i)
        pool_B_(c, i) =
            static_cast<T>((2.0 * rng.uniform(static_cast<std::uint64_t>(k * in + c * out + i)) - 1.0) * bounds_.B);
    adapter_.A.resize(r, in);
    adapter_.B.resize(out, r);
    adapter_.alpha = config.alpha;
    adapter_.use_rslora = config.use_rslora;
    adapter_.layout = layout;
    selected_A_.resize(static_cast<std::size_t>(r));
    selected_B_.resize(static_cast<std::size_t>(r));
    for (Index i = 0; i < r; ++i) {
      const Index c = k - r + i;
      selected_A_[static_cast<std::size_t>(i)] = c;
      selected_B_[static_cast<std::size_t>(i)] = c;
      adapter_.A.row(i) = pool_A_.row(c);
      adapter_.B.col(i) = pool_B_.row(c).transpose();
    }
    frozen_A_.assign(static_cast<std::size_t>(r), 0);
    frozen_B_.assign(static_cast<std::size_t>(r), 0);
    moments_.m_A = RowMatrix<float>::Zero(r, in);
    moments_.v_A = RowMatrix<float>::Zero(r, in);
    moments_.m_B = RowMatrix<float>::Zero(out, r);
    moments_.v_B = RowMatrix<float>::Zero(out, r);
    moments_.step_A.assign(static_cast<std::size_t>(r), 0);
    moments_.step_B.assign(static_cast<std::size_t>(r), 0);
  }

  /// The adapter (A: r x in, B: out x r). Mutable so that the caller may run its own optimizer on
  /// A and B; their shapes must not change (every method checks them).
  [[nodiscard]] LoraAdapter<T>& adapter() noexcept { return adapter_; }
  [[nodiscard]] const LoraAdapter<T>& adapter() const noexcept { return adapter_; }
  [[nodiscard]] const SwitchLoraConfig& config() const noexcept { return config_; }
  [[nodiscard]] Index rank() const noexcept { return config_.rank; }
  [[nodiscard]] Index in_features() const noexcept { return pool_A_.cols(); }
  [[nodiscard]] Index out_features() const noexcept { return pool_B_.cols(); }
  /// `min(in, out)`: candidates per pool.
  [[nodiscard]] Index candidate_num() const noexcept { return pool_A_.rows(); }
  /// The bounds the pools were drawn from.
  [[nodiscard]] SwitchLoraBounds bounds() const noexcept { return bounds_; }
  /// The LoRA scaling s (alpha / r, or alpha / sqrt(r)).
  [[nodiscard]] double scaling() const { return adapter_.scaling(); }
  /// False when B's bound is 0 (`zero_init_B`, `origin_lora`): B columns are then never switched.
  [[nodiscard]] bool switches_B() const noexcept { return bounds_.B != 0; }
  /// A's candidate pool, `candidate_num x in`.
  [[nodiscard]] const RowMatrix<T>& candidates_A() const noexcept { return pool_A_; }
  /// B's candidate pool, `candidate_num x out` (row c is candidate column c).
  [[nodiscard]] const RowMatrix<T>& candidates_B() const noexcept { return pool_B_; }
  /// Candidate index that each row of A currently holds (r entries).
  [[nodiscard]] std::span<const Index> selected_A() const noexcept { return selected_A_; }
  /// Candidate index that each column of B currently holds (r entries).
  [[nodiscard]] std::span<const Index> selected_B() const noexcept { return selected_B_; }
  /// Remaining frozen steps of each row of A (0: trainable). Its gradient must be zero while > 0.
  [[nodiscard]] std::span<const int> frozen_A() const noexcept { return frozen_A_; }
  /// Remaining frozen steps of each column of B.
  [[nodiscard]] std::span<const int> frozen_B() const noexcept { return frozen_B_; }
  /// The factors' Adam state (per-vector steps).
  [[nodiscard]] SwitchLoraMoments& moments() noexcept { return moments_; }
  [[nodiscard]] const SwitchLoraMoments& moments() const noexcept { return moments_; }
  /// `switchlora_interval(interval0, t, descent_rate * total_steps)`.
  [[nodiscard]] double interval(std::int64_t t) const {
    return switchlora_interval(config_.interval0, t, config_.descent_rate * static_cast<double>(config_.total_steps));
  }

  /// Switches row i of A from its value `a` to candidate c of A's pool:
  /// `W_out_in += s B[:, i] (a - c)^T` (one `rank_update` on the `WeightView`, so `Layout` is
  /// honoured), `a` written back into the pool slot it came from, `A[i, :] = c`, and the
  /// counterpart column `B[:, i]` frozen for `adam_warm_step` steps with its m, v and step zeroed
  /// (as configured). Row i's own Adam state is untouched.
  /// \param W  base weight of this layer (`out x in` or `in x out` per the adapter's layout)
  /// \param c  a candidate index in [0, candidate_num) not currently held by any row of A
  /// Cost: `2 out in` flops (one pass over W).
  /// \throws Error (W and the layer unchanged) for a W of another shape or layout, i or c out of
  ///   range, c in use, a non-finite A or B, or a reshaped adapter.
  template <SupportedScalar TW>
    requires(!std::is_const_v<TW>)
  void switch_A_row(WeightView<TW> W, Index i, Index c) {
    constexpr const char* fn = "lowrank::adapt::SwitchLoraLayer::switch_A_row";
    check_layer(fn, W);
    check_pick(fn, "A", i, c, selected_A_);
    const Index rows[1] = {i}, cands[1] = {c};
    apply_A(W, std::span<const Index>(rows), std::span<const Index>(cands));
  }

  /// Switches column j of B from `b` to candidate c of B's pool: `W_out_in += s (b - c) A[j, :]`,
  /// `b` back into the pool, `B[:, j] = c`, and row `A[j, :]` frozen with its state zeroed.
  /// \throws Error as `switch_A_row`, and if B is never switched (`switches_B()` false).
  template <SupportedScalar TW>
    requires(!std::is_const_v<TW>)
  void switch_B_col(WeightView<TW> W, Index j, Index c) {
    constexpr const char* fn = "lowrank::adapt::SwitchLoraLayer::switch_B_col";
    check_layer(fn, W);
    if (!switches_B()) {
      lowrank::detail::fail(fn, "B's candidates are zero (zero_init_B or origin_lora): B columns are never switched");
    }
    check_pick(fn, "B", j, c, selected_B_);
    const Index cols[1] = {j}, cands[1] = {c};
    apply_B(W, std::span<const Index>(cols), std::span<const Index>(cands));
  }

  /// Advances the freeze counters by one step (each positive counter decreases by 1).
  /// `switch_step` calls it first; call it yourself once per step only when switching by hand.
  void tick() noexcept {
    for (int& f : frozen_A_) f = f > 0 ? f - 1 : 0;
    for (int& f : frozen_B_) f = f > 0 ? f - 1 : 0;
  }

  /// The per-step switching of step `t >= 0` (call after backward, before the optimizer step):
  /// `tick()`, then with `x = r / interval(t)`, `n_A = switchlora_round(x, u(b))` rows of A and
  /// `n_B = switchlora_round(x, u(b + 1))` columns of B (none when `switches_B()` is false), each
  /// capped at `min(r, candidate_num - r)`, are switched to distinct unused candidates, first the
  /// A rows (one rank-`n_A` compensation), then the B columns (one rank-`n_B` compensation
  /// against the updated A). A vector switched at step t has its counterpart frozen at steps t to
  /// `t + adam_warm_step - 1`.
  ///
  /// Randomness: `u(k) = RandomStream(seed, stream).uniform(k)`, `b = 2^62 + t (2 + 4 r)`; the
  /// A rows are a partial Fisher-Yates shuffle of 0..r-1 with `bits(b + 2 + k)`, their
  /// candidates one of the unused candidate indices (ascending) with `bits(b + 2 + r + k)`; B
  /// uses `b + 2 + 2r + k` and `b + 2 + 3r + k`.
  /// Cost: at most two passes over W (`2 out in (n_A + n_B)` flops); allocates O(candidate_num +
  /// r (in + out)) of scratch per call.
  /// \throws Error (W and the layer unchanged) for t < 0, an interval below `2 adam_warm_step`,
  ///   or what `switch_A_row` refuses.
  template <SupportedScalar TW>
    requires(!std::is_const_v<TW>)
  SwitchReport switch_step(WeightView<TW> W, std::int64_t t) {
    constexpr const char* fn = "lowrank::adapt::SwitchLoraLayer::switch_step";
    if (t < 0) lowrank::detail::fail(fn, "t is {}; it must be >= 0", t);
    check_layer(fn, W);
    SwitchReport rep;
    rep.interval = interval(t);
    if (rep.interval < 2.0 * config_.adam_warm_step) {
      lowrank::detail::fail(fn, "interval({}) = {} is below 2 * adam_warm_step = {}", t, rep.interval,
                            2 * config_.adam_warm_step);
    }
    const Index r = rank();
    const Index cap = std::min(r, candidate_num() - r);
    rep.expected = static_cast<double>(r) / rep.interval;
    const RandomStream rng(seed_, stream_);
    const std::uint64_t base = (std::uint64_t{1} << 62) + static_cast<std::uint64_t>(t) * static_cast<std::uint64_t>(2 + 4 * r);
    const Index n_A = std::min(cap, switchlora_round(rep.expected, rng.uniform(base)));
    const Index n_B = switches_B() ? std::min(cap, switchlora_round(rep.expected, rng.uniform(base + 1))) : 0;
    std::vector<Index> rows_A = pick(rng, base + 2, r, n_A, {});
    std::vector<Index> cands_A = pick(rng, base + 2 + static_cast<std::uint64_t>(r), candidate_num(), n_A, selected_A_);
    std::vector<Index> cols_B = pick(rng, base + 2 + 2 * static_cast<std::uint64_t>(r), r, n_B, {});
    std::vector<Index> cands_B =
        pick(rng, base + 2 + 3 * static_cast<std::uint64_t>(r), candidate_num(), n_B, selected_B_);
    const std::vector<int> frozen_A_before = frozen_A_, frozen_B_before = frozen_B_;
    tick();
    try {
      if (n_A > 0) apply_A(W, rows_A, cands_A);
      if (n_B > 0) apply_B(W, cols_B, cands_B);
    } catch (...) {
      // Only the first rank_update can refuse W (the second sees the same view): nothing changed.
      frozen_A_ = frozen_A_before;
      frozen_B_ = frozen_B_before;
      throw;
    }
    for (Index k = 0; k < n_A; ++k) rep.A.emplace_back(rows_A[static_cast<std::size_t>(k)], cands_A[static_cast<std::size_t>(k)]);
    for (Index k = 0; k < n_B; ++k) rep.B.emplace_back(cols_B[static_cast<std::size_t>(k)], cands_B[static_cast<std::size_t>(k)]);
    return rep;
  }

  /// Zeroes the gradient of every frozen vector: row i of `gA` (r x in) while `frozen_A()[i] > 0`,
  /// column j of `gB` (out x r) while `frozen_B()[j] > 0`. (`adam_step` does this by itself; use
  /// this with your own optimizer.)
  /// \throws Error (gradients unchanged) for gradients of the wrong shape.
  void zero_frozen_gradients(MatrixView<T> gA, MatrixView<T> gB) const {
    constexpr const char* fn = "lowrank::adapt::SwitchLoraLayer::zero_frozen_gradients";
    check_grads(fn, gA, gB);
    for (Index i = 0; i < rank(); ++i)
      if (frozen_A_[static_cast<std::size_t>(i)] > 0)
        for (Index j = 0; j < gA.cols; ++j) gA(i, j) = T(0);
    for (Index j = 0; j < rank(); ++j)
      if (frozen_B_[static_cast<std::size_t>(j)] > 0)
        for (Index i = 0; i < gB.rows; ++i) gB(i, j) = T(0);
  }

  /// One AdamW step of A and B with per-vector step counters (the reference's `StepAdamW`): for
  /// each row i of A, `t = ++step_A[i]` and `(step_size, eps) = optim::adam_scalars(config, t, lr)`,
  /// then per entry `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2` (fp32, as torch),
  /// `u = step_size m / (sqrt(v) + eps)` and `A -= u` with the weight decay at `config.decay`
  /// (`after_update`: `A = (A - u)(1 - lr wd)`; `before_update`: `A = A (1 - lr wd) - u`);
  /// likewise for each column j of B with `step_B[j]`. A frozen vector's gradient is taken as zero
  /// (the reference zeroes it): its m and v decay, its step advances, and it moves only by its
  /// remaining momentum (none after a zeroed state) and the weight decay.
  /// \param gA  dL/dA, `r x in`;  \param gB  dL/dB, `out x r` (any strides)
  /// Cost: O(r (in + out)); 2r `adam_scalars` evaluations.
  /// \returns false if the step was skipped (non-finite gradient with `NonFinitePolicy::skip`).
  /// \throws Error (factors and state unchanged) for gradients of the wrong shape, an invalid
  ///   config or lr, or a non-finite gradient with `NonFinitePolicy::error`.
  bool adam_step(MatrixView<const T> gA, MatrixView<const T> gB, const optim::AdamConfig& config, double lr,
                 optim::NonFinitePolicy policy = optim::NonFinitePolicy::error) {
    constexpr const char* fn = "lowrank::adapt::SwitchLoraLayer::adam_step";
    check_grads(fn, gA, gB);
    optim::check_adam_config(fn, config);
    if (!(lr >= 0) || !std::isfinite(lr)) lowrank::detail::fail(fn, "lr is {}; it must be finite and >= 0", lr);
    for (Index i = 0; i < gA.rows; ++i)
      for (Index j = 0; j < gA.cols; ++j)
        if (!std::isfinite(gA(i, j))) {
          if (policy == optim::NonFinitePolicy::skip) return false;
          lowrank::detail::fail(fn, "gA ({}x{}) has a non-finite value {} at ({}, {})", gA.rows, gA.cols, gA(i, j), i, j);
        }
    for (Index i = 0; i < gB.rows; ++i)
      for (Index j = 0; j < gB.cols; ++j)
        if (!std::isfinite(gB(i, j))) {
          if (policy == optim::NonFinitePolicy::skip) return false;
          lowrank::detail::fail(fn, "gB ({}x{}) has a non-finite value {} at ({}, {})", gB.rows, gB.cols, gB(i, j), i, j);
        }
    const Index r = rank();
    // All scalars first: adam_scalars validates lr and the config before anything is written.
    std::vector<optim::AdamScalars> sA(static_cast<std::size_t>(r)), sB(static_cast<std::size_t>(r));
    for (Index k = 0; k < r; ++k) {
      sA[static_cast<std::size_t>(k)] = optim::adam_scalars(config, moments_.step_A[static_cast<std::size_t>(k)] + 1, lr);
      sB[static_cast<std::size_t>(k)] = optim::adam_scalars(config, moments_.step_B[static_cast<std::size_t>(k)] + 1, lr);
    }
    // As torch: the betas and 1 - beta each rounded once to fp32.
    const float b1 = static_cast<float>(config.beta1), c1 = static_cast<float>(1.0 - config.beta1);
    const float b2 = static_cast<float>(config.beta2), c2 = static_cast<float>(1.0 - config.beta2);
    const double decay = 1.0 - lr * config.weight_decay;
    const bool before = config.decay == optim::DecayPlacement::before_update;
    auto update = [&](T& w, float& m, float& v, float g, const optim::AdamScalars& s) {
      m = b1 * m + c1 * g;
      v = b2 * v + c2 * g * g;
      const double u = s.step_size * static_cast<double>(m) / (std::sqrt(static_cast<double>(v)) + s.eps);
      const double x = static_cast<double>(w);
      w = static_cast<T>(before ? x * decay - u : (x - u) * decay);
    };
    for (Index i = 0; i < r; ++i) {
      const bool frozen = frozen_A_[static_cast<std::size_t>(i)] > 0;
      for (Index j = 0; j < in_features(); ++j)
        update(adapter_.A(i, j), moments_.m_A(i, j), moments_.v_A(i, j), frozen ? 0.0f : static_cast<float>(gA(i, j)),
               sA[static_cast<std::size_t>(i)]);
      ++moments_.step_A[static_cast<std::size_t>(i)];
    }
    for (Index i = 0; i < out_features(); ++i)
      for (Index j = 0; j < r; ++j) {
        const bool frozen = frozen_B_[static_cast<std::size_t>(j)] > 0;
        update(adapter_.B(i, j), moments_.m_B(i, j), moments_.v_B(i, j), frozen ? 0.0f : static_cast<float>(gB(i, j)),
               sB[static_cast<std::size_t>(j)]);
      }
    for (Index j = 0; j < r; ++j) ++moments_.step_B[static_cast<std::size_t>(j)];
    return true;
  }

 private:
  SwitchLoraConfig config_;
  std::uint64_t seed_ = 0, stream_ = 0;
  SwitchLoraBounds bounds_;
  LoraAdapter<T> adapter_;
  RowMatrix<T> pool_A_;  // candidate_num x in
  RowMatrix<T> pool_B_;  // candidate_num x out
  std::vector<Index> selected_A_, selected_B_;
  std::vector<int> frozen_A_, frozen_B_;
  SwitchLoraMoments moments_;

  template <class TW>
  void check_layer(const char* fn, const WeightView<TW>& W) const {
    const Index r = rank(), in = in_features(), out = out_features();
    const auto& a = adapter_;
    if (a.A.rows() != r || a.A.cols() != in || a.B.rows() != out || a.B.cols() != r) {
      lowrank::detail::fail(fn, "the adapter was reshaped: A is {}x{} and B is {}x{}, the layer has r {}, in {}, out {}",
                            a.A.rows(), a.A.cols(), a.B.rows(), a.B.cols(), r, in, out);
    }
    lowrank::detail::lora_check_adapter(fn, "adapter", a);
    lowrank::detail::lora_check_weight(fn, W, a);
    if (auto [i, j] = lowrank::detail::lora_first_nonfinite(a.A); i >= 0) {
      lowrank::detail::fail(fn, "adapter.A ({}x{}) has a non-finite value {} at ({}, {})", a.A.rows(), a.A.cols(),
                            a.A(i, j), i, j);
    }
    if (auto [i, j] = lowrank::detail::lora_first_nonfinite(a.B); i >= 0) {
      lowrank::detail::fail(fn, "adapter.B ({}x{}) has a non-finite value {} at ({}, {})", a.B.rows(), a.B.cols(),
                            a.B(i, j), i, j);
    }
  }

  void check_pick(const char* fn, const char* factor, Index vec, Index c, const std::vector<Index>& selected) const {
    if (vec < 0 || vec >= rank()) {
      lowrank::detail::fail(fn, "{} vector index {} is outside [0, r = {})", factor, vec, rank());
    }
    if (c < 0 || c >= candidate_num()) {
      lowrank::detail::fail(fn, "candidate {} is outside [0, candidate_num = {})", c, candidate_num());
    }
    for (std::size_t k = 0; k < selected.size(); ++k)
      if (selected[k] == c) {
        lowrank::detail::fail(fn, "candidate {} of {}'s pool is in use by vector {}", c, factor, k);
      }
  }

  template <class G>
  void check_grads(const char* fn, const MatrixView<G>& gA, const MatrixView<G>& gB) const {
    if (gA.rows != rank() || gA.cols != in_features() || gB.rows != out_features() || gB.cols != rank()) {
      lowrank::detail::fail(fn, "gA is {}x{} and gB is {}x{}; they must be r x in = {}x{} and out x r = {}x{}", gA.rows,
                            gA.cols, gB.rows, gB.cols, rank(), in_features(), out_features(), rank());
    }
    if ((!gA.empty() && gA.data == nullptr) || (!gB.empty() && gB.data == nullptr)) {
      lowrank::detail::fail(fn, "gA or gB has a null data pointer");
    }
  }

  // n distinct indices of [0, count) not in `exclude`, by a partial Fisher-Yates shuffle of the
  // ascending list of allowed indices driven by bits(first + k).
  static std::vector<Index> pick(const RandomStream& rng, std::uint64_t first, Index count, Index n,
                                 const std::vector<Index>& exclude) {
    std::vector<char> used(static_cast<std::size_t>(count), 0);
    for (Index e : exclude) used[static_cast<std::size_t>(e)] = 1;
    std::vector<Index> allowed;
    allowed.reserve(static_cast<std::size_t>(count));
    for (Index k = 0; k < count; ++k)
      if (!used[static_cast<std::size_t>(k)]) allowed.push_back(k);
    LOWRANK_DASSERT(n <= static_cast<Index>(allowed.size()));
    for (Index k = 0; k < n; ++k) {
      const auto left = static_cast<std::uint64_t>(allowed.size()) - static_cast<std::uint64_t>(k);
      const auto off = (static_cast<std::uint64_t>(rng.bits(first + static_cast<std::uint64_t>(k))) * left) >> 32;
      std::swap(allowed[static_cast<std::size_t>(k)], allowed[static_cast<std::size_t>(k + static_cast<Index>(off))]);
    }
    allowed.resize(static_cast<std::size_t>(n));
    return allowed;
  }

  void freeze_and_zero_B(Index j) {
    frozen_B_[static_cast<std::size_t>(j)] = config_.adam_warm_step;
    if (config_.zero_switched_state) {
      moments_.m_B.col(j).setZero();
      moments_.v_B.col(j).setZero();
    }
    if (config_.zero_switched_step) moments_.step_B[static_cast<std::size_t>(j)] = 0;
  }

  void freeze_and_zero_A(Index i) {
    frozen_A_[static_cast<std::size_t>(i)] = config_.adam_warm_step;
    if (config_.zero_switched_state) {
      moments_.m_A.row(i).setZero();
      moments_.v_A.row(i).setZero();
    }
    if (config_.zero_switched_step) moments_.step_A[static_cast<std::size_t>(i)] = 0;
  }

  // W += s B[:, rows] (A[rows] - pool_A[cands])^T, then the bookkeeping (which cannot fail).
  template <class TW>
  void apply_A(WeightView<TW> W, std::span<const Index> rows, std::span<const Index> cands) {
    const auto n = static_cast<Index>(rows.size());
    RowMatrix<T> U(out_features(), n), V(in_features(), n);
    for (Index k = 0; k < n; ++k) {
      const Index i = rows[static_cast<std::size_t>(k)], c = cands[static_cast<std::size_t>(k)];
      U.col(k) = adapter_.B.col(i);
      V.col(k) = (adapter_.A.row(i) - pool_A_.row(c)).transpose();
    }
    rank_update(W, view(std::as_const(U)), view(std::as_const(V)), scaling());
    for (Index k = 0; k < n; ++k) {
      const Index i = rows[static_cast<std::size_t>(k)], c = cands[static_cast<std::size_t>(k)];
      pool_A_.row(selected_A_[static_cast<std::size_t>(i)]) = adapter_.A.row(i);
      adapter_.A.row(i) = pool_A_.row(c);
      selected_A_[static_cast<std::size_t>(i)] = c;
      freeze_and_zero_B(i);
    }
  }

  // W += s (B[:, cols] - pool_B[cands]^T) A[cols]^T, then the bookkeeping.
  template <class TW>
  void apply_B(WeightView<TW> W, std::span<const Index> cols, std::span<const Index> cands) {
    const auto n = static_cast<Index>(cols.size());
    RowMatrix<T> U(out_features(), n), V(in_features(), n);
    for (Index k = 0; k < n; ++k) {
      const Index j = cols[static_cast<std::size_t>(k)], c = cands[static_cast<std::size_t>(k)];
      U.col(k) = adapter_.B.col(j) - pool_B_.row(c).transpose();
      V.col(k) = adapter_.A.row(j).transpose();
    }
    rank_update(W, view(std::as_const(U)), view(std::as_const(V)), scaling());
    for (Index k = 0; k < n; ++k) {
      const Index j = cols[static_cast<std::size_t>(k)], c = cands[static_cast<std::size_t>(k)];
      pool_B_.row(selected_B_[static_cast<std::size_t>(j)]) = adapter_.B.col(j).transpose();
      adapter_.B.col(j) = pool_B_.row(c).transpose();
      selected_B_[static_cast<std::size_t>(j)] = c;
      freeze_and_zero_A(j);
    }
  }
};

}  // namespace adapt

LOWRANK_END_NAMESPACE
