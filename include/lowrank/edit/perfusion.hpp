/// \file
/// Perfusion's key-locked gated rank-1 edit (Tewel, Gal, Chechik, Atzmon, SIGGRAPH 2023): a
/// per-concept, input-dependent edit of a projection (the cross-attention K and V projections of a
/// text-to-image model) that is ROME's update with a sigmoid gate in place of the linear one, so it
/// cannot be folded into the weight and runs as an op of the forward pass.
#pragma once

#include <span>
#include <type_traits>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/kernels/lora_forward.hpp"
#include "lowrank/linalg/spd.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace edit {

/// One concept of a Perfusion edit: the target input `i*` (the text-encoder output at the concept
/// token, an EMA during training), the target output `o*` and the gate's bias and temperature.
///
/// Gate defaults are the training values of both re-implementations (`lucidrains/perfusion-pytorch`
/// and `ChenDarYen/Key-Locked-Rank-One-Editing-for-Text-to-Image-Personalization`): `beta = 0.75`,
/// `tau = 0.1`. lucidrains evaluates with `beta = 0.70`, `tau = 0.15`; the paper's inference ranges
/// are `beta` 0.6 to 0.75 for local key-locking and 0.4 to 0.6 for global key-locking, and an
/// inference `tau` above the training one (about 0.15) tends to work better. Raising `beta`
/// weakens the concept, lowering it strengthens it. `Perfusion::set_gate` changes both at
/// inference time.
struct PerfusionConcept {
  Vector<double> i_star;  ///< target input (`in`)
  Vector<double> o_star;  ///< target output (`out`); for the K path `lock_key(W_K, i_super)`
  double beta = 0.75;     ///< gate bias (finite)
  double tau = 0.1;       ///< gate temperature (finite, > 0)
};

/// How several concepts share one projection (editing.md 3.3).
enum class MultiConcept {
  /// Independent rank-1 projections, `W e - sum_c s_c(e) W i*_c` (lucidrains' default, reportedly
  /// the Perfusion author's preference). Exact when the `i*_c` are mutually C^{-1}-orthogonal.
  additive,
  /// The paper's App. B: `W (e - sum_k u_k u_k^T C^{-1} e)` with `{u_k}` a C^{-1}-orthonormal basis
  /// of `span{i*_c}`, so `W e` vanishes exactly on every `i*_c` whatever their mutual angles.
  exact,
};

/// `o*_K = W_K i_super` in fp64 (`out` entries) for a weight in either layout: key-locking. The K
/// path's target output is the superclass word's encoding mapped by the unedited K projection, and
/// is not learned. Cost `2 out in` flops.
/// \throws Error if `i_super.size() != W.in_features()`.
template <SupportedScalar TW>
Vector<double> lock_key(WeightView<const TW> W, const Eigen::Ref<const Vector<double>>& i_super);

/// Prepared Perfusion state for one projection `W` (`out x in`, explicit `Layout`) and a set of
/// concepts. With `C` the uncentred second moment of the projection's inputs (about 100K captions
/// for Stable Diffusion) and, per concept c,
///
///   `energy_c = i*_c^T C^{-1} i*_c`,  `a_c = C^{-1} i*_c / energy_c` (`in`),  `b_c = W i*_c` (`out`),
///   `s_c(e) = a_c^T e`  (so `s_c(i*_c) = 1`),  `g_c(e) = sigmoid((s_c(e) - beta_c) / tau_c)`,
///
/// the edited projection maps a token encoding `e` (`in`) to
///
///   additive: `out(e) = W e - sum_c s_c(e) b_c + sum_c g_c(e) o*_c`;
///   exact:    `out(e) = W (e - sum_k u_k (u_k^T C^{-1} e)) + sum_c g_c(e) o*_c`,
///
/// with `{u_k}` (k < r = rank of `[i*_1 ... i*_m]`) a C^{-1}-orthonormal basis of `span{i*_c}`
/// (`u_j^T C^{-1} u_k = delta_jk`), built as `Q = orth(L^{-1} I*)` (column-pivoted QR, numerical
/// rank) and `u_k = L q_k` with `C = L L^T`. For one concept both forms are paper Eq. 3,
/// `W (e - s(e) i*) + g(e) o*`; replacing the gate by `s(e)` gives ROME's update with
/// `Lambda = (o* - W i*) / energy`.
///
/// Both forms are `X W^T` plus a rank-r low-rank term plus the gates: the term is
/// `-(X D^T) P^T` with `D` = `dual_basis()^T` (`r x in`) and `P = W basis()` (`out x r`):
/// additive `basis() = [i*_c]`, `dual_basis() = [a_c]`; exact `basis() = [u_k]`,
/// `dual_basis() = [C^{-1} u_k]`. `forward` runs it as one `lora_forward` call (one pass over W)
/// and adds the gates from similarities computed in fp64.
///
/// Scale: nothing depends on the scale of C (`SpdOptions::scale`), so C may be normalised by the
/// number of tokens or of captions. Its ridge, if any, is part of the metric.
///
/// Storage: `i*`, `o*` and the gate per concept, `a_c`, the basis, `D` and `P` in fp64, and `D`, `P`
/// again in fp32 for the kernel: `O((in + out) (m + r))` numbers; C and W are not kept.
class Perfusion {
 public:
  Perfusion() = default;

