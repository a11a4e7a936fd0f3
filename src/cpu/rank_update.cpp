// The rank-update entry point: validation, canonicalisation, packing, threading and dispatch to
// the per-ISA panel kernels. Compiled with baseline flags only.
#include "lowrank/kernels/rank_update.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/aligned_vector.hpp"
#include "kernel_api.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/philox.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/kernels/convert.hpp"
#include "lowrank/kernels/targets.hpp"
#include "rank_update_packed.hpp"
#include "view_checks-inl.hpp"

#if defined(LOWRANK_HAVE_OPENMP)
#include <omp.h>
#endif

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace {

#include "float_bits-inl.hpp"


// ---- packing ----------------------------------------------------------------------------------

template <class T>
auto to_compute(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<double>(static_cast<float>(x));
  }
}

// Row panels: MR rows each. Full panels take every q-th row (q = m / MR): panel p holds rows
// p, p + q, ..., p + (MR - 1) q, so that the kernel streams MR far-apart, long contiguous runs
// of W (consecutive panels continue each run) instead of restarting MR short streams per panel;
// the hardware prefetchers stay trained (measured: +20% bandwidth at rank 1). The m - MR q rows
// left over form one last panel of adjacent rows.
struct Panels {
  Index q = 0;      // number of full panels
  Index count = 0;  // q, plus one for the leftover rows
  int mr = 1;
  Index m = 0;
  Index first_row(Index p) const { return p < q ? p : q * mr; }
  Index row_step(Index p) const { return p < q ? q : 1; }
  Index rows(Index p) const { return p < q ? mr : m - q * mr; }
};

Panels make_panels(Index m, int mr) {
  Panels panels;
  panels.q = m / mr;
  panels.count = panels.q + (m % mr != 0);
  panels.mr = mr;
  panels.m = m;
  return panels;
}

// Prefetch of p + offset elements, the address formed as an integer: it may lie past the operand
// (prefetches never fault, but pointer arithmetic out of bounds is undefined).
template <class T>
void prefetch_at(const T* p, Index offset) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) +
                                                   static_cast<std::uintptr_t>(offset) * sizeof(T)));
}

// One packed value: alpha * x computed in double and rounded once to the compute type C. With
// alpha == 1 the product is exact, so the conversion alone gives the same bits (and the packing
// loops below are plain copies, without an fp64 multiply per element).
template <class C, class TF>
C packed_value(TF x, double alpha, bool unit) {
  return unit ? static_cast<C>(to_compute(x)) : static_cast<C>(alpha * to_compute(x));
}

// Panel p of A (m x r) -> [k][MR], scaled by alpha, zero padded. Reads each row of the panel
// along k (the order of memory when A is row-major).
template <class C, class TF>
void pack_a_panel(const MatrixView<const TF>& a, double alpha, const Panels& panels, Index p, C* dst) {
  const int mr = panels.mr;
  const bool unit = alpha == 1.0;
  const Index first = panels.first_row(p), step = panels.row_step(p), rows = panels.rows(p);
  for (int i = 0; i < mr; ++i) {
    if (i >= rows) {
      for (Index k = 0; k < a.cols; ++k) dst[k * mr + i] = C(0);
      continue;
    }
    const TF* row = a.data + (first + i * step) * a.row_stride;
    for (Index k = 0; k < a.cols; ++k) dst[k * mr + i] = packed_value<C>(row[k * a.col_stride], alpha, unit);
  }
}

// Column-major operands are packed by tiles of kPackDepth columns across all panels (blocks):
// each tile reads kPackDepth x MR sequential streams for A (kPackDepth for B, NR consecutive
// values per block), a cache line of each serving several panels, and writes each panel's stretch
// contiguously. Packing a column-major operand panel by
// panel instead reads one cache line per element, far apart (measured: 20% of a rank-256 update
// of a 1024 x 1024 matrix, the packing then costing more than a quarter of the product).
constexpr Index kPackDepth = 8;

