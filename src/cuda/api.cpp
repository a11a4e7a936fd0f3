// Host side of lowrank::cuda: argument validation (lowrank::Error, nothing enqueued on error),
// canonicalisation, cuBLAS calls and kernel launches (launch.hpp, *.cu).
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>

#include "host-inl.hpp"
#include "launch.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/cuda/eggroll.hpp"
#include "lowrank/cuda/lora_forward.hpp"
#include "lowrank/cuda/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda {

bool device_available(std::string* reason) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    if (reason != nullptr) *reason = cudaGetErrorString(status);
    return false;
  }
  if (count == 0) {
    if (reason != nullptr) *reason = "the CUDA runtime reports 0 devices";
    return false;
  }
  return true;
}

// ---- rank update --------------------------------------------------------------------------------

template <DeviceScalar TW>
  requires(!std::is_const_v<TW>)
void rank_update(DeviceMatrix<TW> W, DeviceMatrix<const float> U, DeviceMatrix<const float> V, double alpha,
                 const RankUpdateOptions& options, cudaStream_t stream, const DeviceRankUpdateOptions& kernel) {
  constexpr const char* fn = "cuda::rank_update";
  using namespace detail;
  check_shape(fn, "W", W);
  check_shape(fn, "U", U);
  check_shape(fn, "V", V);
  if (U.rows != W.rows) fail(fn, "U has {} rows, W is {}x{} (U must have W's {} rows)", U.rows, W.rows, W.cols, W.rows);
  if (V.rows != W.cols) {
    fail(fn, "V has {} rows, W is {}x{} (V must have one row per column of W: {})", V.rows, W.rows, W.cols, W.cols);
  }
  if (U.cols != V.cols) {
    fail(fn, "U is {}x{} and V is {}x{}: their column counts (the rank) differ", U.rows, U.cols, V.rows, V.cols);
  }
  if (U.cols == 0) fail(fn, "rank is 0 (U is {}x0, V is {}x0); the rank must be at least 1", U.rows, V.rows);
  if (U.cols > 0x7FFFFFFF) fail(fn, "rank {} is too large", U.cols);
  if (!std::isfinite(alpha)) fail(fn, "alpha is {}; it must be finite (W is {}x{})", alpha, W.rows, W.cols);
  if (self_overlapping(W)) {
    fail(fn, "W ({}x{}, strides {}, {}) has overlapping elements", W.rows, W.cols, W.row_stride, W.col_stride);
  }
  if (overlap(W, U)) fail(fn, "W's memory ({}x{}) overlaps U's ({}x{})", W.rows, W.cols, U.rows, U.cols);
  if (overlap(W, V)) fail(fn, "W's memory ({}x{}) overlaps V's ({}x{})", W.rows, W.cols, V.rows, V.cols);
  if (options.index_cols != 0 && options.index_col0 + static_cast<std::uint64_t>(W.cols) > options.index_cols) {
    fail(fn, "options.index_col0 ({}) + W's {} columns exceed options.index_cols ({})", options.index_col0, W.cols,
         options.index_cols);
  }
  if (alpha == 0.0 || W.empty()) return;
  require_device(fn);
  check_device(fn, "W", W);
  check_device(fn, "U", U);
  check_device(fn, "V", V);

  RankUpdateLaunch l{};
  l.dtype = dtype_of<TW>();
  l.r = U.cols;
  l.stochastic = !std::same_as<TW, float> && options.rounding == Rounding::stochastic;
  l.seed = options.seed;
  l.stream_id = options.stream;
  l.index_row0 = options.index_row0;
  l.index_col0 = options.index_col0;
  l.index_cols = options.index_cols != 0 ? options.index_cols : static_cast<std::uint64_t>(W.cols);
  l.w = W.data;
  // Canonical form: unit column stride where possible (a column-major W is updated as W^T += V U^T).
  // alpha scales the user's U on whichever side it lands, as on the CPU.
  const bool transpose = W.col_stride != 1 && W.cols > 1 && (W.row_stride == 1 || W.rows == 1);
  DeviceMatrix<TW> c = transpose ? W.transposed() : W;
  if (c.cols == 1) c.col_stride = 1;
  if (c.rows == 1) c.row_stride = c.cols;
  const DeviceMatrix<const float> cu = transpose ? V : U;
  const DeviceMatrix<const float> cv = transpose ? U : V;
  l.transposed = transpose;
  l.m = c.rows, l.n = c.cols, l.w_rs = c.row_stride, l.w_cs = c.col_stride;
  l.u = cu.data, l.u_rs = cu.row_stride, l.u_cs = cu.col_stride;
  l.v = cv.data, l.v_rs = cv.row_stride, l.v_cs = cv.col_stride;
  l.alpha_u = transpose ? 1.0 : alpha;
  l.alpha_v = transpose ? alpha : 1.0;
  l.pipelined = kernel.pipelined;
  check_cuda(fn, static_cast<cudaError_t>(launch_rank_update(l, stream)), "kernel launch");
}