  /// Prepares the edit of `W` for `concepts` (which may be empty: the base projection).
  ///
  /// \param W        the projection with its layout (`out x in` or `in x out`), any strides; read,
  ///                 not kept: pass the same weight to `forward` and `output`
  /// \param C        Cholesky factor of the inputs' second moment (`in x in`)
  /// \param concepts `i_star` of size `in`, `o_star` of size `out`, finite gates with `tau > 0`
  /// \param mode     additive (default) or exact multi-concept form (the same for one concept)
  ///
  /// Cost: `m` solves with C (`2 in^2` flops each) and `m` products with W (`2 out in` each);
  /// exact adds a QR of `in x m` (`2 in m^2`), `L Q` (`in^2 r`, with a temporary copy of L:
  /// `in^2` doubles) and `W U` (`2 out in r`).
  /// \throws Error (naming the argument, concept index and sizes) if C is empty, W is not
  ///   `out x C.dim()` with `out >= 1` or has a null pointer or a non-positive stride, a concept's
  ///   `i_star` or `o_star` has the wrong size or a NaN or infinity, `beta` is not finite, `tau` is
  ///   not finite and positive, `energy_c` is not positive (a zero `i_star`), or `W i*_c` is not
  ///   finite.
  template <SupportedScalar TW>
  Perfusion(WeightView<const TW> W, const linalg::SpdFactor& C, std::span<const PerfusionConcept> concepts,
            MultiConcept mode = MultiConcept::additive);
  template <SupportedScalar TW>
    requires(!std::is_const_v<TW>)
  Perfusion(WeightView<TW> W, const linalg::SpdFactor& C, std::span<const PerfusionConcept> concepts,
            MultiConcept mode = MultiConcept::additive)
      : Perfusion(WeightView<const TW>{W.matrix, W.layout}, C, concepts, mode) {}

  /// Merging separately trained modules is concatenating their concepts (`i*`, `o*` and current
  /// gates, in the order given) and preparing them again for `W` and `C`: lucidrains'
  /// `merge_rank1_edit_modules`. Outputs do not depend on the order of the modules (additive: a sum;
  /// exact: the projection onto the span is basis-free), up to rounding.
  /// \throws Error if a pointer is null, a module was prepared for another `out x in`, or as the
  ///   constructor.
  template <SupportedScalar TW>
  static Perfusion merge(WeightView<const TW> W, const linalg::SpdFactor& C,
                         std::span<const Perfusion* const> modules, MultiConcept mode = MultiConcept::additive);
  /// `merge` of two modules.
  template <SupportedScalar TW>
  static Perfusion merge(WeightView<const TW> W, const linalg::SpdFactor& C, const Perfusion& first,
                         const Perfusion& second, MultiConcept mode = MultiConcept::additive) {
    const Perfusion* modules[] = {&first, &second};
    return merge(W, C, std::span<const Perfusion* const>(modules), mode);
  }

