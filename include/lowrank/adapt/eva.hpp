/// \file
/// EVA, Explained Variance Adaptation (Paischer et al., arXiv 2410.07170; PEFT's
/// `tuners/lora/eva.py`): LoRA's A initialised with the top principal directions of each layer's
/// inputs, found by incremental PCA over a stream of batches, with ranks redistributed across
/// layers by explained variance. The library owns no model: the caller runs the forward passes and
/// hands each layer's input batch to an `Eva` state object.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/linalg/ipca.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace adapt {

/// EVA settings; defaults are PEFT's `EvaConfig` (plus the iteration cap PEFT lacks).
struct EvaConfig {
  /// >= 1. A layer of rank r may get up to round(r * rho) (Python's round: halves to even),
  /// clamped to its in_features; 1 means no redistribution.
  double rho = 2.0;
  /// In [0, 1]. Component i of a layer has converged when the cosine similarity of its row in two
  /// successive fits is >= tau (signs count: `svd_flip` makes them deterministic).
  double tau = 0.99;
  /// Divide each row of A by sqrt(its singular value) (singular values of the centred inputs).
  bool whiten = false;
  /// alpha <- alpha * new_rank / r, so that alpha / rank stays alpha / r.
  bool adjust_scaling_factors = true;
  /// Most loop steps (batches, i.e. forward passes) before `done()` gives up; >= 1. PEFT has no
  /// cap and loops forever on a layer that never converges (tau = 1, too few tokens); here the
  /// result then says `converged == false` and names the layers.
  Index max_steps = 1000;
  /// The incremental PCA's SVD (default: PEFT's randomized q = 2 n_components, niter 4, seed 42).
  linalg::IpcaOptions ipca = {};
};

/// One adapted layer as the caller declares it.
struct EvaLayer {
  std::string name;       ///< any label (e.g. the module path; used by `peft_eva_patterns`)
  Index in_features = 0;  ///< width of the layer input (columns of the batches), >= 1
  Index rank = 8;         ///< the layer's configured LoRA rank r (rank_pattern applied), >= 1
  double alpha = 8;       ///< the layer's configured lora_alpha (alpha_pattern applied), finite
};

/// EVA's outcome for one layer.
template <class Scalar>
struct EvaLayerResult {
  std::string name;
  Index rank = 0;          ///< new rank in [0, max_components]; 0: drop this layer's adapter
  double alpha = 0;        ///< alpha * rank / r with `adjust_scaling_factors` (if rank != r), else alpha
  RowMatrix<Scalar> A;     ///< rank x in_features: top principal directions of the inputs (whitened on
                           ///< request); LoRA's B is zero (out x rank), so the step-0 delta is 0
  Index max_components = 0;  ///< round(r * rho), raised to its equal-input group's maximum
  Index owner = 0;           ///< index of the layer whose PCA it uses (itself unless it shares inputs)
  bool converged = false;    ///< the first `rank` components of its PCA converged
  bool fitted = false;       ///< its PCA absorbed at least one batch
  Vector<double> explained_variance_ratio;  ///< of its PCA (max_components entries; empty if unfitted)
};

/// EVA's outcome for all layers, in declaration order.
template <class Scalar>
struct EvaResult {
  std::vector<EvaLayerResult<Scalar>> layers;
  bool converged = false;   ///< the loop ended because every layer converged (not the cap)
  Index steps = 0;          ///< loop steps run
  Index rank_budget = 0;    ///< sum of the configured ranks; the new ranks sum to it (see `Eva`)
  std::vector<std::string> not_converged;  ///< layers with a rank > 0 whose components did not converge
  std::int64_t batches_skipped = 0;        ///< batches with fewer rows than the PCA's components
};

