/// \file
/// Non-owning matrix views over user memory (row- or column-major, with strides) and weight views
/// that carry a `Layout`.
#pragma once

#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/core/scalar.hpp"

LOWRANK_BEGIN_NAMESPACE

using Index = Eigen::Index;

/// A `rows x cols` matrix in user memory: element `(i, j)` lives at
/// `data[i * row_stride + j * col_stride]`. Row-major storage has `col_stride == 1`, column-major
/// `row_stride == 1`; larger strides describe blocks of bigger matrices. Strides are in elements
/// and must be positive. `T` may be const for read-only views.
template <class T>
  requires SupportedScalar<T>
struct MatrixView {
  T* data = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index row_stride = 0;  ///< elements between (i, j) and (i + 1, j)
  Index col_stride = 1;  ///< elements between (i, j) and (i, j + 1)

  constexpr MatrixView() = default;
  constexpr MatrixView(T* data_, Index rows_, Index cols_, Index row_stride_, Index col_stride_) noexcept
      : data(data_), rows(rows_), cols(cols_), row_stride(row_stride_), col_stride(col_stride_) {}

  /// A read-only view of a mutable one.
  template <class U>
    requires(std::is_const_v<T> && std::same_as<std::remove_const_t<T>, U>)
  constexpr MatrixView(const MatrixView<U>& other) noexcept  // NOLINT(google-explicit-constructor)
      : MatrixView(other.data, other.rows, other.cols, other.row_stride, other.col_stride) {}

  [[nodiscard]] constexpr T& operator()(Index i, Index j) const noexcept {
    return data[i * row_stride + j * col_stride];
  }
  [[nodiscard]] constexpr Index size() const noexcept { return rows * cols; }
  [[nodiscard]] constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
  /// The transpose, over the same memory.
  [[nodiscard]] constexpr MatrixView transposed() const noexcept {
    return {data, cols, rows, col_stride, row_stride};
  }
};

/// Row-major `rows x cols` view; `ld` (elements between rows) defaults to `cols`.
template <SupportedScalar T>
[[nodiscard]] constexpr MatrixView<T> row_major(T* data, Index rows, Index cols, Index ld = -1) noexcept {
  return {data, rows, cols, ld < 0 ? cols : ld, 1};
}

/// Column-major `rows x cols` view; `ld` (elements between columns) defaults to `rows`.
template <SupportedScalar T>
[[nodiscard]] constexpr MatrixView<T> col_major(T* data, Index rows, Index cols, Index ld = -1) noexcept {
  return {data, rows, cols, 1, ld < 0 ? rows : ld};
}

namespace detail {
template <class E>
concept EigenDirectAccess = requires(E& e) {
  typename std::remove_cvref_t<E>::Scalar;
  { e.data() };
  { e.rowStride() } -> std::convertible_to<Index>;
  { e.colStride() } -> std::convertible_to<Index>;
};
}  // namespace detail

/// A view of an Eigen object with direct memory access (`Matrix`, `Map`, `Ref`, blocks of them).
/// A const object gives a read-only view.
template <class E>
  requires detail::EigenDirectAccess<E> && SupportedScalar<typename std::remove_cvref_t<E>::Scalar>
[[nodiscard]] auto view(E&& e) noexcept {
  using Ptr = decltype(e.data());
  using T = std::remove_pointer_t<Ptr>;
  return MatrixView<T>(e.data(), e.rows(), e.cols(), e.rowStride(), e.colStride());
}

/// A view passes through `view` unchanged, so generic code can call `view` on either.
template <class T>
[[nodiscard]] constexpr MatrixView<T> view(MatrixView<T> v) noexcept {
  return v;
}

/// A weight matrix: its storage view plus the `Layout` that says which index is the output.
template <class T>
  requires SupportedScalar<T>
struct WeightView {
  MatrixView<T> matrix;
  Layout layout = Layout::out_in;

  /// Number of output features.
  [[nodiscard]] constexpr Index out_features() const noexcept {
    return layout == Layout::out_in ? matrix.rows : matrix.cols;
  }
  /// Number of input features.
  [[nodiscard]] constexpr Index in_features() const noexcept {
    return layout == Layout::out_in ? matrix.cols : matrix.rows;
  }
  /// The same weight as an `out x in` view (a transposed view for `Layout::in_out`).
  [[nodiscard]] constexpr MatrixView<T> as_out_in() const noexcept {
    return layout == Layout::out_in ? matrix : matrix.transposed();
  }
};

/// A weight view of `m` with the given layout.
template <class M>
[[nodiscard]] auto weight(M&& m, Layout layout) noexcept {
  auto v = view(std::forward<M>(m));
  return WeightView<std::remove_pointer_t<decltype(v.data)>>{v, layout};
}

LOWRANK_END_NAMESPACE
