// Helpers shared by the adapter and merge-based training tests: fp64 reference weights stored in
// a given layout and storage type, read back, and compared bit for bit.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>
#include <random>

#include "lowrank/adapt/lora.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/matrix.hpp"
#include "test_util.hpp"

namespace lowrank_test {

using M64 = lowrank::RowMatrix<double>;

/// rows x cols Gaussian entries with standard deviation `scale`, from `std::mt19937_64(seed)`.
inline M64 gaussian(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(0.0, scale);
  M64 m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = n(rng);
  return m;
}

/// Storage of an out x in fp64 matrix in the given layout and type.
template <class TW>
lowrank::RowMatrix<TW> store(const M64& out_in, lowrank::Layout layout) {
  const M64 s = layout == lowrank::Layout::out_in ? out_in : M64(out_in.transpose());
  lowrank::RowMatrix<TW> m(s.rows(), s.cols());
  for (Index i = 0; i < s.rows(); ++i)
    for (Index j = 0; j < s.cols(); ++j) m(i, j) = from_double<TW>(s(i, j));
  return m;
}

/// The stored weight back as an out x in fp64 matrix.
template <class TW>
M64 load(const lowrank::RowMatrix<TW>& m, lowrank::Layout layout) {
  M64 s(m.rows(), m.cols());
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) s(i, j) = to_double(m(i, j));
  return layout == lowrank::Layout::out_in ? s : M64(s.transpose());
}

/// Naive fp64 reference of `weight * s * B * A` (out x in), from the factors as stored.
template <class T>
M64 delta_ref(const lowrank::adapt::LoraAdapter<T>& a, double weight = 1.0) {
  const double s = weight * (a.use_rslora ? a.alpha / std::sqrt(double(a.rank())) : a.alpha / double(a.rank()));
  M64 d = M64::Zero(a.out_features(), a.in_features());
  for (Index i = 0; i < d.rows(); ++i)
    for (Index j = 0; j < d.cols(); ++j) {
      double acc = 0;
      for (Index k = 0; k < a.rank(); ++k) acc += double(a.B(i, k)) * double(a.A(k, j));
      d(i, j) = s * acc;
    }
  return d;
}

template <class T>
bool bitwise_equal(const lowrank::RowMatrix<T>& a, const lowrank::RowMatrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

}  // namespace lowrank_test
