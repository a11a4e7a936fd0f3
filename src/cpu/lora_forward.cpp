// The lora_forward entry points: validation, packing of the small operands, threading and dispatch
// to the per-ISA kernels. Compiled with baseline flags only.
//
// Plan of one call (docs/performance.md, "Fused LoRA forward"):
//   1. T = s (X A^T), tokens x R (all terms side by side, each at a multiple of 16), with the dot
//      kernel (A plays W); for a mixed batch only the tokens of each adapter.
//   2. The base GEMM with the low-rank term folded in as R extra columns: [X | T] [W | B]^T.
//      Dot form for unit-stride `out x in` weights (nn.Linear), axpy form for unit-stride
//      `in x out` weights (Conv1D), a scalar loop otherwise.
#include "lowrank/kernels/lora_forward.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "../core/aligned_vector.hpp"
#include "kernel_api.hpp"
#include "lora_forward_api.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/threading.hpp"
#include "lowrank/kernels/targets.hpp"
#include "view_checks-inl.hpp"

#if defined(LOWRANK_HAVE_OPENMP)
#include <omp.h>
#endif

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace {

const ForwardKernels& forward_kernels_for(Target target) {
  switch (target) {
#if defined(LOWRANK_HAVE_AVX512)
    case Target::avx512: return lora_forward_avx512;
#endif
#if defined(LOWRANK_HAVE_AVX2)
    case Target::avx2: return lora_forward_avx2;
    case Target::avx2_128: return lora_forward_avx2_128;
#endif
    default: return lora_forward_scalar;
  }
}

// ---- workspace --------------------------------------------------------------------------------

constexpr Index kRankAlign = 16;   // each term's columns of T start at a multiple of this
constexpr Index kTokenBlock = 16;  // tokens per pass over W
constexpr Index kAxpyCols = 256;   // output columns per axpy kernel call (accumulators stay in L1)

struct Unit {  // rows [row0, row0 + rows) of term `term`'s A, for step 1
  Index term, row0, rows;
};

// GEMM path (from kGemmTokens tokens): X and T packed in panels of the rank-update micro-kernel's
// MR tokens, W packed per block of kGemmCols outputs x kGemmDepth inputs (128 KiB: stays in L2
// while every panel of X streams past it), the micro-kernel accumulating into Y itself. Measured
// on Zen 3 (512 x 1024 x 1024, one core, against OpenBLAS in the same process): 512 x 64 runs at
// 1.00 of OpenBLAS's sgemm, the former 256 x 128 at 0.92; the chunking does not change any bits
// (the accumulator is stored in fp32 between chunks).
constexpr Index kGemmDepth = 512;
constexpr Index kGemmCols = 64;

struct ForwardWorkspace {
  AlignedVector<float> x, t, a, b, acc, xg, wg;
  std::vector<Index> offset;
  std::vector<const float*> a_ptr;
  std::vector<Index> a_ld;
  std::vector<Unit> units;
};
thread_local ForwardWorkspace tls_forward;

Index round_up(Index x, Index m) { return (x + m - 1) / m * m; }

template <class TW>
DotKernel dot_for(const ForwardKernels& k) {
  if constexpr (std::is_same_v<TW, bf16>) {
    return k.dot_bf16;
  } else if constexpr (std::is_same_v<TW, f16>) {
    return k.dot_f16;
  } else {
    return k.dot_f32;
  }
}

template <class TW>
PackWKernel pack_w_for(const ForwardKernels& k) {
  if constexpr (std::is_same_v<TW, bf16>) {
    return k.pack_w_bf16;
  } else if constexpr (std::is_same_v<TW, f16>) {
    return k.pack_w_f16;
  } else {
    return k.pack_w_f32;
  }
}

template <class TW>
AxpyKernel axpy_for(const ForwardKernels& k) {
  if constexpr (std::is_same_v<TW, bf16>) {
    return k.axpy_bf16;
  } else if constexpr (std::is_same_v<TW, f16>) {
    return k.axpy_f16;
  } else {
    return k.axpy_f32;
  }
}

// [begin, end) of `n` items for thread `id` of `count`, in chunks that are multiples of `align`.
[[maybe_unused]] std::pair<Index, Index> thread_range(Index n, int id, int count, Index align) {
  const Index chunk = round_up((n + count - 1) / count, align);
  const Index begin = std::min(n, chunk * id);
  return {begin, std::min(n, begin + chunk)};
}

enum class Path { dot, axpy, gemm, generic };

template <class TW>
void forward(const char* fn, MatrixView<const float> X, WeightView<const TW> W, std::span<const LoraTerm> terms,
             const std::int32_t* adapter, MatrixView<float> Y, const LoraForwardOptions& options) {
  // ---- validation (nothing is written before it passes) ----
  check_view(fn, "X", X);
  check_view(fn, "W", W.matrix);
  check_view(fn, "Y", Y);
  const Index tokens = X.rows, in = X.cols, out = W.out_features();
  if (W.in_features() != in) {
    fail(fn, "X is {}x{} but W ({}x{}, {}) has {} input features (X must have one column per input feature)",
         X.rows, X.cols, W.matrix.rows, W.matrix.cols, to_string(W.layout), W.in_features());
  }
  if (Y.rows != tokens || Y.cols != out) {
    fail(fn, "Y is {}x{} but must be tokens x out = {}x{} (X is {}x{}, W is {}x{} {})", Y.rows, Y.cols, tokens, out,
         X.rows, X.cols, W.matrix.rows, W.matrix.cols, to_string(W.layout));
  }
  if (self_overlapping(Y)) {
    fail(fn, "Y ({}x{}, strides {}, {}) has overlapping elements", Y.rows, Y.cols, Y.row_stride, Y.col_stride);
  }
  if (spans_overlap(Y, X)) fail(fn, "Y's memory ({}x{}) overlaps X's ({}x{})", Y.rows, Y.cols, X.rows, X.cols);
  if (spans_overlap(Y, W.matrix)) {
    fail(fn, "Y's memory ({}x{}) overlaps W's ({}x{})", Y.rows, Y.cols, W.matrix.rows, W.matrix.cols);
  }
  if (options.bias != nullptr && spans_overlap(Y, MatrixView<const float>(options.bias, 1, out, out, 1))) {
    fail(fn, "Y's memory ({}x{}) overlaps the bias ({} floats)", Y.rows, Y.cols, out);
  }
  for (std::size_t j = 0; j < terms.size(); ++j) {
    const LoraTerm& term = terms[j];
    const auto name_a = fmt::format("terms[{}].A", j), name_b = fmt::format("terms[{}].B", j);
    check_view(fn, name_a.c_str(), term.A);
    check_view(fn, name_b.c_str(), term.B);
    if (term.A.cols != in) {
      fail(fn, "{} is {}x{} but must have X's {} columns (r x in; X is {}x{})", name_a, term.A.rows, term.A.cols, in,
           X.rows, X.cols);
    }
    if (term.B.rows != out) {
      fail(fn, "{} is {}x{} but must have W's {} output rows (out x r)", name_b, term.B.rows, term.B.cols, out);
    }
    if (term.A.rows != term.B.cols) {
      fail(fn, "{} is {}x{} and {} is {}x{}: A's rows and B's columns (the rank) differ", name_a, term.A.rows,
           term.A.cols, name_b, term.B.rows, term.B.cols);
    }
    if (!std::isfinite(term.scale)) fail(fn, "terms[{}].scale is {}; it must be finite", j, term.scale);
    if (spans_overlap(Y, term.A)) {
      fail(fn, "Y's memory ({}x{}) overlaps {}'s ({}x{})", Y.rows, Y.cols, name_a, term.A.rows, term.A.cols);
    }
    if (spans_overlap(Y, term.B)) {
      fail(fn, "Y's memory ({}x{}) overlaps {}'s ({}x{})", Y.rows, Y.cols, name_b, term.B.rows, term.B.cols);
    }
  }
  if (adapter != nullptr) {
    for (Index t = 0; t < tokens; ++t) {
      if (adapter[t] < -1 || adapter[t] >= static_cast<std::int64_t>(terms.size())) {
        fail(fn, "adapter[{}] is {}; it must be -1 (no adapter) or an index below the {} terms", t, adapter[t],
             terms.size());
      }
    }
  }
  if (Y.empty()) return;
  if (in == 0) {  // X W^T and X A^T are zero
    for (Index t = 0; t < tokens; ++t)
      for (Index o = 0; o < out; ++o) Y(t, o) = options.bias != nullptr ? options.bias[o] : 0.0f;
    return;
  }

  // ---- set-up (allocations happen here, before anything is written) ----
  const ForwardKernels& kern = forward_kernels_for(active_target());
  MatrixView<const TW> wo = W.as_out_in();
  if (wo.cols == 1) wo.col_stride = 1;
  if (wo.rows == 1) wo.row_stride = 1;
  Path path = Path::generic;
  if constexpr (!std::is_same_v<TW, double>) {
    if (wo.col_stride == 1) {
      path = Path::dot;
    } else if (wo.row_stride == 1) {
      path = Path::axpy;
    }
  }
  if (path != Path::generic && tokens >= lora_forward_gemm_tokens && (Y.col_stride == 1 || out == 1)) {
    path = Path::gemm;
  }

  ForwardWorkspace& ws = tls_forward;
  // X with unit column stride. Several tokens are also copied when rows are a multiple of 4 KiB
  // apart (any power-of-two width from 1024 floats): the kernels keep chunks of up to 16 x rows in
  // L1, and rows that map to the same L1 sets evict each other (measured: 1.3x to 1.8x slower
  // at 256 tokens on 4096 inputs). The copy's rows are 64 bytes more than a multiple of 64 apart.
  const float* xp = X.data;
  Index ldx = X.row_stride;
  float* xpack = nullptr;
  const bool aliased_rows = tokens > 1 && path != Path::generic && (X.row_stride * 4) % 4096 == 0;
  if (X.col_stride != 1 || (aliased_rows && path != Path::gemm)) {
    ldx = round_up(in, 16) + 16;
    xpack = grow(ws.x, static_cast<std::size_t>(tokens * ldx));
    xp = xpack;
  }
  auto pack_x = [&](Index t) {
    for (Index i = 0; i < in; ++i) xpack[t * ldx + i] = X(t, i);
  };

  // Columns of T: term j at offset[j] (a multiple of kRankAlign); rank_len = end of the last term.
  const std::size_t nterms = terms.size();
  Index* offset = grow(ws.offset, nterms + 1);
  Index rank_len = 0, next = 0, a_rows_packed = 0;
  for (std::size_t j = 0; j < nterms; ++j) {
    offset[j] = next;
    const Index r = terms[j].A.rows;
    if (r > 0) rank_len = next + r;
    next += round_up(r, kRankAlign);
    if (r > 0 && terms[j].A.col_stride != 1) a_rows_packed += r;
  }
  const Index ldt = std::max<Index>(round_up(rank_len, kRankAlign), 1);
  float* tbuf = nullptr;
  std::size_t unit_count = 0;
  if (rank_len > 0) {
    tbuf = grow(ws.t, static_cast<std::size_t>(tokens * ldt));
    std::fill(tbuf, tbuf + tokens * ldt, 0.0f);
    // A with unit column stride (packed only when it is not).
    const float** a_ptr = grow(ws.a_ptr, nterms);
    Index* a_ld = grow(ws.a_ld, nterms);
    float* apack = a_rows_packed > 0 ? grow(ws.a, static_cast<std::size_t>(a_rows_packed * in)) : nullptr;
    for (std::size_t j = 0; j < nterms; ++j) {
      const MatrixView<const float>& a = terms[j].A;
      a_ptr[j] = a.data;
      a_ld[j] = a.rows > 1 ? a.row_stride : in;
      if (a.rows > 0 && a.col_stride != 1) {
        for (Index k = 0; k < a.rows; ++k)
          for (Index i = 0; i < in; ++i) apack[k * in + i] = a(k, i);
        a_ptr[j] = apack;
        a_ld[j] = in;
        apack += a.rows * in;
      }
    }
    // Step-1 work units: up to eight rows of one term's A.
    for (std::size_t j = 0; j < nterms; ++j) unit_count += static_cast<std::size_t>((terms[j].A.rows + 7) / 8);
    Unit* units = grow(ws.units, unit_count);
    std::size_t u = 0;
    for (std::size_t j = 0; j < nterms; ++j)
      for (Index k = 0; k < terms[j].A.rows; k += 8)
        units[u++] = Unit{static_cast<Index>(j), k, std::min<Index>(8, terms[j].A.rows - k)};
  }

  // B side: for the dot form rows of [B_0 | B_1 | ...] (out x ldt), for the axpy form its
  // transpose (rank_len x out); a single term is used in place when its strides allow it.
  const float* bp = nullptr;
  Index ldb = 0;
  bool pack_b = false;
  if (rank_len > 0 && path != Path::generic) {
    const MatrixView<const float>& b0 = terms[0].B;
    if (nterms == 1 && path == Path::dot && (b0.col_stride == 1 || b0.cols == 1)) {
      bp = b0.data, ldb = b0.row_stride;
    } else if (nterms == 1 && path == Path::axpy && (b0.row_stride == 1 || b0.rows == 1)) {
      bp = b0.data, ldb = b0.col_stride;
    } else {
      pack_b = true;
      ldb = path == Path::dot ? ldt : out;
      bp = grow(ws.b, static_cast<std::size_t>(path == Path::dot ? out * ldt : rank_len * out));
    }
  }
  if (path == Path::gemm) bp = nullptr, pack_b = false;  // B is packed per block of outputs

  // GEMM path buffers: X in chunks of kGemmDepth inputs, each chunk in panels of MR tokens
  // ([depth][MR], zero rows past the last token). The last chunk carries `extra` more columns:
  // the rank_len columns of T, then a column of ones when there is a bias (the bias is then the
  // matching row of the packed W block: fma(1, bias, acc) rounds acc + bias once, as the other
  // paths do). Per thread a W block of kGemmCols outputs.
  const RankUpdateKernels& rk = rank_update_kernels(active_target());
  const Index mr = rk.mr_f32, nr = rk.nr_f32;
  const Index panels = (tokens + mr - 1) / mr;
  const Index extra = rank_len + (options.bias != nullptr ? 1 : 0);
  const Index last_k0 = (in - 1) / kGemmDepth * kGemmDepth;
  const Index wg_size = (kGemmDepth + extra) * round_up(kGemmCols, nr);
  float* xg = nullptr;
  if (path == Path::gemm) xg = grow(ws.xg, static_cast<std::size_t>(panels * mr * (in + extra)));
  const Index out_pad = round_up(out, 16);
  float* acc = path == Path::axpy ? grow(ws.acc, static_cast<std::size_t>(std::min(tokens, kTokenBlock) * out_pad))
                                  : nullptr;

  int threads = options.max_threads > 0 ? std::min(options.max_threads, num_threads()) : num_threads();
  if (static_cast<double>(tokens) * static_cast<double>(in) * static_cast<double>(out) < (1 << 18)) threads = 1;
  if (path == Path::generic) threads = 1;
  threads = static_cast<int>(std::max<Index>(1, std::min<Index>(threads, (out + 23) / 24)));
  float* wg = path == Path::gemm ? grow(ws.wg, static_cast<std::size_t>(threads * wg_size)) : nullptr;

  const DotKernel dot_w = dot_for<TW>(kern);
  const DotKernel dot_a = kern.dot_f32;
  const AxpyKernel axpy_w = axpy_for<TW>(kern);
  const AxpyKernel axpy_t = kern.axpy_f32;
  const PackWKernel pack_w = pack_w_for<TW>(kern);
  const Unit* units = ws.units.data();
  const float** a_ptr = ws.a_ptr.data();
  const Index* a_ld = ws.a_ld.data();

  // ---- step 1: T = s X A^T (per term, per run of tokens) ----
  auto compute_unit = [&](const Unit& unit) {
    const std::size_t j = static_cast<std::size_t>(unit.term);
    const double scale = terms[j].scale;
    Index t0 = 0;
    while (t0 < tokens) {
      Index t1 = t0;
      if (adapter == nullptr) {
        t1 = tokens;
      } else {
        while (t0 < tokens && adapter[t0] != static_cast<std::int32_t>(j)) ++t0;
        if (t0 == tokens) break;
        t1 = t0;
        while (t1 < tokens && adapter[t1] == static_cast<std::int32_t>(j)) ++t1;
      }
      float* y = tbuf + t0 * ldt + offset[j] + unit.row0;
      const DotArgs args{xp + t0 * ldx, ldx,     t1 - t0,  a_ptr[j] + unit.row0 * a_ld[j], a_ld[j], unit.rows, in,
                         nullptr,       0,       nullptr,  0,                               0,       nullptr,   y,
                         ldt,           1};
      dot_a(args);
      for (Index t = 0; t < t1 - t0; ++t)
        for (Index k = 0; k < unit.rows; ++k)
          y[t * ldt + k] = static_cast<float>(scale * static_cast<double>(y[t * ldt + k]));
      t0 = t1;
    }
  };

  // ---- GEMM path: packing of X and T, and the blocked product per thread ----
  // Depth of the chunk starting at k0, extra columns included.
  auto chunk_depth = [&](Index k0) { return std::min(kGemmDepth, in - k0) + (k0 == last_k0 ? extra : 0); };
  // With X contiguous along k, the target's transposing kernel; otherwise token by token (a row
  // of X is then read along memory when X is row-major), into every chunk.
  auto pack_x_panel = [&](Index p) {
    const Index t0 = p * mr, rows = std::min(mr, tokens - t0);
    if (X.col_stride == 1) {
      for (Index k0 = 0; k0 < in; k0 += kGemmDepth) {
        kern.pack_x(PackXArgs{&X(t0, k0), X.row_stride, rows, std::min(kGemmDepth, in - k0), mr,
                              xg + k0 * panels * mr + p * mr * chunk_depth(k0)});
      }
      return;
    }
    for (Index i = 0; i < mr; ++i) {
      const float* x = i < rows ? &X(t0 + i, 0) : nullptr;
      for (Index k0 = 0; k0 < in; k0 += kGemmDepth) {
        const Index depth = std::min(kGemmDepth, in - k0);
        float* dst = xg + k0 * panels * mr + p * mr * chunk_depth(k0) + i;
        if (x == nullptr) {
          for (Index k = 0; k < depth; ++k) dst[k * mr] = 0.0f;
        } else {
          const float* src = x + k0 * X.col_stride;
          for (Index k = 0; k < depth; ++k) dst[k * mr] = src[k * X.col_stride];
        }
      }
    }
  };
  auto pack_extra_panel = [&](Index p) {  // after T is computed
    const Index t0 = p * mr, rows = std::min(mr, tokens - t0);
    float* dst = xg + last_k0 * panels * mr + p * mr * chunk_depth(last_k0) + (in - last_k0) * mr;
    for (Index k = 0; k < extra; ++k)
      for (Index i = 0; i < mr; ++i) {
        dst[k * mr + i] = i >= rows ? 0.0f : k < rank_len ? tbuf[(t0 + i) * ldt + k] : 1.0f;
      }
  };
  // Y[:, ob:oe) = [X | T | 1] [W | B | bias]^T: every element is one fp32 chain of fmas in index
  // order (the W part in chunks of kGemmDepth, then the rank_len columns of T, then the bias),
  // stored between chunks; the first chunk starts from +0 without reading Y.
  auto run_gemm = [&](Index ob, Index oe, float* wblock) {
    const Index ldy = Y.row_stride;
    for (Index o0 = ob; o0 < oe; o0 += kGemmCols) {
      const Index cols = std::min(kGemmCols, oe - o0);
      for (Index k0 = 0; k0 < in; k0 += kGemmDepth) {
        const Index wdepth = std::min(kGemmDepth, in - k0), depth = chunk_depth(k0);
        for (Index j = 0; j < cols; j += nr) {
          float* panel = wblock + j * depth;
          const Index width = std::min(nr, cols - j);
          pack_w(PackWArgs{wo.data + (o0 + j) * wo.row_stride + k0 * wo.col_stride, wo.row_stride, wo.col_stride,
                           width, wdepth, nr, panel});
          if (depth == wdepth) continue;
          // The extra rows: B's columns (zero between terms and past the last output), the bias.
          float* rest = panel + wdepth * nr;
          std::fill(rest, rest + extra * nr, 0.0f);
          for (std::size_t q = 0; q < nterms; ++q)
            for (Index k = 0; k < terms[q].B.cols; ++k)
              for (Index c = 0; c < width; ++c) rest[(offset[q] + k) * nr + c] = terms[q].B(o0 + j + c, k);
          if (options.bias != nullptr)
            for (Index c = 0; c < width; ++c) rest[rank_len * nr + c] = options.bias[o0 + j + c];
        }
        const float* xchunk = xg + k0 * panels * mr;
        const PanelF32 panel_kernel = k0 == 0 ? rk.f32_store : rk.f32;  // the first chunk writes Y
        for (Index p = 0; p < panels; ++p) {
          panel_kernel(xchunk + p * mr * depth, wblock, depth, Y.data + p * mr * ldy + o0, ldy,
                       std::min(mr, tokens - p * mr), cols, mr * ldy);
        }
      }
    }
  };

  // ---- step 2 (dot, axpy and generic paths), per thread: output range [ob, oe) ----
  auto run_range = [&](Index ob, Index oe) {
    if (ob >= oe) return;
    if (pack_b) {
      if (path == Path::dot) {
        float* b = const_cast<float*>(bp);
        for (Index o = ob; o < oe; ++o) {
          float* row = b + o * ldt;
          std::fill(row, row + ldt, 0.0f);
          for (std::size_t j = 0; j < nterms; ++j)
            for (Index k = 0; k < terms[j].B.cols; ++k) row[offset[j] + k] = terms[j].B(o, k);
        }
      } else {
        float* b = const_cast<float*>(bp);
        for (Index k = 0; k < rank_len; ++k) std::fill(b + k * out + ob, b + k * out + oe, 0.0f);
        for (std::size_t j = 0; j < nterms; ++j)
          for (Index k = 0; k < terms[j].B.cols; ++k)
            for (Index o = ob; o < oe; ++o) b[(offset[j] + k) * out + o] = terms[j].B(o, k);
      }
    }
    const float* bias = options.bias;
    for (Index tb = 0; tb < tokens; tb += kTokenBlock) {
      const Index nb = std::min(kTokenBlock, tokens - tb);
      if (path == Path::dot) {
        const DotArgs args{xp + tb * ldx,
                           ldx,
                           nb,
                           wo.data + ob * wo.row_stride,
                           wo.row_stride,
                           oe - ob,
                           in,
                           tbuf != nullptr ? tbuf + tb * ldt : nullptr,
                           ldt,
                           bp != nullptr ? bp + ob * ldb : nullptr,
                           ldb,
                           rank_len,
                           bias != nullptr ? bias + ob : nullptr,
                           Y.data + tb * Y.row_stride + ob * Y.col_stride,
                           Y.row_stride,
                           Y.col_stride};
        dot_w(args);
      } else if (path == Path::axpy) {
        for (Index t = 0; t < nb; ++t) std::fill(acc + t * out_pad + ob, acc + t * out_pad + oe, 0.0f);
        for (Index o0 = ob; o0 < oe; o0 += kAxpyCols) {
          const Index cols = std::min(kAxpyCols, oe - o0);
          axpy_w(AxpyArgs{xp + tb * ldx, ldx, nb, wo.data + o0 * wo.row_stride, wo.col_stride, cols, in, acc + o0,
                          out_pad});
          if (rank_len > 0) {
            axpy_t(AxpyArgs{tbuf + tb * ldt, ldt, nb, bp + o0, ldb, cols, rank_len, acc + o0, out_pad});
          }
        }
        for (Index t = 0; t < nb; ++t)
          for (Index o = ob; o < oe; ++o)
            Y(tb + t, o) = bias != nullptr ? acc[t * out_pad + o] + bias[o] : acc[t * out_pad + o];
      } else {
        using C = compute_t<TW>;
        for (Index t = tb; t < tb + nb; ++t)
          for (Index o = ob; o < oe; ++o) {
            C sum = 0;
            for (Index i = 0; i < in; ++i) sum += static_cast<C>(xp[t * ldx + i]) * static_cast<C>(wo(o, i));
            for (std::size_t j = 0; j < nterms; ++j)
              for (Index k = 0; k < terms[j].B.cols; ++k)
                sum += static_cast<C>(tbuf[t * ldt + offset[j] + k]) * static_cast<C>(terms[j].B(o, k));
            const float value = static_cast<float>(sum);
            Y(t, o) = bias != nullptr ? value + bias[o] : value;
          }
      }
    }
  };

  const Index align = path == Path::axpy ? 16 : 24;  // the static split of the non-GEMM paths
  if (threads <= 1) {
    if (xpack != nullptr)
      for (Index t = 0; t < tokens; ++t) pack_x(t);
    if (path == Path::gemm) {
      for (Index p = 0; p < panels; ++p) pack_x_panel(p);
      for (std::size_t u = 0; u < unit_count; ++u) compute_unit(units[u]);
      if (extra > 0)
        for (Index p = 0; p < panels; ++p) pack_extra_panel(p);
      run_gemm(0, out, wg);
      return;
    }
    for (std::size_t u = 0; u < unit_count; ++u) compute_unit(units[u]);
    run_range(0, out);
    return;
  }
#if defined(LOWRANK_HAVE_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    if (xpack != nullptr) {
#pragma omp for schedule(static)
      for (Index t = 0; t < tokens; ++t) pack_x(t);
    }
    if (path == Path::gemm) {
#pragma omp for schedule(static) nowait
      for (Index p = 0; p < panels; ++p) pack_x_panel(p);
    }
#pragma omp for schedule(static)
    for (std::size_t u = 0; u < unit_count; ++u) compute_unit(units[u]);
    const int id = omp_get_thread_num();
    if (path == Path::gemm) {
      if (extra > 0) {
#pragma omp for schedule(static)
        for (Index p = 0; p < panels; ++p) pack_extra_panel(p);
      }
      // Blocks of kGemmCols outputs taken dynamically: a core slowed by other work (a VM's
      // neighbour, an efficiency core) takes fewer (a tile's bits do not depend on its thread).
      const Index blocks = (out + kGemmCols - 1) / kGemmCols;
#pragma omp for schedule(dynamic, 1) nowait
      for (Index b = 0; b < blocks; ++b) {
        run_gemm(b * kGemmCols, std::min(out, (b + 1) * kGemmCols), wg + id * wg_size);
      }
    } else {
      const auto [ob, oe] = thread_range(out, id, omp_get_num_threads(), align);
      run_range(ob, oe);
    }
  }