// Columns [k0, k0 + kPackDepth) of column-major A (m x r) into every panel ([panel][k][MR]).
template <class C, class TF>
void pack_a_columns(const MatrixView<const TF>& a, double alpha, const Panels& panels, Index k0, C* apack) {
  const int mr = panels.mr;
  const bool unit = alpha == 1.0;
  const Index r = a.cols, k1 = std::min(r, k0 + kPackDepth);
  for (Index p = 0; p < panels.count; ++p) {
    const Index first = panels.first_row(p), step = panels.row_step(p), rows = panels.rows(p);
    C* dst = apack + p * r * mr;
    for (Index k = k0; k < k1; ++k) {
      const TF* col = a.data + k * a.col_stride + first * a.row_stride;
      if (step > 1 && first % 16 == 0) {
        for (int i = 0; i < mr; ++i) prefetch_at(col, (i * step + 64) * a.row_stride);
      }
      for (int i = 0; i < mr; ++i) {
        dst[k * mr + i] = i < rows ? packed_value<C>(col[i * step * a.row_stride], alpha, unit) : C(0);
      }
    }
  }
}

// Block q of B (n x r) -> [k][NR], scaled like A, zero padded; lane j holds column order[j] of the
// block (identity without an order). Reads each row along k (row-major B).
template <class C, class TF>
void pack_b_block(const MatrixView<const TF>& b, double alpha, int nr, const int* order, Index q, C* dst) {
  const bool unit = alpha == 1.0;
  for (int j = 0; j < nr; ++j) {
    const Index row = q * nr + (order != nullptr ? order[j] : j);
    if (row >= b.rows) {
      for (Index k = 0; k < b.cols; ++k) dst[k * nr + j] = C(0);
      continue;
    }
    const TF* src = b.data + row * b.row_stride;
    for (Index k = 0; k < b.cols; ++k) dst[k * nr + j] = packed_value<C>(src[k * b.col_stride], alpha, unit);
  }
}

// Columns [k0, k0 + kPackDepth) of column-major B (n x r) into every block ([block][k][NR]).
template <class C, class TF>
void pack_b_columns(const MatrixView<const TF>& b, double alpha, int nr, const int* order, Index k0, C* bpack) {
  const bool unit = alpha == 1.0;
  const Index r = b.cols, k1 = std::min(r, k0 + kPackDepth), blocks = (b.rows + nr - 1) / nr;
  for (Index q = 0; q < blocks; ++q) {
    C* dst = bpack + q * r * nr;
    for (Index k = k0; k < k1; ++k) {
      const TF* col = b.data + k * b.col_stride;
      prefetch_at(col, (q * nr + 4 * nr) * b.row_stride);
      for (int j = 0; j < nr; ++j) {
        const Index row = q * nr + (order != nullptr ? order[j] : j);
        dst[k * nr + j] = row < b.rows ? packed_value<C>(col[row * b.row_stride], alpha, unit) : C(0);
      }
    }
  }
}

// ---- storage conversions for the gather/scatter path -----------------------------------------

template <class T>
compute_t<T> load_compute(const T& x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return bf16_bits_to_f32(std::bit_cast<std::uint16_t>(x));
  } else if constexpr (std::is_same_v<T, f16>) {
    return f16_bits_to_f32(std::bit_cast<std::uint16_t>(x));
  } else {
    return x;
  }
}

template <class T>
void store_nearest(T& out, compute_t<T> x) {
  if constexpr (std::is_same_v<T, bf16>) {
    out = std::bit_cast<bf16>(f32_to_bf16_bits(x));
  } else if constexpr (std::is_same_v<T, f16>) {
    out = std::bit_cast<f16>(f32_to_f16_bits(x));
  } else {
    out = x;
  }
}

