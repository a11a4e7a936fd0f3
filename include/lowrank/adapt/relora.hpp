/// \file
/// ReLoRA (`../shared/reference/optimizers.md` §3): a LoRA adapter that is periodically merged into
/// its base weight and restarted, `W <- W + s B A`, then A re-initialised kaiming-uniform(a =
/// sqrt(5)) and B = 0. The optimizer reset at a restart is `optim::prune_moments`
/// (lowrank/optim/prune.hpp); the learning-rate schedule and the merge/reset triggers are in
/// lowrank/optim/schedule.hpp.
///
/// Two failure modes of the reference are impossible here:
///
/// - **A = B = 0** (Guitaricet/relora#18: wrapping with `keep_original_weights=True` also zeroes
///   `lora_A`). Then `dL/dA ∝ B^T (.) = 0` and `dL/dB ∝ (.) A^T = 0`, and the first cycle trains
///   no LoRA parameter at all. `relora_wrap` and `merge_and_reinit` always leave A kaiming-uniform
///   (non-zero) and B = 0, and `check_relora_trainable` refuses an adapter whose A and B are both
///   zero.
/// - **`trainable_scaling`** (`s = tanh(s_param)`): the reference's merge sets `s_param = 0`, so
///   `s = tanh(0) = 0`, the adapter contributes nothing and A, B and `s_param` all receive zero
///   gradient for the rest of training (a dead end). There is no such option; `ReloraConfig`
///   keeps the flag only to reject it with an explanation when a reference configuration is ported.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>

#include "lowrank/adapt/init.hpp"
#include "lowrank/adapt/lora.hpp"
#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt {

/// ReLoRA's adapter configuration (`torchrun_main.py` defaults: r = 128, lora_alpha = 32, so
/// s = alpha / r = 0.25).
struct ReloraConfig {
  Index rank = 128;
  double alpha = 32;
  bool use_rslora = false;
  /// The reference's `trainable_scaling` (s = tanh(s_param)). Must stay false: `relora_wrap`
  /// throws when it is set, because the reference's merge zeroes `s_param` and every LoRA gradient
  /// is zero afterwards (see the file comment).
  bool trainable_scaling = false;
};

/// Refuses an adapter that cannot learn: A and B both exactly zero (relora#18), in which case
/// `dL/dA = s B^T dL/dy x^T = 0` and `dL/dB = s dL/dy (A x)^T = 0`. Cost: one pass over A and B.
/// \throws Error naming `fn` (default `lowrank::adapt::check_relora_trainable`) and the shapes.
template <FactorScalar T>
void check_relora_trainable(const LoraAdapter<T>& adapter, const char* fn = nullptr) {
  if (fn == nullptr) fn = "lowrank::adapt::check_relora_trainable";
  lowrank::detail::lora_check_adapter(fn, "adapter", adapter);
  if (adapter.A.isZero(0) && adapter.B.isZero(0)) {
    lowrank::detail::fail(fn,
                          "adapter.A ({}x{}) and adapter.B ({}x{}) are both zero: both LoRA gradients are zero "
                          "(relora#18); re-initialise A (merge_and_reinit or relora_wrap)",
                          adapter.A.rows(), adapter.A.cols(), adapter.B.rows(), adapter.B.cols());
  }
}

/// Wraps a base layer for ReLoRA: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (kaiming-uniform, a = sqrt(5)),
/// `B = 0`, exactly `init_default(out, in, rank, alpha, layout, seed, stream, use_rslora)`. The
/// base weight is not touched (the reference's `keep_original_weights=True`) and the adapted
/// layer equals the base layer at step 0, while `dL/dB = s dL/dy (A x)^T` is non-zero from the
/// first step. Never both factors zero (relora#18).
/// \param out, in  features of the base layer
/// \throws Error for `config.trainable_scaling` (a dead end, see the file comment), a rank
///   outside [1, min(out, in)], non-positive features or a non-finite alpha.
template <FactorScalar T = float>
[[nodiscard]] LoraAdapter<T> relora_wrap(Index out, Index in, Layout layout, const ReloraConfig& config,
                                         std::uint64_t seed, std::uint64_t stream = 0) {
  constexpr const char* fn = "lowrank::adapt::relora_wrap";
  if (config.trainable_scaling) {
    lowrank::detail::fail(fn,
                          "config.trainable_scaling is not supported: the reference's merge sets s_param = 0, so "
                          "s = tanh(0) = 0 and A, B and s_param get zero gradient (out {}, in {}, rank {})",
                          out, in, config.rank);
  }
  lowrank::detail::lora_check_init(fn, out, in, config.rank, config.alpha);
  return init_default<T>(out, in, config.rank, config.alpha, layout, seed, stream, config.use_rslora);
}