#else
  (void)align;
#endif
}

}  // namespace
}  // namespace detail

template <SupportedScalar TW>
void lora_forward(MatrixView<const float> X, WeightView<const TW> W, MatrixView<const float> A,
                  MatrixView<const float> B, double scale, MatrixView<float> Y, const LoraForwardOptions& options) {
  const LoraTerm term{A, B, scale};
  detail::forward<TW>("lora_forward", X, W, std::span<const LoraTerm>(&term, 1), nullptr, Y, options);
}

template <SupportedScalar TW>
void lora_forward(MatrixView<const float> X, WeightView<const TW> W, std::span<const LoraTerm> terms,
                  MatrixView<float> Y, const LoraForwardOptions& options) {
  detail::forward<TW>("lora_forward", X, W, terms, nullptr, Y, options);
}

template <SupportedScalar TW>
void lora_forward_mixed(MatrixView<const float> X, WeightView<const TW> W, std::span<const LoraTerm> terms,
                        std::span<const std::int32_t> adapter, MatrixView<float> Y,
                        const LoraForwardOptions& options) {
  if (X.rows >= 0 && adapter.size() != static_cast<std::size_t>(X.rows)) {
    detail::fail("lora_forward_mixed", "adapter has {} entries but X is {}x{} (one entry per token)", adapter.size(),
                 X.rows, X.cols);
  }
  detail::forward<TW>("lora_forward_mixed", X, W, terms, adapter.data(), Y, options);
}

#define LOWRANK_INSTANTIATE(TW)                                                                                \
  template void lora_forward<TW>(MatrixView<const float>, WeightView<const TW>, MatrixView<const float>,       \
                                 MatrixView<const float>, double, MatrixView<float>, const LoraForwardOptions&); \
  template void lora_forward<TW>(MatrixView<const float>, WeightView<const TW>, std::span<const LoraTerm>,     \
                                 MatrixView<float>, const LoraForwardOptions&);                                \
  template void lora_forward_mixed<TW>(MatrixView<const float>, WeightView<const TW>, std::span<const LoraTerm>, \
                                       std::span<const std::int32_t>, MatrixView<float>, const LoraForwardOptions&);
LOWRANK_INSTANTIATE(float)
LOWRANK_INSTANTIATE(double)
LOWRANK_INSTANTIATE(bf16)
LOWRANK_INSTANTIATE(f16)
#undef LOWRANK_INSTANTIATE

LOWRANK_END_NAMESPACE
