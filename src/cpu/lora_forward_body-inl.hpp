// The lora_forward micro-kernels, written once over a small vector-ops interface and included by
// each per-ISA translation unit inside its own namespace (no include guard on purpose).
//
// Before including, the TU includes float_bits-inl.hpp (Bf16, F16) and defines in its namespace
//   struct Ops { using V; static constexpr int kLanes; zero(), set1(float), fma(a, b, c) = a * b + c,
//                load(const float*), load(const Bf16*), load(const F16*) (lane l = element l),
//                store(float*, V), hsum(V) (a fixed order), prefetch(const void*) };
//
// Every output element is computed by the same sequence of operations whatever tile it falls in
// (tails run the same code on zero-padded copies), so results do not depend on the tiling, the
// thread count or the other tokens of the batch.

// ---- dot form: y(t, o) = <x_t, w_o> (+ <xa_t, wa_o>) (+ bias_o) --------------------------------

template <class Ops, int MT, int NT, class S>
[[gnu::always_inline]] inline void dot_accumulate(typename Ops::V (&acc)[MT][NT], const float* const (&x)[MT],
                                                  const S* const (&w)[NT], FIndex depth) {
  using V = typename Ops::V;
  constexpr int L = Ops::kLanes;
  FIndex k = 0;
  for (; k + L <= depth; k += L) {
    if constexpr (MT > NT) {
      V wv[NT];
#pragma GCC unroll 8
      for (int n = 0; n < NT; ++n) wv[n] = Ops::load(w[n] + k);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const V xv = Ops::load(x[m] + k);
#pragma GCC unroll 8
        for (int n = 0; n < NT; ++n) acc[m][n] = Ops::fma(xv, wv[n], acc[m][n]);
      }
    } else {
      V xv[MT];
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) xv[m] = Ops::load(x[m] + k);
#pragma GCC unroll 8
      for (int n = 0; n < NT; ++n) {
        const V wv = Ops::load(w[n] + k);
#pragma GCC unroll 8
        for (int m = 0; m < MT; ++m) acc[m][n] = Ops::fma(xv[m], wv, acc[m][n]);
      }
    }
  }
  if (k < depth) {
    // The tail as one zero-padded vector: the same lanes and operations as a full one.
    const FIndex rest = depth - k;
    float xb[MT][L] = {};
    S wb[NT][L] = {};
    for (int m = 0; m < MT; ++m)
      for (FIndex l = 0; l < rest; ++l) xb[m][l] = x[m][k + l];
    for (int n = 0; n < NT; ++n)
      for (FIndex l = 0; l < rest; ++l) wb[n][l] = w[n][k + l];
    for (int m = 0; m < MT; ++m) {
      const V xv = Ops::load(xb[m]);
      for (int n = 0; n < NT; ++n) acc[m][n] = Ops::fma(xv, Ops::load(wb[n]), acc[m][n]);
    }
  }
}

// The reduction over k runs in chunks of kChunk (a multiple of every vector width), so that the
// chunks of up to 16 x rows and NT w rows being multiplied stay in L1 (16 KiB + NT KiB at fp32);
// between chunks the vector accumulators are parked in a small buffer, which leaves every
// element's arithmetic unchanged.
constexpr FIndex kChunk = 256;
constexpr int kBlockTokens = 16;  // tokens whose accumulators are parked together

template <class Ops, int MT, int NT, class S>
inline void dot_group_chunk(const DotArgs& a, typename Ops::V* buf, FIndex t0, FIndex o0, FIndex k0, FIndex k1,
                            bool first) {
  using V = typename Ops::V;
  V acc[MT][NT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NT; ++n) acc[m][n] = first ? Ops::zero() : buf[m * NT + n];
  const S* const w0 = static_cast<const S*>(a.w);
  const float* x[MT];
  const S* w[NT];
  for (int m = 0; m < MT; ++m) x[m] = a.x + (t0 + m) * a.ldx + k0;
  for (int n = 0; n < NT; ++n) w[n] = w0 + (o0 + n) * a.ldw + k0;
  dot_accumulate<Ops, MT, NT, S>(acc, x, w, k1 - k0);
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NT; ++n) buf[m * NT + n] = acc[m][n];
}