// Stochastic rounding: round away from the truncated value with probability equal to the
// remainder's share of the gap, using 32 random bits. Non-finite values and magnitudes at or above
// the largest finite value round to nearest.
inline std::uint16_t f32_to_bf16_stochastic(float x, std::uint32_t random) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  if ((bits & 0x7F800000u) == 0x7F800000u) return f32_to_bf16_bits(x);
  if ((bits & 0x7FFFFFFFu) >= 0x7F7F0000u) return f32_to_bf16_bits(x);
  return static_cast<std::uint16_t>((bits + (random >> 16)) >> 16);
}

inline std::uint16_t f32_to_f16_stochastic(float x, std::uint32_t random) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs >= 0x477FE000u) return f32_to_f16_bits(x);  // >= 65504 (max finite), inf, NaN
  if (abs >= 0x38800000u) {                           // normal half: 13 bits are dropped
    const std::uint32_t mantissa = abs & 0x7FFFFFu;
    std::uint32_t h = ((((abs >> 23) - 112u) << 10) | (mantissa >> 13));
    if ((random & 0x1FFFu) < (mantissa & 0x1FFFu)) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  const float scaled = std::bit_cast<float>(abs) * 0x1.0p24f;  // exact; in [0, 1024)
  const float floor_value = std::floor(scaled);
  std::uint32_t h = static_cast<std::uint32_t>(floor_value);
  if (uniform_from_bits(random) < scaled - floor_value) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

template <class T>
void store_stochastic(T& out, float x, std::uint32_t random) {
  if constexpr (std::is_same_v<T, bf16>) {
    out = std::bit_cast<bf16>(f32_to_bf16_stochastic(x, random));
  } else {
    out = std::bit_cast<f16>(f32_to_f16_stochastic(x, random));
  }
}

// ---- driver -----------------------------------------------------------------------------------

// The calling thread's workspace: packed A and B, and one gather tile per worker thread. Sized
// before the parallel region, so nothing allocates (or throws) inside it.
struct Workspace {
  AlignedVector<float> a32, b32, tiles32;
  AlignedVector<double> a64, b64, tiles64;
};
thread_local Workspace tls_workspace;

// Columns per block of B kept hot in L2 (about 256 KiB of packed B), a multiple of NR.
Index column_block(Index n, Index r, int nr, std::size_t elem) {
  const Index budget = static_cast<Index>((256 * 1024) / (static_cast<std::size_t>(r) * elem));
  const Index cols = std::max<Index>(nr, budget / nr * nr);
  return std::min(cols, (n + nr - 1) / nr * nr);
}

// Threads for an m x n update of rank r over `panels` row panels: at most max_threads (0: all),
// one below 2^18 multiply-adds, never more than panels.
int update_threads(int max_threads, Index m, Index n, Index r, Index panels) {
  int threads = max_threads > 0 ? std::min(max_threads, num_threads()) : num_threads();
  if (static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(r) < 1 << 18) threads = 1;
  return static_cast<int>(std::max<Index>(1, std::min<Index>(threads, panels)));
}

// The panel kernel for storage type T (T is also the compute type on the gather path).
template <class T>
void call_panel(const RankUpdateKernels& k, const compute_t<T>* a, const compute_t<T>* b, Index r, T* c,
                Index ldc, Index rows, Index cols, Index prefetch) {
  if constexpr (std::is_same_v<T, double>) {
    k.f64(a, b, r, c, ldc, rows, cols, prefetch);
  } else if constexpr (std::is_same_v<T, float>) {
    k.f32(a, b, r, c, ldc, rows, cols, prefetch);
  } else if constexpr (std::is_same_v<T, bf16>) {
    k.bf16(a, b, r, c, ldc, rows, cols, prefetch);
  } else {
    k.f16(a, b, r, c, ldc, rows, cols, prefetch);
  }
}

// Runs W(i, j) += sum_k A(i, k) B(j, k) over a canonical view `c` (the user's W or its transpose:
// `transposed` says which, for stochastic-rounding indices).
// alpha scales the user's U whichever side it lands on, so that every element is computed as
// fma(alpha * U(i, k), V(j, k), acc) in both orientations.
template <class TW, class TF>
void run(MatrixView<TW> c, const MatrixView<const TF>& u, const MatrixView<const TF>& v, double alpha,
         const RankUpdateOptions& options, bool transposed, std::uint64_t user_cols) {
  using C = compute_t<TW>;
  if (c.cols == 1) c.col_stride = 1;  // a single column is contiguous whatever its stride
  const RankUpdateKernels& kern = rank_update_kernels(active_target());
  const int mr = std::is_same_v<C, double> ? kern.mr_f64 : kern.mr_f32;
  const int nr = std::is_same_v<C, double> ? kern.nr_f64 : kern.nr_f32;
  const Index m = c.rows, n = c.cols, r = u.cols;
  const Panels pan = make_panels(m, mr);
  const Index panels = pan.count;
  const Index blocks = (n + nr - 1) / nr;

  constexpr bool half_storage = std::is_same_v<TW, bf16> || std::is_same_v<TW, f16>;
  const bool stochastic = half_storage && options.rounding == Rounding::stochastic;
  const bool direct = c.col_stride == 1 && !stochastic;
  const int* order = direct && std::is_same_v<TW, bf16> ? kern.bf16_b_order : nullptr;
  const Index nc = column_block(n, r, nr, sizeof(C));
  // What to prefetch: with one column block, the hardware streams along the rows and 1 KiB ahead
  // in the same row suffices; with several, each panel covers a short stretch of its rows, so
  // prefetch the same stretch of the next panel (one row further down: see Panels).
  const Index prefetch = nc < n ? c.row_stride : static_cast<Index>(1024 / sizeof(TW));

  const int threads = update_threads(options.max_threads, m, n, r, panels);
  const RandomStream random(options.seed, options.stream);

  Workspace& ws = tls_workspace;
  C* apack;
  C* bpack;
  C* tiles = nullptr;
  const auto tile_size = static_cast<std::size_t>(mr * nc);
  if constexpr (std::is_same_v<C, double>) {
    apack = grow(ws.a64, static_cast<std::size_t>(panels * r * mr));
    bpack = grow(ws.b64, static_cast<std::size_t>(blocks * r * nr));
    if (!direct) tiles = grow(ws.tiles64, tile_size * static_cast<std::size_t>(threads));
  } else {
    apack = grow(ws.a32, static_cast<std::size_t>(panels * r * mr));
    bpack = grow(ws.b32, static_cast<std::size_t>(blocks * r * nr));
    if (!direct) tiles = grow(ws.tiles32, tile_size * static_cast<std::size_t>(threads));
  }
  const double alpha_a = transposed ? 1.0 : alpha;
  const double alpha_b = transposed ? alpha : 1.0;

#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
#if defined(LOWRANK_HAVE_OPENMP)
    // No tiles on the direct path: tile stays null (an offset from a null pointer is undefined).
    C* tile = tiles != nullptr ? tiles + tile_size * static_cast<std::size_t>(omp_get_thread_num()) : nullptr;
#else
    C* tile = tiles;
#endif
    // Packing is threaded too, by blocks of B and panels of A, or by tiles of columns for a
    // column-major operand. Every thread reads all of B: the loop's implicit barrier waits for
    // it. Row-major A panels are packed with the same static schedule as the panel loop below, so
    // each thread packs exactly the panels it runs and needs no barrier; by columns, every thread
    // writes into every panel, and the loop's implicit barrier orders it before the panel loop.
    const Index k_tiles = (r + kPackDepth - 1) / kPackDepth;
    if (v.row_stride == 1 && v.rows > 1) {
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(static)
#endif
      for (Index t = 0; t < k_tiles; ++t) pack_b_columns(v, alpha_b, nr, order, t * kPackDepth, bpack);
    } else {
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(static)
#endif
      for (Index q = 0; q < blocks; ++q) pack_b_block(v, alpha_b, nr, order, q, bpack + q * r * nr);
    }
    if (u.row_stride == 1 && u.rows > 1) {
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(static)
#endif
      for (Index t = 0; t < k_tiles; ++t) pack_a_columns(u, alpha_a, pan, t * kPackDepth, apack);
    } else {
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(static) nowait
#endif
      for (Index p = 0; p < panels; ++p) pack_a_panel(u, alpha_a, pan, p, apack + p * r * mr);
    }

    for (Index j0 = 0; j0 < n; j0 += nc) {
      const Index width = std::min(nc, n - j0);
      const C* bblock = bpack + (j0 / nr) * r * nr;
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(static) nowait
#endif
      for (Index p = 0; p < panels; ++p) {
        const Index first = pan.first_row(p), step = pan.row_step(p), rows = pan.rows(p);
        const C* apanel = apack + p * r * mr;
        if (direct) {
          call_panel<TW>(kern, apanel, bblock, r, &c(first, j0), step * c.row_stride, rows, width, prefetch);
          continue;
        }
        // Gather into a compute-precision tile, update it, scatter back rounded.
        for (Index i = 0; i < rows; ++i)
          for (Index j = 0; j < width; ++j) tile[i * nc + j] = load_compute(c(first + i * step, j0 + j));
        call_panel<C>(kern, apanel, bblock, r, tile, nc, rows, width, 0);
        for (Index i = 0; i < rows; ++i)
          for (Index j = 0; j < width; ++j) {
            const Index row = first + i * step;
            TW& out = c(row, j0 + j);
            const C value = tile[i * nc + j];
            if constexpr (half_storage) {
              if (stochastic) {
                const Index ui = transposed ? j0 + j : row;
                const Index uj = transposed ? row : j0 + j;
                const auto index = (options.index_row0 + static_cast<std::uint64_t>(ui)) * user_cols +
                                   options.index_col0 + static_cast<std::uint64_t>(uj);
                store_stochastic(out, value, random.bits(index));
                continue;
              }
            }
            store_nearest(out, value);
          }
      }
    }
  }
}

}  // namespace

