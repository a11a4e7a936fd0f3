// W += alpha U V^T on the device: a bandwidth-bound kernel for row-major W with aligned rows and
// rank <= 16 (V in registers, alpha U staged in shared memory, several rows of loads in flight),
// and a generic one-thread-per-element kernel for everything else. Both compute every element as
// the CPU's SIMD targets do (rank_update.cpp): acc = W, acc = fma(float(alpha * double(U(i, k))),
// V(j, k), acc) for k in order, one rounding into storage.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launch.hpp"
#include "lowrank/core/philox.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda::detail {
namespace {

// ---- storage conversions (bit-exact copies of src/cpu/float_bits-inl.hpp and rank_update.cpp) ----

struct Bf16s {
  std::uint16_t bits;
};
struct F16s {
  std::uint16_t bits;
};

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(Bf16s h) { return __uint_as_float(static_cast<std::uint32_t>(h.bits) << 16); }
__device__ __forceinline__ float to_f32(F16s h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exponent = (h.bits >> 10) & 0x1Fu;
  const std::uint32_t mantissa = h.bits & 0x3FFu;
  if (exponent == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = __fmul_rn(static_cast<float>(mantissa), 0x1.0p-24f);
    return sign ? -magnitude : magnitude;
  }
  return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ __forceinline__ std::uint16_t bf16_nearest(float x) {
  const std::uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  return static_cast<std::uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ std::uint16_t f16_nearest(float x) {
  const std::uint32_t bits = __float_as_uint(x);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  if (abs >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
  if (abs >= 0x38800000u) {
    const std::uint32_t mantissa = abs & 0x7FFFFFu;
    std::uint32_t h = ((((abs >> 23) - 112u) << 10) | (mantissa >> 13));
    const std::uint32_t rest = mantissa & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  const float scaled = __fmul_rn(__uint_as_float(abs), 0x1.0p24f);
  const float shifted = __fadd_rn(scaled, 0x1.0p23f);
  const float rounded = __fsub_rn(shifted, 0x1.0p23f);
  return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(rounded));
}

__device__ __forceinline__ std::uint16_t bf16_stochastic(float x, std::uint32_t random) {
  const std::uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7F800000u) == 0x7F800000u) return bf16_nearest(x);
  if ((bits & 0x7FFFFFFFu) >= 0x7F7F0000u) return bf16_nearest(x);
  return static_cast<std::uint16_t>((bits + (random >> 16)) >> 16);
}

__device__ __forceinline__ std::uint16_t f16_stochastic(float x, std::uint32_t random) {
  const std::uint32_t bits = __float_as_uint(x);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs >= 0x477FE000u) return f16_nearest(x);
  if (abs >= 0x38800000u) {
    const std::uint32_t mantissa = abs & 0x7FFFFFu;
    std::uint32_t h = ((((abs >> 23) - 112u) << 10) | (mantissa >> 13));
    if ((random & 0x1FFFu) < (mantissa & 0x1FFFu)) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  const float scaled = __fmul_rn(__uint_as_float(abs), 0x1.0p24f);
  const float floor_value = floorf(scaled);
  std::uint32_t h = static_cast<std::uint32_t>(floor_value);
  if (uniform_from_bits(random) < __fsub_rn(scaled, floor_value)) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

__device__ __forceinline__ void store(float& out, float x, bool, std::uint32_t) { out = x; }
__device__ __forceinline__ void store(Bf16s& out, float x, bool stochastic, std::uint32_t random) {
  out.bits = stochastic ? bf16_stochastic(x, random) : bf16_nearest(x);
}
__device__ __forceinline__ void store(F16s& out, float x, bool stochastic, std::uint32_t random) {
  out.bits = stochastic ? f16_stochastic(x, random) : f16_nearest(x);
}

// Stochastic-rounding bits of canonical element (i, j), with a one-block cache (consecutive
// elements usually share a Philox block).
struct RoundingBits {
  RandomStream random;
  std::uint64_t row0, col0, cols;
  bool transposed;
  std::uint64_t cached = ~std::uint64_t{0};
  Philox4x32Block block{};

  __device__ std::uint32_t operator()(std::int64_t i, std::int64_t j) {
    const auto ui = static_cast<std::uint64_t>(transposed ? j : i);
    const auto uj = static_cast<std::uint64_t>(transposed ? i : j);
    const std::uint64_t index = (row0 + ui) * cols + col0 + uj;
    if ((index >> 2) != cached) {
      cached = index >> 2;
      block = random.block(cached);
    }
    const unsigned lane = static_cast<unsigned>(index & 3u);
    return lane == 0 ? block.v[0] : lane == 1 ? block.v[1] : lane == 2 ? block.v[2] : block.v[3];
  }
};

struct Params {
  std::int64_t m, n, w_rs, w_cs, u_rs, u_cs, v_rs, v_cs;
  int r;
  double alpha_u, alpha_v;
  bool stochastic;
  bool transposed;
  std::uint64_t seed, stream_id, row0, col0, cols;
};

__device__ RoundingBits make_bits(const Params& p) {
  return RoundingBits{RandomStream(p.seed, p.stream_id), p.row0, p.col0, p.cols, p.transposed};
}

// ---- generic kernel: one element per thread, any strides, any rank ----------------------------

template <class TW>
__global__ void rank_update_generic(TW* __restrict__ w, const float* __restrict__ u, const float* __restrict__ v,
                                    Params p) {
  RoundingBits bits = make_bits(p);
  const std::int64_t total = p.m * p.n;
  for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = e / p.n, j = e % p.n;
    TW& out = w[i * p.w_rs + j * p.w_cs];
    float acc = to_f32(out);
    for (int k = 0; k < p.r; ++k) {
      const float a = static_cast<float>(p.alpha_u * static_cast<double>(u[i * p.u_rs + k * p.u_cs]));
      const float b = static_cast<float>(p.alpha_v * static_cast<double>(v[j * p.v_rs + k * p.v_cs]));
      acc = __fmaf_rn(a, b, acc);
    }
    store(out, acc, p.stochastic, p.stochastic ? bits(i, j) : 0u);
  }
}

// ---- fast kernel: row-major W, VEC-aligned rows, rank <= RMAX ---------------------------------

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 64;

// VEC elements of TW as one load: 16 bytes (fp32 x 4, 16-bit x 8) or 8 bytes (16-bit x 4).
template <class TW, int VEC>
struct Vec {
  static constexpr int words = VEC * static_cast<int>(sizeof(TW)) / 4;
  using Load = std::conditional_t<words == 4, uint4, uint2>;
};

template <class TW, int VEC>
__device__ __forceinline__ void unpack(const typename Vec<TW, VEC>::Load& in, float (&out)[VEC]) {
  std::uint32_t w[Vec<TW, VEC>::words];
  if constexpr (Vec<TW, VEC>::words == 4) {
    w[0] = in.x, w[1] = in.y, w[2] = in.z, w[3] = in.w;
  } else {
    w[0] = in.x, w[1] = in.y;
  }
  if constexpr (sizeof(TW) == 4) {
#pragma unroll
    for (int c = 0; c < VEC; ++c) out[c] = __uint_as_float(w[c]);
  } else {
#pragma unroll
    for (int q = 0; q < VEC / 2; ++q) {
      out[2 * q] = to_f32(TW{static_cast<std::uint16_t>(w[q] & 0xFFFFu)});
      out[2 * q + 1] = to_f32(TW{static_cast<std::uint16_t>(w[q] >> 16)});
    }
  }
}

// Nearest-even rounding of two floats into one word of 16-bit storage by the hardware conversion
// (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 on sm_80+: one instruction for two elements instead of
// about seven integer operations each). It rounds finite values, infinities and subnormals as
// bf16_nearest / f16_nearest do, but gives NaNs the canonical NaN: a pair whose sum is NaN (a
// NaN, or infinities of both signs) takes the integer code instead, which is exact for any input.
__device__ __forceinline__ std::uint32_t pack2_hw(Bf16s, float lo, float hi) {
  const float sum = lo + hi;
  if (sum != sum) {
    return static_cast<std::uint32_t>(bf16_nearest(lo)) | (static_cast<std::uint32_t>(bf16_nearest(hi)) << 16);
  }
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return static_cast<std::uint32_t>(__bfloat16_as_ushort(h.x)) |
         (static_cast<std::uint32_t>(__bfloat16_as_ushort(h.y)) << 16);
}
__device__ __forceinline__ std::uint32_t pack2_hw(F16s, float lo, float hi) {
  const float sum = lo + hi;
  if (sum != sum) {
    return static_cast<std::uint32_t>(f16_nearest(lo)) | (static_cast<std::uint32_t>(f16_nearest(hi)) << 16);
  }
  const __half2 h = __floats2half2_rn(lo, hi);
  return static_cast<std::uint32_t>(__half_as_ushort(h.x)) | (static_cast<std::uint32_t>(__half_as_ushort(h.y)) << 16);
}

// VEC floats rounded (nearest-even) into one load's worth of TW; HW: 16-bit storage by the
// hardware conversion (pack2_hw), same bits.
template <class TW, int VEC, bool HW = false>
__device__ __forceinline__ typename Vec<TW, VEC>::Load pack(const float (&v)[VEC]) {
  std::uint32_t w[Vec<TW, VEC>::words];
  if constexpr (sizeof(TW) == 4) {
#pragma unroll
    for (int c = 0; c < VEC; ++c) w[c] = __float_as_uint(v[c]);
  } else if constexpr (HW) {
#pragma unroll
    for (int q = 0; q < VEC / 2; ++q) w[q] = pack2_hw(TW{}, v[2 * q], v[2 * q + 1]);
  } else {
#pragma unroll
    for (int q = 0; q < VEC / 2; ++q) {
      TW lo, hi;
      store(lo, v[2 * q], false, 0u);
      store(hi, v[2 * q + 1], false, 0u);
      w[q] = static_cast<std::uint32_t>(lo.bits) | (static_cast<std::uint32_t>(hi.bits) << 16);
    }
  }
  typename Vec<TW, VEC>::Load out;
  if constexpr (Vec<TW, VEC>::words == 4) {
    out.x = w[0], out.y = w[1], out.z = w[2], out.w = w[3];
  } else {
    out.x = w[0], out.y = w[1];
  }
  return out;
}

// One 16-byte (8-byte) global store, an ordinary weak one. A plain assignment through a uint4
// pointer compiled to four 4-byte stores (nvcc 13.0, sm_90); __stwb gives a .STRONG.SM store.
__device__ __forceinline__ void store_vec(uint4* p, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void store_vec(uint2* p, const uint2& v) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y));
}

