// SecondMoment (include/lowrank/linalg/moments.hpp): fp64 accumulation of k k^T with the
// rank-update micro-kernel on the lower triangle (a SYRK).
#include "../core/widen.hpp"
#include "lowrank/linalg/moments.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "../cpu/kernel_api.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/kernels/targets.hpp"

#if defined(LOWRANK_HAVE_OPENMP)
#include <omp.h>
#endif

LOWRANK_BEGIN_NAMESPACE

namespace linalg {
namespace {

using detail::fail;

constexpr Index kKeyChunk = 256;  // keys per pass over the triangle (the depth of each tile)
constexpr Index kColBlock = 128;  // columns of the triangle per block (B block of 256 KiB in fp64)

using detail::widen;

// S (lower triangle) += K^T K for K `n x d` (any strides), with the rank-update micro-kernel in
// fp64. Per chunk of kKeyChunk keys the chunk is packed once, widened to fp64, both as MR-row
// panels and NR-column blocks of K^T; then S^T, seen row-major (S^T(j, i) = S(i, j) at j d + i),
// gets its upper part (i >= j, whole tiles from the diagonal on) one column block at a time, the
// row panels of a block spread over the threads. Each element is one fma chain in key order per
// chunk, so the bits do not depend on the thread count.
template <class T>
void syrk_lower(ColMatrix<double>& S, const MatrixView<const T>& K) {
  const Index d = S.rows();
  const detail::RankUpdateKernels& rk = detail::rank_update_kernels(active_target());
  const Index mr = rk.mr_f64, nr = rk.nr_f64;
  const Index panels = (d + mr - 1) / mr, blocks = (d + nr - 1) / nr;
  const Index depth_max = std::min(kKeyChunk, K.rows);
  std::vector<double> apack(static_cast<std::size_t>(panels * mr * depth_max));
  std::vector<double> bpack(static_cast<std::size_t>(blocks * nr * depth_max));
  double* const s = S.data();
  [[maybe_unused]] int threads = num_threads();
  if (static_cast<double>(d) * static_cast<double>(d) * static_cast<double>(K.rows) < 1 << 20) threads = 1;
  for (Index k0 = 0; k0 < K.rows; k0 += kKeyChunk) {
    const Index nk = std::min(kKeyChunk, K.rows - k0);
    double* const a = apack.data();
    double* const b = bpack.data();
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(static) nowait
#endif
      for (Index p = 0; p < panels; ++p) {
        double* dst = a + p * mr * nk;
        for (Index k = 0; k < nk; ++k)
          for (Index r = 0; r < mr; ++r) dst[k * mr + r] = p * mr + r < d ? widen(K(k0 + k, p * mr + r)) : 0.0;
      }
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(static)
#endif
      for (Index q = 0; q < blocks; ++q) {
        double* dst = b + q * nr * nk;
        for (Index k = 0; k < nk; ++k)
          for (Index c = 0; c < nr; ++c) dst[k * nr + c] = q * nr + c < d ? widen(K(k0 + k, q * nr + c)) : 0.0;
      }
      for (Index i0 = 0; i0 < d; i0 += kColBlock) {
        const Index i1 = std::min(d, i0 + kColBlock);
        const Index row_panels = (i1 + mr - 1) / mr;  // rows j < i1 meet this block's upper part
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(dynamic, 4)
#endif
        for (Index p = 0; p < row_panels; ++p) {
          const Index j0 = p * mr, rows = std::min(mr, d - j0);
          const Index c0 = std::max(i0, j0 / nr * nr);
          if (c0 >= i1) continue;
          rk.f64(a + p * mr * nk, b + (c0 / nr) * nr * nk, nk, s + j0 * d + c0, d, rows, i1 - c0, mr * d);
        }
      }
    }
  }
}

// S (lower triangle) += alpha v v^T.
void rank_one_lower(ColMatrix<double>& S, const Vector<double>& v, double alpha) {
  const Index d = S.rows();
  for (Index j = 0; j < d; ++j) {
    const double vj = alpha * v(j);
    for (Index i = j; i < d; ++i) S(i, j) += v(i) * vj;
  }
}

template <class T>
void check_keys(const char* fn, Index dim, const MatrixView<const T>& keys) {
  if (keys.cols != dim) fail(fn, "keys is {}x{} but the accumulator has dimension {} (one key per row)", keys.rows,
                             keys.cols, dim);
  if (keys.rows < 0) fail(fn, "keys has {} rows", keys.rows);
  if (keys.rows > 0 && keys.data == nullptr) fail(fn, "keys ({}x{}) has a null data pointer", keys.rows, keys.cols);
  if (keys.rows > 0 && (keys.row_stride <= 0 || keys.col_stride <= 0))
    fail(fn, "keys ({}x{}) has strides {}, {}; they must be positive", keys.rows, keys.cols, keys.row_stride,
         keys.col_stride);
  for (Index t = 0; t < keys.rows; ++t)
    for (Index i = 0; i < keys.cols; ++i)
      if (!std::isfinite(widen(keys(t, i))))
        fail(fn, "keys({}, {}) is {} (keys {}x{}); keys must be finite", t, i, widen(keys(t, i)), keys.rows,
             keys.cols);
}

constexpr const char* kAdd = "lowrank::linalg::SecondMoment::add";

}  // namespace

SecondMoment::SecondMoment(Index dim, bool centered) : dim_(dim), centered_(centered) {
  if (dim < 1) fail("lowrank::linalg::SecondMoment", "dim is {}; it must be >= 1", dim);
  scatter_ = ColMatrix<double>::Zero(dim, dim);
  sum_ = Vector<double>::Zero(dim);
}

