// The rank-update micro-kernel, written once over a small vector-ops interface and included by
// each per-ISA translation unit inside its own namespace (no include guard on purpose).
//
// Before including, the TU defines in its namespace:
//   struct OpsF32 { using V; static constexpr int kLanes; set1, fma(a, b, c) = a * b + c, prefetch,
//                   load/store of one vector for float* and F16* (converting, RNE), and either
//                   load/store for Bf16* (kBf16Pairs = false) or, with kBf16Pairs = true, the pair
//                   functions load_bf16_pair, store_bf16_pair (RNE, not valid for NaN), any_nan };
//   struct OpsF64 { the same for double* };
// and the tile sizes kMrF32, kNvF32, kMrF64, kNvF64 (rows; vectors per row), and
// kBf16Order: the order in which a bf16 row's NV * kLanes columns land in the vector lanes
// (B is packed in that order; nullptr when it is the identity).
//
// Every element is computed as acc = C(i, j) (+0 in the store-only kernel, f32_store, which does
// not read C); for k in 0..r-1: acc = fma(a(i, k), b(j, k), acc); C(i, j) = round(acc). Edge
// tiles run the same code on a padded copy, so an element's bits do not depend on where its tile
// falls, hence not on the thread count.

// bf16 pair fallback for a pair holding a NaN: exact scalar rounding keeps it a NaN. Rare, cold.
template <class Ops, class V>
[[gnu::noinline, gnu::cold]] void store_bf16_pair_exact(Bf16* q, V even, V odd) {
  float e[Ops::kLanes], o[Ops::kLanes];
  Ops::store(e, even);
  Ops::store(o, odd);
  for (int i = 0; i < Ops::kLanes; ++i) {
    q[2 * i].bits = f32_to_bf16_bits(e[i]);
    q[2 * i + 1].bits = f32_to_bf16_bits(o[i]);
  }
}

// NV vectors of one row of C, converted to and from the compute type. With kBf16Pairs, a bf16 row
// is handled in pairs of vectors: even columns in the first, odd columns in the second
// (kBf16Order), so that widening is a shift or a mask and narrowing a shift and a blend.
template <class Ops, class S>
constexpr bool bf16_pairs() {
  if constexpr (std::is_same_v<S, Bf16>) {
    return Ops::kBf16Pairs;
  } else {
    return false;
  }
}

template <class Ops, int NV, class S, class V>
inline void load_row(const S* p, V* out) {
  if constexpr (bf16_pairs<Ops, S>()) {
    static_assert(NV % 2 == 0, "bf16 rows come in pairs of vectors");
    for (int v = 0; v < NV; v += 2) Ops::load_bf16_pair(p + v * Ops::kLanes, out[v], out[v + 1]);
  } else {
    for (int v = 0; v < NV; ++v) out[v] = Ops::load(p + v * Ops::kLanes);
  }
}

template <class Ops, int NV, class S, class V>
inline void store_row(S* p, const V* in) {
  if constexpr (bf16_pairs<Ops, S>()) {
    for (int v = 0; v < NV; v += 2) {
      Bf16* q = p + v * Ops::kLanes;
      if (Ops::any_nan(in[v], in[v + 1])) {
        store_bf16_pair_exact<Ops>(q, in[v], in[v + 1]);
      } else {
        Ops::store_bf16_pair(q, in[v], in[v + 1]);
      }
    }
  } else {
    for (int v = 0; v < NV; ++v) Ops::store(p + v * Ops::kLanes, in[v]);
  }
}

