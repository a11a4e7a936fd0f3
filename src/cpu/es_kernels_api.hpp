// Interface between the ES code (src/es/) and the per-ISA ES kernel translation units. Plain
// declarations only (see kernel_api.hpp for why).
#pragma once

#include <cstddef>
#include <cstdint>

#include "lowrank/core/config.hpp"
#include "lowrank/es/noise.hpp"
#include "lowrank/kernels/targets.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

struct EsKernels {
  // out[0 .. 4 blocks) = normals 4 first_block .. 4 (first_block + blocks) of the stream of
  // (key, index); bitwise identical to es::noise_normals4 on every target.
  void (*normals)(const es::NoiseKey& key, std::uint32_t index, std::uint32_t first_block, std::uint64_t blocks,
                  float* out);
  // y[0..out) += sum_j c_j at[j * out + o] for j = 0..r-1 with c_j = fl(scale * dot(x, bt[j * in ..])),
  // x, y contiguous; bt is r x in, at is r x out (row-major, contiguous).
  void (*row_term)(const float* x, const float* bt, const float* at, std::ptrdiff_t in, std::ptrdiff_t out, int r,
                   float scale, float* y);
  // Rank-4 factors written transposed: bt (4 x in, row j at bt + j * ldb) and at (4 x out, row j
  // at at + j * lda), i.e. bt[j * ldb + i] = element 4 i + j and at[j * lda + i] = element
  // 4 (in + i) + j of the stream.
  void (*factors_t4)(const es::NoiseKey& key, std::uint32_t index, std::ptrdiff_t in, std::ptrdiff_t out, float* bt,
                     std::ptrdiff_t ldb, float* at, std::ptrdiff_t lda);
  // Only the scalar target (nullptr elsewhere): rows [row0, row0 + rows) of G (element (i, j) at
  // g[i * rs + j * cs]) += U V^T with U column-major (out x k, ld out) and V column-major (in x k,
  // ld in), each element as acc = G(i, j); for p in 0..k-1: acc = fma(U(i, p), V(j, p), acc) with
  // correctly rounded fused multiply-adds: bitwise what rank_update's SIMD targets compute.
  void (*update_fused)(float* g, std::ptrdiff_t rs, std::ptrdiff_t cs, const float* u, const float* v,
                       std::ptrdiff_t row0, std::ptrdiff_t rows, std::ptrdiff_t out, std::ptrdiff_t in,
                       std::ptrdiff_t k);
  // Optional (nullptr: use factors_t4 and row_term): the rank-4 factors of (key, index) applied
  // to rows 0 <= q < rows (rows <= kMaxFusedRows), x[q] and y[q] contiguous, without storing the
  // factors; bitwise what factors_t4 followed by row_term(x[q], bt, at, in, out, 4, scale[q], y[q])
  // for each q computes.
  void (*row_terms_t4)(const es::NoiseKey& key, std::uint32_t index, std::ptrdiff_t in, std::ptrdiff_t out, int rows,
                       const float* const* x, float* const* y, const float* scale);
};

// Most rows one row_terms_t4 call takes (its accumulators live on the stack).
inline constexpr int kMaxFusedRows = 8;

extern const EsKernels es_kernels_scalar;
#if defined(LOWRANK_HAVE_AVX2)
extern const EsKernels es_kernels_avx2;
#endif

const EsKernels& es_kernels(Target target);

}  // namespace detail
LOWRANK_END_NAMESPACE