/// Computes EVA's rank redistribution: pool the first `max_components[l]` explained-variance
/// ratios of every layer l (`ratios[l]`; layers that share a PCA pass the same values), take the
/// `rank_budget` largest, and count how many each layer got (so a rank is in [0, max_components]).
/// Ties are broken by pool order (a stable sort): layers in the order of `pool_order`, each
/// layer's values in component order; PEFT pools group owners first, then the other group
/// members, and its (unstable) argsort has agreed with that on every fixture.
/// Returns the count per layer (indexed like `ratios`).
/// \throws Error if the sizes disagree or an entry of pool_order is out of range.
inline std::vector<Index> eva_rank_distribution(const std::vector<Vector<double>>& ratios,
                                                const std::vector<Index>& max_components,
                                                const std::vector<Index>& pool_order, Index rank_budget) {
  constexpr const char* kFunction = "lowrank::adapt::eva_rank_distribution";
  const Index L = static_cast<Index>(ratios.size());
  if (static_cast<Index>(max_components.size()) != L)
    ::lowrank::detail::fail(kFunction, "{} ratio vectors but {} max_components", L, max_components.size());
  struct Entry {
    double value;
    Index layer;
  };
  std::vector<Entry> pool;
  for (const Index l : pool_order) {
    if (l < 0 || l >= L) ::lowrank::detail::fail(kFunction, "pool_order holds {} (there are {} layers)", l, L);
    const Index take = std::min<Index>(max_components[static_cast<std::size_t>(l)], ratios[static_cast<std::size_t>(l)].size());
    for (Index i = 0; i < take; ++i) pool.push_back({ratios[static_cast<std::size_t>(l)](i), l});
  }
  std::stable_sort(pool.begin(), pool.end(), [](const Entry& a, const Entry& b) { return a.value > b.value; });
  std::vector<Index> counts(static_cast<std::size_t>(L), 0);
  const Index n = std::min<Index>(rank_budget, static_cast<Index>(pool.size()));
  for (Index i = 0; i < n; ++i) ++counts[static_cast<std::size_t>(pool[static_cast<std::size_t>(i)].layer)];
  return counts;
}

/// Python's round() of a non-negative value: to nearest, halves to even (round(2.5) == 2).
inline Index round_half_even(double x) {
  const double fl = std::floor(x);
  const double d = x - fl;
  Index r = static_cast<Index>(fl);
  if (d > 0.5 || (d == 0.5 && (r % 2 != 0))) ++r;
  return r;
}

