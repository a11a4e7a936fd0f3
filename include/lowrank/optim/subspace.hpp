/// \file
/// Optimizers that keep Adam's state in a low-rank subspace of each weight's gradient: GaLore,
/// FRUGAL, Fira and Online Subspace Descent (`../shared/reference/optimizers.md` §1, §2, §4, §5.2),
/// as one state object per weight matrix acting on (W, G) pairs from any training loop.
///
/// One step, with R = project(G) and t the Adam step after the increment:
///   1. refresh the basis at steps 0, T, 2T, ... (the counter before the increment), handling the
///      Adam state as `on_refresh` says; Online Subspace Descent refreshes only at step 0;
///   2. Adam on R: N = m / (sqrt(v) + eps), step_size = lr sqrt(bc2) / bc1 (`adam_scalars`);
///   3. weight decay before the update if `adam.decay == before_update` (FRUGAL);
///   4. W += -step_size * scale * back(N)                          (one rank-r update of W)
///   5. residual path on G - back(R) (never scaled by `scale` unless `fira_alpha_residual`):
///        sign_sgd: W += -lr * residual_lr_scale * sign(G - back(R))   (FRUGAL default)
///        sgd:      W += -lr * residual_lr_scale * (G - back(R))
///        fira:     W += -step_size * S, S = phi (.) (G - back(R)) with Fira's per-row/column
///                  phi = ||N_j|| / (||R_j|| + 1e-8) along the r-sized axis and the norm-growth
///                  limiter ||S_t|| <= gamma ||S_{t-1}||
///   6. weight decay after the update if `adam.decay == after_update` (GaLore, Fira);
///   7. Online Subspace Descent (from the second step on): the basis takes one AdamW step on the online-PCA loss
///      ||G^ Q Q^T - G^||^2 (right; left: ||P P^T G^ - G^||^2), G^ = G / ||G||_F, with
///      lr_P = lr / (T lr_0) (lr_0: the lr of the first step), computed with the old basis.
///
/// Factory functions give each method's published defaults: `galore_config`, `frugal_config`,
/// `fira_config`, `online_subspace_descent_config`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"
#include "lowrank/optim/adam.hpp"
#include "lowrank/optim/projector.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace optim {

/// What happens to Adam's m and v when the basis changes.
enum class StateOnRefresh {
  keep,    ///< GaLore: reused as they are in the new basis (step counter keeps running)
  reset,   ///< FRUGAL `reset_statistics`: zeroed, step = 0 (bias correction restarts)
  rotate,  ///< m <- m expressed in the new basis (m O or O^T m with O = old^T new), v <- v with
           ///< O squared element-wise (the variance of the rotated coordinates if they were
           ///< independent: a heuristic); step counter kept
};

/// The update applied to the part of G outside the subspace.
enum class ResidualRule {
  none,      ///< GaLore, Online Subspace Descent
  sign_sgd,  ///< FRUGAL default (`inactive_update_rule='sign_sgd'`)
  sgd,       ///< FRUGAL `'sgd'`
  fira,      ///< Fira's norm-scaled residual with the growth limiter
};

/// Q-GaLore's lazy refresh: after each SVD the cosine similarity of the new and previous first
/// basis vector enters a FIFO of `queue` entries; when it is full and its mean >= `threshold`,
/// the gap is multiplied by `gamma` (truncated to an integer). The queue is not cleared.
/// lowrank takes |cos| because singular vectors are defined up to sign (the reference uses the
/// signed value).
struct LazyRefresh {
  bool enabled = false;
  int queue = 5;
  double threshold = 0.4;
  double gamma = 2.0;
};

/// Configuration of a `SubspaceOptimizer`.
struct SubspaceConfig {
  Index rank = 128;  ///< r, in [0, min(rows, cols)]; 0 = the empty subspace (FRUGAL density 0)
  ProjectionRule rule = ProjectionRule::standard;
  double scale = 0.25;                ///< GaLore's alpha on the back-projected Adam step
  std::int64_t update_gap = 200;      ///< T
  BasisOptions basis{};               ///< how refreshes compute the basis
  StateOnRefresh on_refresh = StateOnRefresh::keep;
  LazyRefresh lazy{};
  AdamConfig adam{};                  ///< hf eps 1e-6, decay after (GaLore's)
  ResidualRule residual = ResidualRule::none;
  double residual_lr_scale = 1.0;     ///< FRUGAL `inactive_lr_scale`: lr_f = lr * this
  double fira_gamma = 1.01;           ///< Fira's limiter
  bool fira_alpha_residual = false;   ///< Fira reference quirk: residual G - scale * back(R)
  bool online_pca = false;            ///< Online Subspace Descent: move the basis every step
  AdamConfig basis_adam{0.9, 0.999, 1e-8, EpsConvention::torch, 0.01, DecayPlacement::before_update, true};
  NonFinitePolicy non_finite = NonFinitePolicy::error;
};

