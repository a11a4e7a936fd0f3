// Projectors and the low-rank-state optimizers (include/lowrank/optim/projector.hpp, subspace.hpp).
#include "lowrank/optim/subspace.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <numeric>
#include <utility>

#include "lowrank/core/error.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/kernels/rank_update.hpp"
#include "lowrank/linalg/svd.hpp"
#include "common-inl.hpp"

#if defined(LOWRANK_HAVE_OPENMP)
#include <omp.h>
#endif

LOWRANK_BEGIN_NAMESPACE

namespace optim {

using detail::fail;
using internal::first_nonfinite;

namespace {

// Columns of the long dimension per rank_update call in the projection GEMM: the packed chunk of
// G (rows x 256 fp32) and of the basis stay in cache while R is updated.
constexpr Index kProjectChunk = 256;

const char* side_name(Side s) { return s == Side::left ? "left" : "right"; }

bool all_finite(const RowMatrix<float>& M) {
  const float* p = M.data();
  float acc = 0;
  for (Index i = 0; i < M.size(); ++i) acc += p[i] * 0.0f;  // NaN/inf turn 0 into NaN
  return acc == 0.0f;
}

double squared_norm(MatrixView<const float> G) {
  double s = 0;
  for (Index i = 0; i < G.rows; ++i)
    for (Index j = 0; j < G.cols; ++j) {
      const double x = G(i, j);
      s += x * x;
    }
  return s;
}

MatrixView<float> view_of(RowMatrix<float>& M) { return {M.data(), M.rows(), M.cols(), M.cols(), 1}; }

void check_matrix(const char* fn, const char* what, MatrixView<const float> M, Index rows, Index cols) {
  if (M.rows != rows || M.cols != cols)
    fail(fn, "{} is {}x{} but the optimizer/projector is for {}x{}", what, M.rows, M.cols, rows, cols);
  if (M.data == nullptr || M.row_stride <= 0 || M.col_stride <= 0)
    fail(fn, "{} ({}x{}) has a null pointer or strides {}, {} that are not positive", what, M.rows, M.cols,
         M.row_stride, M.col_stride);
}

// The projection GEMM, R += P^T G (left, R r x cols) or G Q (right, R rows x r), R row-major and
// zeroed: each thread owns a slice of R's long dimension (columns of G for left, rows for right)
// and runs the whole k loop over it with single-threaded rank updates (chunks of kProjectChunk
// along G's other dimension), so there is one parallel region and no barrier per chunk. Each
// element is one fma chain in k order whatever the thread count (rank_update is tiling-invariant).
void project_dense(MatrixView<const float> G, float* R, const float* P, bool left, Index rows, Index cols, Index r) {
  const Index slice_len = left ? cols : rows;  // R's long dimension, split over threads
  const Index k_len = left ? rows : cols;
  int threads = num_threads();
  if (static_cast<double>(rows) * static_cast<double>(cols) * static_cast<double>(r) < (1 << 20)) threads = 1;
  const Index slices = std::max<Index>(1, std::min<Index>(threads, slice_len / 16));
  RankUpdateOptions one;
  one.max_threads = 1;
  auto project_slice = [&](Index s) {
    // Slice bounds on multiples of 16 (the micro-kernel's column width for left).
    const Index per = (slice_len / slices + 15) / 16 * 16;
    const Index a = std::min(slice_len, s * per), b = s + 1 == slices ? slice_len : std::min(slice_len, (s + 1) * per);
    if (a >= b) return;
    for (Index k0 = 0; k0 < k_len; k0 += kProjectChunk) {
      const Index kc = std::min(kProjectChunk, k_len - k0);
      if (left) {
        // R[:, a:b] (r x (b-a)) += P[k0:k1, :]^T G[k0:k1, a:b]
        const MatrixView<float> out(R + a, r, b - a, cols, 1);
        const MatrixView<const float> U(P + k0, r, kc, rows, 1);                         // U(i, k) = P(k0 + k, i)
        const MatrixView<const float> V(&G(k0, a), b - a, kc, G.col_stride, G.row_stride);  // V(j, k) = G(k0 + k, a + j)
        rank_update(out, U, V, 1.0, one);
      } else {
        // R[a:b, :] ((b-a) x r) += G[a:b, k0:k1] Q[k0:k1, :]
        const MatrixView<float> out(R + a * r, b - a, r, r, 1);
        const MatrixView<const float> U(&G(a, k0), b - a, kc, G.row_stride, G.col_stride);
        const MatrixView<const float> V(P + k0, r, kc, cols, 1);  // V(j, k) = Q(k0 + k, j)
        rank_update(out, U, V, 1.0, one);
      }
    }
  };
  // A slice's rank updates allocate their workspace on the thread that runs them, inside the
  // region: an exception (std::bad_alloc) must not leave the region (the program would
  // terminate), so the first one is kept and rethrown after it (R's contents are then unspecified).
  std::exception_ptr error;
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(slices)) if (slices > 1)
#endif
  for (Index s = 0; s < slices; ++s) {
    try {
      project_slice(s);
    } catch (...) {
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp critical(lowrank_project_dense_error)
#endif
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// The randomized range finder of `linalg::truncated_svd` (Halko, Martinsson and Tropp 2011, as
// torch.svd_lowrank) with the projection GEMM above for the products with G, which dominate:
// the side's top-r singular vectors of G (rows x cols), `side_length x r`, orthonormal columns.
// T = G^T for a left basis (its right singular vectors are G's left ones), so the loop always
// looks for T's right singular vectors: Y = T Omega, then power iterations Z = orth(T^T Y),
// Y = orth(T Z), then T^T Y = Qb Rb and the l x l SVD of Rb^T gives V = Qb Vr.
ColMatrix<float> randomized_basis(MatrixView<const float> G, bool left, Index r, Index oversample, int power_iterations,
                                  std::uint64_t seed, std::uint64_t stream) {
  const Index rows = G.rows, cols = G.cols;
  const Index len = left ? rows : cols;      // length of the wanted singular vectors
  const Index l = std::min(std::min(rows, cols), r + oversample);
  const RandomStream rng(seed, stream);
  ColMatrix<float> omega(len, l);  // Omega(i, j) = normal(j * len + i)
  for (Index j = 0; j < l; ++j)
    for (Index i = 0; i < len; ++i)
      omega(i, j) = rng.normal(static_cast<std::uint64_t>(j) * static_cast<std::uint64_t>(len) + static_cast<std::uint64_t>(i));
  // T B for B (len x l): right: G B (rows x l); left: G^T B (cols x l) = (B^T G)^T.
  RowMatrix<float> tmp;
  const auto times_T = [&](const ColMatrix<float>& B) -> ColMatrix<float> {
    if (left) {
      tmp = RowMatrix<float>::Zero(l, cols);
      project_dense(G, tmp.data(), B.data(), true, rows, cols, l);  // B^T G, l x cols
      return tmp.transpose();
    }
    tmp = RowMatrix<float>::Zero(rows, l);
    project_dense(G, tmp.data(), B.data(), false, rows, cols, l);  // G B, rows x l
    return tmp;
  };
  // T^T B for B (other x l): right: G^T B (cols x l); left: G B (rows x l).
  const auto times_Tt = [&](const ColMatrix<float>& B) -> ColMatrix<float> {
    if (left) {
      tmp = RowMatrix<float>::Zero(rows, l);
      project_dense(G, tmp.data(), B.data(), false, rows, cols, l);
      return tmp;
    }
    tmp = RowMatrix<float>::Zero(l, cols);
    project_dense(G, tmp.data(), B.data(), true, rows, cols, l);
    return tmp.transpose();
  };
  ColMatrix<float> Y = times_T(omega);  // other x l
  linalg::detail::orthonormalize_columns(Y);
  for (int it = 0; it < power_iterations; ++it) {
    ColMatrix<float> Z = times_Tt(Y);  // len x l
    linalg::detail::orthonormalize_columns(Z);
    Y = times_T(Z);
    linalg::detail::orthonormalize_columns(Y);
  }
  const ColMatrix<float> Bt = times_Tt(Y);  // len x l = T^T Y
  ColMatrix<float> qb, r_upper;
  linalg::detail::thin_qr(Bt, qb, r_upper);
  const linalg::detail::DenseSvd small = linalg::detail::dense_svd(r_upper.transpose().cast<double>());
  return qb * small.V.leftCols(r).cast<float>();
}

}  // namespace

// ---- Projector ------------------------------------------------------------------------------------

Projector::Projector(Index rows, Index cols, Index rank, Side side) {
  constexpr const char* fn = "lowrank::optim::Projector";
  if (rows < 1 || cols < 1) fail(fn, "the gradient is {}x{}; both dimensions must be >= 1", rows, cols);
  if (rank < 0 || rank > std::min(rows, cols))
    fail(fn, "rank is {} for a {}x{} gradient; it must be in [0, {}]", rank, rows, cols, std::min(rows, cols));
  rows_ = rows;
  cols_ = cols;
  rank_ = rank;
  side_ = side;
  shaped_ = true;
  if (rank == 0) {  // the empty subspace: project gives an empty R, add_back does nothing
    basis_.resize(side_length(), 0);
    has_basis_ = true;
  }
}

void Projector::require_basis(const char* fn) const {
  if (!shaped_) fail(fn, "the projector is default-constructed (no shape)");
  if (!has_basis_) fail(fn, "the {} projector ({}x{}, rank {}) has no basis yet", side_name(side_), rows_, cols_, rank_);
}

ColMatrix<float> Projector::dense_basis() const {
  if (!coordinates_) return basis_;
  ColMatrix<float> P = ColMatrix<float>::Zero(side_length(), rank_);
  for (Index k = 0; k < rank_; ++k) P(indices_[static_cast<std::size_t>(k)], k) = 1.0f;
  return P;
}

void Projector::set_basis(const Eigen::Ref<const ColMatrix<float>>& basis) {
  constexpr const char* fn = "lowrank::optim::Projector::set_basis";
  if (!shaped_) fail(fn, "the projector is default-constructed (no shape)");
  if (basis.rows() != side_length() || basis.cols() != rank_)
    fail(fn, "basis is {}x{} but the {} projector of a {}x{} gradient with rank {} needs {}x{}", basis.rows(),
         basis.cols(), side_name(side_), rows_, cols_, rank_, side_length(), rank_);
  if (!basis.allFinite()) fail(fn, "basis ({}x{}) has a non-finite entry", basis.rows(), basis.cols());
  basis_ = basis;
  indices_.clear();
  coordinates_ = false;
  has_basis_ = true;
}

void Projector::set_coordinates(std::vector<Index> indices) {
  constexpr const char* fn = "lowrank::optim::Projector::set_coordinates";
  if (!shaped_) fail(fn, "the projector is default-constructed (no shape)");
  if (static_cast<Index>(indices.size()) != rank_)
    fail(fn, "indices has {} entries but the rank is {}", indices.size(), rank_);
  std::sort(indices.begin(), indices.end());
  for (std::size_t k = 0; k < indices.size(); ++k) {
    if (indices[k] < 0 || indices[k] >= side_length())
      fail(fn, "index {} is outside [0, {}) (the {} side of a {}x{} gradient)", indices[k], side_length(),
           side_name(side_), rows_, cols_);
    if (k > 0 && indices[k] == indices[k - 1]) fail(fn, "index {} appears twice", indices[k]);
  }
  indices_ = std::move(indices);
  basis_.resize(0, 0);
  coordinates_ = true;
  has_basis_ = true;
}

double Projector::refresh(MatrixView<const float> G, const BasisOptions& options, std::uint64_t refresh) {
  constexpr const char* fn = "lowrank::optim::Projector::refresh";
  if (!shaped_) fail(fn, "the projector is default-constructed (no shape)");
  check_matrix(fn, "G", G, rows_, cols_);
  if (options.oversample < 0) fail(fn, "options.oversample is {}; it must be >= 0", options.oversample);
  if (options.power_iterations < 0)
    fail(fn, "options.power_iterations is {}; it must be >= 0", options.power_iterations);
  const auto bad = first_nonfinite(G);
  if (bad.first >= 0) fail(fn, "G ({}x{}) has a non-finite value at ({}, {})", rows_, cols_, bad.first, bad.second);
  const double total = squared_norm(G);
  const Index len = side_length();
  if (rank_ == 0) return 0.0;
  switch (options.method) {
    case BasisMethod::randomized_svd:
      if (total == 0) fail(fn, "G ({}x{}) is zero: its singular vectors are undefined", rows_, cols_);
      basis_ = randomized_basis(G, side_ == Side::left, rank_, options.oversample, options.power_iterations,
                                options.seed, refresh);
      coordinates_ = false;
      indices_.clear();
      break;
    case BasisMethod::exact_svd: {
      if (total == 0) fail(fn, "G ({}x{}) is zero: its singular vectors are undefined", rows_, cols_);
      linalg::SvdOptions so;
      so.method = linalg::SvdMethod::exact;
      so.oversample = options.oversample;
      so.power_iterations = options.power_iterations;
      so.seed = options.seed;
      so.stream = refresh;
      auto svd = linalg::truncated_svd(G, rank_, so);
      basis_ = side_ == Side::left ? std::move(svd.U) : std::move(svd.V);
      coordinates_ = false;
      indices_.clear();
      break;
    }
    case BasisMethod::random_orthogonal: {
      const RandomStream rng(options.seed, refresh);
      ColMatrix<float> Y(len, rank_);
      for (Index j = 0; j < rank_; ++j)
        for (Index i = 0; i < len; ++i)
          Y(i, j) = rng.normal(static_cast<std::uint64_t>(j) * static_cast<std::uint64_t>(len) + static_cast<std::uint64_t>(i));
      linalg::detail::orthonormalize_columns(Y);
      basis_ = std::move(Y);
      coordinates_ = false;
      indices_.clear();
      break;
    }
    case BasisMethod::coordinates: {
      // The first r entries of a random permutation (partial Fisher-Yates driven by Philox).
      std::vector<Index> perm = internal::random_subset(options.seed, refresh, len, rank_);
      std::sort(perm.begin(), perm.end());
      indices_ = std::move(perm);
      basis_.resize(0, 0);
      coordinates_ = true;
      break;
    }
  }
  has_basis_ = true;
  if (total == 0) return 1.0;
  RowMatrix<float> R;
  project(G, R);
  return R.cast<double>().squaredNorm() / total;
}

void Projector::project(MatrixView<const float> G, RowMatrix<float>& R) const {
  constexpr const char* fn = "lowrank::optim::Projector::project";
  require_basis(fn);
  check_matrix(fn, "G", G, rows_, cols_);
  R.resize(projected_rows(), projected_cols());
  if (rank_ == 0) return;
  if (coordinates_) {
    if (side_ == Side::left) {
      for (Index k = 0; k < rank_; ++k)
        for (Index j = 0; j < cols_; ++j) R(k, j) = G(indices_[static_cast<std::size_t>(k)], j);
    } else {
      for (Index i = 0; i < rows_; ++i)
        for (Index k = 0; k < rank_; ++k) R(i, k) = G(i, indices_[static_cast<std::size_t>(k)]);
    }
    return;
  }
  R.setZero();
  project_dense(G, R.data(), basis_.data(), side_ == Side::left, rows_, cols_, rank_);
}

void Projector::add_back(MatrixView<float> W, const RowMatrix<float>& N, double alpha) const {
  constexpr const char* fn = "lowrank::optim::Projector::add_back";
  require_basis(fn);
  check_matrix(fn, "W", W, rows_, cols_);
  if (N.rows() != projected_rows() || N.cols() != projected_cols())
    fail(fn, "N is {}x{} but the {} projector of a {}x{} gradient with rank {} needs {}x{}", N.rows(), N.cols(),
         side_name(side_), rows_, cols_, rank_, projected_rows(), projected_cols());
  if (!std::isfinite(alpha)) fail(fn, "alpha is {}; it must be finite", alpha);
  if (alpha == 0 || rank_ == 0) return;
  if (coordinates_) {
    if (side_ == Side::left) {
      for (Index k = 0; k < rank_; ++k)
        for (Index j = 0; j < cols_; ++j)
          W(indices_[static_cast<std::size_t>(k)], j) += static_cast<float>(alpha * N(k, j));
    } else {
      for (Index i = 0; i < rows_; ++i)
        for (Index k = 0; k < rank_; ++k)
          W(i, indices_[static_cast<std::size_t>(k)]) += static_cast<float>(alpha * N(i, k));
    }
    return;
  }
  const float* P = basis_.data();
  if (side_ == Side::left) {
    // W += alpha P N: U = P (rows x r, column-major), V = N^T (cols x r).
    const MatrixView<const float> U(P, rows_, rank_, 1, rows_);
    const MatrixView<const float> V(N.data(), cols_, rank_, 1, cols_);
    rank_update(W, U, V, alpha);
  } else {
    // W += alpha N Q^T: U = N (rows x r, row-major), V = Q (cols x r, column-major).
    const MatrixView<const float> U(N.data(), rows_, rank_, rank_, 1);
    const MatrixView<const float> V(P, cols_, rank_, 1, cols_);
    rank_update(W, U, V, alpha);
  }
}

RowMatrix<float> Projector::back(const RowMatrix<float>& N, double alpha) const {
  RowMatrix<float> out = RowMatrix<float>::Zero(rows_, cols_);
  add_back(view_of(out), N, alpha);
  return out;
}

std::size_t Projector::bytes() const noexcept {
  return static_cast<std::size_t>(basis_.size()) * sizeof(float) + indices_.size() * sizeof(Index);
}

// ---- configurations -------------------------------------------------------------------------------

SubspaceConfig galore_config(Index rank, BasisMethod method) {
  SubspaceConfig c;
  c.rank = rank;
  c.basis.method = method;
  return c;
}

SubspaceConfig frugal_config(Index rows, Index cols, double density, BasisMethod method) {
  constexpr const char* fn = "lowrank::optim::frugal_config";
  if (!(density >= 0 && density <= 1)) fail(fn, "density is {}; it must be in [0, 1]", density);
  SubspaceConfig c;
  const Side side = choose_side(rows, cols, c.rule);
  const Index len = side == Side::left ? rows : cols;
  if (rows < 1 || cols < 1) fail(fn, "the weight is {}x{}; both dimensions must be >= 1", rows, cols);
  // Python's round() (FRUGAL's): ties to even.
  c.rank = static_cast<Index>(std::nearbyint(density * static_cast<double>(len)));
  c.scale = 1.0;
  c.basis.method = method;
  c.on_refresh = StateOnRefresh::reset;
  c.adam.eps = 1e-8;
  c.adam.eps_convention = EpsConvention::torch;
  c.adam.decay = DecayPlacement::before_update;
  c.residual = ResidualRule::sign_sgd;
  return c;
}

SubspaceConfig fira_config(Index rank, BasisMethod method) {
  SubspaceConfig c = galore_config(rank, method);
  c.residual = ResidualRule::fira;
  return c;
}

SubspaceConfig online_subspace_descent_config(Index rank) {
  SubspaceConfig c = galore_config(rank, BasisMethod::exact_svd);
  c.online_pca = true;
  return c;
}

// ---- SubspaceOptimizer ----------------------------------------------------------------------------

namespace {

void check_config(const char* fn, Index rows, Index cols, const SubspaceConfig& c) {
  if (rows < 1 || cols < 1) fail(fn, "the weight is {}x{}; both dimensions must be >= 1", rows, cols);
  if (c.rank < 0 || c.rank > std::min(rows, cols))
    fail(fn, "config.rank is {} for a {}x{} weight; it must be in [0, {}]", c.rank, rows, cols, std::min(rows, cols));
  if (c.rank == 0 && c.online_pca) fail(fn, "config.online_pca needs config.rank >= 1");
  if (c.update_gap < 1) fail(fn, "config.update_gap is {}; it must be >= 1", c.update_gap);
  if (!std::isfinite(c.scale)) fail(fn, "config.scale is {}; it must be finite", c.scale);
  if (!(c.residual_lr_scale >= 0) || !std::isfinite(c.residual_lr_scale))
    fail(fn, "config.residual_lr_scale is {}; it must be finite and >= 0", c.residual_lr_scale);
  if (!(c.fira_gamma >= 1) || !std::isfinite(c.fira_gamma))
    fail(fn, "config.fira_gamma is {}; it must be finite and >= 1", c.fira_gamma);
  if (c.lazy.enabled && (c.lazy.queue < 1 || !(c.lazy.gamma >= 1) || !std::isfinite(c.lazy.gamma) ||
                         !std::isfinite(c.lazy.threshold)))
    fail(fn, "config.lazy is (queue {}, threshold {}, gamma {}); it needs queue >= 1, gamma >= 1, finite values",
         c.lazy.queue, c.lazy.threshold, c.lazy.gamma);
  if (c.basis.oversample < 0) fail(fn, "config.basis.oversample is {}; it must be >= 0", c.basis.oversample);
  if (c.basis.power_iterations < 0)
    fail(fn, "config.basis.power_iterations is {}; it must be >= 0", c.basis.power_iterations);
  if (c.online_pca && c.basis.method == BasisMethod::coordinates)
    fail(fn, "config.online_pca needs a dense basis; config.basis.method is coordinates");
  check_adam_config(fn, c.adam);
  if (c.online_pca) check_adam_config(fn, c.basis_adam);
}

}  // namespace

SubspaceOptimizer::SubspaceOptimizer(Index rows, Index cols, const SubspaceConfig& config) {
  check_config("lowrank::optim::SubspaceOptimizer", rows, cols, config);
  rows_ = rows;
  cols_ = cols;
  config_ = config;
  projector_ = Projector(rows, cols, config.rank, choose_side(rows, cols, config.rule));
  gap_ = config.update_gap;
}

bool SubspaceOptimizer::refresh_due() const noexcept {
  if (config_.rank == 0) return false;
  // A basis set by the caller before the first step replaces the first refresh.
  if (steps_ == 0 && refreshes_ == 0 && projector_.has_basis()) return false;
  if (pending_refresh_) return true;
  return !config_.online_pca && steps_ >= next_refresh_;
}

std::size_t SubspaceOptimizer::state_bytes() const noexcept {
  std::size_t b = adam_.bytes() + projector_.bytes() + basis_adam_.bytes();
  if (config_.residual == ResidualRule::fira) b += sizeof(double);
  return b;
}

std::size_t SubspaceOptimizer::state_bytes_for(Index rows, Index cols, const SubspaceConfig& c) {
  check_config("lowrank::optim::SubspaceOptimizer::state_bytes_for", rows, cols, c);
  const Side side = choose_side(rows, cols, c.rule);
  const auto r = static_cast<std::size_t>(c.rank);
  const auto len = static_cast<std::size_t>(side == Side::left ? rows : cols);
  const auto other = static_cast<std::size_t>(side == Side::left ? cols : rows);
  std::size_t b = 2 * r * other * sizeof(float);
  b += c.basis.method == BasisMethod::coordinates ? r * sizeof(Index) : r * len * sizeof(float);
  if (c.online_pca) b += 2 * r * len * sizeof(float);
  if (c.residual == ResidualRule::fira) b += sizeof(double);
  return b;
}

std::size_t SubspaceOptimizer::workspace_bytes() const noexcept {
  return static_cast<std::size_t>(R_.size() + N_.size() + block_.size() + basis_grad_.size()) * sizeof(float);
}

void SubspaceOptimizer::do_refresh(MatrixView<const float> G, StepReport& report) {
  const double total = squared_norm(G);
  if (total == 0) {
    // Singular vectors of 0 are undefined: keep the basis (or start from the first coordinates)
    // and retry at the next step.
    report.zero_gradient = true;
    pending_refresh_ = true;
    if (!projector_.has_basis()) {
      ColMatrix<float> I = ColMatrix<float>::Identity(projector_.side_length(), projector_.rank());
      projector_.set_basis(I);
    }
    return;
  }
  const bool had_basis = projector_.has_basis();
  ColMatrix<float> old_basis;
  if (had_basis && (config_.on_refresh == StateOnRefresh::rotate || config_.lazy.enabled))
    old_basis = projector_.dense_basis();
  report.captured_energy = projector_.refresh(G, config_.basis, static_cast<std::uint64_t>(refreshes_));
  ++refreshes_;
  report.refreshed = true;
  pending_refresh_ = false;
  const ColMatrix<float> new_basis =
      (config_.on_refresh == StateOnRefresh::rotate || config_.lazy.enabled) ? projector_.dense_basis() : ColMatrix<float>();
  if (had_basis && adam_.m.size() > 0) {
    if (config_.on_refresh == StateOnRefresh::reset) {
      adam_.zero(true);
    } else if (config_.on_refresh == StateOnRefresh::rotate) {
      const ColMatrix<float> O = old_basis.transpose() * new_basis;  // r x r
      const ColMatrix<float> O2 = O.cwiseAbs2();
      if (projector_.side() == Side::right) {
        adam_.m = (adam_.m * O).eval();
        adam_.v = (adam_.v * O2).eval();
      } else {
        adam_.m = (O.transpose() * adam_.m).eval();
        adam_.v = (O2.transpose() * adam_.v).eval();
      }
    }
  }
  if (config_.lazy.enabled && had_basis && old_basis.size() > 0) {
    const double a = old_basis.col(0).cast<double>().norm(), b = new_basis.col(0).cast<double>().norm();
    const double cosine = a > 0 && b > 0 ? std::abs(old_basis.col(0).cast<double>().dot(new_basis.col(0).cast<double>())) / (a * b) : 0.0;
    lazy_queue_.push_back(cosine);
    while (static_cast<int>(lazy_queue_.size()) > config_.lazy.queue) lazy_queue_.pop_front();
    if (static_cast<int>(lazy_queue_.size()) == config_.lazy.queue) {
      double mean = 0;
      for (double x : lazy_queue_) mean += x;
      mean /= static_cast<double>(lazy_queue_.size());
      if (mean >= config_.lazy.threshold)
        gap_ = std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(gap_) * config_.lazy.gamma));
    }
  }
  next_refresh_ = steps_ + gap_;
}

StepReport SubspaceOptimizer::step(MatrixView<float> W, MatrixView<const float> G, double lr) {
  constexpr const char* fn = "lowrank::optim::SubspaceOptimizer::step";
  check_matrix(fn, "W", W, rows_, cols_);
  check_matrix(fn, "G", G, rows_, cols_);
  if (!(lr >= 0) || !std::isfinite(lr)) fail(fn, "lr is {}; it must be finite and >= 0", lr);
  {  // The fp32 step sizes (Adam's is at most lr / (1 - beta1) with bias correction) must be finite.
    const double adam_bound = config_.adam.bias_correction ? lr / (1 - config_.adam.beta1) : lr;
    const double bound = std::max({adam_bound * std::abs(config_.scale), adam_bound, lr * config_.residual_lr_scale,
                                   lr * config_.adam.weight_decay});
    if (!(bound <= static_cast<double>(std::numeric_limits<float>::max())))
      fail(fn, "lr is {}: the step sizes it gives (up to {}) do not fit in fp32", lr, bound);
  }
  StepReport report;
  report.update_gap = gap_;
  const bool refresh = refresh_due();
  // Non-finite gradients: a full scan at a refresh and for coordinate (or empty) bases; with a
  // dense basis the projection R is checked instead, which is non-finite whenever G is (every G
  // entry enters every R entry of its row/column through an fma, and inf * 0 = NaN), so the
  // residual path and the online-PCA step never see a non-finite G either.
  const bool scan = refresh || projector_.is_coordinates() || config_.rank == 0;
  if (scan) {
    const auto bad = first_nonfinite(G);
    if (bad.first >= 0) {
      if (config_.non_finite == NonFinitePolicy::skip) return report;
      fail(fn, "G ({}x{}) has a non-finite value {} at ({}, {})", rows_, cols_, G(bad.first, bad.second), bad.first,
           bad.second);
    }
  }
  // From here on the step commits (the refresh may already change the basis).
  if (refresh) do_refresh(G, report);
  projector_.project(G, R_);
  if (!scan && !all_finite(R_)) {
    if (config_.non_finite == NonFinitePolicy::skip) return report;
    fail(fn, "G ({}x{}) has a non-finite value (or its projection overflows): the projected gradient is not finite",
         rows_, cols_);
  }
  if (adam_.m.rows() != R_.rows() || adam_.m.cols() != R_.cols()) adam_ = AdamState(R_.rows(), R_.cols());
  if (lr0_ < 0) lr0_ = lr;
  ++adam_.step;
  const AdamScalars s = adam_scalars(config_.adam, adam_.step, lr);
  N_.resize(R_.rows(), R_.cols());
  adam_moments(R_.data(), R_.cols(), adam_.m.data(), adam_.v.data(), N_.data(), R_.rows(), R_.cols(),
               config_.adam.beta1, config_.adam.beta2, s.eps);
  const float decay = static_cast<float>(lr * config_.adam.weight_decay);
  if (decay != 0 && config_.adam.decay == DecayPlacement::before_update) {
    for (Index i = 0; i < rows_; ++i)
      for (Index j = 0; j < cols_; ++j) W(i, j) *= 1.0f - decay;
  }
  if (config_.residual != ResidualRule::none) apply_residual(W, G, lr, s.step_size, report);
  projector_.add_back(W, N_, -s.step_size * config_.scale);
  if (decay != 0 && config_.adam.decay == DecayPlacement::after_update) {
    for (Index i = 0; i < rows_; ++i)
      for (Index j = 0; j < cols_; ++j) {
        float& w = W(i, j);
        w = w - decay * w;
      }
  }
  if (config_.online_pca) {
    const Index len = projector_.side_length(), r = projector_.rank();
    if (basis_adam_.m.rows() != len || basis_adam_.m.cols() != r) basis_adam_ = AdamState(len, r);
    // The first call only sets the basis (by SVD or the caller); the basis moves from step 1 on.
    if (steps_ > 0) online_pca_step(G, lr);
  }
  if (steps_ == 0 && !report.refreshed && !report.zero_gradient) {
    pending_refresh_ = false;  // the caller's basis stood in for the first refresh
    next_refresh_ = gap_;
  }
  ++steps_;
  report.taken = true;
  report.update_gap = gap_;
  return report;
}

void SubspaceOptimizer::apply_residual(MatrixView<float> W, MatrixView<const float> G, double lr, double step_size,
                                       StepReport& report) {
  const bool fira = config_.residual == ResidualRule::fira;
  const double c = fira && config_.fira_alpha_residual ? config_.scale : 1.0;
  const Side side = projector_.side();
  const Index r = projector_.rank();
  // Fira needs the norm of the whole scaled residual before applying it: one block of all rows.
  // sign/sgd go block by block (rows), the blocks spread over the threads, each thread with its
  // own block buffer, so the residual stays in cache and W is read and written once.
  const Index block_rows =
      fira ? rows_ : std::max<Index>(1, std::min<Index>(rows_, (Index{1} << 20) / std::max<Index>(1, cols_)));
  const Index blocks = (rows_ + block_rows - 1) / block_rows;
  int threads = fira ? 1 : num_threads();
  threads = static_cast<int>(std::max<Index>(1, std::min<Index>(threads, blocks)));
  block_.resize(block_rows * threads, cols_);
  RankUpdateOptions one;
  one.max_threads = fira ? 0 : 1;
  // T = G[i0:i0+nb, :] - c back(R)[i0:i0+nb, :] into buf (nb x cols, row-major).
  const auto residual_block = [&](Index i0, Index nb, float* buf) {
    for (Index i = 0; i < nb; ++i)
      for (Index j = 0; j < cols_; ++j) buf[i * cols_ + j] = G(i0 + i, j);
    const MatrixView<float> T(buf, nb, cols_, cols_, 1);
    if (r == 0) return;
    if (projector_.is_coordinates()) {
      const auto& idx = projector_.indices();
      if (side == Side::left) {
        for (Index k = 0; k < r; ++k) {
          const Index row = idx[static_cast<std::size_t>(k)];
          if (row < i0 || row >= i0 + nb) continue;
          for (Index j = 0; j < cols_; ++j) T(row - i0, j) -= static_cast<float>(c * R_(k, j));
        }
      } else {
        for (Index i = 0; i < nb; ++i)
          for (Index k = 0; k < r; ++k) T(i, idx[static_cast<std::size_t>(k)]) -= static_cast<float>(c * R_(i0 + i, k));
      }
      return;
    }
    const float* P = projector_.basis().data();
    if (side == Side::left) {
      const MatrixView<const float> U(P + i0, nb, r, 1, rows_);        // P[i0:i0+nb, :]
      const MatrixView<const float> V(R_.data(), cols_, r, 1, cols_);  // R^T
      rank_update(T, U, V, -c, one);
    } else {
      const MatrixView<const float> U(R_.data() + i0 * r, nb, r, r, 1);  // R[i0:i0+nb, :]
      const MatrixView<const float> V(P, cols_, r, 1, cols_);            // Q
      rank_update(T, U, V, -c, one);
    }
  };
  if (!fira) {
    const bool sign = config_.residual == ResidualRule::sign_sgd;
    const float lr_f = static_cast<float>(lr * config_.residual_lr_scale);
    double applied2 = 0;
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : applied2) if (threads > 1)
#endif
    for (Index b = 0; b < blocks; ++b) {
#if defined(LOWRANK_HAVE_OPENMP)
      float* buf = block_.data() + static_cast<Index>(omp_get_thread_num()) * block_rows * cols_;
#else
      float* buf = block_.data();
#endif
      const Index i0 = b * block_rows, nb = std::min(block_rows, rows_ - i0);
      residual_block(i0, nb, buf);
      for (Index i = 0; i < nb; ++i) {
        const float* t = buf + i * cols_;
        float row2 = 0;
        if (W.col_stride == 1) {
          float* w = &W(i0 + i, 0);
          for (Index j = 0; j < cols_; ++j) {
            const float d = sign ? internal::sign_of(t[j]) : t[j];
            row2 += d * d;
            w[j] -= lr_f * d;
          }
        } else {
          for (Index j = 0; j < cols_; ++j) {
            const float d = sign ? internal::sign_of(t[j]) : t[j];
            row2 += d * d;
            W(i0 + i, j) -= lr_f * d;
          }
        }
        applied2 += static_cast<double>(row2);
      }
    }
    report.residual_norm = std::sqrt(applied2);
    return;
  }
  residual_block(0, rows_, block_.data());
  // Fira's phi: one factor per row (right) or column (left) of the unprojected dimension.
  Vector<float> phi;
  if (side == Side::right) {
    phi.resize(rows_);
    for (Index i = 0; i < rows_; ++i) {
      const double n = N_.row(i).cast<double>().norm(), g = R_.row(i).cast<double>().norm();
      phi(i) = static_cast<float>(n / (g + 1e-8));
    }
  } else {
    phi.resize(cols_);
    for (Index j = 0; j < cols_; ++j) {
      const double n = N_.col(j).cast<double>().norm(), g = R_.col(j).cast<double>().norm();
      phi(j) = static_cast<float>(n / (g + 1e-8));
    }
  }
  // S = phi (.) T, limiter, W -= step_size S.
  double norm2 = 0;
  for (Index i = 0; i < rows_; ++i)
    for (Index j = 0; j < cols_; ++j) {
      float& t = block_(i, j);
      t *= side == Side::right ? phi(i) : phi(j);
      norm2 += static_cast<double>(t) * t;
    }
  const double norm = std::sqrt(norm2);
  double limit = 1;
  if (fira_prev_ >= 0) {
    limit = std::max(norm / (fira_prev_ + 1e-8), config_.fira_gamma) / config_.fira_gamma;
    fira_prev_ = norm / limit;
  } else {
    fira_prev_ = norm;
  }
  const float coef = static_cast<float>(step_size / limit);
  for (Index i = 0; i < rows_; ++i)
    for (Index j = 0; j < cols_; ++j) W(i, j) -= coef * block_(i, j);
  report.residual_norm = norm / limit;
}