/// EVA as a state object driven by the caller's loop over batches (PEFT's `get_eva_state_dict`
/// loop over `cycle(dataloader)`, step for step):
///
/// ```
/// adapt::Eva<> eva(layers, config, {{q, k, v}, {gate, up}});   // q/k/v read the same input
/// while (!eva.done()) {
///   forward one batch;  for (Index l : eva.wanted()) eva.feed(l, input_of_layer_l);  // tokens x in
///   eva.end_step();
/// }
/// auto result = eva.result();                                 // or: eva.run(callback)
/// ```
///
/// Per step, every layer whose PCA is still needed (`wanted()`; only one layer per equal-input
/// group, its first member, owns a PCA) takes its input rows; after the step the rank distribution
/// is recomputed (once every PCA has components) and each owner is frozen when its first
/// `rank_distribution()[owner]` components have converged (cosine similarity >= tau between
/// successive fits), and unfrozen if a later redistribution gives it more rank than has
/// converged. `done()` is true when every owner is frozen, or after `config.max_steps` steps.
///
/// Budget: `max_components[l] = round(r_l * rho)` (clamped to in_features), raised to the group
/// maximum within an equal-input group; `rank_budget = sum r_l`. Redistribution pools each layer's
/// first max_components explained-variance ratios (group members reuse the owner's), keeps the
/// `rank_budget` largest (`eva_rank_distribution`) and then swaps counts within each group so the
/// owner has the largest. With rho = 1 the pool holds exactly the budget and every layer keeps r.
///
/// Inputs should hold only the tokens that count (PEFT drops padding by attention mask and, with
/// `use_label_mask`, tokens whose label is -100); a batch with fewer rows than the owner's
/// max_components is skipped (counted), as in PEFT.
///
/// \tparam Scalar float or double: the PCA's compute precision and the type of A (default
///   double: PEFT's PCA is fp64 after the first batch).
template <class Scalar = double>
class Eva {
 public:
  /// \param layers  the adapted layers (names, in_features, configured rank and alpha)
  /// \param config  EVA settings
  /// \param equal_input_groups  sets of layer indices that always receive the same input (e.g.
  ///   q, k, v projections); the first index of each set owns the PCA. Layers not listed are alone.
  /// \throws Error if layers is empty, a layer has in_features < 1, rank < 1 or non-finite alpha;
  ///   rho < 1 or not finite, tau outside [0, 1], max_steps < 1; a group index is out of range,
  ///   repeated, or joins layers with different in_features.
  explicit Eva(std::vector<EvaLayer> layers, const EvaConfig& config = {},
               std::vector<std::vector<Index>> equal_input_groups = {})
      : layers_(std::move(layers)), config_(config) {
    constexpr const char* kFunction = "lowrank::adapt::Eva";
    using ::lowrank::detail::fail;
    const Index L = static_cast<Index>(layers_.size());
    if (L == 0) fail(kFunction, "no layers");
    if (!(config.rho >= 1) || !std::isfinite(config.rho)) fail(kFunction, "config.rho is {} (must be finite and >= 1)", config.rho);
    if (!(config.tau >= 0 && config.tau <= 1)) fail(kFunction, "config.tau is {} (must be in [0, 1])", config.tau);
    if (config.max_steps < 1) fail(kFunction, "config.max_steps is {} (must be >= 1)", config.max_steps);
    for (Index l = 0; l < L; ++l) {
      const EvaLayer& e = layers_[static_cast<std::size_t>(l)];
      if (e.in_features < 1) fail(kFunction, "layer {} ('{}') has in_features {}", l, e.name, e.in_features);
      if (e.rank < 1) fail(kFunction, "layer {} ('{}') has rank {}", l, e.name, e.rank);
      if (!std::isfinite(e.alpha)) fail(kFunction, "layer {} ('{}') has alpha {}", l, e.name, e.alpha);
    }
    owner_.resize(static_cast<std::size_t>(L));
    std::iota(owner_.begin(), owner_.end(), Index{0});
    std::vector<bool> grouped(static_cast<std::size_t>(L), false);
    for (const auto& g : equal_input_groups) {
      for (const Index l : g) {
        if (l < 0 || l >= L) fail(kFunction, "equal_input_groups holds layer {} (there are {} layers)", l, L);
        if (grouped[static_cast<std::size_t>(l)]) fail(kFunction, "layer {} appears in equal_input_groups twice", l);
        grouped[static_cast<std::size_t>(l)] = true;
        if (layer(l).in_features != layer(g.front()).in_features)
          fail(kFunction, "equal_input_groups joins layer {} ({} in_features) and layer {} ({})", g.front(),
               layer(g.front()).in_features, l, layer(l).in_features);
        owner_[static_cast<std::size_t>(l)] = g.front();
      }
    }
    max_components_.resize(static_cast<std::size_t>(L));
    for (Index l = 0; l < L; ++l) {
      const EvaLayer& e = layer(l);
      max_components_[static_cast<std::size_t>(l)] =
          std::clamp<Index>(round_half_even(static_cast<double>(e.rank) * config.rho), 1, e.in_features);
      rank_budget_ += e.rank;
    }
    for (Index l = 0; l < L; ++l) {  // group maximum, stored at the owner first
      Index& m = max_components_[static_cast<std::size_t>(owner(l))];
      m = std::max(m, max_components_[static_cast<std::size_t>(l)]);
    }
    for (Index l = 0; l < L; ++l)
      max_components_[static_cast<std::size_t>(l)] = max_components_[static_cast<std::size_t>(owner(l))];
    // Pool / swap order: owners in layer order, then the other members (groups by owner, members as listed).
    for (Index l = 0; l < L; ++l)
      if (owner(l) == l) pool_order_.push_back(l);
    std::vector<std::vector<Index>> groups = std::move(equal_input_groups);
    std::stable_sort(groups.begin(), groups.end(),
                     [](const auto& a, const auto& b) { return !b.empty() && (a.empty() || a.front() < b.front()); });
    for (const auto& g : groups)
      for (std::size_t i = 1; i < g.size(); ++i) pool_order_.push_back(g[i]);

    pcas_.reserve(static_cast<std::size_t>(L));
    converged_.resize(static_cast<std::size_t>(L));
    for (Index l = 0; l < L; ++l) {
      const Index m = owner(l) == l ? max_components_[static_cast<std::size_t>(l)] : 1;
      pcas_.emplace_back(m, config.ipca);
      converged_[static_cast<std::size_t>(l)].assign(static_cast<std::size_t>(m), false);
    }
    frozen_.assign(static_cast<std::size_t>(L), false);
    fed_.assign(static_cast<std::size_t>(L), false);
    rank_dist_ = max_components_;
    begin_step();
  }

