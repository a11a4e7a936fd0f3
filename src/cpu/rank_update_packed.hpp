// Internal: fp32 rank updates from operands the caller packs itself (es::aggregate_update scatters
// its noise factors into this layout group by group instead of forming the chunk's whole U and V,
// saving rank_update's packing pass: 12% of an EGGROLL update of a 1024 x 1024 weight, Zen 3).
#pragma once

#include "lowrank/core/config.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

struct RankUpdateKernels;

/// Packed operands of C += A B^T, C m x n, depth r, for the active target's fp32 micro-tile:
/// panel p of A holds rows [p mr, p mr + mr) as `a[(p r + k) mr + i]` (rows past m zero), block q
/// of B rows [q nr, q nr + nr) as `b[(q r + k) nr + j]` (rows past n zero). The caller writes every
/// element, padding included.
struct PackedOperands {
  Index m = 0, n = 0, r = 0;
  int mr = 1, nr = 1;
  const RankUpdateKernels* kernels = nullptr;  // the target's kernels at packing time (a later
                                               // force_target must not change the tile sizes)
  float* a = nullptr;
  float* b = nullptr;
  Index panels() const { return (m + mr - 1) / mr; }
  Index blocks() const { return (n + nr - 1) / nr; }
};

/// Buffers for (m, n, r) in the calling thread's workspace (valid until its next rank update or
/// the next call of this function on the thread).
PackedOperands packed_operands(Index m, Index n, Index r);

/// C += A B^T from `ops` (C fp32, `ops.m x ops.n`, unit column stride), with the kernels `ops` was
/// packed for: every element the same fp32 chain of fused multiply-adds as
/// rank_update(C, A, B, 1.0), hence the same bits, on any thread count.
void rank_update_packed(MatrixView<float> c, const PackedOperands& ops, int max_threads);

}  // namespace detail
LOWRANK_END_NAMESPACE