// V's rows for this thread's columns j.., scaled by alpha_v, in registers (zero past n and r).
template <int VEC, int RMAX>
__device__ __forceinline__ void load_v(float (&vr)[VEC][RMAX], const float* __restrict__ v, const Params& p,
                                       std::int64_t j) {
#pragma unroll
  for (int c = 0; c < VEC; ++c)
#pragma unroll
    for (int k = 0; k < RMAX; ++k)
      vr[c][k] = (k < p.r && j + c < p.n)
                     ? static_cast<float>(p.alpha_v * static_cast<double>(v[(j + c) * p.v_rs + k * p.v_cs]))
                     : 0.0f;
}

// alpha U of rows i0 .. i0 + rows - 1 into shared memory (all threads of the block).
template <int RMAX>
__device__ __forceinline__ void stage_u(float (*au)[RMAX], const float* __restrict__ u, const Params& p,
                                        std::int64_t i0, int rows) {
  for (int e = threadIdx.x; e < rows * p.r; e += kThreads) {
    const int ii = e / p.r, k = e % p.r;
    au[ii][k] = static_cast<float>(p.alpha_u * static_cast<double>(u[(i0 + ii) * p.u_rs + k * p.u_cs]));
  }
}

// Issues the loads of rows i .. i + min(count, UNROLL) - 1 at columns j.. into `buf`.
template <class TW, int VEC, int UNROLL>
__device__ __forceinline__ void issue_rows(typename Vec<TW, VEC>::Load (&buf)[UNROLL], const TW* __restrict__ w,
                                           const Params& p, std::int64_t j, bool full, std::int64_t i, int count) {
  if (!full) return;
#pragma unroll
  for (int q = 0; q < UNROLL; ++q)
    if (q < count) buf[q] = *reinterpret_cast<const typename Vec<TW, VEC>::Load*>(w + (i + q) * p.w_rs + j);
}

