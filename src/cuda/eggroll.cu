// EGGROLL population term: Y_i = sign sigma/sqrt(r) (X_i B_k) A_k^T, the factors regenerated
// from the Philox noise streams (es/noise.hpp) in the kernel; the base product X W^T is added by
// cuBLAS afterwards (beta = 1). One block per noise index present in the batch: an antithetic
// pair whose members are both in the batch shares one generation of its noise.
//
// No fast-math here: the normal transform must round exactly as on the CPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.hpp"
#include "lowrank/es/noise.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRank = 16;

__device__ __forceinline__ float load(const float* p, std::int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void put(float* p, std::int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, std::int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }

struct TermParams {
  std::int64_t rows, in, out, x_rs, x_cs, ldy;
  es::NoiseKey key;
  int rank;
  float scale;
  std::int64_t member0, population;
  es::Antithetic antithetic;
  int grouping;
};

// Sums `v` over the block; every thread gets the total. `scratch` holds kThreads / 32 floats.
__device__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

template <class T, int M, int R>
__global__ void __launch_bounds__(kThreads) eggroll_term(const T* __restrict__ x, T* __restrict__ y, TermParams p) {
  __shared__ float scratch[kThreads / 32];
  __shared__ float t_shared[M][R];
  // The rows of this block (M = 1 or 2) and their noise.
  std::int64_t row[M];
  const std::int64_t g = blockIdx.x;
  if constexpr (M == 1) {
    row[0] = g;
  } else {
    row[0] = p.grouping == 1 ? 2 * g : g;
    row[1] = p.grouping == 1 ? 2 * g + 1 : g + p.rows / 2;
  }
  float sign[M];
  std::uint32_t index = 0;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const es::MemberNoise mn = es::member_noise(p.member0 + row[m], p.population, p.antithetic);
    sign[m] = mn.sign;
    index = mn.index;  // equal for both rows of a group
  }
  const int r = p.rank;
  // t[m][c] = sum_j X(row m, j) B(j, c) over B's elements [0, in r).
  float t[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < R; ++c) t[m][c] = 0.0f;
  const std::uint64_t b_elems = static_cast<std::uint64_t>(p.in) * static_cast<std::uint64_t>(r);
  const std::uint64_t b_blocks = (b_elems + 3) / 4;
  for (std::uint64_t blk = threadIdx.x; blk < b_blocks; blk += kThreads) {
    float z[4];
    es::noise_normals4(p.key, index, static_cast<std::uint32_t>(blk), z);
    // (j, c) of the block's first element, then advanced element by element (no division per
    // element; R == 1 means r == 1).
    const std::uint64_t e0 = blk * 4;
    std::int64_t j;
    int c;
    if constexpr (R == 1) {
      j = static_cast<std::int64_t>(e0);
      c = 0;
    } else if ((e0 >> 32) == 0) {
      j = static_cast<std::uint32_t>(e0) / static_cast<std::uint32_t>(r);
      c = static_cast<int>(static_cast<std::uint32_t>(e0) % static_cast<std::uint32_t>(r));
    } else {
      j = static_cast<std::int64_t>(e0 / static_cast<std::uint64_t>(r));
      c = static_cast<int>(e0 % static_cast<std::uint64_t>(r));
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (e0 + q >= b_elems) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float xv = load(x, row[m] * p.x_rs + j * p.x_cs);
#pragma unroll
        for (int cc = 0; cc < R; ++cc)
          if (cc == c) t[m][cc] = __fmaf_rn(xv, z[q], t[m][cc]);
      }
      if constexpr (R == 1) {
        ++j;
      } else if (++c == r) {
        c = 0;
        ++j;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < R; ++c) {
      if (c < r) {
        const float s = block_sum(t[m][c], scratch);
        if (threadIdx.x == 0) t_shared[m][c] = s;
      }
    }
  __syncthreads();
  // Y(row m, o) = sign scale sum_c t[m][c] A(o, c), A(o, c) = element in r + o r + c. Each thread
  // takes 4 consecutive outputs at a time and the Philox blocks covering their elements.
  const std::uint64_t a0 = b_elems;
  for (std::int64_t o0 = static_cast<std::int64_t>(threadIdx.x) * 4; o0 < p.out; o0 += kThreads * 4) {
    float acc[M][4];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[m][q] = 0.0f;
    const std::int64_t o_end = o0 + 4 < p.out ? o0 + 4 : p.out;
    const std::uint64_t e_first = a0 + static_cast<std::uint64_t>(o0) * r;
    const std::uint64_t e_last = a0 + static_cast<std::uint64_t>(o_end) * r;  // exclusive
    int oo = 0, c = 0;  // output (relative to o0) and rank index of element e, e = e_first, ...
    for (std::uint64_t blk = e_first / 4; blk * 4 < e_last; ++blk) {
      float z[4];
      es::noise_normals4(p.key, index, static_cast<std::uint32_t>(blk), z);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const std::uint64_t e = blk * 4 + q;
        if (e < e_first || e >= e_last) continue;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float tc = 0.0f;
#pragma unroll
          for (int cc = 0; cc < R; ++cc)
            if (cc == c) tc = t_shared[m][cc];
#pragma unroll
          for (int qq = 0; qq < 4; ++qq)
            if (qq == oo) acc[m][qq] = __fmaf_rn(tc, z[q], acc[m][qq]);
        }
        if constexpr (R == 1) {
          ++oo;
        } else if (++c == r) {
          c = 0;
          ++oo;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float s = sign[m] * p.scale;
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (o0 + q < p.out) put(y, row[m] * p.ldy + o0 + q, s * acc[m][q]);
    }
  }
}

template <class T, int M>
cudaError_t launch_m(const T* x, T* y, const TermParams& p, cudaStream_t stream) {
  const std::int64_t blocks = M == 1 ? p.rows : p.rows / 2;
  if (blocks == 0) return cudaSuccess;
  if (p.rank == 1) {
    eggroll_term<T, M, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, y, p);
  } else if (p.rank <= 4) {
    eggroll_term<T, M, 4><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, y, p);
  } else {
    eggroll_term<T, M, kMaxRank><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, y, p);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_t(const T* x, T* y, const TermParams& p, cudaStream_t stream) {
  return p.grouping == 0 ? launch_m<T, 1>(x, y, p, stream) : launch_m<T, 2>(x, y, p, stream);
}