  /// Whether the loop is over (every layer converged, or `config.max_steps` steps were run).
  [[nodiscard]] bool done() const noexcept { return done_; }
  /// Steps completed (`end_step` calls).
  [[nodiscard]] Index steps() const noexcept { return steps_; }
  /// Whether layer `l` takes an input in the current step (it owns a PCA that is not frozen).
  [[nodiscard]] bool wants(Index l) const {
    check_layer(l, "lowrank::adapt::Eva::wants");
    return !done_ && owner(l) == l && !frozen_[static_cast<std::size_t>(l)];
  }
  /// The layers that take an input in the current step, ascending (empty when done).
  [[nodiscard]] std::vector<Index> wanted() const {
    std::vector<Index> out;
    for (Index l = 0; l < num_layers(); ++l)
      if (wants(l)) out.push_back(l);
    return out;
  }

  /// Gives layer `l` its input rows for this step (tokens x in_features; any Eigen expression of
  /// float or double). Absorbed by the layer's PCA (skipped if it has fewer rows than
  /// max_components); from the second fit on, the convergence flags are updated.
  /// Cost: one `IncrementalPca::partial_fit`.
  /// \throws Error (state unchanged) if l is out of range, not `wants(l)`, already fed this step,
  ///   X's column count is not in_features, or X has a NaN or infinity.
  template <class Derived>
  void feed(Index l, const Eigen::MatrixBase<Derived>& X) {
    constexpr const char* kFunction = "lowrank::adapt::Eva::feed";
    check_layer(l, kFunction);
    if (!wants(l))
      ::lowrank::detail::fail(kFunction, "layer {} ('{}') takes no input this step ({})", l, layer(l).name,
                              done_ ? "EVA is done" : owner(l) != l ? "it shares its input with the group owner" : "it has converged");
    if (fed_[static_cast<std::size_t>(l)])
      ::lowrank::detail::fail(kFunction, "layer {} ('{}') was already fed in step {}", l, layer(l).name, steps_);
    if (X.cols() != layer(l).in_features)
      ::lowrank::detail::fail(kFunction, "X is {}x{} but layer {} ('{}') has {} in_features", X.rows(), X.cols(), l,
                              layer(l).name, layer(l).in_features);
    linalg::IncrementalPca<Scalar>& pca = pcas_[static_cast<std::size_t>(l)];
    const bool had = pca.fitted();
    RowMatrix<Scalar> previous;
    if (had) previous = pca.components();
    if (pca.partial_fit(X) == linalg::IpcaFit::skipped) {
      ++batches_skipped_;
      fed_[static_cast<std::size_t>(l)] = true;
      return;
    }
    fed_[static_cast<std::size_t>(l)] = true;
    if (!had) return;
    const RowMatrix<Scalar>& c = pca.components();
    std::vector<bool>& conv = converged_[static_cast<std::size_t>(l)];
    for (Index i = 0; i < c.rows(); ++i) {
      const double dot = c.row(i).template cast<double>().dot(previous.row(i).template cast<double>());
      const double nn = c.row(i).template cast<double>().norm() * previous.row(i).template cast<double>().norm();
      conv[static_cast<std::size_t>(i)] = dot / std::max(nn, 1e-8) >= config_.tau;
    }
  }

  /// Ends the current step: recomputes the rank distribution (once every PCA has components),
  /// freezes or unfreezes layers, and decides `done()`. Layers that were wanted but not fed simply
  /// saw no batch this step. \throws Error if already done.
  void end_step() {
    if (done_) ::lowrank::detail::fail("lowrank::adapt::Eva::end_step", "EVA is done (after {} steps)", steps_);
    ++steps_;
    bool all_fitted = true;
    for (Index l = 0; l < num_layers(); ++l)
      if (owner(l) == l && !pcas_[static_cast<std::size_t>(l)].fitted()) all_fitted = false;
    if (all_fitted) redistribute();
    begin_step();
  }

