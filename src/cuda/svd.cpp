// Device randomized SVD (include/lowrank/cuda/svd.hpp): validation, the workspace plan, and the
// cuBLAS / cuSOLVER sequence that mirrors linalg::detail::randomized_svd_tall.
#include <cusolverDn.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <utility>

#include "host-inl.hpp"
#include "launch.hpp"
#include "lowrank/cuda/svd.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda {
namespace detail {
namespace {

const char* solver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cuSOLVER error";
  }
}

void check_solver(const char* fn, cusolverStatus_t s, const char* what) {
  if (s != CUSOLVER_STATUS_SUCCESS) fail(fn, "{} failed: {}", what, solver_status_name(s));
}

// This thread's cuSOLVER handle for the current device, set to `stream`.
cusolverDnHandle_t solver_for(const char* fn, cudaStream_t stream) {
  const cusolverDnHandle_t h = per_thread_handle<cusolverDnHandle_t>(
      fn, [fn](cusolverDnHandle_t* p) { check_solver(fn, cusolverDnCreate(p), "cusolverDnCreate"); });
  check_solver(fn, cusolverDnSetStream(h, stream), "cusolverDnSetStream");
  return h;
}

// cuSOLVER's Jacobi SVD parameters (tolerance and sweeps at their defaults), released on scope exit.
struct JacobiParams {
  gesvdjInfo_t p = nullptr;
  explicit JacobiParams(const char* fn) { check_solver(fn, cusolverDnCreateGesvdjInfo(&p), "cusolverDnCreateGesvdjInfo"); }
  ~JacobiParams() { cusolverDnDestroyGesvdjInfo(p); }
  JacobiParams(const JacobiParams&) = delete;
  JacobiParams& operator=(const JacobiParams&) = delete;
};

constexpr std::size_t kAlign = 256;
// Status words: two per QR (geqrf, orgqr) and one for the Jacobi SVD: 5 + 4 per power iteration.
constexpr int kMaxInfos = 64;