template <SupportedScalar T>
void SecondMoment::add(MatrixView<const T> keys) {
  if (dim_ == 0) fail(kAdd, "the accumulator is empty (default-constructed)");
  check_keys(kAdd, dim_, keys);
  const Index n = keys.rows;
  if (n == 0) return;
  Vector<double> batch_sum = Vector<double>::Zero(dim_);
  for (Index t = 0; t < n; ++t)
    for (Index i = 0; i < dim_; ++i) batch_sum(i) += widen(keys(t, i));
  if (!centered_) {
    syrk_lower(scatter_, keys);
  } else {
    // Centre the batch by its own mean, then merge (Chan et al.).
    const Vector<double> batch_mean = batch_sum / static_cast<double>(n);
    RowMatrix<double> centred(n, dim_);
    for (Index t = 0; t < n; ++t)
      for (Index i = 0; i < dim_; ++i) centred(t, i) = widen(keys(t, i)) - batch_mean(i);
    ColMatrix<double> batch = ColMatrix<double>::Zero(dim_, dim_);
    syrk_lower(batch, MatrixView<const double>(centred.data(), n, dim_, dim_, 1));
    if (count_ > 0) {
      const double na = static_cast<double>(count_), nb = static_cast<double>(n);
      const Vector<double> delta = batch_mean - sum_ / na;
      rank_one_lower(batch, delta, na * nb / (na + nb));
    }
    scatter_.triangularView<Eigen::Lower>() += batch;
  }
  sum_ += batch_sum;
  count_ += n;
}

template <SupportedScalar T>
void SecondMoment::add(MatrixView<const T> keys, std::span<const std::uint8_t> mask) {
  if (keys.rows >= 0 && mask.size() != static_cast<std::size_t>(keys.rows))
    fail(kAdd, "mask has {} entries but keys is {}x{} (one entry per key)", mask.size(), keys.rows, keys.cols);
  if (dim_ == 0) fail(kAdd, "the accumulator is empty (default-constructed)");
  check_keys(kAdd, dim_, keys);
  // Gather the kept rows (fp64 keeps every value exactly).
  std::vector<Index> kept;
  for (Index t = 0; t < keys.rows; ++t)
    if (mask[static_cast<std::size_t>(t)] != 0) kept.push_back(t);
  RowMatrix<double> rows(static_cast<Index>(kept.size()), dim_);
  for (std::size_t r = 0; r < kept.size(); ++r)
    for (Index i = 0; i < dim_; ++i) rows(static_cast<Index>(r), i) = widen(keys(kept[r], i));
  add(MatrixView<const double>(rows.data(), rows.rows(), dim_, dim_, 1));
}

void SecondMoment::merge(const SecondMoment& other) {
  constexpr const char* fn = "lowrank::linalg::SecondMoment::merge";
  if (other.dim_ != dim_) fail(fn, "the other accumulator has dimension {}, this one {}", other.dim_, dim_);
  if (other.centered_ != centered_)
    fail(fn, "the accumulators differ in mode (this one {}, the other {})", centered_ ? "centred" : "uncentred",
         other.centered_ ? "centred" : "uncentred");
  if (other.count_ == 0) return;
  if (centered_ && count_ > 0) {
    const double na = static_cast<double>(count_), nb = static_cast<double>(other.count_);
    const Vector<double> delta = other.sum_ / nb - sum_ / na;
    ColMatrix<double> add = other.scatter_;
    rank_one_lower(add, delta, na * nb / (na + nb));
    scatter_.triangularView<Eigen::Lower>() += add;
  } else {
    scatter_.triangularView<Eigen::Lower>() += other.scatter_;
  }
  sum_ += other.sum_;
  count_ += other.count_;
}

ColMatrix<double> SecondMoment::scatter() const {
  return scatter_.selfadjointView<Eigen::Lower>();
}

ColMatrix<double> SecondMoment::moment() const {
  if (count_ == 0) fail("lowrank::linalg::SecondMoment::moment", "no keys have been added (dimension {})", dim_);
  return scatter() / static_cast<double>(count_);
}

Vector<double> SecondMoment::mean() const {
  if (count_ == 0) return Vector<double>::Zero(dim_);
  return sum_ / static_cast<double>(count_);
}

SecondMoment SecondMoment::from_parts(std::int64_t count, const Eigen::Ref<const ColMatrix<double>>& scatter,
                                      const Eigen::Ref<const Vector<double>>& sum, bool centered) {
  constexpr const char* fn = "lowrank::linalg::SecondMoment::from_parts";
  const Index d = scatter.rows();
  if (d < 1 || scatter.cols() != d) fail(fn, "scatter is {}x{}; it must be square and non-empty", d, scatter.cols());
  if (sum.size() != d) fail(fn, "sum has {} entries; scatter is {}x{}", sum.size(), d, d);
  if (count < 0) fail(fn, "count is {}; it must be >= 0", count);
  if (!scatter.allFinite() || !sum.allFinite()) fail(fn, "scatter ({}x{}) or sum has a NaN or infinity", d, d);
  SecondMoment m(d, centered);
  m.count_ = count;
  m.scatter_.triangularView<Eigen::Lower>() = scatter.triangularView<Eigen::Lower>();
  m.sum_ = sum;
  return m;
}

#define LOWRANK_INSTANTIATE(T)                                       \
  template void SecondMoment::add<T>(MatrixView<const T>);           \
  template void SecondMoment::add<T>(MatrixView<const T>, std::span<const std::uint8_t>);
LOWRANK_INSTANTIATE(double)
LOWRANK_INSTANTIATE(float)
LOWRANK_INSTANTIATE(bf16)
LOWRANK_INSTANTIATE(f16)
#undef LOWRANK_INSTANTIATE

}  // namespace linalg

LOWRANK_END_NAMESPACE