PackedOperands packed_operands(Index m, Index n, Index r) {
  const RankUpdateKernels& kern = rank_update_kernels(active_target());
  PackedOperands ops;
  ops.m = m, ops.n = n, ops.r = r, ops.mr = kern.mr_f32, ops.nr = kern.nr_f32, ops.kernels = &kern;
  Workspace& ws = tls_workspace;
  ops.a = grow(ws.a32, static_cast<std::size_t>(ops.panels() * r * ops.mr));
  ops.b = grow(ws.b32, static_cast<std::size_t>(ops.blocks() * r * ops.nr));
  return ops;
}

void rank_update_packed(MatrixView<float> c, const PackedOperands& ops, int max_threads) {
  if (ops.kernels == nullptr || c.rows != ops.m || c.cols != ops.n || (c.col_stride != 1 && c.cols > 1)) {
    fail("rank_update_packed", "C ({}x{}, column stride {}) does not match the packed operands ({}x{})", c.rows,
         c.cols, c.col_stride, ops.m, ops.n);
  }
  const RankUpdateKernels& kern = *ops.kernels;
  const Index m = c.rows, n = c.cols, r = ops.r, mr = ops.mr, nr = ops.nr;
  const Index panels = ops.panels();
  const Index nc = column_block(n, r, static_cast<int>(nr), sizeof(float));
  // As in run(): the next panel's stretch (mr rows further down) with several column blocks.
  const Index prefetch = nc < n ? mr * c.row_stride : static_cast<Index>(1024 / sizeof(float));
  const int threads = update_threads(max_threads, m, n, r, panels);
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  for (Index j0 = 0; j0 < n; j0 += nc) {
    const Index width = std::min(nc, n - j0);
    const float* bblock = ops.b + (j0 / nr) * r * nr;
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp for schedule(static) nowait
#endif
    for (Index p = 0; p < panels; ++p) {
      kern.f32(ops.a + p * r * mr, bblock, r, &c(p * mr, j0), c.row_stride, std::min(mr, m - p * mr), width,
               prefetch);
    }
  }
}