// ---- LoRA forward -------------------------------------------------------------------------------

std::size_t lora_forward_workspace_bytes(std::int64_t tokens, std::int64_t rank) noexcept {
  if (tokens <= 0 || rank <= 0) return 0;
  return (static_cast<std::size_t>(tokens) * static_cast<std::size_t>(rank) * sizeof(float) + 255) / 256 * 256;
}

template <ForwardScalar T>
void lora_forward(DeviceMatrix<const T> X, DeviceMatrix<const T> W, DeviceMatrix<const T> A, DeviceMatrix<const T> B,
                  double scale, DeviceMatrix<T> Y, void* workspace, std::size_t workspace_bytes, cudaStream_t stream,
                  const DeviceLoraOptions& options) {
  constexpr const char* fn = "cuda::lora_forward";
  using namespace detail;
  check_shape(fn, "X", X);
  check_shape(fn, "W", W);
  check_shape(fn, "A", A);
  check_shape(fn, "B", B);
  check_shape(fn, "Y", Y);
  const std::int64_t tokens = X.rows, in = X.cols, out = W.rows, r = A.rows;
  if (W.cols != in) fail(fn, "W is {}x{} (out x in) but X is {}x{} (tokens x in)", W.rows, W.cols, X.rows, X.cols);
  if (A.cols != in) fail(fn, "A is {}x{} (r x in) but X has in = {}", A.rows, A.cols, in);
  if (B.rows != out || B.cols != r) fail(fn, "B is {}x{}; it must be {}x{} (out x r)", B.rows, B.cols, out, r);
  if (Y.rows != tokens || Y.cols != out) fail(fn, "Y is {}x{}; it must be {}x{} (tokens x out)", Y.rows, Y.cols, tokens, out);
  if (!std::isfinite(scale)) fail(fn, "scale is {}; it must be finite", scale);
  check_blas_layout(fn, "X", X);
  check_blas_layout(fn, "W", W);
  check_blas_layout(fn, "A", A);
  check_blas_layout(fn, "B", B);
  check_blas_layout(fn, "Y", Y);
  if (overlap(Y, X) || overlap(Y, W) || overlap(Y, A) || overlap(Y, B)) {
    fail(fn, "Y ({}x{}) overlaps an input (X, W, A or B)", Y.rows, Y.cols);
  }
  const std::size_t need = lora_forward_workspace_bytes(tokens, r);
  if (workspace_bytes < need) fail(fn, "workspace has {} bytes; {} tokens at rank {} need {}", workspace_bytes, tokens, r, need);
  if (need > 0 && (workspace == nullptr || reinterpret_cast<std::uintptr_t>(workspace) % 256 != 0)) {
    fail(fn, "workspace {} is null or not 256-byte aligned", workspace);
  }
  const DeviceMatrix<T> t(static_cast<T*>(workspace), tokens, r, r, 1);
  if (need > 0 && overlap(Y, t)) fail(fn, "Y ({}x{}) overlaps the workspace", Y.rows, Y.cols);
  if (Y.empty()) return;
  require_device(fn);
  check_device(fn, "X", X);
  check_device(fn, "W", W);
  check_device(fn, "A", A);
  check_device(fn, "B", B);
  check_device(fn, "Y", Y);
  if (need > 0) check_pointer(fn, "workspace", workspace);
  const std::int64_t vec = std::same_as<T, float> ? 4 : 8;
  auto rows_aligned = [&](const auto& v) {
    return v.col_stride == 1 && (v.rows == 1 || v.row_stride % vec == 0) &&
           reinterpret_cast<std::uintptr_t>(v.data) % 16 == 0;
  };
  // One-pass kernels: bf16 on tensor cores when `in` is a multiple of 32, else the FMA kernel
  // (fast up to a few tokens only: its X operands come from L1 for every product).
  const bool one_pass_layout = in % 8 == 0 && in > 0 && r <= 64 && rows_aligned(X) && rows_aligned(W) &&
                               (Y.col_stride == 1 || Y.cols == 1);
  const bool use_mma = std::same_as<T, bf16> && options.bf16_one_pass_tensor_cores && in % 32 == 0 &&
                       device_major(fn) >= 8;
  const std::int64_t one_pass_max = std::same_as<T, float> ? std::min<std::int64_t>(options.fp32_one_pass_max_tokens, 4)
                                                            : std::min<std::int64_t>(options.bf16_one_pass_max_tokens,
                                                                                     use_mma ? 16 : 4);
  if (one_pass_layout && tokens <= one_pass_max) {
    LoraSmallLaunch l{};
    l.dtype = dtype_of<T>();
    l.x = X.data, l.ldx = X.row_stride;
    l.w = W.data, l.ldw = W.row_stride;
    l.a = A.data, l.a_rs = A.row_stride, l.a_cs = A.col_stride;
    l.b = B.data, l.b_rs = B.row_stride, l.b_cs = B.col_stride;
    l.y = Y.data, l.ldy = Y.rows > 1 ? Y.row_stride : Y.cols;
    l.t = static_cast<float*>(workspace);
    l.tokens = tokens, l.in = in, l.out = out, l.r = r;
    l.scale = static_cast<float>(scale);
    l.mma = use_mma;
    l.a_rows = r <= 16 && (r == 0 || rows_aligned(A));
    check_cuda(fn, static_cast<cudaError_t>(launch_lora_small(l, stream)), "kernel launch");
    return;
  }
  cublasHandle_t h = handle_for(fn, stream);
  // Medium batches: the low-rank term by one kernel (T in fp32, A and B read once per two tokens),
  // then the base GEMM adds onto it.
  if (tokens <= options.term_max_tokens && r >= 1 && r <= 16 && in % 8 == 0 && rows_aligned(X) &&
      rows_aligned(A) && Y.col_stride == 1) {
    LoraSmallLaunch l{};
    l.dtype = dtype_of<T>();
    l.x = X.data, l.ldx = X.row_stride;
    l.a = A.data, l.a_rs = A.row_stride, l.a_cs = A.col_stride;
    l.b = B.data, l.b_rs = B.row_stride, l.b_cs = B.col_stride;
    l.y = Y.data, l.ldy = Y.rows > 1 ? Y.row_stride : Y.cols;
    l.tokens = tokens, l.in = in, l.out = out, l.r = r;
    l.scale = static_cast<float>(scale);
    check_cuda(fn, static_cast<cudaError_t>(launch_lora_term(l, stream)), "kernel launch");
    gemm<T>(fn, h, X, W.transposed(), Y, 1.0f, 1.0f);
    return;
  }
  if (r > 0 && in > 0) {
    gemm<T>(fn, h, X, A.transposed(), t, static_cast<float>(scale), 0.0f);  // T = s X A^T
    gemm<T>(fn, h, t, B.transposed(), Y, 1.0f, 0.0f);                        // Y = T B^T
    gemm<T>(fn, h, X, W.transposed(), Y, 1.0f, 1.0f);                        // Y += X W^T
  } else {
    gemm<T>(fn, h, X, W.transposed(), Y, 1.0f, 0.0f);
  }
}