  /// Runs the loop: while not done, `step(*this)` (which runs one forward pass and feeds
  /// `wanted()` layers), then `end_step()`. Returns `result()`. Terminates: at most max_steps steps.
  template <class StepFn>
  EvaResult<Scalar> run(StepFn&& step) {
    while (!done_) {
      step(*this);
      end_step();
    }
    return result();
  }

  /// The current outcome (meaningful once `done()`, available at any time): per layer its new rank
  /// (the current distribution, capped at what its PCA holds; 0 for a layer whose PCA never
  /// fitted), A = components[:rank] (whitened if configured), adjusted alpha, and flags.
  [[nodiscard]] EvaResult<Scalar> result() const {
    EvaResult<Scalar> out;
    out.steps = steps_;
    out.rank_budget = rank_budget_;
    out.batches_skipped = batches_skipped_;
    bool all = true;
    for (Index l = 0; l < num_layers(); ++l) {
      const EvaLayer& e = layer(l);
      const linalg::IncrementalPca<Scalar>& pca = pcas_[static_cast<std::size_t>(owner(l))];
      EvaLayerResult<Scalar> r;
      r.name = e.name;
      r.owner = owner(l);
      r.max_components = max_components_[static_cast<std::size_t>(l)];
      r.fitted = pca.fitted();
      r.rank = r.fitted ? std::min<Index>(rank_dist_[static_cast<std::size_t>(l)], pca.components().rows()) : 0;
      r.converged = prefix_converged(owner(l), r.rank);
      if (r.fitted) {
        r.A = pca.components().topRows(r.rank);
        if (config_.whiten)
          for (Index i = 0; i < r.rank; ++i) r.A.row(i) /= std::sqrt(pca.singular_values()(i));
        r.explained_variance_ratio = pca.explained_variance_ratio();
      } else {
        r.A.resize(0, e.in_features);
      }
      r.alpha = e.alpha;
      if (r.rank != e.rank && config_.adjust_scaling_factors)
        r.alpha = e.alpha * (static_cast<double>(r.rank) / static_cast<double>(e.rank));
      if (r.rank > 0 && !r.converged) {
        out.not_converged.push_back(e.name);
        all = false;
      }
      out.layers.push_back(std::move(r));
    }
    out.converged = all && converged_exit_;
    return out;
  }

  /// Number of layers.
  [[nodiscard]] Index num_layers() const noexcept { return static_cast<Index>(layers_.size()); }
  /// The declaration of layer l.
  [[nodiscard]] const EvaLayer& layer(Index l) const { return layers_[static_cast<std::size_t>(l)]; }
  /// The layer that owns l's PCA (l itself unless l shares its input).
  [[nodiscard]] Index owner(Index l) const { return owner_[static_cast<std::size_t>(l)]; }
  /// Index of the layer named `name`. \throws Error if there is none.
  [[nodiscard]] Index index_of(std::string_view name) const {
    for (Index l = 0; l < num_layers(); ++l)
      if (layer(l).name == name) return l;
    ::lowrank::detail::fail("lowrank::adapt::Eva::index_of", "no layer is named '{}'", name);
  }
  /// max_components per layer (round(r rho), group maxima applied).
  [[nodiscard]] const std::vector<Index>& max_components() const noexcept { return max_components_; }
  /// The current rank distribution (max_components until every PCA has components).
  [[nodiscard]] const std::vector<Index>& rank_distribution() const noexcept { return rank_dist_; }
  /// Sum of the configured ranks.
  [[nodiscard]] Index rank_budget() const noexcept { return rank_budget_; }
  /// The PCA used by layer l (its owner's).
  [[nodiscard]] const linalg::IncrementalPca<Scalar>& pca(Index l) const {
    check_layer(l, "lowrank::adapt::Eva::pca");
    return pcas_[static_cast<std::size_t>(owner(l))];
  }
  /// The settings.
  [[nodiscard]] const EvaConfig& config() const noexcept { return config_; }

