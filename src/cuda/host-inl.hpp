// Host-side helpers of lowrank::cuda shared by its translation units (api.cpp, svd.cpp): the
// argument checks (lowrank::Error, nothing enqueued on error), CUDA and cuBLAS status checks, the
// per-thread library handles and the layout-agnostic GEMM. Private to src/cuda; compiled by the
// host compiler only.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "../cpu/view_checks-inl.hpp"
#include "launch.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/cuda/device.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda::detail {

using lowrank::detail::fail;

template <class T>
Dtype dtype_of() {
  if constexpr (std::same_as<std::remove_cv_t<T>, float>) {
    return Dtype::f32;
  } else if constexpr (std::same_as<std::remove_cv_t<T>, bf16>) {
    return Dtype::bf16;
  } else {
    return Dtype::f16;
  }
}

// The shape, overlap and aliasing checks of the CPU entry points (src/cpu/view_checks-inl.hpp),
// on a host-side MatrixView of the same pointer, shape and strides (nothing is dereferenced).
template <class T>
MatrixView<T> as_view(const DeviceMatrix<T>& v) {
  return {v.data, v.rows, v.cols, v.row_stride, v.col_stride};
}

template <class T>
void check_shape(const char* fn, const char* name, const DeviceMatrix<T>& v) {
  lowrank::detail::check_view(fn, name, as_view(v));
}

template <class A, class B>
bool overlap(const DeviceMatrix<A>& a, const DeviceMatrix<B>& b) {
  return lowrank::detail::spans_overlap(as_view(a), as_view(b));
}

template <class T>
bool self_overlapping(const DeviceMatrix<T>& v) {
  return lowrank::detail::self_overlapping(as_view(v));
}

// One unit stride (cuBLAS layouts).
template <class T>
void check_blas_layout(const char* fn, const char* name, const DeviceMatrix<T>& v) {
  if (v.empty()) return;
  const bool row_major = v.col_stride == 1 || v.cols == 1;
  const bool col_major = v.row_stride == 1 || v.rows == 1;
  if (!row_major && !col_major) {
    fail(fn, "{} ({}x{}) has strides ({}, {}); one of them must be 1", name, v.rows, v.cols, v.row_stride,
         v.col_stride);
  }
  if (self_overlapping(v)) fail(fn, "{} ({}x{}, strides {}, {}) has overlapping elements", name, v.rows, v.cols,
                                v.row_stride, v.col_stride);
}

inline void require_device(const char* fn) {
  std::string reason;
  if (!device_available(&reason)) fail(fn, "no CUDA device: {}", reason);
}

inline void check_cuda(const char* fn, cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    fail(fn, "{} failed: {} ({})", what, cudaGetErrorString(status), cudaGetErrorName(status));
  }
}

inline void check_pointer(const char* fn, const char* name, const void* p) {
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, p);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    fail(fn, "{}: cannot query its pointer {}: {}", name, p, cudaGetErrorString(status));
  }
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
    fail(fn, "{}: pointer {} is not device memory (host or unregistered memory)", name, p);
  }
}
template <class T>
void check_device(const char* fn, const char* name, const DeviceMatrix<T>& v) {
  if (!v.empty()) check_pointer(fn, name, static_cast<const void*>(v.data));
}

// ---- cuBLAS ------------------------------------------------------------------------------------

inline const char* blas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
  }
}

inline void check_blas(const char* fn, cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail(fn, "{} failed: {}", what, blas_status_name(s));
}

// A library handle (cuBLAS, cuSOLVER, ...) per host thread and device, made by `create(&h)` on
// first use and never destroyed (destroying handles at thread or process exit can run after the
// CUDA runtime has shut down). One map per handle type.
template <class Handle, class Create>
Handle per_thread_handle(const char* fn, const Create& create) {
  thread_local std::unordered_map<int, Handle> handles;
  int device = 0;
  check_cuda(fn, cudaGetDevice(&device), "cudaGetDevice");
  auto it = handles.find(device);
  if (it == handles.end()) {
    Handle h{};
    create(&h);
    it = handles.emplace(device, h).first;
  }
  return it->second;
}

// This thread's cuBLAS handle for the current device, set to `stream`.
inline cublasHandle_t handle_for(const char* fn, cudaStream_t stream) {
  const cublasHandle_t h = per_thread_handle<cublasHandle_t>(
      fn, [fn](cublasHandle_t* p) { check_blas(fn, cublasCreate(p), "cublasCreate"); });
  check_blas(fn, cublasSetStream(h, stream), "cublasSetStream");
  return h;
}

inline int device_major(const char* fn) {
  int device = 0, major = 0;
  check_cuda(fn, cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(fn, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  return major;
}

struct Operand {
  const void* p;
  std::int64_t ld;
  bool col;  // column-major in memory
};
template <class T>
Operand operand(const DeviceMatrix<T>& v) {
  if (v.col_stride == 1 && !(v.row_stride == 1 && v.cols > 1)) {
    return {v.data, std::max<std::int64_t>({v.row_stride, v.cols, 1}), false};
  }
  return {v.data, std::max<std::int64_t>({v.col_stride, v.rows, 1}), true};
}

// C = alpha A B + beta C (A m x k, B k x n, C m x n), fp32 accumulation.
template <class T>
void gemm(const char* fn, cublasHandle_t h, DeviceMatrix<const T> a, DeviceMatrix<const T> b, DeviceMatrix<T> c,
          float alpha, float beta) {
  const cudaDataType_t type = std::same_as<T, float> ? CUDA_R_32F : CUDA_R_16BF;
  const Operand oa = operand(a), ob = operand(b), oc = operand(c);
  const std::int64_t m = c.rows, n = c.cols, k = a.cols;
  for (std::int64_t dim : {m, n, k, oa.ld, ob.ld, oc.ld})
    if (dim > 0x7FFFFFFF) fail(fn, "a dimension ({}) exceeds cuBLAS's 32-bit limit", dim);
  cublasStatus_t s;
  if (oc.col) {
    s = cublasGemmEx(h, oa.col ? CUBLAS_OP_N : CUBLAS_OP_T, ob.col ? CUBLAS_OP_N : CUBLAS_OP_T, static_cast<int>(m),
                     static_cast<int>(n), static_cast<int>(k), &alpha, oa.p, type, static_cast<int>(oa.ld), ob.p,
                     type, static_cast<int>(ob.ld), &beta, const_cast<void*>(oc.p), type, static_cast<int>(oc.ld),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  } else {
    // Row-major C: C^T = B^T A^T in column-major terms.
    s = cublasGemmEx(h, ob.col ? CUBLAS_OP_T : CUBLAS_OP_N, oa.col ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
                     static_cast<int>(m), static_cast<int>(k), &alpha, ob.p, type, static_cast<int>(ob.ld), oa.p,
                     type, static_cast<int>(oa.ld), &beta, const_cast<void*>(oc.p), type, static_cast<int>(oc.ld),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }
  check_blas(fn, s, "cublasGemmEx");
}

}  // namespace cuda::detail
LOWRANK_END_NAMESPACE