template <class Ops, int MT, int NT>
inline void dot_group_finish(const DotArgs& a, const typename Ops::V* buf, FIndex t0, FIndex o0) {
  using V = typename Ops::V;
  V acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) acc[m][n] = buf[m * NT + n];
  if (a.aug_depth > 0) {
    const float* x[MT];
    const float* w[NT];
    for (int m = 0; m < MT; ++m) x[m] = a.xa + (t0 + m) * a.ldxa;
    for (int n = 0; n < NT; ++n) w[n] = a.wa + (o0 + n) * a.ldwa;
    dot_accumulate<Ops, MT, NT, float>(acc, x, w, a.aug_depth);
  }
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) {
      float value = Ops::hsum(acc[m][n]);
      if (a.bias != nullptr) value += a.bias[o0 + n];
      a.y[(t0 + m) * a.ldy + (o0 + n) * a.ycs] = value;
    }
}

template <class Ops, int NT, class S>
inline void dot_rest_chunk(const DotArgs& a, typename Ops::V* buf, FIndex rest, FIndex t0, FIndex o0, FIndex k0,
                           FIndex k1, bool first) {
  switch (rest) {
    case 3: dot_group_chunk<Ops, 3, NT, S>(a, buf, t0, o0, k0, k1, first); break;
    case 2: dot_group_chunk<Ops, 2, NT, S>(a, buf, t0, o0, k0, k1, first); break;
    case 1: dot_group_chunk<Ops, 1, NT, S>(a, buf, t0, o0, k0, k1, first); break;
    default: break;
  }
}

// NT output rows for every token: blocks of up to 16 tokens, each in groups of four tokens and a
// remainder group, chunk by chunk along k.
template <class Ops, int NT, class S>
void dot_all_tokens(const DotArgs& a, FIndex o0) {
  using V = typename Ops::V;
  for (FIndex tb = 0; tb < a.tokens; tb += kBlockTokens) {
    const FIndex nb = a.tokens - tb < kBlockTokens ? a.tokens - tb : kBlockTokens;
    const FIndex full = nb / 4 * 4, rest = nb - full;
    V buf[kBlockTokens * NT];
    FIndex k0 = 0;
    do {
      const FIndex k1 = a.depth - k0 < kChunk ? a.depth : k0 + kChunk;
      for (FIndex g = 0; g < full; g += 4) dot_group_chunk<Ops, 4, NT, S>(a, buf + g * NT, tb + g, o0, k0, k1, k0 == 0);
      dot_rest_chunk<Ops, NT, S>(a, buf + full * NT, rest, tb + full, o0, k0, k1, k0 == 0);
      k0 = k1;
    } while (k0 < a.depth);
    for (FIndex g = 0; g < full; g += 4) dot_group_finish<Ops, 4, NT>(a, buf + g * NT, tb + g, o0);
    switch (rest) {
      case 3: dot_group_finish<Ops, 3, NT>(a, buf + full * NT, tb + full, o0); break;
      case 2: dot_group_finish<Ops, 2, NT>(a, buf + full * NT, tb + full, o0); break;
      case 1: dot_group_finish<Ops, 1, NT>(a, buf + full * NT, tb + full, o0); break;
      default: break;
    }
  }
}

template <class Ops, int NT, class S>
void dot_rows(const DotArgs& a) {
  FIndex o = 0;
  for (; o + NT <= a.outs; o += NT) dot_all_tokens<Ops, NT, S>(a, o);
  if constexpr (NT > 2) {
    if (a.outs - o >= 2) {
      dot_all_tokens<Ops, 2, S>(a, o);
      o += 2;
    }
  }
  for (; o < a.outs; ++o) dot_all_tokens<Ops, 1, S>(a, o);
}

// Tile shapes by token count: 12 accumulators from 3 tokens up (4 x 3, 3 x 4; 4 x 6 with 32
// vector registers), more output rows for one or two tokens, where W streams from memory and each
// x vector serves NT rows.
template <class Ops, class S>
void dot_kernel(const DotArgs& a) {
  if (a.tokens >= 4 && Ops::kRegisters >= 32) {
    dot_rows<Ops, 6, S>(a);
  } else if (a.tokens >= 4) {
    dot_rows<Ops, 3, S>(a);
  } else if (a.tokens == 3) {
    dot_rows<Ops, 4, S>(a);
  } else if (a.tokens == 2) {
    dot_rows<Ops, 6, S>(a);
  } else if (a.tokens == 1) {
    dot_rows<Ops, 8, S>(a);
  }
}

// ---- axpy form: acc(t, :) += x(t, k) w(k, :) for k in order -------------------------------------

