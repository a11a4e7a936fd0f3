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
};

extern const EsKernels es_kernels_scalar;
#if defined(LOWRANK_HAVE_AVX2)
extern const EsKernels es_kernels_avx2;
#endif

const EsKernels& es_kernels(Target target);

}  // namespace detail
LOWRANK_END_NAMESPACE