void SubspaceOptimizer::online_pca_step(MatrixView<const float> G, double lr) {
  const double g2 = squared_norm(G);
  if (g2 == 0) return;  // the loss is 0 for every basis: no step (and no NaN from G / ||G||)
  const Index r = projector_.rank();
  const Side side = projector_.side();
  ColMatrix<float>& Q = projector_.basis_mut();  // side_length x r
  // Work in the right-projection frame: H = G^ (right) or G^^T (left), Pt = Q^T (r x len),
  // A = H Pt^T = R / ||G|| (right) or R^T / ||G|| (left), X = A^T H (r x len).
  const Index len = projector_.side_length();
  RowMatrix<float> X = RowMatrix<float>::Zero(r, len);
  const MatrixView<float> xv(X.data(), r, len, len, 1);
  if (side == Side::right) {
    // X = R^T G (k over rows).
    for (Index k0 = 0; k0 < rows_; k0 += kProjectChunk) {
      const Index kc = std::min(kProjectChunk, rows_ - k0);
      const MatrixView<const float> U(R_.data() + k0 * r, r, kc, 1, r);                // U(i, k) = R(k0 + k, i)
      const MatrixView<const float> V(&G(k0, 0), cols_, kc, G.col_stride, G.row_stride);  // V(j, k) = G(k0 + k, j)
      rank_update(xv, U, V, 1.0);
    }
  } else {
    // X = R G^T (k over cols).
    for (Index k0 = 0; k0 < cols_; k0 += kProjectChunk) {
      const Index kc = std::min(kProjectChunk, cols_ - k0);
      const MatrixView<const float> U(R_.data() + k0, r, kc, cols_, 1);                  // U(i, k) = R(i, k0 + k)
      const MatrixView<const float> V(&G(0, k0), rows_, kc, G.row_stride, G.col_stride);  // V(j, k) = G(j, k0 + k)
      rank_update(xv, U, V, 1.0);
    }
  }
  X /= static_cast<float>(g2);
  const ColMatrix<float> AtA =
      (side == Side::right ? ColMatrix<float>(R_.transpose() * R_) : ColMatrix<float>(R_ * R_.transpose())) /
      static_cast<float>(g2);
  const ColMatrix<float> PPt = Q.transpose() * Q;  // r x r
  // grad_Pt = 2 PPt X - 4 X + 2 AtA Pt  (r x len); the basis gradient is its transpose.
  RowMatrix<float> grad = 2.0f * (PPt * X) - 4.0f * X;
  grad.noalias() += 2.0f * (AtA * Q.transpose());
  basis_grad_ = grad.transpose();
  // AdamW on the basis with lr_P = lr / (T lr_0) (lr_0 = 0: lr_P = 1 / T).
  const double lr_p = (lr0_ > 0 ? lr / lr0_ : 1.0) / static_cast<double>(config_.update_gap);
  ++basis_adam_.step;
  const AdamScalars s = adam_scalars(config_.basis_adam, basis_adam_.step, lr_p);
  // basis_grad_ is column-major len x r: treat it, m, v and Q as flat arrays of len * r.
  const float b1 = static_cast<float>(config_.basis_adam.beta1), c1 = 1.0f - b1;
  const float b2 = static_cast<float>(config_.basis_adam.beta2), c2 = 1.0f - b2;
  const float e = static_cast<float>(s.eps), step = static_cast<float>(s.step_size);
  const float decay = static_cast<float>(lr_p * config_.basis_adam.weight_decay);
  const bool before = config_.basis_adam.decay == DecayPlacement::before_update;
  for (Index j = 0; j < r; ++j)
    for (Index i = 0; i < len; ++i) {
      const float g = basis_grad_(i, j);
      float& m = basis_adam_.m(i, j);
      float& v = basis_adam_.v(i, j);
      m = b1 * m + c1 * g;
      v = b2 * v + c2 * (g * g);
      float& q = Q(i, j);
      const float u = step * (m / (std::sqrt(v) + e));
      if (before) {
        q = q * (1.0f - decay) - u;
      } else {
        q = q - u;
        q = q - decay * q;
      }
    }
}

}  // namespace optim

LOWRANK_END_NAMESPACE