__global__ void noise_factors(es::NoiseKey key, std::uint32_t index, float* a, std::int64_t out, std::int64_t a_rs,
                              std::int64_t a_cs, float* b, std::int64_t in, std::int64_t b_rs, std::int64_t b_cs,
                              std::int64_t rank) {
  const std::uint64_t total = static_cast<std::uint64_t>(in + out) * static_cast<std::uint64_t>(rank);
  const std::uint64_t blocks = (total + 3) / 4;
  for (std::uint64_t blk = blockIdx.x * static_cast<std::uint64_t>(blockDim.x) + threadIdx.x; blk < blocks;
       blk += static_cast<std::uint64_t>(gridDim.x) * blockDim.x) {
    float z[4];
    es::noise_normals4(key, index, static_cast<std::uint32_t>(blk), z);
    for (int q = 0; q < 4; ++q) {
      const std::uint64_t e = blk * 4 + q;
      if (e >= total) break;
      const std::uint64_t b_elems = static_cast<std::uint64_t>(in) * rank;
      if (e < b_elems) {
        b[static_cast<std::int64_t>(e / rank) * b_rs + static_cast<std::int64_t>(e % rank) * b_cs] = z[q];
      } else {
        const std::uint64_t rel = e - b_elems;
        a[static_cast<std::int64_t>(rel / rank) * a_rs + static_cast<std::int64_t>(rel % rank) * a_cs] = z[q];
      }
    }
  }
}

}  // namespace

int launch_eggroll_term(const EggrollTermLaunch& l, cudaStream_t stream) {
  TermParams p{l.x.rows, l.x.cols, l.out,     l.x.rs,   l.x.cs,          l.ldy,        l.key,
               l.rank,   l.scale,  l.member0, l.population, l.antithetic, l.grouping};
  if (l.dtype == Dtype::f32) return launch_t(static_cast<const float*>(l.x.data), static_cast<float*>(l.y), p, stream);
  return launch_t(static_cast<const __nv_bfloat16*>(l.x.data), static_cast<__nv_bfloat16*>(l.y), p, stream);
}

int launch_noise_factors(const es::NoiseKey& key, std::uint32_t index, float* a, std::int64_t out, std::int64_t a_rs,
                         std::int64_t a_cs, float* b, std::int64_t in, std::int64_t b_rs, std::int64_t b_cs,
                         std::int64_t rank, cudaStream_t stream) {
  const std::uint64_t blocks = ((static_cast<std::uint64_t>(in + out) * rank + 3) / 4 + 255) / 256;
  if (blocks == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  noise_factors<<<grid, 256, 0, stream>>>(key, index, a, out, a_rs, a_cs, b, in, b_rs, b_cs, rank);
  return cudaGetLastError();
}

}  // namespace cuda::detail
LOWRANK_END_NAMESPACE
