/// \file
/// The CUDA backend's common vocabulary: device matrix views, the stream type and device queries.
/// Compiles without nvcc and without the CUDA headers (the stream type is forward-declared exactly
/// as `cuda_runtime_api.h` declares it), so host code can include every `lowrank/cuda/` header.
/// Link `lowrank::cuda` (built with `-DLOWRANK_ENABLE_CUDA=ON`) for the definitions.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/scalar.hpp"

// The CUDA runtime's stream handle; the same declaration as in driver_types.h.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;  // NOLINT(modernize-use-using): must match CUDA's typedef

LOWRANK_BEGIN_NAMESPACE

namespace cuda {

/// Storage types of device data: fp32, bf16 and fp16 (`lowrank::bf16`/`f16` have the bit layout
/// of `__nv_bfloat16`/`__half`).
template <class T>
concept DeviceScalar = std::same_as<std::remove_cv_t<T>, float> || std::same_as<std::remove_cv_t<T>, bf16> ||
                       std::same_as<std::remove_cv_t<T>, f16>;

/// Storage types of the forward kernels (`lora_forward`, `eggroll_forward`): fp32 and bf16.
template <class T>
concept ForwardScalar = std::same_as<std::remove_cv_t<T>, float> || std::same_as<std::remove_cv_t<T>, bf16>;

/// A `rows x cols` matrix in DEVICE memory: element `(i, j)` at `data[i * row_stride + j *
/// col_stride]` (strides in elements, positive). The same conventions as `lowrank::MatrixView`;
/// a distinct type so that host views cannot be passed by mistake.
template <class T>
  requires DeviceScalar<T>
struct DeviceMatrix {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t row_stride = 0;  ///< elements between (i, j) and (i + 1, j)
  std::int64_t col_stride = 1;  ///< elements between (i, j) and (i, j + 1)

  constexpr DeviceMatrix() = default;
  constexpr DeviceMatrix(T* data_, std::int64_t rows_, std::int64_t cols_, std::int64_t row_stride_,
                         std::int64_t col_stride_) noexcept
      : data(data_), rows(rows_), cols(cols_), row_stride(row_stride_), col_stride(col_stride_) {}
  /// A read-only view of a mutable one.
  template <class U>
    requires(std::is_const_v<T> && std::same_as<std::remove_const_t<T>, U>)
  constexpr DeviceMatrix(const DeviceMatrix<U>& o) noexcept  // NOLINT(google-explicit-constructor)
      : DeviceMatrix(o.data, o.rows, o.cols, o.row_stride, o.col_stride) {}

  [[nodiscard]] constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
  /// The transpose, over the same memory.
  [[nodiscard]] constexpr DeviceMatrix transposed() const noexcept { return {data, cols, rows, col_stride, row_stride}; }
};

/// Row-major `rows x cols` device view; `ld` (elements between rows) defaults to `cols`.
template <DeviceScalar T>
[[nodiscard]] constexpr DeviceMatrix<T> device_row_major(T* data, std::int64_t rows, std::int64_t cols,
                                                         std::int64_t ld = -1) noexcept {
  return {data, rows, cols, ld < 0 ? cols : ld, 1};
}

/// Column-major `rows x cols` device view; `ld` (elements between columns) defaults to `rows`.
template <DeviceScalar T>
[[nodiscard]] constexpr DeviceMatrix<T> device_col_major(T* data, std::int64_t rows, std::int64_t cols,
                                                         std::int64_t ld = -1) noexcept {
  return {data, rows, cols, 1, ld < 0 ? rows : ld};
}

/// True when the CUDA runtime sees at least one device. Otherwise false, and `*reason` (if given)
/// receives the runtime's explanation (e.g. "no CUDA-capable device is detected").
bool device_available(std::string* reason = nullptr);

}  // namespace cuda

LOWRANK_END_NAMESPACE
