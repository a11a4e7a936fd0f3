// Fused LoRA forward for a few tokens: W is read once, by a GEMV-like kernel (one warp per output
// row, lanes along the input dimension, 16-byte loads) that adds the low-rank term T B^T before
// its single rounding into Y. T = s X A^T comes from a small kernel launched just before; on
// sm_90 the GEMV kernel is launched as its programmatic dependent and streams W while T is
// computed, waiting for T only at the end (griddepcontrol).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// T(t, c) = scale * X(t, :) . A(c, :), fp32. One warp per (t, c).
template <class T>
__global__ void lora_t_kernel(const T* __restrict__ x, std::int64_t ldx, const T* __restrict__ a, std::int64_t a_rs,
                              std::int64_t a_cs, std::int64_t tokens, std::int64_t in, int r, float scale,
                              float* __restrict__ t_out) {
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
  if (l.r > 0) {
    const std::int64_t warps = l.tokens * l.r;
    lora_t_kernel<T><<<static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, stream>>>(
        static_cast<const T*>(l.x), l.ldx, static_cast<const T*>(l.a), l.a_rs, l.a_cs, l.tokens, l.in,
        static_cast<int>(l.r), l.scale, l.t);
    s = cudaGetLastError();
    if (s != cudaSuccess) return s;
  }
  const bool pdl = major >= 9 && l.r > 0;
  if (l.tokens <= 1) return launch_gemv<T, 1>(l, stream, pdl);
  if (l.tokens <= 4) return launch_gemv<T, 4>(l, stream, pdl);
  if (l.tokens <= 8) return launch_gemv<T, 8>(l, stream, pdl);
  return launch_gemv<T, kMaxTokens>(l, stream, pdl);
}

}  // namespace

int launch_lora_small(const LoraSmallLaunch& l, cudaStream_t stream) {
  if (l.tokens < 1 || l.tokens > kMaxTokens || l.r > 64) return cudaErrorInvalidValue;
  return l.dtype == Dtype::f32 ? launch_small<float>(l, stream) : launch_small<__nv_bfloat16>(l, stream);
}

}  // namespace cuda::detail
LOWRANK_END_NAMESPACE
