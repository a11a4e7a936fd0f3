// Fused LoRA forward for a few tokens: W is read once, by a GEMV-like kernel (one warp per output
// row, lanes along the input dimension, 16-byte loads) that adds the low-rank term T B^T before
// its single rounding into Y. T = s X A^T comes from a small kernel launched just before; on
// sm_90 the GEMV kernel is launched as its programmatic dependent and streams W while T is
// computed, waiting for T only at the end (griddepcontrol).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launch.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda::detail {
namespace {

constexpr int kMaxTokens = 16;

__device__ __forceinline__ float ld(const float* p, std::int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, std::int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void st(__nv_bfloat16* p, std::int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }

// 8 consecutive elements (16 bytes for bf16, two 16-byte loads for fp32) widened to fp32.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
  const std::uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    v[2 * q] = __uint_as_float(w[q] << 16);
    v[2 * q + 1] = __uint_as_float(w[q] & 0xFFFF0000u);
  }
}

// Lets the main kernel, launched as this grid's programmatic dependent on sm_90, start streaming
// W now instead of when this grid exits: it reads T only after cudaGridDependencySynchronize(),
// which waits for this grid's completion and the visibility of its writes, not for the trigger.
__device__ __forceinline__ void let_dependent_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// T(t, c) = scale * X(t, :) . A(c, :), fp32. One warp per (t, c).
template <class T>
__global__ void lora_t_kernel(const T* __restrict__ x, std::int64_t ldx, const T* __restrict__ a, std::int64_t a_rs,
                              std::int64_t a_cs, std::int64_t tokens, std::int64_t in, int r, float scale,
                              float* __restrict__ t_out) {
  let_dependent_start();
  const int warp = static_cast<int>((blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (warp >= tokens * r) return;
  const std::int64_t t = warp / r, c = warp % r;
  float acc = 0.0f;
  for (std::int64_t i = lane; i < in; i += 32) acc = __fmaf_rn(ld(x, t * ldx + i), ld(a, c * a_rs + i * a_cs), acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
  if (lane == 0) t_out[t * r + c] = scale * acc;
}

// T(t, :) = scale * X(t, :) A^T with one block per token: each thread takes 8 consecutive
// columns at a time (16-byte loads of X and of every row of A, all independent), then the block
// sums each of the r partial sums. Needs A row-major with 16-byte aligned rows and r <= 16.
template <class T>
__global__ void __launch_bounds__(256) lora_t_rows_kernel(const T* __restrict__ x, std::int64_t ldx,
                                                          const T* __restrict__ a, std::int64_t lda, std::int64_t in,
                                                          int r, float scale, float* __restrict__ t_out) {
  constexpr int kMaxR = 16;
  let_dependent_start();
  __shared__ float part[8][kMaxR];
  const std::int64_t tok = blockIdx.x;
  float acc[kMaxR];
#pragma unroll
  for (int c = 0; c < kMaxR; ++c) acc[c] = 0.0f;
  for (std::int64_t i = static_cast<std::int64_t>(threadIdx.x) * 8; i < in; i += 256 * 8) {
    float xv[8];
    load8(x + tok * ldx + i, xv);
#pragma unroll
    for (int c = 0; c < kMaxR; ++c) {
      if (c < r) {
        float av[8];
        load8(a + c * lda + i, av);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[c] = __fmaf_rn(xv[e], av[e], acc[c]);
      }
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < kMaxR; ++c) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[c] += __shfl_xor_sync(0xFFFFFFFFu, acc[c], o);
    if (lane == 0) part[warp][c] = acc[c];
  }
  __syncthreads();
  if (threadIdx.x < r) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) v += part[w][threadIdx.x];
    t_out[tok * r + threadIdx.x] = scale * v;
  }
}

// The low-rank term alone for a medium batch: Y = s (X A^T) B^T, TPB tokens per block (A and B
// are read once per block), T kept in fp32 in shared memory, Y rounded once. cuBLAS then adds
// X W^T with beta = 1. Needs X and A row-major with 16-byte aligned rows, `in % 8 == 0`, r <= 16.
template <class T, int TPB>
__global__ void __launch_bounds__(256) lora_term_kernel(const T* __restrict__ x, std::int64_t ldx,
                                                        const T* __restrict__ a, std::int64_t lda,
                                                        const T* __restrict__ b, std::int64_t b_rs, std::int64_t b_cs,
                                                        T* __restrict__ y, std::int64_t ldy, std::int64_t tokens,
                                                        std::int64_t in, std::int64_t out, int r, float scale) {
  constexpr int kMaxR = 16;
  __shared__ float part[8][TPB][kMaxR];
  __shared__ float ts[TPB][kMaxR];
  const std::int64_t t0 = static_cast<std::int64_t>(blockIdx.x) * TPB;
  float acc[TPB][kMaxR];
#pragma unroll
  for (int tt = 0; tt < TPB; ++tt)
#pragma unroll
    for (int c = 0; c < kMaxR; ++c) acc[tt][c] = 0.0f;
  for (std::int64_t i = static_cast<std::int64_t>(threadIdx.x) * 8; i < in; i += 256 * 8) {
    float xv[TPB][8];
#pragma unroll
    for (int tt = 0; tt < TPB; ++tt) {
      if (t0 + tt < tokens) {
        load8(x + (t0 + tt) * ldx + i, xv[tt]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) xv[tt][e] = 0.0f;
      }
    }
#pragma unroll
    for (int c = 0; c < kMaxR; ++c) {
      if (c < r) {
        float av[8];
        load8(a + c * lda + i, av);
#pragma unroll
        for (int tt = 0; tt < TPB; ++tt)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[tt][c] = __fmaf_rn(xv[tt][e], av[e], acc[tt][c]);
      }
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int tt = 0; tt < TPB; ++tt)
#pragma unroll
    for (int c = 0; c < kMaxR; ++c) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[tt][c] += __shfl_xor_sync(0xFFFFFFFFu, acc[tt][c], o);
      if (lane == 0) part[warp][tt][c] = acc[tt][c];
    }
  __syncthreads();
  if (threadIdx.x < TPB * kMaxR) {
    const int tt = threadIdx.x / kMaxR, c = threadIdx.x % kMaxR;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) v += part[w][tt][c];
    ts[tt][c] = scale * v;
  }
  __syncthreads();
  for (std::int64_t o = threadIdx.x; o < out; o += 256) {
    float bv[kMaxR];
#pragma unroll
    for (int c = 0; c < kMaxR; ++c) bv[c] = c < r ? ld(b, o * b_rs + c * b_cs) : 0.0f;
#pragma unroll
    for (int tt = 0; tt < TPB; ++tt) {
      if (t0 + tt >= tokens) continue;
      float v = 0.0f;
#pragma unroll
      for (int c = 0; c < kMaxR; ++c)
        if (c < r) v = __fmaf_rn(ts[tt][c], bv[c], v);
      st(y, (t0 + tt) * ldy + o, v);
    }
  }
}