// kStore: C = A B^T, C only written (every accumulator starts at +0, as from a zeroed C).
template <class Ops, int MR, int NV, bool kStore, class S, class C>
inline void tile(const C* __restrict a, const C* __restrict b, KIndex r, S* __restrict c, KIndex ldc,
                 KIndex prefetch) {
  using V = typename Ops::V;
  constexpr int W = Ops::kLanes;
  constexpr int NR = NV * W;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    // The address is formed as an integer: it may lie outside C (prefetches never fault).
    Ops::prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(c + i * ldc) +
                                                static_cast<std::uintptr_t>(prefetch) * sizeof(S)));
    if constexpr (kStore) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = Ops::set1(0.0f);
    } else {
      load_row<Ops, NV>(c + i * ldc, acc[i]);
    }
  }
  // A long product: the next tile's rows of C, to L1 (the panel's prefetch distance is tuned for
  // short ones, and a line it fetches would leave L1 again before a long product reaches it).
  if (r >= 64) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) Ops::prefetch(c + i * ldc + NR);
  }
  // Four steps of k per loop iteration: in-process A/B on Zen 3, 3-10% faster on the
  // 512 x 1024 x 1024 GEMM path of linear_forward and 4-14% on the ES update (the fmas keep
  // their order: same bits).
#pragma GCC unroll 4
  for (KIndex k = 0; k < r; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Ops::load(b + k * NR + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V ai = Ops::set1(a[k * MR + i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = Ops::fma(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) store_row<Ops, NV>(c + i * ldc, acc[i]);
}

template <class Ops, int MR, int NV, bool kStore = false, class S, class C>
void panel(const C* a, const C* b, KIndex r, S* c, KIndex ldc, KIndex rows, KIndex cols, KIndex prefetch) {
  constexpr KIndex NR = NV * Ops::kLanes;
  KIndex j = 0;
  if (rows == MR) {
    for (; j + NR <= cols; j += NR) tile<Ops, MR, NV, kStore>(a, b + (j / NR) * r * NR, r, c + j, ldc, prefetch);
  }
  // Ragged edge: the same tile on a zero-padded copy of the storage values.
  for (; j < cols; j += NR) {
    S buffer[MR * NR] = {};
    const KIndex width = cols - j < NR ? cols - j : NR;
    if constexpr (!kStore) {
      for (KIndex i = 0; i < rows; ++i)
        for (KIndex jj = 0; jj < width; ++jj) buffer[i * NR + jj] = c[i * ldc + j + jj];
    }
    tile<Ops, MR, NV, kStore>(a, b + (j / NR) * r * NR, r, buffer, NR, 0);
    for (KIndex i = 0; i < rows; ++i)
      for (KIndex jj = 0; jj < width; ++jj) c[i * ldc + j + jj] = buffer[i * NR + jj];
  }
}

inline void panel_f32(const float* a, const float* b, KIndex r, void* c, KIndex ldc, KIndex rows, KIndex cols,
                        KIndex prefetch) {
  panel<OpsF32, kMrF32, kNvF32>(a, b, r, static_cast<float*>(c), ldc, rows, cols, prefetch);
}
inline void panel_f32_store(const float* a, const float* b, KIndex r, void* c, KIndex ldc, KIndex rows, KIndex cols,
                            KIndex prefetch) {
  panel<OpsF32, kMrF32, kNvF32, true>(a, b, r, static_cast<float*>(c), ldc, rows, cols, prefetch);
}
inline void panel_bf16(const float* a, const float* b, KIndex r, void* c, KIndex ldc, KIndex rows, KIndex cols,
                        KIndex prefetch) {
  panel<OpsF32, kMrF32, kNvF32>(a, b, r, static_cast<Bf16*>(c), ldc, rows, cols, prefetch);
}
inline void panel_f16(const float* a, const float* b, KIndex r, void* c, KIndex ldc, KIndex rows, KIndex cols,
                        KIndex prefetch) {
  panel<OpsF32, kMrF32, kNvF32>(a, b, r, static_cast<F16*>(c), ldc, rows, cols, prefetch);
}
inline void panel_f64(const double* a, const double* b, KIndex r, double* c, KIndex ldc, KIndex rows, KIndex cols,
                      KIndex prefetch) {
  panel<OpsF64, kMrF64, kNvF64>(a, b, r, c, ldc, rows, cols, prefetch);
}

constexpr RankUpdateKernels kKernels{kMrF32,     kNvF32 * OpsF32::kLanes, kMrF64,     kNvF64 * OpsF64::kLanes,
                                     &panel_f32, &panel_bf16,              &panel_f16, &panel_f64,
                                     kBf16Order, &panel_f32_store};