// Updates rows i0 + ii + q (q < UNROLL, ii + q < rows) of the chunk starting at row i0: `au` holds
// the chunk's alpha U, `buf` the rows' loads (when `full`). SR: stochastic rounding; HW: full
// 16-bit vectors rounded by the hardware conversion (pack2_hw).
template <class TW, int VEC, int RMAX, int UNROLL, bool SR, bool HW>
__device__ __forceinline__ void update_rows(const typename Vec<TW, VEC>::Load (&buf)[UNROLL], TW* __restrict__ w,
                                            const Params& p, const float (&vr)[VEC][RMAX],
                                            const float (*au)[RMAX], std::int64_t j, bool full, std::int64_t i0,
                                            int ii, int rows) {
  if (j >= p.n) return;
#pragma unroll
  for (int q = 0; q < UNROLL; ++q) {
    if (ii + q >= rows) continue;
    const std::int64_t i = i0 + ii + q;
    TW* row = w + i * p.w_rs;
    float acc[VEC];
    if (full) {
      unpack<TW, VEC>(buf[q], acc);
    } else {
#pragma unroll
      for (int c = 0; c < VEC; ++c) acc[c] = j + c < p.n ? to_f32(row[j + c]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < RMAX; ++k) {
      if (k < p.r) {
        const float a = au[ii + q][k];
#pragma unroll
        for (int c = 0; c < VEC; ++c) acc[c] = __fmaf_rn(a, vr[c][k], acc[c]);
      }
    }
    if constexpr (SR) {
      RoundingBits bits = make_bits(p);
#pragma unroll
      for (int c = 0; c < VEC; ++c)
        if (j + c < p.n) store(row[j + c], acc[c], true, bits(i, j + c));
    } else if (full) {
      store_vec(reinterpret_cast<typename Vec<TW, VEC>::Load*>(row + j), pack<TW, VEC, HW>(acc));
    } else {
#pragma unroll
      for (int c = 0; c < VEC; ++c)
        if (j + c < p.n) store(row[j + c], acc[c], false, 0u);
    }
  }
}

// Grid: x over column strips of kThreads * VEC columns, y over row chunks (each block loops over
// chunks blockIdx.y, blockIdx.y + gridDim.y, ...): V is loaded into registers once per block and
// reused for all its rows; alpha U of each chunk is staged in shared memory.
template <class TW, int VEC, int RMAX, int UNROLL, bool SR>
__global__ void __launch_bounds__(kThreads, 2) rank_update_rows(TW* __restrict__ w, const float* __restrict__ u,
                                                                const float* __restrict__ v, Params p) {
  using Load = typename Vec<TW, VEC>::Load;
  __shared__ float au[kRowsPerBlock][RMAX];
  const std::int64_t j = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  float vr[VEC][RMAX];
  load_v(vr, v, p, j);
  const bool full = j + VEC <= p.n;
  const std::int64_t chunks = (p.m + kRowsPerBlock - 1) / kRowsPerBlock;
  for (std::int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const std::int64_t i0 = chunk * kRowsPerBlock;
    const int rows = static_cast<int>(p.m - i0 < kRowsPerBlock ? p.m - i0 : kRowsPerBlock);
    __syncthreads();  // the previous chunk's reads of au are done
    stage_u(au, u, p, i0, rows);
    __syncthreads();
    if (j >= p.n) continue;
    for (int ii = 0; ii < rows; ii += UNROLL) {
      // All UNROLL rows' loads in flight first; then each row is widened, updated and stored.
      Load raw[UNROLL];
      issue_rows<TW, VEC, UNROLL>(raw, w, p, j, full, i0 + ii, rows - ii);
      update_rows<TW, VEC, RMAX, UNROLL, SR, false>(raw, w, p, vr, au, j, full, i0, ii, rows);
    }
  }
}

// Variant with software-pipelined loads (DeviceRankUpdateOptions::pipelined). Each block owns one
// contiguous range of rows; the loads of the next UNROLL rows are issued into a second register
// buffer before the current UNROLL rows are widened, updated and stored, so a thread always has a
// batch of loads in flight, also across the 64-row chunks of alpha U. Same arithmetic, same bits;
// full 16-bit vectors are rounded by the hardware conversion (pack2_hw). Nearest-even only.
template <class TW, int VEC, int RMAX, int UNROLL>
__global__ void __launch_bounds__(kThreads, 2) rank_update_pipelined(TW* __restrict__ w, const float* __restrict__ u,
                                                                     const float* __restrict__ v, Params p,
                                                                     std::int64_t rows_per_block) {
  static_assert(kRowsPerBlock % (2 * UNROLL) == 0, "a chunk holds whole pairs of batches");
  using Load = typename Vec<TW, VEC>::Load;
  __shared__ float au[kRowsPerBlock][RMAX];
  const std::int64_t j = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  float vr[VEC][RMAX];
  load_v(vr, v, p, j);
  const bool full = j + VEC <= p.n;
  const std::int64_t begin = static_cast<std::int64_t>(blockIdx.y) * rows_per_block;
  const std::int64_t end = p.m - begin < rows_per_block ? p.m : begin + rows_per_block;
  // Rows from i on that this block may load (at most UNROLL matter).
  const auto left = [end](std::int64_t i) { return end - i < UNROLL ? static_cast<int>(end - i) : UNROLL; };
  Load buf0[UNROLL], buf1[UNROLL];
  issue_rows<TW, VEC, UNROLL>(buf0, w, p, j, full, begin, left(begin));
  for (std::int64_t i0 = begin; i0 < end; i0 += kRowsPerBlock) {
    const int rows = static_cast<int>(end - i0 < kRowsPerBlock ? end - i0 : kRowsPerBlock);
    __syncthreads();  // the previous chunk's reads of au are done
    stage_u(au, u, p, i0, rows);
    __syncthreads();
    // buf0 holds rows i0 + ii.. on entry of every iteration (a chunk is an even number of batches;
    // the last issue of a chunk is the next chunk's first batch).
    for (int ii = 0; ii < rows; ii += 2 * UNROLL) {
      issue_rows<TW, VEC, UNROLL>(buf1, w, p, j, full, i0 + ii + UNROLL, left(i0 + ii + UNROLL));
      update_rows<TW, VEC, RMAX, UNROLL, false, true>(buf0, w, p, vr, au, j, full, i0, ii, rows);
      issue_rows<TW, VEC, UNROLL>(buf0, w, p, j, full, i0 + ii + 2 * UNROLL, left(i0 + ii + 2 * UNROLL));
      update_rows<TW, VEC, RMAX, UNROLL, false, true>(buf1, w, p, vr, au, j, full, i0, ii + UNROLL, rows);
    }
  }
}

template <class TW, int RMAX>
cudaError_t launch_rows(TW* w, const float* u, const float* v, const Params& p, bool pipelined, cudaStream_t stream) {
  // 16-byte accesses except for 16-bit storage at rank > 2 (8 bytes: V's registers are VEC x RMAX).
  constexpr int VEC = sizeof(TW) == 2 && RMAX <= 2 ? 8 : 4;
  constexpr int UNROLL = RMAX > 4 ? (sizeof(TW) == 2 ? 8 : 4) : VEC * sizeof(TW) == 16 ? 8 : 16;
  // The pipelined kernel holds two batches of loads: 16-bit storage at rank > 4 takes batches of 4
  // rows (8 spilled at 128 registers; ptxas, sm_90).
  constexpr int PIPE_UNROLL = RMAX > 4 && sizeof(TW) == 2 ? 4 : UNROLL;
  const std::int64_t col_blocks = (p.n + static_cast<std::int64_t>(kThreads) * VEC - 1) / (kThreads * VEC);
  const std::int64_t chunks = (p.m + kRowsPerBlock - 1) / kRowsPerBlock;
  if (col_blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  // One wave of two blocks per multiprocessor, each looping over an equal number of row chunks
  // (V is loaded once per block).
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    sms = 132;
  }
  std::int64_t row_blocks = (2 * static_cast<std::int64_t>(sms) + col_blocks - 1) / col_blocks;
  row_blocks = row_blocks < chunks ? row_blocks : chunks;
  const std::int64_t per_block = (chunks + row_blocks - 1) / row_blocks;
  row_blocks = (chunks + per_block - 1) / per_block;
  if (pipelined && !p.stochastic) {
    // Contiguous row ranges of whole chunks, at most 65535 of them. (Stochastic rounding stays on
    // rank_update_rows: it is not bandwidth-bound, and every instantiation costs build time.)
    const std::int64_t chunks_per_block = per_block > (chunks + 65534) / 65535 ? per_block : (chunks + 65534) / 65535;
    const std::int64_t rows_per_block = chunks_per_block * kRowsPerBlock;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((chunks + chunks_per_block - 1) /
                                                                             chunks_per_block));
    rank_update_pipelined<TW, VEC, RMAX, PIPE_UNROLL><<<grid, kThreads, 0, stream>>>(w, u, v, p, rows_per_block);
    return cudaGetLastError();
  }
  row_blocks = row_blocks < 65535 ? row_blocks : 65535;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
  if (p.stochastic) {
    if constexpr (sizeof(TW) == 2) {
      rank_update_rows<TW, VEC, RMAX, UNROLL, true><<<grid, kThreads, 0, stream>>>(w, u, v, p);
      return cudaGetLastError();
    }
  }
  rank_update_rows<TW, VEC, RMAX, UNROLL, false><<<grid, kThreads, 0, stream>>>(w, u, v, p);
  return cudaGetLastError();
}