template <class Ops, int MT, int U, class S>
inline void axpy_block(const AxpyArgs& a, FIndex t0, FIndex k0) {
  using V = typename Ops::V;
  constexpr int L = Ops::kLanes;
  const S* const wbase = static_cast<const S*>(a.w);
  V xb[MT][U];
  float* c[MT];
  const S* w[U];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    c[m] = a.acc + (t0 + m) * a.ldacc;
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) xb[m][u] = Ops::set1(a.x[(t0 + m) * a.ldx + k0 + u]);
  }
  for (int u = 0; u < U; ++u) w[u] = wbase + (k0 + u) * a.ldw;
  FIndex o = 0;
  for (; o + L <= a.outs; o += L) {
    V am[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) am[m] = Ops::load(c[m] + o);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const V wv = Ops::load(w[u] + o);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) am[m] = Ops::fma(xb[m][u], wv, am[m]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) Ops::store(c[m] + o, am[m]);
  }
  if (o < a.outs) {
    const FIndex rest = a.outs - o;
    float cb[MT][L] = {};
    S wb[U][L] = {};
    for (int m = 0; m < MT; ++m)
      for (FIndex l = 0; l < rest; ++l) cb[m][l] = c[m][o + l];
    for (int u = 0; u < U; ++u)
      for (FIndex l = 0; l < rest; ++l) wb[u][l] = w[u][o + l];
    V am[MT];
    for (int m = 0; m < MT; ++m) am[m] = Ops::load(cb[m]);
    for (int u = 0; u < U; ++u) {
      const V wv = Ops::load(wb[u]);
      for (int m = 0; m < MT; ++m) am[m] = Ops::fma(xb[m][u], wv, am[m]);
    }
    for (int m = 0; m < MT; ++m) {
      Ops::store(cb[m], am[m]);
      for (FIndex l = 0; l < rest; ++l) c[m][o + l] = cb[m][l];
    }
  }
}

template <class Ops, int U, class S>
void axpy_all_tokens(const AxpyArgs& a, FIndex k0) {
  FIndex t = 0;
  for (; t + 3 <= a.tokens; t += 3) axpy_block<Ops, 3, U, S>(a, t, k0);
  switch (a.tokens - t) {
    case 2: axpy_block<Ops, 2, U, S>(a, t, k0); break;
    case 1: axpy_block<Ops, 1, U, S>(a, t, k0); break;
    default: break;
  }
}

// Four rows of W per pass over the accumulators (one load and store of each per four FMAs).
template <class Ops, class S>
void axpy_kernel(const AxpyArgs& a) {
  FIndex k = 0;
  for (; k + 4 <= a.depth; k += 4) axpy_all_tokens<Ops, 4, S>(a, k);
  for (; k < a.depth; ++k) axpy_all_tokens<Ops, 1, S>(a, k);
}

// ---- packing of W and X for the GEMM path -----------------------------------------------------
// The TU also defines struct Quad { Q; load(const S*) (4 consecutive elements widened), store,
// zero(), transpose(a, b, c, d) (4 x 4, in place), store_pairs(p, stride, a, b) (the pairs
// (a[k], b[k]) at p + k stride) }.

inline float widen(float x) { return x; }
inline float widen(Bf16 x) { return bf16_bits_to_f32(x.bits); }
inline float widen(F16 x) { return f16_bits_to_f32(x.bits); }

