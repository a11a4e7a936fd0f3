// Internal interface between the host-side API (api.cpp: validation, cuBLAS) and the kernels
// (*.cu). Plain C++ without Eigen, so that nvcc never compiles Eigen.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "lowrank/es/noise.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace cuda::detail {

enum class Dtype : int { f32, bf16, f16 };

// A strided matrix of any storage type.
struct Mat {
  const void* data;
  std::int64_t rows, cols, rs, cs;
};

struct RankUpdateLaunch {
  Dtype dtype;
  void* w;
  std::int64_t m, n, w_rs, w_cs;  // canonical view (transposed when the user's W is column-major)
  const float* u;                 // m x r, scaled by alpha_u
  std::int64_t u_rs, u_cs;
  const float* v;                 // n x r, scaled by alpha_v (each product rounded once to fp32)
  std::int64_t v_rs, v_cs;
  std::int64_t r;
  double alpha_u, alpha_v;        // the user's alpha on the side of the user's U, 1 on the other
  bool stochastic;
  bool transposed;                // canonical (i, j) is the user's (j, i)
  std::uint64_t seed, stream_id, index_row0, index_col0, index_cols;
  bool pipelined;                 // DeviceRankUpdateOptions::pipelined
};
// Returns a cudaError_t value (0 on success).
int launch_rank_update(const RankUpdateLaunch& p, cudaStream_t stream);
// For the GPU tests: adds to counts[0] (bf16) and counts[1] (fp16), device memory, the number of
// float bit patterns that the hardware conversion of the pipelined rank-update kernel rounds
// differently from the integer code (rank_update.cu).
int launch_rounding_self_check(unsigned long long* counts, cudaStream_t stream);

struct EggrollTermLaunch {
  Dtype dtype;                   // f32 or bf16
  Mat x;                         // rows x in
  void* y;                       // rows x out, row-major
  std::int64_t ldy;
  std::int64_t out;
  es::NoiseKey key;
  int rank;
  float scale;                   // sigma / sqrt(r)
  std::int64_t member0, population;
  es::Antithetic antithetic;
  int grouping;                  // 0: one row per block; 1: rows (2g, 2g+1); 2: rows (g, g + rows/2)
};
// Writes Y = sign sigma/sqrt(r) (X_i B_k) A_k^T for every row.
int launch_eggroll_term(const EggrollTermLaunch& p, cudaStream_t stream);

// Fused LoRA forward for 1..16 tokens (lora_small.cu). Preconditions (checked by the caller): X,
// W, Y with unit column stride; X and W rows 16-byte aligned with `in` a multiple of 8 (32 for
// the tensor-core kernel); r <= 64.
struct LoraSmallLaunch {
  Dtype dtype;  // f32 or bf16
  const void* x;
  std::int64_t ldx;
  const void* w;
  std::int64_t ldw;
  const void* a;
  std::int64_t a_rs, a_cs;
  const void* b;
  std::int64_t b_rs, b_cs;
  void* y;
  std::int64_t ldy;
  float* t;  // workspace: tokens x r fp32
  std::int64_t tokens, in, out, r;
  float scale;
  bool mma;     // bf16 tensor-core kernel (in a multiple of 32, sm_80+); else the FMA kernel
  bool a_rows;  // A row-major with 16-byte aligned rows and r <= 16: T by the one-block-per-token kernel
};
int launch_lora_small(const LoraSmallLaunch& p, cudaStream_t stream);
// Y = s (X A^T) B^T alone, for a medium batch (the fields of LoraSmallLaunch; X, A row-major with
// aligned rows, in % 8 == 0, 1 <= r <= 16; `t` unused), before cuBLAS adds X W^T.
int launch_lora_term(const LoraSmallLaunch& p, cudaStream_t stream);

int launch_noise_factors(const es::NoiseKey& key, std::uint32_t index, float* a, std::int64_t out, std::int64_t a_rs,
                         std::int64_t a_cs, float* b, std::int64_t in, std::int64_t b_rs, std::int64_t b_cs,
                         std::int64_t rank, cudaStream_t stream);

// Randomized SVD helpers (svd_kernels.cu): omega[i] = RandomStream(seed, stream_id).normal(i)
// for i < count; m (l x l col-major fp64) = the transpose of the upper triangle of r (col-major
// fp32, leading dimension ldr), zeros above the diagonal; out = (float) in, both col-major.
int launch_fill_normal(float* omega, std::uint64_t count, std::uint64_t seed, std::uint64_t stream_id,
                       cudaStream_t stream);
int launch_upper_transposed(const float* r, std::int64_t ldr, double* m, std::int64_t l, cudaStream_t stream);
int launch_narrow(const double* in, std::int64_t ldi, float* out, std::int64_t ldo, std::int64_t rows,
                  std::int64_t cols, cudaStream_t stream);

}  // namespace cuda::detail
LOWRANK_END_NAMESPACE