template <class TW>
cudaError_t dispatch(TW* w, const float* u, const float* v, const Params& p, bool pipelined, cudaStream_t stream) {
  // The fast kernels need rows aligned to their access width (16 bytes; 8 for 16-bit storage at
  // rank > 2).
  const int vec = sizeof(TW) == 2 && p.r <= 2 ? 8 : 4;
  const bool aligned = p.w_cs == 1 && p.w_rs % vec == 0 &&
                       reinterpret_cast<std::uintptr_t>(w) % (vec * sizeof(TW)) == 0;
  if (aligned && p.r <= 16) {
    if (p.r == 1) return launch_rows<TW, 1>(w, u, v, p, pipelined, stream);
    if (p.r <= 2) return launch_rows<TW, 2>(w, u, v, p, pipelined, stream);
    if (p.r <= 4) return launch_rows<TW, 4>(w, u, v, p, pipelined, stream);
    if (p.r <= 8) return launch_rows<TW, 8>(w, u, v, p, pipelined, stream);
    return launch_rows<TW, 16>(w, u, v, p, pipelined, stream);
  }
  const std::int64_t total = p.m * p.n;
  std::int64_t blocks = (total + 255) / 256;
  if (blocks > 65536L * 32) blocks = 65536L * 32;
  rank_update_generic<TW><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(w, u, v, p);
  return cudaGetLastError();
}