template <class S>
void pack_w_kernel(const PackWArgs& p) {
  const S* const w = static_cast<const S*>(p.w);
  float* const d = p.dst;
  const FIndex nr = p.nr, depth = p.depth, rs = p.rs, cs = p.cs;
  if (p.rows == nr && nr % 4 == 0 && cs == 1) {
    // Rows of W contiguous along k (nn.Linear): 4 x 4 transposes. Each row's chunk is a short
    // stream on its own page, which the hardware prefetchers learn too late: the rows two groups
    // ahead, at the same depth, are prefetched a line at a time. Past the panel's last rows these
    // are the next panel's, which the caller packs next except after a block's last panel (then
    // the next depth chunk comes first and the lines may be gone when they are used). The
    // addresses are formed as integers: they may lie outside W (prefetches never fault).
    for (FIndex j = 0; j < nr; j += 4) {
      const S* const r0 = w + j * rs;
      const std::uintptr_t next =
          reinterpret_cast<std::uintptr_t>(r0) + static_cast<std::uintptr_t>(8 * rs) * sizeof(S);
      constexpr FIndex kLine = 64 / sizeof(S);
      FIndex k = 0;
      for (; k + 4 <= depth; k += 4) {
        if (k % kLine == 0) {
          for (FIndex q = 0; q < 4; ++q) {
            const std::uintptr_t line = next + static_cast<std::uintptr_t>(q * rs + k) * sizeof(S);
            __builtin_prefetch(reinterpret_cast<const void*>(line));
          }
        }
        typename Quad::Q a = Quad::load(r0 + k), b = Quad::load(r0 + rs + k), c = Quad::load(r0 + 2 * rs + k),
                         e = Quad::load(r0 + 3 * rs + k);
        Quad::transpose(a, b, c, e);
        Quad::store(d + k * nr + j, a);
        Quad::store(d + (k + 1) * nr + j, b);
        Quad::store(d + (k + 2) * nr + j, c);
        Quad::store(d + (k + 3) * nr + j, e);
      }
      for (; k < depth; ++k)
        for (FIndex i = 0; i < 4; ++i) d[k * nr + j + i] = widen(r0[i * rs + k]);
    }
    return;
  }
  if (p.rows == nr && nr % 4 == 0 && rs == 1) {
    // Rows of W contiguous along j (Conv1D): copies.
    for (FIndex k = 0; k < depth; ++k)
      for (FIndex j = 0; j < nr; j += 4) Quad::store(d + k * nr + j, Quad::load(w + k * cs + j));
    return;
  }
  for (FIndex k = 0; k < depth; ++k)
    for (FIndex j = 0; j < nr; ++j) d[k * nr + j] = j < p.rows ? widen(w[j * rs + k * cs]) : 0.0f;
}

// Four rows of X at a time through 4 x 4 transposes, then pairs of rows (two-float stores), then
// single rows; missing rows (i >= rows) read as zeros.
inline void pack_x_kernel(const PackXArgs& p) {
  const FIndex mr = p.mr, depth = p.depth, rows = p.rows, rs = p.rs, k4 = depth / 4 * 4;
  float* const d = p.dst;
  auto row = [&](FIndex i) -> const float* { return i < rows ? p.x + i * rs : nullptr; };
  auto load = [](const float* r, FIndex k) { return r != nullptr ? Quad::load(r + k) : Quad::zero(); };
  FIndex i0 = 0;
  for (; i0 + 4 <= mr; i0 += 4) {
    const float *r0 = row(i0), *r1 = row(i0 + 1), *r2 = row(i0 + 2), *r3 = row(i0 + 3);
    for (FIndex k = 0; k < k4; k += 4) {
      typename Quad::Q a = load(r0, k), b = load(r1, k), c = load(r2, k), e = load(r3, k);
      Quad::transpose(a, b, c, e);
      Quad::store(d + k * mr + i0, a);
      Quad::store(d + (k + 1) * mr + i0, b);
      Quad::store(d + (k + 2) * mr + i0, c);
      Quad::store(d + (k + 3) * mr + i0, e);
    }
  }
  for (; i0 + 2 <= mr; i0 += 2) {
    const float *r0 = row(i0), *r1 = row(i0 + 1);
    for (FIndex k = 0; k < k4; k += 4) Quad::store_pairs(d + k * mr + i0, mr, load(r0, k), load(r1, k));
  }
  for (; i0 < mr; ++i0) {
    const float* r0 = row(i0);
    for (FIndex k = 0; k < k4; ++k) d[k * mr + i0] = r0 != nullptr ? r0[k] : 0.0f;
  }
  for (FIndex k = k4; k < depth; ++k)
    for (FIndex i = 0; i < mr; ++i) d[k * mr + i] = i < rows ? p.x[i * rs + k] : 0.0f;
}

inline void dot_f32(const DotArgs& a) { dot_kernel<Ops, float>(a); }
inline void dot_bf16(const DotArgs& a) { dot_kernel<Ops, Bf16>(a); }
inline void dot_f16(const DotArgs& a) { dot_kernel<Ops, F16>(a); }
inline void axpy_f32(const AxpyArgs& a) { axpy_kernel<Ops, float>(a); }
inline void axpy_bf16(const AxpyArgs& a) { axpy_kernel<Ops, Bf16>(a); }
inline void axpy_f16(const AxpyArgs& a) { axpy_kernel<Ops, F16>(a); }

constexpr ForwardKernels kForwardKernels{&dot_f32,  &dot_bf16, &dot_f16, &axpy_f32, &axpy_bf16, &axpy_f16,
                                         &pack_w_kernel<float>, &pack_w_kernel<Bf16>, &pack_w_kernel<F16>,
                                         &pack_x_kernel};