std::size_t aligned(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Shapes and the workspace layout of one call.
struct Plan {
  bool transpose = false;        // T = A^T (A is wide)
  std::int64_t p = 0, s = 0;     // T is p x s, p >= s
  std::int64_t l = 0, k = 0;     // range width, rank
  int lwork_f = 0, lwork_d = 0;  // cuSOLVER work sizes (elements)
  // Byte offsets into the workspace.
  std::size_t y = 0, z = 0, tau = 0, rt = 0, ur = 0, vr = 0, sd = 0, uk = 0, vk = 0, fwork = 0, dwork = 0, info = 0;
  std::size_t bytes = 0;
};

void check_options(const char* fn, std::int64_t rows, std::int64_t cols, std::int64_t rank,
                   const DeviceSvdOptions& o) {
  if (rows < 1 || cols < 1) fail(fn, "A is {}x{}; it must not be empty", rows, cols);
  const std::int64_t small = std::min(rows, cols);
  if (rank < 1 || rank > small) fail(fn, "rank is {}; it must be in [1, min(m, n)] = [1, {}] for A {}x{}", rank, small, rows, cols);
  if (o.oversample < 0) fail(fn, "options.oversample is {}; it must be >= 0", o.oversample);
  if (o.q < 0 || (o.q > 0 && o.q < rank)) fail(fn, "options.q is {}; it must be 0 or >= the rank {}", o.q, rank);
  if (o.power_iterations < 0) fail(fn, "options.power_iterations is {}; it must be >= 0", o.power_iterations);
  if (2 * (2 + 2 * static_cast<std::int64_t>(o.power_iterations)) + 4 > kMaxInfos)
    fail(fn, "options.power_iterations is {}; at most {} are supported", o.power_iterations, (kMaxInfos - 8) / 4);
  for (std::int64_t d : {rows, cols})
    if (d > INT_MAX) fail(fn, "a dimension of A ({}x{}) exceeds cuSOLVER's 32-bit limit", rows, cols);
}

Plan plan_for(const char* fn, std::int64_t rows, std::int64_t cols, std::int64_t rank, const DeviceSvdOptions& o,
              cusolverDnHandle_t h, const JacobiParams& params) {
  Plan pl;
  pl.transpose = rows < cols;
  pl.p = std::max(rows, cols);
  pl.s = std::min(rows, cols);
  pl.k = rank;
  pl.l = std::min(o.q > 0 ? o.q : rank + o.oversample, pl.s);
  const int p = static_cast<int>(pl.p), s = static_cast<int>(pl.s), l = static_cast<int>(pl.l);
  int w = 0;
  check_solver(fn, cusolverDnSgeqrf_bufferSize(h, p, l, nullptr, p, &w), "cusolverDnSgeqrf_bufferSize");
  pl.lwork_f = std::max(pl.lwork_f, w);
  check_solver(fn, cusolverDnSgeqrf_bufferSize(h, s, l, nullptr, s, &w), "cusolverDnSgeqrf_bufferSize");
  pl.lwork_f = std::max(pl.lwork_f, w);
  check_solver(fn, cusolverDnSorgqr_bufferSize(h, p, l, l, nullptr, p, nullptr, &w), "cusolverDnSorgqr_bufferSize");
  pl.lwork_f = std::max(pl.lwork_f, w);
  check_solver(fn, cusolverDnSorgqr_bufferSize(h, s, l, l, nullptr, s, nullptr, &w), "cusolverDnSorgqr_bufferSize");
  pl.lwork_f = std::max(pl.lwork_f, w);
  check_solver(fn,
               cusolverDnDgesvdj_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, 0, l, l, nullptr, l, nullptr, nullptr, l,
                                            nullptr, l, &pl.lwork_d, params.p),
               "cusolverDnDgesvdj_bufferSize");
  const auto n = [](std::int64_t a, std::int64_t b) { return static_cast<std::size_t>(a) * static_cast<std::size_t>(b); };
  std::size_t at = 0;
  const auto take = [&](std::size_t bytes) {
    const std::size_t offset = at;
    at += aligned(bytes);
    return offset;
  };
  pl.y = take(n(pl.p, pl.l) * sizeof(float));
  pl.z = take(n(pl.s, pl.l) * sizeof(float));
  pl.tau = take(n(pl.l, 1) * sizeof(float));
  pl.rt = take(n(pl.l, pl.l) * sizeof(double));
  pl.ur = take(n(pl.l, pl.l) * sizeof(double));
  pl.vr = take(n(pl.l, pl.l) * sizeof(double));
  pl.sd = take(n(pl.l, 1) * sizeof(double));
  pl.uk = take(n(pl.l, pl.k) * sizeof(float));
  pl.vk = take(n(pl.l, pl.k) * sizeof(float));
  pl.fwork = take(static_cast<std::size_t>(std::max(pl.lwork_f, 1)) * sizeof(float));
  pl.dwork = take(static_cast<std::size_t>(std::max(pl.lwork_d, 1)) * sizeof(double));
  pl.info = take(kMaxInfos * sizeof(int));
  pl.bytes = at;
  return pl;
}

template <class T>
T* at_offset(void* base, std::size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

}  // namespace
}  // namespace detail

std::size_t truncated_svd_workspace_bytes(std::int64_t rows, std::int64_t cols, std::int64_t rank,
                                          const DeviceSvdOptions& options) {
  constexpr const char* fn = "cuda::truncated_svd_workspace_bytes";
  using namespace detail;
  check_options(fn, rows, cols, rank, options);
  require_device(fn);
  const JacobiParams params(fn);
  return plan_for(fn, rows, cols, rank, options, solver_for(fn, nullptr), params).bytes;
}