// pack2_hw against the integer rounding for every float bit pattern x in the low half, paired
// with the pattern x * 2654435761 (mod 2^32, also every pattern) in the high half:
// counts[0] += bf16 words that differ, counts[1] += fp16 words that differ.
__global__ void hw_rounding_check(unsigned long long* counts) {
  unsigned long long bad_bf16 = 0, bad_f16 = 0;
  const std::uint64_t step = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t e = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < (1ull << 32);
       e += step) {
    const float x = __uint_as_float(static_cast<std::uint32_t>(e));
    const float y = __uint_as_float(static_cast<std::uint32_t>(e) * 2654435761u);
    const std::uint32_t bf16 = bf16_nearest(x) | (static_cast<std::uint32_t>(bf16_nearest(y)) << 16);
    const std::uint32_t f16 = f16_nearest(x) | (static_cast<std::uint32_t>(f16_nearest(y)) << 16);
    bad_bf16 += pack2_hw(Bf16s{}, x, y) != bf16;
    bad_f16 += pack2_hw(F16s{}, x, y) != f16;
  }
  if (bad_bf16 != 0) atomicAdd(&counts[0], bad_bf16);
  if (bad_f16 != 0) atomicAdd(&counts[1], bad_f16);
}

}  // namespace

int launch_rounding_self_check(unsigned long long* counts, cudaStream_t stream) {
  hw_rounding_check<<<2048, 256, 0, stream>>>(counts);
  return cudaGetLastError();
}

int launch_rank_update(const RankUpdateLaunch& l, cudaStream_t stream) {
  const Params p{l.m,       l.n,       l.w_rs,       l.w_cs,       l.u_rs, l.u_cs,
                 l.v_rs,    l.v_cs,    static_cast<int>(l.r), l.alpha_u, l.alpha_v, l.stochastic,
                 l.transposed, l.seed, l.stream_id, l.index_row0, l.index_col0, l.index_cols};
  switch (l.dtype) {
    case Dtype::f32: return dispatch(static_cast<float*>(l.w), l.u, l.v, p, l.pipelined, stream);
    case Dtype::bf16: return dispatch(static_cast<Bf16s*>(l.w), l.u, l.v, p, l.pipelined, stream);
    case Dtype::f16: return dispatch(static_cast<F16s*>(l.w), l.u, l.v, p, l.pipelined, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda::detail
LOWRANK_END_NAMESPACE
