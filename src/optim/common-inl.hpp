// Helpers shared by the optimizers (subspace.cpp, block.cpp): the first non-finite entry of an
// fp32 view, and a random k-subset drawn with Philox. Private to src/optim.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include "lowrank/core/philox.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace optim::internal {

// First (row, col) of a NaN or infinity in G, or (-1, -1).
inline std::pair<Index, Index> first_nonfinite(MatrixView<const float> G) {
  for (Index i = 0; i < G.rows; ++i) {
    if (G.col_stride == 1) {
      // Exponent bits all ones <=> NaN or infinity; an OR over the row vectorizes.
      const float* row = &G(i, 0);
      unsigned bad = 0;
      for (Index j = 0; j < G.cols; ++j) {
        std::uint32_t b;
        std::memcpy(&b, row + j, sizeof b);
        bad |= static_cast<unsigned>((b & 0x7f800000u) == 0x7f800000u);
      }
      if (bad == 0) continue;
    }
    for (Index j = 0; j < G.cols; ++j)
      if (!std::isfinite(G(i, j))) return {i, j};
  }
  return {-1, -1};
}

// The first k entries of a uniformly random permutation of 0..len-1 (partial Fisher-Yates; each
// pick from 64 Philox bits of stream `stream` under key `seed`, so the modulo bias is below
// len / 2^64), in draw order.
inline std::vector<Index> random_subset(std::uint64_t seed, std::uint64_t stream, Index len, Index k) {
  const RandomStream rng(seed, stream);
  std::vector<Index> perm(static_cast<std::size_t>(len));
  std::iota(perm.begin(), perm.end(), Index{0});
  for (Index i = 0; i < k; ++i) {
    const auto span = static_cast<std::uint64_t>(len - i);
    const std::uint64_t wide = (static_cast<std::uint64_t>(rng.bits(2 * static_cast<std::uint64_t>(i))) << 32) |
                               rng.bits(2 * static_cast<std::uint64_t>(i) + 1);
    const auto pick = static_cast<Index>(i + static_cast<Index>(wide % span));
    std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(pick)]);
  }
  perm.resize(static_cast<std::size_t>(k));
  return perm;
}

}  // namespace optim::internal
LOWRANK_END_NAMESPACE