/// ReLoRA's restart: merges the adapter into its base weight, `W_out_in += s B A` (through
/// `adapt::merge`: either `Layout`, any storage, fp32 accumulation and one rounding per element,
/// stochastic on request in `options`), then re-initialises `A` exactly as `init_default` does
/// (`A(i, j) = (2 u - 1) / sqrt(in)`, `u = RandomStream(seed, stream).uniform(i * in + j)`) and
/// sets `B = 0`, so the layer computes the same function before and after (to the rounding of W's
/// storage) and the next cycle starts with a live adapter (`dL/dA = 0`, `dL/dB != 0`).
/// alpha, rsLoRA, layout and `lora_bias` are kept (a `lora_bias` is merged into `bias` and zeroed).
///
/// Use a different (seed, stream) at every restart and for every layer, e.g. stream = layer index
/// and seed = a function of the restart number.
///
/// \param W        base weight, `out x in` (`Layout::out_in`) or `in x out` (`Layout::in_out`),
///                 layout equal to `adapter.layout`
/// \param adapter  A (`r x in`) and B (`out x r`), finite, `r <= min(out, in)`
/// \param bias     the base bias (`out` entries), needed only for an adapter with a `lora_bias`
/// Cost: `2 out in r` flops (the merge) plus `r in` Philox draws; allocates one `r x in` matrix.
/// \throws Error (W, bias and adapter unchanged) for an invalid adapter, `r > min(out, in)`, a
///   non-finite entry in A, B or `lora_bias`, a shape or layout mismatch with W, a non-finite
///   `options.weight`, or anything `merge` refuses.
template <SupportedScalar TW, FactorScalar T, SupportedScalar TB = std::remove_const_t<TW>>
  requires(!std::is_const_v<TW> && !std::is_const_v<TB>)
void merge_and_reinit(WeightView<TW> W, LoraAdapter<T>& adapter, std::uint64_t seed, std::uint64_t stream = 0,
                      const MergeOptions& options = {}, std::span<TB> bias = {}) {
  constexpr const char* fn = "lowrank::adapt::merge_and_reinit";
  namespace d = lowrank::detail;
  d::lora_check_adapter(fn, "adapter", adapter);
  d::lora_check_weight(fn, W, adapter);
  d::lora_check_bias(fn, bias, adapter);
  const Index out = adapter.out_features(), in = adapter.in_features(), r = adapter.rank();
  d::lora_check_init(fn, out, in, r, adapter.alpha);
  if (auto [i, j] = d::lora_first_nonfinite(adapter.A); i >= 0) {
    d::fail(fn, "adapter.A ({}x{}) has a non-finite value {} at ({}, {})", adapter.A.rows(), adapter.A.cols(),
            adapter.A(i, j), i, j);
  }
  if (auto [i, j] = d::lora_first_nonfinite(adapter.B); i >= 0) {
    d::fail(fn, "adapter.B ({}x{}) has a non-finite value {} at ({}, {})", adapter.B.rows(), adapter.B.cols(),
            adapter.B(i, j), i, j);
  }
  if (auto [i, j] = d::lora_first_nonfinite(adapter.lora_bias); i >= 0) {
    d::fail(fn, "adapter.lora_bias ({} entries) has a non-finite value {} at {}", adapter.lora_bias.size(),
            adapter.lora_bias(i), i);
  }
  // Stage the fresh A before the merge: after the merge nothing may throw.
  RowMatrix<T> fresh = init_default<T>(out, in, r, adapter.alpha, adapter.layout, seed, stream, adapter.use_rslora).A;
  merge(W, adapter, options, bias);  // validates before its first write
  adapter.A.swap(fresh);
  adapter.B.setZero();
  if (adapter.lora_bias.size() != 0) adapter.lora_bias.setZero();
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