template <ForwardScalar T>
void linear_forward(DeviceMatrix<const T> X, DeviceMatrix<const T> W, DeviceMatrix<T> Y, cudaStream_t stream) {
  constexpr const char* fn = "cuda::linear_forward";
  using namespace detail;
  check_shape(fn, "X", X);
  check_shape(fn, "W", W);
  check_shape(fn, "Y", Y);
  if (W.cols != X.cols) fail(fn, "W is {}x{} (out x in) but X is {}x{} (tokens x in)", W.rows, W.cols, X.rows, X.cols);
  if (Y.rows != X.rows || Y.cols != W.rows) fail(fn, "Y is {}x{}; it must be {}x{}", Y.rows, Y.cols, X.rows, W.rows);
  check_blas_layout(fn, "X", X);
  check_blas_layout(fn, "W", W);
  check_blas_layout(fn, "Y", Y);
  if (overlap(Y, X) || overlap(Y, W)) fail(fn, "Y ({}x{}) overlaps X or W", Y.rows, Y.cols);
  if (Y.empty()) return;
  require_device(fn);
  check_device(fn, "X", X);
  check_device(fn, "W", W);
  check_device(fn, "Y", Y);
  gemm<T>(fn, handle_for(fn, stream), X, W.transposed(), Y, 1.0f, 0.0f);
}