template <class T, int NT>
__global__ void __launch_bounds__(256) lora_gemv_kernel(const T* __restrict__ x, std::int64_t ldx,
                                                        const T* __restrict__ w, std::int64_t ldw,
                                                        const T* __restrict__ b, std::int64_t b_rs, std::int64_t b_cs,
                                                        const float* __restrict__ t_in, T* __restrict__ y,
                                                        std::int64_t ldy, int tokens, std::int64_t in,
                                                        std::int64_t out, int r) {
  const std::int64_t o = (blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  if (o < out) {
    const T* wr = w + o * ldw;
    constexpr int kUnroll = 4;
    std::int64_t k = static_cast<std::int64_t>(lane) * 8;
    for (; k + (kUnroll - 1) * 256 < in; k += kUnroll * 256) {
      float wv[kUnroll][8];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load8(wr + k + u * 256, wv[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          if (t < tokens) {
            float xv[8];
            load8(x + t * ldx + k + u * 256, xv);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[t] = __fmaf_rn(xv[e], wv[u][e], acc[t]);
          }
        }
    }
    for (; k < in; k += 256) {
      float wv[8];
      load8(wr + k, wv);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t < tokens) {
          float xv[8];
          load8(x + t * ldx + k, xv);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[t] = __fmaf_rn(xv[e], wv[e], acc[t]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) acc[t] += __shfl_xor_sync(0xFFFFFFFFu, acc[t], s);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();  // T is complete and visible from here on
#endif
  if (o >= out) return;
  // Lane t finishes token t: + sum_c T(t, c) B(o, c), one rounding.
  if (lane < tokens) {
    float v = 0.0f;
#pragma unroll
    for (int t = 0; t < NT; ++t)
      if (t == lane) v = acc[t];
    for (int c = 0; c < r; ++c) v = __fmaf_rn(t_in[lane * r + c], ld(b, o * b_rs + c * b_cs), v);
    st(y, lane * ldy + o, v);
  }
}

// bf16 with tensor cores (mma.sync m16n8k16, fp32 accumulation): a block owns 16 output rows and
// its 16 warps split the input dimension in 32-wide chunks (warp w takes chunks w, w + 16, ...).
// Within a chunk, lane (g = lane / 4, t = lane % 4) loads 16 bytes of W rows g and g + 8 and of X
// rows (tokens) g and g + 8 at columns 8t..8t+7; the products' k order is permuted the same way
// for W and X, so the fragments come straight from those loads. The warps' partial sums are
// added in a fixed order through shared memory, then T B^T, then one rounding into Y.
__device__ __forceinline__ void mma_bf16(float (&c)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                         std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// 16-byte read-only load. Volatile asm keeps the issue order of these loads and of the mma
// instructions as written: all loads of an unrolled step are in flight before the first mma.
// Rows outside the matrix read a valid row (the caller clamps the pointer) and are zeroed here.
__device__ __forceinline__ uint4 ldg16(const __nv_bfloat16* p, bool ok) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  if (!ok) v = make_uint4(0u, 0u, 0u, 0u);
  return v;
}

constexpr int kMmaWarps = 16;

template <int NTILES>
__global__ void __launch_bounds__(kMmaWarps * 32) lora_mma_kernel(const __nv_bfloat16* __restrict__ x, std::int64_t ldx,
                                                       const __nv_bfloat16* __restrict__ w, std::int64_t ldw,
                                                       const __nv_bfloat16* __restrict__ b, std::int64_t b_rs,
                                                       std::int64_t b_cs, const float* __restrict__ t_in,
                                                       __nv_bfloat16* __restrict__ y, std::int64_t ldy, int tokens,
                                                       std::int64_t in, std::int64_t out, int r) {
  __shared__ float red[kMmaWarps][16][17];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const std::int64_t o0 = static_cast<std::int64_t>(blockIdx.x) * 16;
  const bool row_lo = o0 + g < out, row_hi = o0 + g + 8 < out;
  const __nv_bfloat16* w_lo = w + (row_lo ? (o0 + g) * ldw : 0) + 8 * t;
  const __nv_bfloat16* w_hi = w + (row_hi ? (o0 + g + 8) * ldw : 0) + 8 * t;
  const __nv_bfloat16* xr[NTILES];
  bool xok[NTILES];
#pragma unroll
  for (int nt = 0; nt < NTILES; ++nt) {
    xok[nt] = nt * 8 + g < tokens;
    xr[nt] = x + (xok[nt] ? (nt * 8 + g) * ldx : 0) + 8 * t;
  }
  float c[NTILES][4];
#pragma unroll
  for (int nt = 0; nt < NTILES; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
  const std::int64_t chunks = in / 32;
  constexpr int U = 4;
  std::int64_t ch = warp;
  for (; ch + kMmaWarps * (U - 1) < chunks; ch += kMmaWarps * U) {
    uint4 wl[U], wh[U], xv[U][NTILES];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const std::int64_t k = (ch + kMmaWarps * u) * 32;
      wl[u] = ldg16(w_lo + k, row_lo);
      wh[u] = ldg16(w_hi + k, row_hi);
#pragma unroll
      for (int nt = 0; nt < NTILES; ++nt) xv[u][nt] = ldg16(xr[nt] + k, xok[nt]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int nt = 0; nt < NTILES; ++nt) {
        mma_bf16(c[nt], wl[u].x, wh[u].x, wl[u].y, wh[u].y, xv[u][nt].x, xv[u][nt].y);
        mma_bf16(c[nt], wl[u].z, wh[u].z, wl[u].w, wh[u].w, xv[u][nt].z, xv[u][nt].w);
      }
  }
  for (; ch < chunks; ch += kMmaWarps) {
    const std::int64_t k = ch * 32;
    const uint4 wl = ldg16(w_lo + k, row_lo), wh = ldg16(w_hi + k, row_hi);
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
      const uint4 xv = ldg16(xr[nt] + k, xok[nt]);
      mma_bf16(c[nt], wl.x, wh.x, wl.y, wh.y, xv.x, xv.y);
      mma_bf16(c[nt], wl.z, wh.z, wl.w, wh.w, xv.z, xv.w);
    }
  }
#pragma unroll
  for (int nt = 0; nt < NTILES; ++nt) {
    red[warp][g][nt * 8 + 2 * t] = c[nt][0];
    red[warp][g][nt * 8 + 2 * t + 1] = c[nt][1];
    red[warp][g + 8][nt * 8 + 2 * t] = c[nt][2];
    red[warp][g + 8][nt * 8 + 2 * t + 1] = c[nt][3];
  }
  __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();  // T is complete and visible from here on
#endif
  const int tok = threadIdx.x >> 4, row = threadIdx.x & 15;
  if (tok < tokens && o0 + row < out) {
    float v = 0.0f;
#pragma unroll
    for (int wv = 0; wv < kMmaWarps; ++wv) v += red[wv][row][tok];
    for (int cc = 0; cc < r; ++cc) v = __fmaf_rn(t_in[tok * r + cc], ld(b, (o0 + row) * b_rs + cc * b_cs), v);
    y[tok * ldy + o0 + row] = __float2bfloat16_rn(v);
  }
}

template <int NTILES>
cudaError_t launch_mma(const LoraSmallLaunch& l, cudaStream_t stream, bool pdl) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>((l.out + 15) / 16));
  config.blockDim = dim3(kMmaWarps * 32);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, lora_mma_kernel<NTILES>, static_cast<const __nv_bfloat16*>(l.x), l.ldx,
                            static_cast<const __nv_bfloat16*>(l.w), l.ldw, static_cast<const __nv_bfloat16*>(l.b),
                            l.b_rs, l.b_cs, static_cast<const float*>(l.t), static_cast<__nv_bfloat16*>(l.y), l.ldy,
                            static_cast<int>(l.tokens), l.in, l.out, static_cast<int>(l.r));
}

template <class T, int NT>
cudaError_t launch_gemv(const LoraSmallLaunch& l, cudaStream_t stream, bool pdl) {
  const auto* x = static_cast<const T*>(l.x);
  const auto* w = static_cast<const T*>(l.w);
  const auto* b = static_cast<const T*>(l.b);
  auto* y = static_cast<T*>(l.y);
  const float* t_in = l.t;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>((l.out * 32 + 255) / 256));
  config.blockDim = dim3(256);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  const int tokens = static_cast<int>(l.tokens), r = static_cast<int>(l.r);
  return cudaLaunchKernelEx(&config, lora_gemv_kernel<T, NT>, x, l.ldx, w, l.ldw, b, l.b_rs, l.b_cs, t_in, y, l.ldy,
                            tokens, l.in, l.out, r);
}

