/// \file
/// Adam/AdamW moments and step with the two eps conventions and the two weight-decay placements
/// that the memory-efficient training methods use (`../shared/reference/optimizers.md` §1.2, §2.2).
#pragma once

#include <cstddef>
#include <cstdint>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace optim {

/// Where eps enters Adam's denominator.
enum class EpsConvention {
  /// Hugging Face / GaLore / Fira / Online Subspace Descent:
  /// `W -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)` (eps not bias-corrected).
  hf,
  /// torch.optim.AdamW / FRUGAL: `W -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`, which equals
  /// the hf form with eps replaced by `eps * sqrt(bc2)`.
  torch,
};

/// Where decoupled weight decay is applied.
enum class DecayPlacement {
  /// GaLore (and HF AdamW): after the update, `W <- W - lr * wd * W`, so `W_new = (W - u)(1 - lr wd)`.
  after_update,
  /// torch.optim.AdamW / FRUGAL: before the update, `W <- W (1 - lr wd)`, so `W_new = W (1 - lr wd) - u`.
  before_update,
};

/// What a step does with a non-finite gradient (NaN or infinity anywhere in G).
enum class NonFinitePolicy {
  error,  ///< throw `lowrank::Error`; W and the optimizer state are unchanged
  skip,   ///< return without changing W or the state (the step counter does not advance)
};

/// Adam hyper-parameters other than the learning rate (which every step takes, so that schedules
/// stay with the caller).
struct AdamConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-6;  ///< GaLore's default; torch's is 1e-8
  EpsConvention eps_convention = EpsConvention::hf;
  double weight_decay = 0;
  DecayPlacement decay = DecayPlacement::after_update;
  bool bias_correction = true;  ///< false: bc1 = bc2 = 1 (HF `correct_bias=False`)
};

/// The two scalars of an Adam step at step number `t >= 1` (after the increment): the update is
/// `step_size * m / (sqrt(v) + eps)` in both conventions (the torch one folds sqrt(bc2) into eps).
struct AdamScalars {
  double step_size = 0;  ///< lr * sqrt(bc2) / bc1
  double eps = 0;        ///< eps (hf) or eps * sqrt(bc2) (torch)
};

/// \throws Error if t < 1, lr is negative or not finite, or the config is invalid (betas outside
///   [0, 1), eps or weight_decay negative or not finite).
[[nodiscard]] AdamScalars adam_scalars(const AdamConfig& config, std::int64_t t, double lr);

/// Checks an `AdamConfig`; `fn` names the caller in the error message.
void check_adam_config(const char* fn, const AdamConfig& config);

/// Adam moments of one `rows x cols` matrix (fp32, row-major) and the step counter.
struct AdamState {
  RowMatrix<float> m;     ///< first moment
  RowMatrix<float> v;     ///< second moment
  std::int64_t step = 0;  ///< steps taken since the last reset (bias correction restarts at 0)

  AdamState() = default;
  AdamState(Index rows, Index cols) : m(RowMatrix<float>::Zero(rows, cols)), v(RowMatrix<float>::Zero(rows, cols)) {}

  /// Zeros m and v; with `reset_step` also the step counter (FRUGAL's `reset_statistics`).
  void zero(bool reset_step = true) {
    m.setZero();
    v.setZero();
    if (reset_step) step = 0;
  }
  /// Bytes held by m and v.
  [[nodiscard]] std::size_t bytes() const noexcept {
    return static_cast<std::size_t>(m.size() + v.size()) * sizeof(float);
  }
};

/// Bytes of an `AdamState` for a `rows x cols` matrix: `2 rows cols` fp32 values.
[[nodiscard]] constexpr std::size_t adam_state_bytes(Index rows, Index cols) noexcept {
  return 2 * static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols) * sizeof(float);
}

/// Moment update and normalised direction, the element-wise core of every Adam step here:
/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`, `n = m / (sqrt(v) + eps)` with the given
/// eps (already converted by `adam_scalars` when the caller wants the bias-corrected form).
/// `n` may alias nothing else; g, m, v, n are row-major `rows x cols` (g with leading dimension
/// `ldg`). One pass, fp32 arithmetic as torch does in fp32.
void adam_moments(const float* g, Index ldg, float* m, float* v, float* n, Index rows, Index cols, double beta1,
                  double beta2, double eps) noexcept;

/// One full-rank AdamW step in place: the baseline every memory-efficient method is compared with.
///
/// `W` and `G` are the same `rows x cols` (any strides); the state is created on the first step
/// (zero moments) and must keep that shape. With `t = ++state.step`:
/// `W <- W - step_size * m / (sqrt(v) + eps)` as in `adam_scalars`, and the weight decay at its
/// placement.
///
/// \returns false if the step was skipped (non-finite gradient under `NonFinitePolicy::skip`).
/// \throws Error (W and state unchanged) on mismatched shapes, a state of another shape, invalid
///   config or lr, or a non-finite gradient under `NonFinitePolicy::error`.
bool adam_step(MatrixView<float> W, MatrixView<const float> G, AdamState& state, const AdamConfig& config, double lr,
               NonFinitePolicy policy = NonFinitePolicy::error);

}  // namespace optim

LOWRANK_END_NAMESPACE
