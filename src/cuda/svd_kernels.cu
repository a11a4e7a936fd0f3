// Element-wise kernels of the device randomized SVD (svd.cpp): the Gaussian test matrix from the
// Philox stream (bitwise the CPU's `RandomStream::normal`), the lower-triangular R^T in fp64 from
// a geqrf result, and the fp64 -> fp32 copy of the small SVD's leading columns.
//
// No fast-math here: the normal transform must round exactly as on the CPU.
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.hpp"
#include "lowrank/core/philox.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda::detail {
namespace {

constexpr int kThreads = 256;

// omega[idx] = normal(idx) for idx in [0, count): one Philox block (four normals) per thread.
__global__ void fill_normal_kernel(float* omega, std::uint64_t count, std::uint64_t seed, std::uint64_t stream) {
  const RandomStream rng(seed, stream);
  const std::uint64_t block = static_cast<std::uint64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const std::uint64_t first = 4 * block;
  if (first >= count) return;
  const Philox4x32Block b = rng.block(block);
  const NormalPair z01 = normal_pair(b.v[0], b.v[1]);
  const NormalPair z23 = normal_pair(b.v[2], b.v[3]);
  const float z[4] = {z01.c, z01.s, z23.c, z23.s};
  for (std::uint64_t q = 0; q < 4 && first + q < count; ++q) omega[first + q] = z[q];
}

// m (l x l, column-major, fp64) = R^T: m(i, j) = r(j, i) for i >= j, 0 above the diagonal; r is
// the upper triangle of a column-major fp32 matrix with leading dimension ldr.
__global__ void upper_transposed_kernel(const float* r, std::int64_t ldr, double* m, std::int64_t l) {
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= l * l) return;
  const std::int64_t i = idx % l, j = idx / l;
  m[idx] = i >= j ? static_cast<double>(r[i * ldr + j]) : 0.0;
}

// out (rows x cols, column-major fp32, leading dimension ldo) = in (column-major fp64, ldi).
__global__ void narrow_kernel(const double* in, std::int64_t ldi, float* out, std::int64_t ldo, std::int64_t rows,
                              std::int64_t cols) {
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= rows * cols) return;
  const std::int64_t i = idx % rows, j = idx / rows;
  out[j * ldo + i] = static_cast<float>(in[j * ldi + i]);
}

unsigned grid_for(std::uint64_t work) { return static_cast<unsigned>((work + kThreads - 1) / kThreads); }

}  // namespace

int launch_fill_normal(float* omega, std::uint64_t count, std::uint64_t seed, std::uint64_t stream_id,
                       cudaStream_t stream) {
  if (count == 0) return 0;
  fill_normal_kernel<<<grid_for((count + 3) / 4), kThreads, 0, stream>>>(omega, count, seed, stream_id);
  return static_cast<int>(cudaGetLastError());
}

int launch_upper_transposed(const float* r, std::int64_t ldr, double* m, std::int64_t l, cudaStream_t stream) {
  if (l == 0) return 0;
  upper_transposed_kernel<<<grid_for(static_cast<std::uint64_t>(l * l)), kThreads, 0, stream>>>(r, ldr, m, l);
  return static_cast<int>(cudaGetLastError());
}

int launch_narrow(const double* in, std::int64_t ldi, float* out, std::int64_t ldo, std::int64_t rows,
                  std::int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return 0;
  narrow_kernel<<<grid_for(static_cast<std::uint64_t>(rows * cols)), kThreads, 0, stream>>>(in, ldi, out, ldo, rows,
                                                                                           cols);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda::detail
LOWRANK_END_NAMESPACE
