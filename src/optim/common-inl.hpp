// Helpers shared by the optimizers (adam.cpp, subspace.cpp, block.cpp): the first non-finite entry
// of an fp32 view, a random k-subset drawn with Philox, and the fused element-wise AdamW update
// (moments, weight decay at its placement, the weight) with its row-sliced threading. Private to
// src/optim.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include "lowrank/core/philox.hpp"
#include "lowrank/core/threading.hpp"
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

// sign(x) in {-1, 0, +1} (0 for zeros and NaN), branch-free so that loops over it vectorize.
inline float sign_of(float x) { return (x > 0.0f ? 1.0f : 0.0f) - (x < 0.0f ? 1.0f : 0.0f); }

// w after weight decay and the update u at their placement: `w (1 - decay) - u` (before) or
// `w - u`, then `- decay (w - u)` (after), in this order of fp32 operations.
inline float decayed_update(float w, float u, float decay, bool before) {
  if (before) return w * (1.0f - decay) - u;
  w = w - u;
  return w - decay * w;
}

// The fp32 scalars of one AdamW step: u = step * m / (sqrt(v) + eps) (adam_scalars' forms).
struct AdamCoefficients {
  float b1 = 0, c1 = 0, b2 = 0, c2 = 0, eps = 0, step = 0;
  float decay = 0;  // lr * weight_decay
  bool before = true;
};

// Rows [i0, i1) of one AdamW step in one pass: m, v (row-major, W's shape) and W.
inline void adam_rows(MatrixView<float> W, MatrixView<const float> G, float* m, float* v, Index i0, Index i1,
                      const AdamCoefficients& k) {
  const Index n = W.cols;
  for (Index i = i0; i < i1; ++i) {
    float* mi = m + i * n;
    float* vi = v + i * n;
    if (W.col_stride == 1 && G.col_stride == 1) {
      float* w = &W(i, 0);
      const float* g = &G(i, 0);
      for (Index j = 0; j < n; ++j) {
        const float mj = k.b1 * mi[j] + k.c1 * g[j];
        const float vj = k.b2 * vi[j] + k.c2 * (g[j] * g[j]);
        mi[j] = mj;
        vi[j] = vj;
        w[j] = decayed_update(w[j], k.step * (mj / (std::sqrt(vj) + k.eps)), k.decay, k.before);
      }
    } else {
      for (Index j = 0; j < n; ++j) {
        const float g = G(i, j);
        const float mj = k.b1 * mi[j] + k.c1 * g;
        const float vj = k.b2 * vi[j] + k.c2 * (g * g);
        mi[j] = mj;
        vi[j] = vj;
        W(i, j) = decayed_update(W(i, j), k.step * (mj / (std::sqrt(vj) + k.eps)), k.decay, k.before);
      }
    }
  }
}

// Below this many elements an element-wise pass runs on one thread (a parallel region costs more).
inline constexpr Index kThreadedElements = Index{1} << 16;

// Calls body(i0, i1) over row slices of a rows x cols matrix, on several threads when it is large.
// Element-wise bodies give the same bits on any thread count.
template <class Body>
void for_row_slices(Index rows, Index cols, const Body& body) {
  const int threads = rows * cols >= kThreadedElements ? std::max(1, num_threads()) : 1;
  const Index slices = std::min<Index>(threads, rows);
  if (slices <= 1) {
    body(0, rows);
    return;
  }
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(slices))
#endif
  for (Index s = 0; s < slices; ++s) body(rows * s / slices, rows * (s + 1) / slices);
}

}  // namespace optim::internal
LOWRANK_END_NAMESPACE