void truncated_svd(DeviceMatrix<const float> A, DeviceMatrix<float> U, DeviceMatrix<float> S, DeviceMatrix<float> V,
                   void* workspace, std::size_t workspace_bytes, const DeviceSvdOptions& options,
                   cudaStream_t stream) {
  constexpr const char* fn = "cuda::truncated_svd";
  using namespace detail;
  check_shape(fn, "A", A);
  check_shape(fn, "U", U);
  check_shape(fn, "S", S);
  check_shape(fn, "V", V);
  const std::int64_t m = A.rows, n = A.cols, k = U.cols;
  check_options(fn, m, n, k, options);
  if (U.rows != m) fail(fn, "U is {}x{} but A is {}x{} (U must have A's {} rows)", U.rows, U.cols, m, n, m);
  if (V.rows != n || V.cols != k) fail(fn, "V is {}x{}; it must be {}x{} (A's columns x the rank of U)", V.rows, V.cols, n, k);
  if (!((S.rows == k && S.cols == 1) || (S.rows == 1 && S.cols == k)))
    fail(fn, "S is {}x{}; it must be {}x1 or 1x{} (the rank of U)", S.rows, S.cols, k, k);
  check_blas_layout(fn, "A", A);
  check_blas_layout(fn, "U", U);
  check_blas_layout(fn, "V", V);
  // cuBLAS's leading dimensions are 32-bit: checked here, not half-way through the enqueued work.
  for (const std::int64_t stride : {A.row_stride, A.col_stride, U.row_stride, U.col_stride, V.row_stride, V.col_stride})
    if (stride > INT_MAX) fail(fn, "a stride of A, U or V ({}) exceeds cuBLAS's 32-bit limit", stride);
  if (overlap(U, V) || overlap(U, S) || overlap(S, V)) fail(fn, "the outputs U, S and V overlap in memory");
  if (overlap(U, A) || overlap(V, A) || overlap(S, A)) fail(fn, "an output (U, S or V) overlaps A's memory");
  if (workspace == nullptr) fail(fn, "workspace is null ({} bytes)", workspace_bytes);
  if (reinterpret_cast<std::uintptr_t>(workspace) % kAlign != 0)
    fail(fn, "workspace {} is not {}-byte aligned", workspace, kAlign);
  // The workspace as a row of floats (it is 256-byte aligned), for the overlap checks.
  const auto ws_floats = static_cast<Index>((workspace_bytes + sizeof(float) - 1) / sizeof(float));
  const MatrixView<const float> ws(static_cast<const float*>(workspace), 1, ws_floats, ws_floats, 1);
  const std::array<std::pair<const char*, DeviceMatrix<float>>, 3> outputs = {{{"U", U}, {"S", S}, {"V", V}}};
  for (const auto& [name, v] : outputs)
    if (lowrank::detail::spans_overlap(as_view(v), ws)) fail(fn, "{} overlaps the workspace", name);
  if (lowrank::detail::spans_overlap(as_view(A), ws)) fail(fn, "A overlaps the workspace");
  require_device(fn);
  check_device(fn, "A", A);
  check_device(fn, "U", U);
  check_device(fn, "S", S);
  check_device(fn, "V", V);
  check_pointer(fn, "workspace", workspace);
  cusolverDnHandle_t sh = solver_for(fn, stream);
  const JacobiParams params(fn);
  const Plan pl = plan_for(fn, m, n, k, options, sh, params);
  if (workspace_bytes < pl.bytes)
    fail(fn, "workspace has {} bytes; truncated_svd_workspace_bytes({}, {}, {}) = {} are needed", workspace_bytes, m,
         n, k, pl.bytes);
  cublasHandle_t bh = handle_for(fn, stream);

  // ---- enqueue: nothing below is an argument error. A failure part-way (a launch, a library
  // call) waits for what was already enqueued before it throws, so that the caller may free the
  // workspace and the outputs on return.
  int infos = 0, svd_info = -1;
  int* info = at_offset<int>(workspace, pl.info);
  try {
    const DeviceMatrix<const float> T = pl.transpose ? A.transposed() : A;  // p x s
    const DeviceMatrix<const float> Tt = T.transposed();                     // s x p
    float* y = at_offset<float>(workspace, pl.y);
    float* z = at_offset<float>(workspace, pl.z);
    float* tau = at_offset<float>(workspace, pl.tau);
    double* rt = at_offset<double>(workspace, pl.rt);
    double* ur = at_offset<double>(workspace, pl.ur);
    double* vr = at_offset<double>(workspace, pl.vr);
    double* sd = at_offset<double>(workspace, pl.sd);
    float* uk = at_offset<float>(workspace, pl.uk);
    float* vk = at_offset<float>(workspace, pl.vk);
    float* fwork = at_offset<float>(workspace, pl.fwork);
    double* dwork = at_offset<double>(workspace, pl.dwork);
    const int p = static_cast<int>(pl.p), s = static_cast<int>(pl.s), l = static_cast<int>(pl.l);
    const auto Y = device_col_major(y, pl.p, pl.l);
    const auto Z = device_col_major(z, pl.s, pl.l);
    check_cuda(fn, cudaMemsetAsync(info, 0, kMaxInfos * sizeof(int), stream), "cudaMemsetAsync");
    // Q factor of a column-major rows x l matrix, in place.
    const auto orthonormalize = [&](float* a, int rows) {
      check_solver(fn, cusolverDnSgeqrf(sh, rows, l, a, rows, tau, fwork, pl.lwork_f, info + infos++), "cusolverDnSgeqrf");
      check_solver(fn, cusolverDnSorgqr(sh, rows, l, l, a, rows, tau, fwork, pl.lwork_f, info + infos++), "cusolverDnSorgqr");
    };
    // Omega (s x l): element (i, j) is normal(j s + i), the CPU's layout.
    check_cuda(fn, static_cast<cudaError_t>(launch_fill_normal(z, static_cast<std::uint64_t>(pl.s * pl.l), options.seed,
                                                               options.stream, stream)),
               "the Gaussian test matrix kernel");
    gemm<float>(fn, bh, T, Z, Y, 1.0f, 0.0f);
    orthonormalize(y, p);
    for (int it = 0; it < options.power_iterations; ++it) {
      gemm<float>(fn, bh, Tt, Y, Z, 1.0f, 0.0f);
      orthonormalize(z, s);
      gemm<float>(fn, bh, T, Z, Y, 1.0f, 0.0f);
      orthonormalize(y, p);
    }
    // T^T Q = Qb R; the SVD of R^T (l x l, fp64) = Ur S Vr^T; T ~= (Q Ur) S (Qb Vr)^T.
    gemm<float>(fn, bh, Tt, Y, Z, 1.0f, 0.0f);
    check_solver(fn, cusolverDnSgeqrf(sh, s, l, z, s, tau, fwork, pl.lwork_f, info + infos++), "cusolverDnSgeqrf");
    check_cuda(fn, static_cast<cudaError_t>(launch_upper_transposed(z, pl.s, rt, pl.l, stream)), "the R^T kernel");
    check_solver(fn, cusolverDnSorgqr(sh, s, l, l, z, s, tau, fwork, pl.lwork_f, info + infos++), "cusolverDnSorgqr");
    svd_info = infos++;
    check_solver(fn,
                 cusolverDnDgesvdj(sh, CUSOLVER_EIG_MODE_VECTOR, 0, l, l, rt, l, sd, ur, l, vr, l, dwork, pl.lwork_d,
                                   info + svd_info, params.p),
                 "cusolverDnDgesvdj");
    check_cuda(fn, static_cast<cudaError_t>(launch_narrow(ur, pl.l, uk, pl.l, pl.l, pl.k, stream)), "a narrowing kernel");
    check_cuda(fn, static_cast<cudaError_t>(launch_narrow(vr, pl.l, vk, pl.l, pl.l, pl.k, stream)), "a narrowing kernel");
    const auto Uk = device_col_major<const float>(uk, pl.l, pl.k);
    const auto Vk = device_col_major<const float>(vk, pl.l, pl.k);
    const auto Q = device_col_major<const float>(y, pl.p, pl.l);
    const auto Qb = device_col_major<const float>(z, pl.s, pl.l);
    // T = A: U = Q Ur_k, V = Qb Vr_k. T = A^T: A ~= (Qb Vr) S (Q Ur)^T, so U = Qb Vr_k, V = Q Ur_k.
    gemm<float>(fn, bh, pl.transpose ? Qb : Q, pl.transpose ? Vk : Uk, U, 1.0f, 0.0f);
    gemm<float>(fn, bh, pl.transpose ? Q : Qb, pl.transpose ? Uk : Vk, V, 1.0f, 0.0f);
    const std::int64_t s_stride = S.rows == k && k > 1 ? S.row_stride : (S.cols > 1 ? S.col_stride : 1);
    check_cuda(fn, static_cast<cudaError_t>(launch_narrow(sd, 1, S.data, s_stride, 1, pl.k, stream)),
               "a narrowing kernel");
  } catch (...) {
    (void)cudaStreamSynchronize(stream);
    (void)cudaGetLastError();
    throw;
  }

  // cuSOLVER's status words: 0, or the index of an illegal argument (< 0), or for gesvdj a
  // Jacobi iteration that did not converge (> 0).
  std::array<int, kMaxInfos> host{};
  check_cuda(fn, cudaMemcpyAsync(host.data(), info, static_cast<std::size_t>(infos) * sizeof(int),
                                 cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync");
  check_cuda(fn, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  for (int i = 0; i < infos; ++i) {
    if (host[static_cast<std::size_t>(i)] == 0) continue;
    if (i == svd_info && host[static_cast<std::size_t>(i)] > 0)
      fail(fn, "the Jacobi SVD of the {}x{} core did not converge (gesvdj info {})", pl.l, pl.l, host[static_cast<std::size_t>(i)]);
    fail(fn, "cuSOLVER reported status {} in step {} (A {}x{}, rank {}, range width {})", host[static_cast<std::size_t>(i)],
         i, m, n, k, pl.l);
  }
}

}  // namespace cuda
LOWRANK_END_NAMESPACE