const RankUpdateKernels& rank_update_kernels(Target target) {
  switch (target) {
#if defined(LOWRANK_HAVE_AVX512)
    case Target::avx512: return rank_update_avx512;
#endif
#if defined(LOWRANK_HAVE_AVX2)
    case Target::avx2: return rank_update_avx2;
    case Target::avx2_128: return rank_update_avx2_128;
#endif
    default: return rank_update_scalar;
  }
}

}  // namespace detail

template <SupportedScalar TW, SupportedScalar TF>
  requires(!std::is_const_v<TW>)
void rank_update(MatrixView<TW> W, MatrixView<const TF> U, MatrixView<const TF> V, double alpha,
                 const RankUpdateOptions& options) {
  constexpr const char* fn = "rank_update";
  using detail::fail;
  detail::check_view(fn, "W", W);
  detail::check_view(fn, "U", U);
  detail::check_view(fn, "V", V);
  if (U.rows != W.rows) fail(fn, "U has {} rows, W is {}x{} (U must have W's {} rows)", U.rows, W.rows, W.cols, W.rows);
  if (V.rows != W.cols) fail(fn, "V has {} rows, W is {}x{} (V must have one row per column of W: {})", V.rows, W.rows, W.cols, W.cols);
  if (U.cols != V.cols) {
    fail(fn, "U is {}x{} and V is {}x{}: their column counts (the rank) differ", U.rows, U.cols, V.rows, V.cols);
  }
  if (U.cols == 0) fail(fn, "rank is 0 (U is {}x0, V is {}x0); the rank must be at least 1", U.rows, V.rows);
  if (!std::isfinite(alpha)) fail(fn, "alpha is {}; it must be finite (W is {}x{})", alpha, W.rows, W.cols);
  if (detail::self_overlapping(W)) {
    fail(fn, "W ({}x{}, strides {}, {}) has overlapping elements", W.rows, W.cols, W.row_stride, W.col_stride);
  }
  if (detail::spans_overlap(W, U)) fail(fn, "W's memory ({}x{}) overlaps U's ({}x{})", W.rows, W.cols, U.rows, U.cols);
  if (detail::spans_overlap(W, V)) fail(fn, "W's memory ({}x{}) overlaps V's ({}x{})", W.rows, W.cols, V.rows, V.cols);
  if (options.index_cols != 0 && options.index_col0 + static_cast<std::uint64_t>(W.cols) > options.index_cols) {
    fail(fn, "options.index_col0 ({}) + W's {} columns exceed options.index_cols ({})", options.index_col0, W.cols,
         options.index_cols);
  }
  if (alpha == 0.0 || W.empty()) return;
  const std::uint64_t index_cols =
      options.index_cols != 0 ? options.index_cols : static_cast<std::uint64_t>(W.cols);

  // Canonical form: unit column stride where possible (a column-major W is updated as W^T += V U^T).
  const bool transpose = W.col_stride != 1 && W.cols > 1 && (W.row_stride == 1 || W.rows == 1);
  if (transpose) {
    detail::run(W.transposed(), V, U, alpha, options, true, index_cols);
  } else {
    detail::run(W, U, V, alpha, options, false, index_cols);
  }
}