template <class T>
cudaError_t launch_small(const LoraSmallLaunch& l, cudaStream_t stream) {
  int device = 0, major = 0;
  cudaError_t s = cudaGetDevice(&device);
  if (s != cudaSuccess) return s;
  s = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (s != cudaSuccess) return s;
  if (l.r > 0 && l.a_rows) {
    lora_t_rows_kernel<T><<<static_cast<unsigned>(l.tokens), 256, 0, stream>>>(
        static_cast<const T*>(l.x), l.ldx, static_cast<const T*>(l.a), l.a_rs, l.in, static_cast<int>(l.r), l.scale,
        l.t);
    s = cudaGetLastError();
    if (s != cudaSuccess) return s;
  } else if (l.r > 0) {
    const std::int64_t warps = l.tokens * l.r;
    lora_t_kernel<T><<<static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, stream>>>(
        static_cast<const T*>(l.x), l.ldx, static_cast<const T*>(l.a), l.a_rs, l.a_cs, l.tokens, l.in,
        static_cast<int>(l.r), l.scale, l.t);
    s = cudaGetLastError();
    if (s != cudaSuccess) return s;
  }
  const bool pdl = major >= 9 && l.r > 0;
  if constexpr (!std::is_same_v<T, float>) {
    if (l.mma && major >= 8) return l.tokens <= 8 ? launch_mma<1>(l, stream, pdl) : launch_mma<2>(l, stream, pdl);
  }
  if (l.tokens <= 1) return launch_gemv<T, 1>(l, stream, pdl);
  if (l.tokens <= 4) return launch_gemv<T, 4>(l, stream, pdl);
  if (l.tokens <= 8) return launch_gemv<T, 8>(l, stream, pdl);
  return launch_gemv<T, kMaxTokens>(l, stream, pdl);
}

}  // namespace

