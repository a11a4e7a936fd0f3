// Validation helpers for the kernels' matrix views, shared by the entry points (lora_forward.cpp,
// rank_update.cpp). Private: compiled with baseline flags only, never included by a per-ISA TU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "lowrank/core/error.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

// A view's shape, data pointer and strides; throws Error naming `fn` and the view `name`.
template <class T>
void check_view(const char* fn, const char* name, const MatrixView<T>& v) {
  if (v.rows < 0 || v.cols < 0) fail(fn, "{} has negative shape {}x{}", name, v.rows, v.cols);
  if (v.empty()) return;
  if (v.data == nullptr) fail(fn, "{} is {}x{} but its data pointer is null", name, v.rows, v.cols);
  if ((v.rows > 1 && v.row_stride <= 0) || (v.cols > 1 && v.col_stride <= 0)) {
    fail(fn, "{} ({}x{}) has strides ({}, {}); strides must be positive", name, v.rows, v.cols, v.row_stride,
         v.col_stride);
  }
}

// [first, last) bytes spanned by a non-empty view (a stride along an extent of 1 does not count).
template <class T>
std::pair<std::uintptr_t, std::uintptr_t> byte_span(const MatrixView<T>& v) {
  const auto first = reinterpret_cast<std::uintptr_t>(v.data);
  const Index last_offset = (v.rows - 1) * std::max<Index>(v.row_stride, 0) +
                            (v.cols - 1) * std::max<Index>(v.col_stride, 0);
  return {first, first + static_cast<std::uintptr_t>(last_offset + 1) * sizeof(T)};
}

// Whether the byte ranges of two views intersect (false if either is empty).
template <class A, class B>
bool spans_overlap(const MatrixView<A>& a, const MatrixView<B>& b) {
  if (a.empty() || b.empty()) return false;
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  return a0 < b1 && b0 < a1;
}

// Elements of an output view must be distinct: one index's stride must step over the whole extent
// of the other.
template <class T>
bool self_overlapping(const MatrixView<T>& v) {
  if (v.rows <= 1 || v.cols <= 1) return false;
  return !(v.row_stride >= v.cols * v.col_stride || v.col_stride >= v.rows * v.row_stride);
}

}  // namespace detail
LOWRANK_END_NAMESPACE