/// GaLore (`jiaweizzhao/GaLore` AdamW): std side rule, exact SVD refresh every 200 steps,
/// scale 0.25, HF Adam (eps 1e-6), decay after the update, state kept across refreshes.
[[nodiscard]] SubspaceConfig galore_config(Index rank, BasisMethod method = BasisMethod::exact_svd);
/// FRUGAL (`philip-zmushko/FRUGAL`, GaloreOptimizer/CoordOptimizer): rank = round(density x the
/// projected dimension) for the given shape, scale 1, torch Adam (eps 1e-8), decay before the
/// update, state reset at each refresh, sign-SGD on the residual.
/// Density 0 gives rank 0: every coordinate on the state-free rule (sign-SGD).
/// \throws Error if density is outside [0, 1] or the shape is empty.
[[nodiscard]] SubspaceConfig frugal_config(Index rows, Index cols, double density = 0.25,
                                           BasisMethod method = BasisMethod::exact_svd);
/// Fira (`xichen-fy/Fira`): GaLore plus the norm-scaled residual and limiter (gamma 1.01); the
/// residual is the true orthogonal complement unless `fira_alpha_residual` is set.
[[nodiscard]] SubspaceConfig fira_config(Index rank, BasisMethod method = BasisMethod::exact_svd);
/// Online Subspace Descent (`kyleliang919/Online-Subspace-Descent`, `continuous`): GaLore's
/// first SVD, then the basis moves every step (AdamW, torch defaults, wd 0.01, lr 1/T scaled by
/// the weight lr schedule); never refreshed by SVD again.
[[nodiscard]] SubspaceConfig online_subspace_descent_config(Index rank);

/// Online Subspace Descent's loss for a basis `Pt` (`r x n`, rows = basis vectors) of the right
/// projection: `L(Pt) = ||Gh Pt^T Pt - Gh||_F^2` with `Gh = G / ||G||_F` (`G` is `m x n`, non-zero).
/// The left projection's loss `||P P^T Gh - Gh||^2` is this one for `G^T` and `Pt = P^T`.
template <class DG, class DP>
[[nodiscard]] double online_pca_loss(const Eigen::MatrixBase<DG>& G, const Eigen::MatrixBase<DP>& Pt) {
  using S = typename DG::Scalar;
  const auto Gh = (G / G.norm()).eval();
  const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic> E = Gh * Pt.transpose() * Pt - Gh;
  return static_cast<double>(E.squaredNorm());
}

/// The closed-form gradient of `online_pca_loss` with respect to `Pt` (`r x n`), with
/// `A = Gh Pt^T` (`m x r`): `2 (Pt Pt^T - I) A^T Gh + 2 A^T (A Pt - Gh)`; O(m n r), no `n x n`
/// matrix (`optimizers.md` §4). `SubspaceOptimizer` computes the same expression in fp32 with the
/// rank-update kernel.
template <class DG, class DP>
[[nodiscard]] Eigen::Matrix<typename DG::Scalar, Eigen::Dynamic, Eigen::Dynamic> online_pca_gradient(
    const Eigen::MatrixBase<DG>& G, const Eigen::MatrixBase<DP>& Pt) {
  using M = Eigen::Matrix<typename DG::Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const M Gh = G / G.norm();
  const M A = Gh * Pt.transpose();
  const M X = A.transpose() * Gh;
  const M I = M::Identity(Pt.rows(), Pt.rows());
  return 2 * (Pt * Pt.transpose() - I) * X + 2 * A.transpose() * (A * Pt - Gh);
}

/// What one step did.
struct StepReport {
  bool taken = false;              ///< false: skipped (non-finite gradient under `skip`)
  bool refreshed = false;          ///< a new basis was computed this step
  bool zero_gradient = false;      ///< a refresh was due but G == 0: basis kept, refresh retried next step
  double captured_energy = -1;     ///< ||project(G)||^2 / ||G||^2 at a refresh (-1 otherwise)
  std::int64_t update_gap = 0;     ///< the gap in force after this step (lazy refresh may grow it)
  double residual_norm = -1;       ///< ||applied residual step direction||_F (sign/sgd/fira), else -1
};