template <SupportedScalar TD, SupportedScalar TS>
  requires(!std::is_const_v<TD>)
void convert(MatrixView<const TS> src, MatrixView<TD> dst, const ConvertOptions& options) {
  constexpr const char* fn = "convert";
  using detail::fail;
  detail::check_view(fn, "src", src);
  detail::check_view(fn, "dst", dst);
  if (src.rows != dst.rows || src.cols != dst.cols) {
    fail(fn, "src is {}x{} and dst is {}x{}; they must have the same shape", src.rows, src.cols, dst.rows, dst.cols);
  }
  if (detail::self_overlapping(dst)) fail(fn, "dst ({}x{}) has overlapping elements", dst.rows, dst.cols);
  if (detail::spans_overlap(dst, src)) fail(fn, "dst's memory ({}x{}) overlaps src's", dst.rows, dst.cols);
  if (options.index_cols != 0 && options.index_col0 + static_cast<std::uint64_t>(dst.cols) > options.index_cols) {
    fail(fn, "options.index_col0 ({}) + dst's {} columns exceed options.index_cols ({})", options.index_col0, dst.cols,
         options.index_cols);
  }
  constexpr bool half = std::is_same_v<TD, bf16> || std::is_same_v<TD, f16>;
  const bool stochastic = half && options.rounding == Rounding::stochastic;
  const std::uint64_t index_cols = options.index_cols != 0 ? options.index_cols : static_cast<std::uint64_t>(dst.cols);
  const RandomStream random(options.seed, options.stream);
  for (Index i = 0; i < dst.rows; ++i) {
    for (Index j = 0; j < dst.cols; ++j) {
      const TS& x = src(i, j);
      TD& out = dst(i, j);
      if constexpr (half) {
        const float value = static_cast<float>(detail::load_compute(x));
        if (stochastic) {
          const auto index = (options.index_row0 + static_cast<std::uint64_t>(i)) * index_cols + options.index_col0 +
                             static_cast<std::uint64_t>(j);
          detail::store_stochastic(out, value, random.bits(index));
        } else {
          detail::store_nearest(out, value);
        }
      } else {
        out = static_cast<TD>(detail::load_compute(x));
      }
    }
  }
}

