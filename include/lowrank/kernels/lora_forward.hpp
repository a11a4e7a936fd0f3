/// \file
/// The fused LoRA forward \f$ Y = X W^\top + \sum_j s_j (X A_j^\top) B_j^\top + b \f$ for a batch of
/// tokens, with one adapter, several adapters summed, or a mixed batch in which every token picks
/// one adapter (or none).
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>

#include "lowrank/core/config.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

/// One low-rank term \f$ s\,(X A^\top) B^\top \f$ of a forward: PEFT's `lora_A.weight` (`r x in`),
/// `lora_B.weight` (`out x r`) and the scale `s` (PEFT's `scaling`, alpha / r or alpha / sqrt(r),
/// times any adapter weight). Views may have any strides. `r == 0` is allowed and adds nothing.
struct LoraTerm {
  MatrixView<const float> A;  ///< `r x in`
  MatrixView<const float> B;  ///< `out x r`
  double scale = 1;           ///< finite
};

/// From this many tokens `lora_forward` runs a packed GEMM (see its arithmetic and determinism);
/// below it, a one-pass kernel that reads W once per 16 tokens. Measured crossover on Zen 1: about
/// 48 tokens (docs/performance.md).
inline constexpr std::ptrdiff_t lora_forward_gemm_tokens = 64;

/// Options of `lora_forward`, `lora_forward_mixed` and `linear_forward`.
struct LoraForwardOptions {
  /// `out` contiguous floats added to every row of Y, or nullptr for none.
  const float* bias = nullptr;
  /// Most threads this call may use; 0 means `num_threads()`. Results do not depend on it.
  int max_threads = 0;
};

/// Fused LoRA forward of one adapter:
/// \f$ Y = X W_{out \times in}^\top + s\,(X A^\top) B^\top \f$ (+ bias), Y overwritten.
///
/// \tparam TW storage type of W: fp32, bf16, fp16 (widened to fp32 on the fly) or fp64 (a slow
///         generic path that accumulates in fp64; fp64 weights are not a target of this kernel)
/// \param X     `tokens x in`, fp32, any strides
/// \param W     the base weight with its layout: `out x in` (`Layout::out_in`, torch `nn.Linear`) or
///              `in x out` (`Layout::in_out`, GPT-2 `Conv1D`), any strides
/// \param A     `r x in`
/// \param B     `out x r`
/// \param scale finite
/// \param Y     `tokens x out`, any strides; must not overlap X, W, A, B or the bias
///
/// Arithmetic (fp32 accumulation): first `T = s (X A^T)` (`tokens x r`, each entry a dot product
/// rounded to fp32, then multiplied by s and rounded once); then every output element is one
/// accumulation of the `in` products `X(t, i) W(o, i)` followed by the `r` products
/// `T(t, k) B(o, k)` (the low-rank term is folded into the base GEMM as `r` extra columns, so it
/// costs 2 tokens r (in + out) flops and one read of A and B), then the bias is added. Which
/// accumulation depends on the path:
/// - fewer than `lora_forward_gemm_tokens` tokens, unit-stride `out x in` weight (one-pass kernel,
///   W read once per 16 tokens): in the target's vector lanes (lane l takes the indices congruent
///   to l), the lanes summed in a fixed order at the end;
/// - fewer than `lora_forward_gemm_tokens` tokens, unit-stride `in x out` weight, or from
///   `lora_forward_gemm_tokens` tokens with either layout when Y has unit column stride (packed
///   GEMM: X and W packed into the micro-kernel's panels, blocks of W that stay in L2): one fma
///   chain in index order per element;
/// - weights with neither unit stride: a slow scalar loop.
///
/// Determinism: for a given target (`active_target()`) and path, every output element is bitwise
/// independent of the thread count, of the tiling and of the other tokens in the batch. So a token
/// gives the same bits in any batch below `lora_forward_gemm_tokens`, and in any batch from it;
/// across that boundary the two agree to rounding (`in x out` weights: bitwise, both paths
/// accumulate in index order). The scalar target rounds products and sums separately, SIMD
/// targets fuse them, so targets agree to rounding error, not bitwise.
///
/// Cost: 2 tokens out in flops for the base plus 2 tokens r (in + out) for the low-rank term; one
/// read of W per 16 tokens below `lora_forward_gemm_tokens` (memory-bound for a few tokens,
/// compute-bound from about 8 on a desktop core), one read and one packing of W from it.
/// Allocation: the calling thread's workspace (T, packed operands, and for `Layout::in_out` an
/// accumulator block) only grows; a warmed-up call does not allocate.
///
/// \throws Error (Y unchanged) if shapes disagree, a stride is not positive, a non-empty view has a
/// null pointer, scale is not finite, Y's elements overlap each other, or Y's memory overlaps X,
/// W, A, B or the bias.
template <SupportedScalar TW>
void lora_forward(MatrixView<const float> X, WeightView<const TW> W, MatrixView<const float> A,
                  MatrixView<const float> B, double scale, MatrixView<float> Y, const LoraForwardOptions& options = {});