// ---- EGGROLL ------------------------------------------------------------------------------------

template <ForwardScalar T>
void eggroll_forward(DeviceMatrix<const T> X, DeviceMatrix<const T> W, const EggrollPopulation& pop, DeviceMatrix<T> Y,
                     cudaStream_t stream) {
  constexpr const char* fn = "cuda::eggroll_forward";
  using namespace detail;
  check_shape(fn, "X", X);
  check_shape(fn, "W", W);
  check_shape(fn, "Y", Y);
  const std::int64_t rows = X.rows, in = X.cols, out = W.rows;
  if (W.cols != in) fail(fn, "W is {}x{} (out x in) but X is {}x{} (members x in)", W.rows, W.cols, X.rows, X.cols);
  if (Y.rows != rows || Y.cols != out) fail(fn, "Y is {}x{}; it must be {}x{} (members x out)", Y.rows, Y.cols, rows, out);
  if (pop.rank < 1 || pop.rank > 16) fail(fn, "rank is {}; it must be in 1..16", pop.rank);
  if (!std::isfinite(pop.sigma)) fail(fn, "sigma is {}; it must be finite", pop.sigma);
  if (pop.population < 1) fail(fn, "population is {}; it must be positive", pop.population);
  if (pop.antithetic != es::Antithetic::none && pop.population % 2 != 0) {
    fail(fn, "population {} is odd; antithetic pairs need an even population", pop.population);
  }
  if (pop.member0 < 0 || pop.member0 + rows > pop.population) {
    fail(fn, "rows are members {}..{} but the population has {} members", pop.member0, pop.member0 + rows - 1,
         pop.population);
  }
  if (static_cast<std::uint64_t>(in + out) * static_cast<std::uint64_t>(pop.rank) > es::max_stream_normals) {
    fail(fn, "(in + out) r = {} exceeds a noise stream's 2^34 normals", (in + out) * pop.rank);
  }
  check_blas_layout(fn, "X", X);
  check_blas_layout(fn, "W", W);
  if (!Y.empty() && Y.col_stride != 1 && Y.cols > 1) fail(fn, "Y ({}x{}) must have unit column stride", Y.rows, Y.cols);
  check_blas_layout(fn, "Y", Y);
  if (overlap(Y, X) || overlap(Y, W)) fail(fn, "Y ({}x{}) overlaps X or W", Y.rows, Y.cols);
  if (Y.empty()) return;
  require_device(fn);
  check_device(fn, "X", X);
  check_device(fn, "W", W);
  check_device(fn, "Y", Y);

  EggrollTermLaunch l{};
  l.dtype = dtype_of<T>();
  l.x = Mat{X.data, X.rows, X.cols, X.rows > 1 ? X.row_stride : X.cols, X.cols > 1 ? X.col_stride : 1};
  l.y = Y.data;
  l.ldy = Y.rows > 1 ? Y.row_stride : Y.cols;
  l.out = out;
  l.key = pop.key;
  l.rank = static_cast<int>(pop.rank);
  l.scale = static_cast<float>(pop.sigma / std::sqrt(static_cast<double>(pop.rank)));
  l.member0 = pop.member0;
  l.population = pop.population;
  l.antithetic = pop.antithetic;
  l.grouping = 0;
  if (pop.antithetic == es::Antithetic::interleaved && pop.member0 % 2 == 0 && rows % 2 == 0) l.grouping = 1;
  if (pop.antithetic == es::Antithetic::halves && pop.member0 == 0 && rows == pop.population) l.grouping = 2;
  if (in == 0) {
    check_cuda(fn, cudaMemset2DAsync(Y.data, static_cast<std::size_t>(l.ldy) * sizeof(T), 0, out * sizeof(T),
                                      static_cast<std::size_t>(rows), stream),
               "cudaMemset2DAsync");
    return;
  }
  check_cuda(fn, static_cast<cudaError_t>(launch_eggroll_term(l, stream)), "kernel launch");
  gemm<T>(fn, handle_for(fn, stream), X, W.transposed(), Y, 1.0f, 1.0f);
}

