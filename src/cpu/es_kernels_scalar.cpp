// Portable ES kernels: the noise through the header's scalar code, the row term with separate
// roundings (this file is compiled with -ffp-contract=off, as the other scalar bodies), and the
// update accumulation with explicit fused multiply-adds, so that the EGGROLL update is bitwise the
// SIMD targets' (std::fma is a library call where the build has no FMA instructions: slow, exact).
#include <cmath>

#include "es_kernels_api.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace {

void normals_scalar(const es::NoiseKey& key, std::uint32_t index, std::uint32_t first_block, std::uint64_t blocks,
                    float* out) {
  for (std::uint64_t b = 0; b < blocks; ++b) {
    es::noise_normals4(key, index, static_cast<std::uint32_t>(first_block + b), out + 4 * b);
  }
}

void row_term_scalar(const float* x, const float* bt, const float* at, std::ptrdiff_t in, std::ptrdiff_t out, int r,
                     float scale, float* y) {
  for (int j = 0; j < r; ++j) {
    const float* b = bt + j * in;
    float dot = 0;
    for (std::ptrdiff_t i = 0; i < in; ++i) dot += x[i] * b[i];
    const float c = scale * dot;
    const float* a = at + j * out;
    for (std::ptrdiff_t o = 0; o < out; ++o) y[o] += c * a[o];
  }
}

void factors_t4_scalar(const es::NoiseKey& key, std::uint32_t index, std::ptrdiff_t in, std::ptrdiff_t out,
                       float* bt, std::ptrdiff_t ldb, float* at, std::ptrdiff_t lda) {
  float z[4];
  for (std::ptrdiff_t i = 0; i < in; ++i) {
    es::noise_normals4(key, index, static_cast<std::uint32_t>(i), z);
    for (int j = 0; j < 4; ++j) bt[j * ldb + i] = z[j];
  }
  for (std::ptrdiff_t i = 0; i < out; ++i) {
    es::noise_normals4(key, index, static_cast<std::uint32_t>(in + i), z);
    for (int j = 0; j < 4; ++j) at[j * lda + i] = z[j];
  }
}

void update_fused_scalar(float* g, std::ptrdiff_t rs, std::ptrdiff_t cs, const float* u, const float* v,
                         std::ptrdiff_t row0, std::ptrdiff_t rows, std::ptrdiff_t out, std::ptrdiff_t in,
                         std::ptrdiff_t k) {
  for (std::ptrdiff_t i = row0; i < row0 + rows; ++i) {
    for (std::ptrdiff_t j = 0; j < in; ++j) {
      float acc = g[i * rs + j * cs];
      for (std::ptrdiff_t p = 0; p < k; ++p) acc = std::fma(u[p * out + i], v[p * in + j], acc);
      g[i * rs + j * cs] = acc;
    }
  }
}

}  // namespace

const EsKernels es_kernels_scalar{normals_scalar, row_term_scalar, factors_t4_scalar, update_fused_scalar, nullptr};

}  // namespace detail
LOWRANK_END_NAMESPACE