#define LOWRANK_INSTANTIATE_CONVERT(TD, TS) \
  template void convert<TD, TS>(MatrixView<const TS>, MatrixView<TD>, const ConvertOptions&);
#define LOWRANK_INSTANTIATE_CONVERT_ALL(TD)  \
  LOWRANK_INSTANTIATE_CONVERT(TD, double) \
  LOWRANK_INSTANTIATE_CONVERT(TD, float)  \
  LOWRANK_INSTANTIATE_CONVERT(TD, bf16)   \
  LOWRANK_INSTANTIATE_CONVERT(TD, f16)
LOWRANK_INSTANTIATE_CONVERT_ALL(double)
LOWRANK_INSTANTIATE_CONVERT_ALL(float)
LOWRANK_INSTANTIATE_CONVERT_ALL(bf16)
LOWRANK_INSTANTIATE_CONVERT_ALL(f16)
#undef LOWRANK_INSTANTIATE_CONVERT_ALL
#undef LOWRANK_INSTANTIATE_CONVERT

#define LOWRANK_INSTANTIATE(TW, TF)                                                                       \
  template void rank_update<TW, TF>(MatrixView<TW>, MatrixView<const TF>, MatrixView<const TF>, double, \
                                    const RankUpdateOptions&);
#define LOWRANK_INSTANTIATE_ALL(TW) \
  LOWRANK_INSTANTIATE(TW, double)   \
  LOWRANK_INSTANTIATE(TW, float)    \
  LOWRANK_INSTANTIATE(TW, bf16)     \
  LOWRANK_INSTANTIATE(TW, f16)
LOWRANK_INSTANTIATE_ALL(double)
LOWRANK_INSTANTIATE_ALL(float)
LOWRANK_INSTANTIATE_ALL(bf16)
LOWRANK_INSTANTIATE_ALL(f16)

LOWRANK_END_NAMESPACE