void eggroll_noise_factors(const es::NoiseKey& key, std::uint32_t noise_index, DeviceMatrix<float> A,
                           DeviceMatrix<float> B, cudaStream_t stream) {
  constexpr const char* fn = "cuda::eggroll_noise_factors";
  using namespace detail;
  check_shape(fn, "A", A);
  check_shape(fn, "B", B);
  if (A.cols != B.cols) fail(fn, "A is {}x{} and B is {}x{}: their ranks differ", A.rows, A.cols, B.rows, B.cols);
  if (A.cols < 1) fail(fn, "rank is {}; it must be at least 1", A.cols);
  if (self_overlapping(A) || self_overlapping(B)) fail(fn, "A or B has overlapping elements");
  if (overlap(A, B)) fail(fn, "A's memory ({}x{}) overlaps B's ({}x{})", A.rows, A.cols, B.rows, B.cols);
  if (static_cast<std::uint64_t>(A.rows + B.rows) * static_cast<std::uint64_t>(A.cols) > es::max_stream_normals) {
    fail(fn, "(in + out) r exceeds a noise stream's 2^34 normals");
  }
  if (A.empty() && B.empty()) return;
  require_device(fn);
  check_device(fn, "A", A);
  check_device(fn, "B", B);
  check_cuda(fn,
             static_cast<cudaError_t>(launch_noise_factors(key, noise_index, A.data, A.rows, A.row_stride, A.col_stride,
                                                           B.data, B.rows, B.row_stride, B.col_stride, A.cols, stream)),
             "kernel launch");
}

template void rank_update<float>(DeviceMatrix<float>, DeviceMatrix<const float>, DeviceMatrix<const float>, double,
                                 const RankUpdateOptions&, cudaStream_t, const DeviceRankUpdateOptions&);
template void rank_update<bf16>(DeviceMatrix<bf16>, DeviceMatrix<const float>, DeviceMatrix<const float>, double,
                                const RankUpdateOptions&, cudaStream_t, const DeviceRankUpdateOptions&);
template void rank_update<f16>(DeviceMatrix<f16>, DeviceMatrix<const float>, DeviceMatrix<const float>, double,
                               const RankUpdateOptions&, cudaStream_t, const DeviceRankUpdateOptions&);
template void lora_forward<float>(DeviceMatrix<const float>, DeviceMatrix<const float>, DeviceMatrix<const float>,
                                  DeviceMatrix<const float>, double, DeviceMatrix<float>, void*, std::size_t,
                                  cudaStream_t, const DeviceLoraOptions&);
template void lora_forward<bf16>(DeviceMatrix<const bf16>, DeviceMatrix<const bf16>, DeviceMatrix<const bf16>,
                                 DeviceMatrix<const bf16>, double, DeviceMatrix<bf16>, void*, std::size_t, cudaStream_t,
                                 const DeviceLoraOptions&);
template void linear_forward<float>(DeviceMatrix<const float>, DeviceMatrix<const float>, DeviceMatrix<float>,
                                    cudaStream_t);
template void linear_forward<bf16>(DeviceMatrix<const bf16>, DeviceMatrix<const bf16>, DeviceMatrix<bf16>, cudaStream_t);
template void eggroll_forward<float>(DeviceMatrix<const float>, DeviceMatrix<const float>, const EggrollPopulation&,
                                     DeviceMatrix<float>, cudaStream_t);
template void eggroll_forward<bf16>(DeviceMatrix<const bf16>, DeviceMatrix<const bf16>, const EggrollPopulation&,
                                    DeviceMatrix<bf16>, cudaStream_t);

}  // namespace cuda
LOWRANK_END_NAMESPACE
