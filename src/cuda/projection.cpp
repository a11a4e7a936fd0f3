// Device projections (include/lowrank/cuda/projection.hpp): validation and one cuBLAS GEMM each.
#include <cmath>
#include <cstdint>
#include <limits>

#include "host-inl.hpp"
#include "lowrank/cuda/projection.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda {
namespace detail {
namespace {

// The basis's expected shape for a `rows x cols` matrix and side, and the checks shared by both
// calls. Returns r.
std::int64_t check_basis(const char* fn, DeviceMatrix<const float> basis, optim::Side side, std::int64_t rows,
                         std::int64_t cols) {
  check_shape(fn, "basis", basis);
  check_blas_layout(fn, "basis", basis);
  const bool left = side == optim::Side::left;
  const std::int64_t len = left ? rows : cols;
  if (basis.rows != len)
    fail(fn, "basis is {}x{}; for the {} side of a {}x{} matrix it must have {} rows", basis.rows, basis.cols,
         left ? "left" : "right", rows, cols, len);
  if (basis.cols < 1) fail(fn, "basis is {}x{}: the rank must be at least 1", basis.rows, basis.cols);
  return basis.cols;
}

}  // namespace
}  // namespace detail

void project(DeviceMatrix<const float> G, DeviceMatrix<const float> basis, optim::Side side, DeviceMatrix<float> R,
             cudaStream_t stream) {
  constexpr const char* fn = "cuda::project";
  using namespace detail;
  check_shape(fn, "G", G);
  check_shape(fn, "R", R);
  check_blas_layout(fn, "G", G);
  check_blas_layout(fn, "R", R);
  const std::int64_t r = check_basis(fn, basis, side, G.rows, G.cols);
  const bool left = side == optim::Side::left;
  const std::int64_t want_rows = left ? r : G.rows, want_cols = left ? G.cols : r;
  if (R.rows != want_rows || R.cols != want_cols)
    fail(fn, "R is {}x{}; it must be {}x{} (G {}x{}, basis {}x{}, {} side)", R.rows, R.cols, want_rows, want_cols,
         G.rows, G.cols, basis.rows, basis.cols, left ? "left" : "right");
  if (overlap(R, G)) fail(fn, "R's memory ({}x{}) overlaps G's ({}x{})", R.rows, R.cols, G.rows, G.cols);
  if (overlap(R, basis)) fail(fn, "R's memory ({}x{}) overlaps the basis ({}x{})", R.rows, R.cols, basis.rows, basis.cols);
  if (R.empty()) return;
  require_device(fn);
  check_device(fn, "G", G);
  check_device(fn, "basis", basis);
  check_device(fn, "R", R);
  if (G.empty()) {  // the projected dimension has length 0: R = 0 (not left to a GEMM with k = 0)
    const Operand o = operand(DeviceMatrix<const float>(R));
    const std::size_t width = static_cast<std::size_t>(o.col ? R.rows : R.cols) * sizeof(float);
    const std::size_t height = static_cast<std::size_t>(o.col ? R.cols : R.rows);
    check_cuda(fn, cudaMemset2DAsync(R.data, static_cast<std::size_t>(o.ld) * sizeof(float), 0, width, height, stream),
               "cudaMemset2DAsync");
    return;
  }
  cublasHandle_t h = handle_for(fn, stream);
  gemm<float>(fn, h, left ? basis.transposed() : G, left ? G : basis, R, 1.0f, 0.0f);
}

void back_project(DeviceMatrix<float> W, DeviceMatrix<const float> N, DeviceMatrix<const float> basis, optim::Side side,
                  double alpha, cudaStream_t stream) {
  constexpr const char* fn = "cuda::back_project";
  using namespace detail;
  check_shape(fn, "W", W);
  check_shape(fn, "N", N);
  check_blas_layout(fn, "W", W);
  check_blas_layout(fn, "N", N);
  const std::int64_t r = check_basis(fn, basis, side, W.rows, W.cols);
  const bool left = side == optim::Side::left;
  const std::int64_t want_rows = left ? r : W.rows, want_cols = left ? W.cols : r;
  if (N.rows != want_rows || N.cols != want_cols)
    fail(fn, "N is {}x{}; it must be {}x{} (W {}x{}, basis {}x{}, {} side)", N.rows, N.cols, want_rows, want_cols,
         W.rows, W.cols, basis.rows, basis.cols, left ? "left" : "right");
  if (!std::isfinite(alpha) || std::abs(alpha) > std::numeric_limits<float>::max())
    fail(fn, "alpha is {}; it must be finite in fp32 (W is {}x{})", alpha, W.rows, W.cols);
  if (overlap(W, N)) fail(fn, "W's memory ({}x{}) overlaps N's ({}x{})", W.rows, W.cols, N.rows, N.cols);
  if (overlap(W, basis)) fail(fn, "W's memory ({}x{}) overlaps the basis ({}x{})", W.rows, W.cols, basis.rows, basis.cols);
  if (W.empty() || alpha == 0.0) return;
  require_device(fn);
  check_device(fn, "W", W);
  check_device(fn, "N", N);
  check_device(fn, "basis", basis);
  cublasHandle_t h = handle_for(fn, stream);
  if (left) {
    gemm<float>(fn, h, basis, N, W, static_cast<float>(alpha), 1.0f);
  } else {
    gemm<float>(fn, h, N, basis.transposed(), W, static_cast<float>(alpha), 1.0f);
  }
}

}  // namespace cuda
LOWRANK_END_NAMESPACE