int launch_lora_term(const LoraSmallLaunch& l, cudaStream_t stream) {
  if (l.r < 1 || l.r > 16) return cudaErrorInvalidValue;
  constexpr int kTpb = 2;
  const unsigned blocks = static_cast<unsigned>((l.tokens + kTpb - 1) / kTpb);
  if (l.dtype == Dtype::f32) {
    lora_term_kernel<float, kTpb><<<blocks, 256, 0, stream>>>(
        static_cast<const float*>(l.x), l.ldx, static_cast<const float*>(l.a), l.a_rs, static_cast<const float*>(l.b),
        l.b_rs, l.b_cs, static_cast<float*>(l.y), l.ldy, l.tokens, l.in, l.out, static_cast<int>(l.r), l.scale);
  } else {
    lora_term_kernel<__nv_bfloat16, kTpb><<<blocks, 256, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(l.x), l.ldx, static_cast<const __nv_bfloat16*>(l.a), l.a_rs,
        static_cast<const __nv_bfloat16*>(l.b), l.b_rs, l.b_cs, static_cast<__nv_bfloat16*>(l.y), l.ldy, l.tokens,
        l.in, l.out, static_cast<int>(l.r), l.scale);
  }
  return cudaGetLastError();
}

int launch_lora_small(const LoraSmallLaunch& l, cudaStream_t stream) {
  if (l.tokens < 1 || l.tokens > kMaxTokens || l.r > 64) return cudaErrorInvalidValue;
  return l.dtype == Dtype::f32 ? launch_small<float>(l, stream) : launch_small<__nv_bfloat16>(l, stream);
}

}  // namespace cuda::detail
LOWRANK_END_NAMESPACE