 private:
  void check_layer(Index l, const char* function) const {
    if (l < 0 || l >= num_layers()) ::lowrank::detail::fail(function, "layer {} is out of range (there are {} layers)", l, num_layers());
  }

  bool prefix_converged(Index owner_layer, Index count) const {
    const std::vector<bool>& c = converged_[static_cast<std::size_t>(owner_layer)];
    const Index n = std::min<Index>(count, static_cast<Index>(c.size()));
    for (Index i = 0; i < n; ++i)
      if (!c[static_cast<std::size_t>(i)]) return false;
    return true;
  }

  void redistribute() {
    const Index L = num_layers();
    std::vector<Vector<double>> ratios(static_cast<std::size_t>(L));
    for (Index l = 0; l < L; ++l)
      ratios[static_cast<std::size_t>(l)] = pcas_[static_cast<std::size_t>(owner(l))].explained_variance_ratio();
    std::vector<Index> counts = eva_rank_distribution(ratios, max_components_, pool_order_, rank_budget_);
    // Within a group the owner gets the largest count (PEFT swaps member by member).
    for (std::size_t i = 0; i < pool_order_.size(); ++i) {
      const Index k = pool_order_[i];
      const Index o = owner(k);
      if (o == k) continue;
      if (counts[static_cast<std::size_t>(o)] >= counts[static_cast<std::size_t>(k)]) continue;
      std::swap(counts[static_cast<std::size_t>(o)], counts[static_cast<std::size_t>(k)]);
    }
    rank_dist_ = std::move(counts);
  }

  // PEFT's check at the top of each loop iteration: freeze owners whose needed prefix converged,
  // unfreeze those that need more; done when all are frozen or the cap is reached.
  void begin_step() {
    std::fill(fed_.begin(), fed_.end(), false);
    bool all = true;
    for (Index l = 0; l < num_layers(); ++l) {
      if (owner(l) != l) continue;
      // The flags start false and are set from the second fit on, so an owner freezes only after
      // two fits (or when it is allotted rank 0, as PEFT's all() of an empty prefix).
      const bool c = prefix_converged(l, rank_dist_[static_cast<std::size_t>(l)]);
      frozen_[static_cast<std::size_t>(l)] = c;
      all = all && c;
    }
    if (all) {
      done_ = true;
      converged_exit_ = true;
    } else if (steps_ >= config_.max_steps) {
      done_ = true;
    }
  }

  std::vector<EvaLayer> layers_;
  EvaConfig config_;
  std::vector<Index> owner_;
  std::vector<Index> max_components_;
  std::vector<Index> pool_order_;
  std::vector<Index> rank_dist_;
  std::vector<linalg::IncrementalPca<Scalar>> pcas_;
  std::vector<std::vector<bool>> converged_;
  std::vector<bool> frozen_;
  std::vector<bool> fed_;
  Index rank_budget_ = 0;
  Index steps_ = 0;
  std::int64_t batches_skipped_ = 0;
  bool done_ = false;
  bool converged_exit_ = false;
};

/// PEFT's adapter_config.json entries after EVA (`_load_eva_state_dict`), for writing an adapter:
/// `rank_pattern[name] = rank` for layers whose new rank differs from the global `r`,
/// `alpha_pattern[name] = alpha` for layers whose (adjusted) alpha differs from the global
/// `lora_alpha`, and `target_modules` = the layers with rank > 0 (rank-0 layers lose their
/// adapter and appear in neither pattern).
struct EvaPeftPatterns {
  std::map<std::string, Index> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  std::vector<std::string> target_modules;  ///< in layer order
};

/// Builds `EvaPeftPatterns` from a result and the config's global `r` and `lora_alpha`.
template <class Scalar>
[[nodiscard]] EvaPeftPatterns peft_eva_patterns(const EvaResult<Scalar>& result, Index r, double lora_alpha) {
  EvaPeftPatterns out;
  for (const auto& l : result.layers) {
    if (l.rank == 0) continue;
    out.target_modules.push_back(l.name);
    if (l.rank != r) out.rank_pattern[l.name] = l.rank;
    if (l.alpha != lora_alpha) out.alpha_pattern[l.name] = l.alpha;
  }
  return out;
}

}  // namespace adapt

LOWRANK_END_NAMESPACE
