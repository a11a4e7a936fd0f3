// Shared helpers for lowrank's tests: reproducible data and storage conversions through Eigen
// (an implementation independent of lowrank's own conversion code).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"

namespace lowrank_test {

using lowrank::bf16;
using lowrank::f16;
using lowrank::Index;

template <class T>
double to_double(T x) {
  return static_cast<double>(static_cast<float>(x));
}
inline double to_double(double x) { return x; }

template <class T>
T from_double(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>(x);
  } else {
    return T(static_cast<float>(x));
  }
}

/// Unit roundoff of a storage type (half an ulp at 1).
template <class T>
constexpr double unit_roundoff() {
  if constexpr (std::is_same_v<T, double>) return 0x1.0p-53;
  if constexpr (std::is_same_v<T, float>) return 0x1.0p-24;
  if constexpr (std::is_same_v<T, bf16>) return 0x1.0p-8;
  return 0x1.0p-11;
}

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, double>) return "f64";
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, bf16>) return "bf16";
  return "f16";
}

/// A matrix in a buffer with padding around it, viewed with the requested strides.
template <class T>
struct Strided {
  std::vector<T> storage;
  lowrank::MatrixView<T> view;
};

enum class Order { row_major, col_major, padded_row, padded_col, both_strided };

inline const char* order_name(Order o) {
  switch (o) {
    case Order::row_major: return "row_major";
    case Order::col_major: return "col_major";
    case Order::padded_row: return "padded_row";
    case Order::padded_col: return "padded_col";
    case Order::both_strided: return "both_strided";
  }
  return "?";
}

template <class T>
Strided<T> make_matrix(Index rows, Index cols, Order order, std::mt19937_64& rng, double scale = 1.0) {
  Index rs = 0, cs = 0, offset = 3;
  switch (order) {
    case Order::row_major: rs = cols, cs = 1, offset = 0; break;
    case Order::col_major: rs = 1, cs = rows, offset = 0; break;
    case Order::padded_row: rs = cols + 5, cs = 1; break;
    case Order::padded_col: rs = 1, cs = rows + 3; break;
    case Order::both_strided: rs = 2 * cols + 1, cs = 2; break;
  }
  Strided<T> m;
  const Index extent = offset + (rows > 0 ? (rows - 1) * rs : 0) + (cols > 0 ? (cols - 1) * cs : 0) + 1 + 7;
  m.storage.resize(static_cast<std::size_t>(extent));
  std::normal_distribution<double> normal(0.0, scale);
  for (auto& x : m.storage) x = from_double<T>(normal(rng));
  m.view = lowrank::MatrixView<T>(m.storage.data() + offset, rows, cols, rs, cs);
  return m;
}

}  // namespace lowrank_test