/// Low-rank-state optimizer of one `rows x cols` fp32 weight matrix.
///
/// A basis set through `projector().set_basis(...)` (or `set_coordinates`) before the first step
/// replaces the refresh at step 0; the next refresh is at step T.
///
/// W and G are views of the same shape, any strides (rows = `out` for a torch `nn.Linear`
/// weight; the side rule sees the matrix as given). The optimizer allocates its state once, at
/// the first step; a per-object workspace of `workspace_bytes()` holds R, N and the residual
/// blocks, so the GaLore and FRUGAL steps allocate nothing after the first one. Refreshes, Fira's
/// per-row factors and the Online Subspace Descent basis step allocate small temporaries
/// (`r x side_length` and smaller) when they run.
class SubspaceOptimizer {
 public:
  /// \throws Error on invalid shape, rank, gap, scale, Adam config or residual options.
  SubspaceOptimizer(Index rows, Index cols, const SubspaceConfig& config);

  /// One optimizer step with learning rate `lr` (schedules stay with the caller).
  /// \throws Error (W and the state unchanged) on a shape mismatch, a negative or non-finite lr,
  ///   or a non-finite G under `NonFinitePolicy::error`.
  StepReport step(MatrixView<float> W, MatrixView<const float> G, double lr);

  [[nodiscard]] Index rows() const noexcept { return rows_; }
  [[nodiscard]] Index cols() const noexcept { return cols_; }
  [[nodiscard]] const SubspaceConfig& config() const noexcept { return config_; }
  [[nodiscard]] const Projector& projector() const noexcept { return projector_; }
  [[nodiscard]] Projector& projector() noexcept { return projector_; }
  [[nodiscard]] const AdamState& state() const noexcept { return adam_; }
  [[nodiscard]] AdamState& state() noexcept { return adam_; }
  /// Steps taken (the GaLore refresh counter: refreshes happen when it is a multiple of the gap).
  [[nodiscard]] std::int64_t steps() const noexcept { return steps_; }
  [[nodiscard]] std::int64_t update_gap() const noexcept { return gap_; }
  [[nodiscard]] std::int64_t refreshes() const noexcept { return refreshes_; }
  /// Fira's limiter state (the previous residual norm; negative before the first residual).
  [[nodiscard]] double fira_previous_norm() const noexcept { return fira_prev_; }

  /// Optimizer-state bytes held now: Adam m and v, the basis, the basis optimizer's moments
  /// (Online Subspace Descent), and Fira's scalar. Excludes the workspace.
  [[nodiscard]] std::size_t state_bytes() const noexcept;
  /// The same, predicted for a shape and config before any allocation:
  /// `2 r max-side` (m, v) + `r side_length` (basis; r indices for coordinates) + OSD's
  /// `2 r side_length` + Fira's 8 bytes.
  [[nodiscard]] static std::size_t state_bytes_for(Index rows, Index cols, const SubspaceConfig& config);
  /// Scratch memory held between steps (R, N, residual blocks, OSD products).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept;

 private:
  bool refresh_due() const noexcept;
  void do_refresh(MatrixView<const float> G, StepReport& report);
  void apply_residual(MatrixView<float> W, MatrixView<const float> G, double lr, double step_size,
                      StepReport& report);
  void online_pca_step(MatrixView<const float> G, double lr);

  Index rows_ = 0, cols_ = 0;
  SubspaceConfig config_;
  Projector projector_;
  AdamState adam_;
  std::int64_t steps_ = 0;
  std::int64_t gap_ = 0;
  std::int64_t next_refresh_ = 0;
  std::int64_t refreshes_ = 0;
  bool pending_refresh_ = true;
  std::deque<double> lazy_queue_;
  ColMatrix<float> previous_first_;  // first basis vector at the previous refresh (lazy rule)
  double fira_prev_ = -1;
  double lr0_ = -1;
  AdamState basis_adam_;  // Online Subspace Descent: moments of the basis (side_length x r)
  // workspace
  RowMatrix<float> R_, N_, block_;
  ColMatrix<float> basis_grad_;
};

}  // namespace optim

LOWRANK_END_NAMESPACE
