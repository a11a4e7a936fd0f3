/// \file
/// The key second moment under ROME, MEMIT and Perfusion: `C = E[k k^T]` accumulated in fp64 from
/// fp64/fp32/bf16/fp16 keys with a symmetric rank-k kernel, mergeable across workers, with a
/// centred (Chan) variant. Saved and loaded as safetensors by `lowrank/io/moments.hpp`.
#pragma once

#include <cstdint>
#include <span>
#include <utility>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/matrix.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace linalg {

/// Running second moment of `dim`-dimensional keys (the rows fed to `add`).
///
/// - Uncentred (the default, what ROME and MEMIT use: their `SecondMoment` in
///   `util/runningstats.py`): `scatter() = sum_t k_t k_t^T` and `moment() = scatter() / count()`.
/// - Centred (`centered = true`): `scatter() = sum_t (k_t - mean)(k_t - mean)^T` about the running
///   mean, kept with Chan, Golub and LeVeque's merge (each batch is centred by its own mean, then
///   merged with the `delta delta^T n_a n_b / n` correction), and `moment()` is the population
///   covariance `scatter() / count()`. For data with mean mu, the uncentred moment equals the
///   centred one plus `mu mu^T`.
///
/// Accumulation is in fp64 whatever the key type (fp32 sums of `k k^T` lose definiteness for keys
/// of magnitude ~1e3, larql PR#339). Only the lower triangle is accumulated (`scatter_lower()`);
/// `scatter()` and `moment()` mirror it, so they are exactly symmetric. `mean()` is kept in both
/// modes (fp64 sum of the keys).
///
/// Kernel (a SYRK on the lower triangle): keys are taken 256 at a time, packed once per chunk in
/// fp64 as the panels of the rank-update micro-kernel, and the triangle is updated by whole tiles
/// from the diagonal on, in column blocks of 128 that stay in L2, the row panels spread over the
/// threads: about d (d + NR) n flops for n keys, within 1% of SYRK's d (d + 1) n at d = 4096.
///
/// Determinism: the same keys fed in the same batches give the same bits on any thread count.
/// Splitting the same keys into other batches changes the summation order (results agree to fp64
/// rounding).
class SecondMoment {
 public:
  SecondMoment() = default;
  /// An empty accumulator for `dim`-dimensional keys (`dim >= 1`).
  /// \throws Error if dim < 1.
  explicit SecondMoment(Index dim, bool centered = false);

  /// Adds every row of `keys` (`n x dim`, any strides; n may be 0).
  /// \throws Error (state unchanged) if `keys.cols != dim()`, a stride is not positive, the data is
  ///   null, or a key has a NaN or infinity.
  template <SupportedScalar T>
  void add(MatrixView<const T> keys);
  /// Adds the rows of `keys` whose `mask` entry is non-zero (padding tokens have 0), as ROME's
  /// `flatten_masked_batch` does.
  /// \throws Error as `add`, or if `mask.size() != keys.rows`.
  template <SupportedScalar T>
  void add(MatrixView<const T> keys, std::span<const std::uint8_t> mask);
  /// `add` for an Eigen matrix or block of keys (rows are keys).
  template <class Derived>
  void add(const Eigen::MatrixBase<Derived>& keys) {
    add(MatrixView<const typename Derived::Scalar>(view(keys.derived())));
  }

  /// Adds another accumulator's state: the result equals one accumulator fed both key sets
  /// (to fp64 rounding).
  /// \throws Error if dimensions or modes differ.
  void merge(const SecondMoment& other);

  Index dim() const { return dim_; }
  bool centered() const { return centered_; }
  /// Keys added so far.
  std::int64_t count() const { return count_; }

  /// `scatter() / count()`: E[k k^T] (uncentred) or the population covariance (centred).
  /// \throws Error if count() == 0.
  ColMatrix<double> moment() const;
  /// The symmetric scatter matrix (see the class description).
  ColMatrix<double> scatter() const;
  /// The accumulated lower triangle (the strict upper triangle holds no data).
  const ColMatrix<double>& scatter_lower() const { return scatter_; }
  /// Sum of the keys (fp64).
  const Vector<double>& sum() const { return sum_; }
  /// `sum() / count()` (zero when count() == 0).
  Vector<double> mean() const;

  /// Rebuilds an accumulator from saved parts (`lowrank/io/moments.hpp`): the count, the scatter
  /// (symmetric; its lower triangle is used), the key sum, and the mode.
  /// \throws Error if shapes disagree, count < 0, or an entry is not finite.
  static SecondMoment from_parts(std::int64_t count, const Eigen::Ref<const ColMatrix<double>>& scatter,
                                 const Eigen::Ref<const Vector<double>>& sum, bool centered);

 private:
  Index dim_ = 0;
  bool centered_ = false;
  std::int64_t count_ = 0;
  ColMatrix<double> scatter_;
  Vector<double> sum_;
};

}  // namespace linalg

LOWRANK_END_NAMESPACE
