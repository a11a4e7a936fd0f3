/// \file
/// Gradient projectors of GaLore, FRUGAL, Fira and Online Subspace Descent with an explicit side
/// (`../shared/reference/optimizers.md` §1.1, §2.2, §8.1): the side is stored, never inferred from
/// a shape, so square matrices and square projected gradients cannot pick the wrong branch
/// (ms-swift PR #10146).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace optim {

/// Which dimension of the `rows x cols` gradient G is compressed.
///  - `left`:  P is `rows x r`; R = P^T G is `r x cols`; back-projection P N.
///  - `right`: Q is `cols x r` (GaLore stores Q^T = `Vh[:r]`, r x cols); R = G Q is `rows x r`;
///    back-projection N Q^T.
enum class Side { left, right };

/// GaLore's `proj_type` rules for choosing the side from the shape, once, at construction.
enum class ProjectionRule {
  standard,          ///< GaLore `std`: project the smaller dimension (right if rows >= cols)
  reverse_standard,  ///< `reverse_std`: the larger one (left if rows >= cols)
  always_left,       ///< `left`
  always_right,      ///< `right`
};

/// The side a rule gives for a `rows x cols` gradient.
[[nodiscard]] constexpr Side choose_side(Index rows, Index cols, ProjectionRule rule) noexcept {
  switch (rule) {
    case ProjectionRule::standard:
      return rows >= cols ? Side::right : Side::left;
    case ProjectionRule::reverse_standard:
      return rows >= cols ? Side::left : Side::right;
    case ProjectionRule::always_left:
      return Side::left;
    case ProjectionRule::always_right:
      break;
  }
  return Side::right;
}

/// How a refresh computes the basis from the current gradient.
enum class BasisMethod {
  exact_svd,          ///< top-r singular vectors from Eigen's BDCSVD (GaLore, FRUGAL `svd`)
  randomized_svd,     ///< randomized range finder + power iterations (GaLore 2), the algorithm of
                      ///< `linalg::truncated_svd` with the products by G on the fp32 projection GEMM
  random_orthogonal,  ///< Gaussian then QR: random semi-orthogonal, independent of G (FRUGAL `random`)
  coordinates,        ///< r distinct random coordinates of the projected side (FRUGAL `randperm`/columns/rows)
};

/// Options of a basis refresh.
struct BasisOptions {
  BasisMethod method = BasisMethod::randomized_svd;
  Index oversample = 10;     ///< randomized SVD: range width r + oversample
  int power_iterations = 2;  ///< randomized SVD: subspace iterations
  std::uint64_t seed = 0;    ///< Philox key of the random methods; refresh k uses stream k
};

/// A projector of a `rows x cols` gradient onto r directions of one side.
///
/// The basis is fp32 (GaLore casts it to the gradient dtype), orthonormal except under Online
/// Subspace Descent, which moves it by gradient steps and never re-orthonormalises it.
/// Coordinate bases are stored as indices (gather/scatter), not as a dense selection matrix.
class Projector {
 public:
  Projector() = default;
  /// Rank 0 is the empty subspace (FRUGAL with density 0): R is empty and nothing is added back.
  /// \throws Error if rows or cols < 1 or rank is outside [0, min(rows, cols)].
  Projector(Index rows, Index cols, Index rank, Side side);

  [[nodiscard]] Index rows() const noexcept { return rows_; }
  [[nodiscard]] Index cols() const noexcept { return cols_; }
  [[nodiscard]] Index rank() const noexcept { return rank_; }
  [[nodiscard]] Side side() const noexcept { return side_; }
  /// Length of the projected side: rows (left) or cols (right).
  [[nodiscard]] Index side_length() const noexcept { return side_ == Side::left ? rows_ : cols_; }
  /// `r x cols` (left) or `rows x r` (right): the shape of R and of the Adam state.
  [[nodiscard]] Index projected_rows() const noexcept { return side_ == Side::left ? rank_ : rows_; }
  [[nodiscard]] Index projected_cols() const noexcept { return side_ == Side::left ? cols_ : rank_; }
  /// Whether a basis has been set or computed.
  [[nodiscard]] bool has_basis() const noexcept { return has_basis_; }
  /// Whether the basis is a set of coordinates (`indices()`) rather than `basis()`.
  [[nodiscard]] bool is_coordinates() const noexcept { return coordinates_; }

  /// The dense basis, `side_length() x r` (P for left, Q for right), column-major. For a
  /// coordinate basis it is materialised on demand (columns of the identity).
  [[nodiscard]] ColMatrix<float> dense_basis() const;
  /// The dense basis as stored (empty for a coordinate basis).
  [[nodiscard]] const ColMatrix<float>& basis() const noexcept { return basis_; }
  /// Mutable access for methods that move the basis (Online Subspace Descent).
  [[nodiscard]] ColMatrix<float>& basis_mut() noexcept { return basis_; }
  /// The selected coordinates of a coordinate basis (ascending), else empty.
  [[nodiscard]] const std::vector<Index>& indices() const noexcept { return indices_; }

  /// Sets a dense basis (`side_length() x r`; orthonormality is the caller's business).
  /// \throws Error on a wrong shape or non-finite entries (projector unchanged).
  void set_basis(const Eigen::Ref<const ColMatrix<float>>& basis);
  /// Sets a coordinate basis: r distinct indices in [0, side_length()).
  /// \throws Error on a wrong count, duplicates or out-of-range indices (projector unchanged).
  void set_coordinates(std::vector<Index> indices);

  /// Computes a new basis from G (`rows x cols`) as `options.method` says, with refresh number
  /// `refresh` selecting the random stream. Returns the energy of G captured by the new basis,
  /// ||project(G)||_F^2 / ||G||_F^2 (1 for G == 0).
  /// \throws Error on a shape mismatch or a non-finite G (projector unchanged).
  double refresh(MatrixView<const float> G, const BasisOptions& options, std::uint64_t refresh);

  /// R = P^T G (left, `r x cols`) or G Q (right, `rows x r`), into row-major `R` (resized).
  /// Cost: 2 rows cols r flops (a gather for coordinates).
  /// \throws Error if no basis is set or G is not `rows x cols` (R unchanged); std::bad_alloc
  ///   when memory runs out, also inside the threaded product (R's contents are then unspecified).
  void project(MatrixView<const float> G, RowMatrix<float>& R) const;
  /// W += alpha * (P N) (left) or alpha * (N Q^T) (right), N row-major `projected_rows() x
  /// projected_cols()`: one rank-r update of W (`lowrank::rank_update`; a scatter for coordinates).
  void add_back(MatrixView<float> W, const RowMatrix<float>& N, double alpha) const;
  /// The dense back-projection alpha * (P N) or alpha * (N Q^T) (for tests and small matrices).
  [[nodiscard]] RowMatrix<float> back(const RowMatrix<float>& N, double alpha = 1.0) const;

  /// Bytes held by the basis (dense fp32, or the indices).
  [[nodiscard]] std::size_t bytes() const noexcept;

 private:
  void require_basis(const char* fn) const;
  Index rows_ = 0, cols_ = 0, rank_ = 0;
  Side side_ = Side::right;
  bool shaped_ = false;
  bool has_basis_ = false;
  bool coordinates_ = false;
  ColMatrix<float> basis_;
  std::vector<Index> indices_;
};

}  // namespace optim

LOWRANK_END_NAMESPACE
