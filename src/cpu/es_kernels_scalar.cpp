// Portable ES kernels: the noise through the header's scalar code, the row term with separate
// roundings (this file is compiled with -ffp-contract=off, as the other scalar bodies).
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

}  // namespace

const EsKernels es_kernels_scalar{normals_scalar, row_term_scalar};

}  // namespace detail
LOWRANK_END_NAMESPACE