  /// Number of concepts m.
  Index concepts() const { return static_cast<Index>(concepts_.size()); }
  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  MultiConcept mode() const { return mode_; }
  /// Rank r of the low-rank term: m (additive) or the numerical rank of `[i*_c]` (exact).
  Index rank() const { return basis_.cols(); }
  /// The concepts as given, with their current gates.
  const std::vector<PerfusionConcept>& concept_list() const { return concepts_; }
  /// `energy_c = i*_c^T C^{-1} i*_c` (m entries).
  const Vector<double>& energies() const { return energy_; }
  /// `[a_c]` (`in x m`): `s_c(e) = a_c^T e`.
  const ColMatrix<double>& similarity_vectors() const { return a_; }
  /// Key side of the removed term (`in x r`): `[i*_c]` (additive) or `[u_k]` (exact).
  const ColMatrix<double>& basis() const { return basis_; }
  /// Its duals (`in x r`): `[a_c]` (additive; `a_c^T i*_c = 1`) or `[C^{-1} u_k]` (exact;
  /// `basis()^T dual_basis() = I`). The removed term is `W basis() dual_basis()^T e`.
  const ColMatrix<double>& dual_basis() const { return dual_; }
  /// `W basis()` (`out x r`), computed in fp64 from the stored weight.
  const ColMatrix<double>& projected_outputs() const { return projected_; }

  /// Changes concept `c`'s gate. O(1): nothing else is recomputed, so it can be turned at
  /// inference (e.g. to lucidrains' eval values 0.70 / 0.15).
  /// \throws Error (state unchanged) if `c` is out of range, `beta` not finite, or `tau` not
  ///   finite and positive.
  void set_gate(Index c, double beta, double tau);
  double beta(Index c) const;
  double tau(Index c) const;

  /// `s_c(e) = e^T C^{-1} i*_c / energy_c` for every concept (m entries, fp64; `2 in m` flops).
  /// \throws Error if `e.size() != in_features()`.
  Vector<double> similarity(const Eigen::Ref<const Vector<double>>& e) const;

  /// The edited output for one token in fp64 (`out` entries), evaluated as the cheap form
  /// `W e - P (D e) + sum_c g_c(e) o*_c` with W widened from its storage: a reference for checks
  /// and for callers that work in fp64. Cost `2 out in + 2 r (in + out) + 2 m (in + out)` flops.
  /// \throws Error if W's shape is not the prepared `out x in` or `e.size() != in`.
  template <SupportedScalar TW>
  Vector<double> output(WeightView<const TW> W, const Eigen::Ref<const Vector<double>>& e) const;

  /// Edited forward of a batch: `Y = X W^T - (X D^T) P^T + G O^T` (+ bias), `G(t, c) =
  /// g_c(X_t)`, `O = [o*_c]`.
  ///
  /// One `lora_forward` call with a single rank-r term (`A = D`, `B = -P`, both fp32), so W is
  /// read once per pass whatever its storage type (fp32, bf16, fp16, fp64) and layout, with that
  /// kernel's arithmetic, paths and determinism; then the similarities `X a_c` are computed in
  /// fp64 and `G O^T` is added to Y in fp64 with one rounding per element (`2 tokens m (in + out)`
  /// flops, single-threaded). Y is overwritten.
  ///
  /// \param X `tokens x in`, fp32, any strides
  /// \param W the weight the edit was prepared with (only its shape can be checked)
  /// \param Y `tokens x out`, any strides, not overlapping X, W or the bias
  /// \throws Error (Y unchanged) if X is not `tokens x in`, Y not `tokens x out`, W not the
  ///   prepared `out x in`, or as `lora_forward` (strides, null pointers, overlaps).
  template <SupportedScalar TW>
  void forward(MatrixView<const float> X, WeightView<const TW> W, MatrixView<float> Y,
               const LoraForwardOptions& options = {}) const;
  template <SupportedScalar TW>
    requires(!std::is_const_v<TW>)
  void forward(MatrixView<const float> X, WeightView<TW> W, MatrixView<float> Y,
               const LoraForwardOptions& options = {}) const {
    forward(X, WeightView<const TW>{W.matrix, W.layout}, Y, options);
  }

 private:
  void check_weight(const char* fn, Index out, Index in) const;

  std::vector<PerfusionConcept> concepts_;
  Index in_ = 0, out_ = 0;
  MultiConcept mode_ = MultiConcept::additive;
  Vector<double> energy_;
  ColMatrix<double> a_;          // in x m
  ColMatrix<double> o_;          // out x m
  ColMatrix<double> basis_;      // in x r
  ColMatrix<double> dual_;       // in x r
  ColMatrix<double> projected_;  // out x r
  RowMatrix<float> lora_a_;      // r x in: dual_^T
  RowMatrix<float> lora_b_;      // out x r: -projected_
};

}  // namespace edit

LOWRANK_END_NAMESPACE