/// Forward with several adapters summed in one pass:
/// \f$ Y = X W^\top + \sum_j s_j (X A_j^\top) B_j^\top \f$ (+ bias). Ranks may differ; an empty
/// span gives the base forward. The terms are concatenated along the rank (each starting at a
/// multiple of 16, padded with zeros), so the cost is that of one adapter of the summed rank.
/// Same arithmetic, determinism and errors as the single-adapter overload.
template <SupportedScalar TW>
void lora_forward(MatrixView<const float> X, WeightView<const TW> W, std::span<const LoraTerm> terms,
                  MatrixView<float> Y, const LoraForwardOptions& options = {});

/// Mixed batch (one base, many adapters, as a multi-adapter server batches requests): token `t`
/// uses `terms[adapter[t]]`, or no adapter when `adapter[t] == -1`:
/// \f$ Y_t = X_t W^\top + s_{a(t)} (X_t A_{a(t)}^\top) B_{a(t)}^\top \f$ (+ bias).
///
/// Each row equals (`==`; the sign of a zero may differ) the row of the single-adapter forward of
/// its adapter over the same tokens, and a row without an adapter equals the base forward (the
/// same path: see the determinism of `lora_forward`). `X A_j^T` is computed only
/// for the tokens of adapter j; the B side costs the summed rank of all terms per token (their
/// columns are zero for tokens of other adapters), so a batch over many adapters of large rank
/// pays `2 tokens out sum_j r_j` flops there.
///
/// \throws Error (Y unchanged) as `lora_forward`, or if `adapter.size() != tokens` or an entry is
/// outside `[-1, terms.size())`.
template <SupportedScalar TW>
void lora_forward_mixed(MatrixView<const float> X, WeightView<const TW> W, std::span<const LoraTerm> terms,
                        std::span<const std::int32_t> adapter, MatrixView<float> Y,
                        const LoraForwardOptions& options = {});

/// The base forward alone, \f$ Y = X W^\top \f$ (+ bias), with the kernels and arithmetic of
/// `lora_forward` (it is `lora_forward` with no terms).
template <SupportedScalar TW>
void linear_forward(MatrixView<const float> X, WeightView<const TW> W, MatrixView<float> Y,
                    const LoraForwardOptions& options = {}) {
  lora_forward(X, W, std::span<const LoraTerm>{}, Y, options);
}

/// Overloads for a mutable weight view (`WeightView<float>` etc.), forwarding to the ones above.
template <SupportedScalar TW>
  requires(!std::is_const_v<TW>)
void lora_forward(MatrixView<const float> X, WeightView<TW> W, MatrixView<const float> A, MatrixView<const float> B,
                  double scale, MatrixView<float> Y, const LoraForwardOptions& options = {}) {
  lora_forward(X, WeightView<const TW>{W.matrix, W.layout}, A, B, scale, Y, options);
}
template <SupportedScalar TW>
  requires(!std::is_const_v<TW>)
void lora_forward(MatrixView<const float> X, WeightView<TW> W, std::span<const LoraTerm> terms, MatrixView<float> Y,
                  const LoraForwardOptions& options = {}) {
  lora_forward(X, WeightView<const TW>{W.matrix, W.layout}, terms, Y, options);
}
template <SupportedScalar TW>
  requires(!std::is_const_v<TW>)
void lora_forward_mixed(MatrixView<const float> X, WeightView<TW> W, std::span<const LoraTerm> terms,
                        std::span<const std::int32_t> adapter, MatrixView<float> Y,
                        const LoraForwardOptions& options = {}) {
  lora_forward_mixed(X, WeightView<const TW>{W.matrix, W.layout}, terms, adapter, Y, options);
}
template <SupportedScalar TW>
  requires(!std::is_const_v<TW>)
void linear_forward(MatrixView<const float> X, WeightView<TW> W, MatrixView<float> Y,
                    const LoraForwardOptions& options = {}) {
  linear_forward(X, WeightView<const TW>{W.matrix, W.layout}, Y, options);
}

LOWRANK_END_NAMESPACE
