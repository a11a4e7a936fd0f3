// AVX2 + FMA ES kernels (compiled with -mavx2 -mfma -mf16c; chosen at run time): Philox4x32-10 on
// eight counters at once and the portable Box-Muller transform of core/philox.hpp lane by lane.
// Every lane performs exactly the scalar sequence of correctly rounded operations, so the normals
// are bitwise those of es::noise_normals4.
#include <immintrin.h>

#include "es_kernels_api.hpp"

// An optimization barrier on two vector values (GCC and Clang, the compilers that build the x86
// kernels): their values are unchanged, but the compiler can no longer see how they were formed.
#define LOWRANK_OPAQUE2(a, b) asm("" : "+x"(a), "+x"(b))

LOWRANK_BEGIN_NAMESPACE
namespace detail {
namespace {

// Philox4x32-10 of the counters (c0 + lane, c1, c2, c3), lane = 0..7, under `keys`; out[w]
// holds word w of the eight blocks. The state is kept as two vectors per word, the even blocks
// and the odd blocks each in the low 32 bits of a 64-bit lane, because _mm256_mul_epu32 reads
// exactly those: a round is then two multiplies, two 32-bit swaps and four xors per parity, with no
// other data movement (the high halves carry garbage that nothing reads).
// The ten round keys of Philox4x32-10 (the Weyl sequence of the key), broadcast once per call.
struct RoundKeys {
  __m256i k0[10], k1[10];
  RoundKeys(std::uint32_t a, std::uint32_t b) {
    for (int round = 0; round < 10; ++round) {
      k0[round] = _mm256_set1_epi32(static_cast<int>(a));
      k1[round] = _mm256_set1_epi32(static_cast<int>(b));
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
  }
};

inline void philox8(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3, const RoundKeys& keys,
                    __m256i out[4]) {
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53);
  const __m256i m1 = _mm256_set1_epi64x(0xCD9E8D57);
  const __m256i base = _mm256_set1_epi64x(c0);
  __m256i x0[2] = {_mm256_add_epi64(base, _mm256_setr_epi64x(0, 2, 4, 6)),
                   _mm256_add_epi64(base, _mm256_setr_epi64x(1, 3, 5, 7))};
  __m256i x1[2] = {_mm256_set1_epi32(static_cast<int>(c1)), _mm256_set1_epi32(static_cast<int>(c1))};
  __m256i x2[2] = {_mm256_set1_epi32(static_cast<int>(c2)), _mm256_set1_epi32(static_cast<int>(c2))};
  __m256i x3[2] = {_mm256_set1_epi32(static_cast<int>(c3)), _mm256_set1_epi32(static_cast<int>(c3))};
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = keys.k0[round];
    const __m256i key1 = keys.k1[round];
    for (int p = 0; p < 2; ++p) {
      const __m256i p0 = _mm256_mul_epu32(x0[p], m0);  // low: lo0, high: hi0
      const __m256i p1 = _mm256_mul_epu32(x2[p], m1);  // low: lo1, high: hi1
      // hi into the low half by a 32-bit swap within each 64-bit lane (Zen 1 issues it on two
      // pipes, a 64-bit shift on one, which the multiplies' neighbours already crowd): 3% fewer
      // cycles per normal than _mm256_srli_epi64(p, 32). The round key goes into the other
      // operand first, off the multiply's chain: one xor after the swap instead of two (mul, swap,
      // xor is a 5-cycle chain on Zen 3). The barrier keeps the compiler from re-associating the
      // xors back onto the chain (Zen 3: 8% fewer cycles per Philox word, 1% faster rank-4
      // population forward; same bits, xor being associative).
      __m256i a = _mm256_xor_si256(x1[p], key0), b = _mm256_xor_si256(x3[p], key1);
      LOWRANK_OPAQUE2(a, b);
      const __m256i n0 = _mm256_xor_si256(_mm256_shuffle_epi32(p1, 0xB1), a);
      const __m256i n2 = _mm256_xor_si256(_mm256_shuffle_epi32(p0, 0xB1), b);
      x0[p] = n0;
      x1[p] = p1;
      x2[p] = n2;
      x3[p] = p0;
    }
  }
  // Interleave: lane 2i from the even vector, lane 2i + 1 from the odd one.
  out[0] = _mm256_blend_epi32(x0[0], _mm256_slli_epi64(x0[1], 32), 0xAA);
  out[1] = _mm256_blend_epi32(x1[0], _mm256_slli_epi64(x1[1], 32), 0xAA);
  out[2] = _mm256_blend_epi32(x2[0], _mm256_slli_epi64(x2[1], 32), 0xAA);
  out[3] = _mm256_blend_epi32(x3[0], _mm256_slli_epi64(x3[1], 32), 0xAA);
}

// normal_pair (core/philox.hpp) on N groups of eight word pairs, statement by statement across
// the groups: their dependency chains (a division, a square root and two polynomial chains each)
// then interleave in the instruction stream, which Zen 1's out-of-order window does not do by
// itself across two sequential calls (N = 2: 7% fewer cycles per normal than two calls).
template <int N>
inline void normal_pairs8(const __m256i* w0, const __m256i* w1, __m256* c_out, __m256* s_out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 radius[N], s[N], s2[N], p[N], ef[N];
  for (int g = 0; g < N; ++g) {
    const __m256 k = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_srli_epi32(w0[g], 8), _mm256_set1_epi32(1)));
    const __m256i kb = _mm256_castps_si256(k);
    const __m256i mant = _mm256_and_si256(kb, _mm256_set1_epi32(0x007fffff));
    const __m256i big = _mm256_cmpgt_epi32(mant, _mm256_set1_epi32(0x3504f3));
    const __m256i e = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_srli_epi32(kb, 23), _mm256_set1_epi32(127 + 24)), big);
    // m = mant with exponent 0 (m in [1, 2)) or -1 where big (one blend instead of shift and add).
    const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
        mant, _mm256_blendv_epi8(_mm256_set1_epi32(127 << 23), _mm256_set1_epi32(126 << 23), big)));
    s[g] = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
    ef[g] = _mm256_cvtepi32_ps(e);
  }
  for (int g = 0; g < N; ++g) s2[g] = _mm256_mul_ps(s[g], s[g]);
  for (int g = 0; g < N; ++g) p[g] = _mm256_fmadd_ps(_mm256_set1_ps(detail::kAtanh7), s2[g], _mm256_set1_ps(detail::kAtanh5));
  for (int g = 0; g < N; ++g) p[g] = _mm256_fmadd_ps(p[g], s2[g], _mm256_set1_ps(detail::kAtanh3));
  for (int g = 0; g < N; ++g) p[g] = _mm256_fmadd_ps(p[g], s2[g], one);
  for (int g = 0; g < N; ++g) {
    const __m256 minus2_ln_u =
        _mm256_fmadd_ps(ef[g], _mm256_set1_ps(-2.0f * detail::kLn2Hi),
                        _mm256_fmadd_ps(ef[g], _mm256_set1_ps(-2.0f * detail::kLn2Lo),
                                        _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(-4.0f), s[g]), p[g])));
    radius[g] = _mm256_sqrt_ps(minus2_ln_u);
  }
  __m256i v[N];
  __m256 t[N], t2[N], ps[N], pc[N];
  for (int g = 0; g < N; ++g) {
    // The angle's t = (j - q 2^22) 2^-22 with j = w1 >> 8 is the low 22 bits of j sign-extended,
    // times 2^-22: w1 with its low 8 bits cleared, shifted left by 2 and read as a signed 32-bit
    // integer, times 2^-32 (the conversion and the scaling are exact). The quadrant
    // q = (j + 2^21) >> 22 (mod 4) is bits 31 (q1) and 30 (q0) of w1 + 2^29. Same bits as the
    // scalar sequence, with 4 fewer vector operations (of them 4 shifts) per 16 normals.
    const __m256i ts = _mm256_slli_epi32(_mm256_and_si256(w1[g], _mm256_set1_epi32(-256)), 2);
    t[g] = _mm256_mul_ps(_mm256_cvtepi32_ps(ts), _mm256_set1_ps(0x1.0p-32f));
    t2[g] = _mm256_mul_ps(t[g], t[g]);
    v[g] = _mm256_add_epi32(w1[g], _mm256_set1_epi32(1 << 29));
  }
  for (int g = 0; g < N; ++g) {
    ps[g] = _mm256_fmadd_ps(_mm256_set1_ps(detail::kSin9), t2[g], _mm256_set1_ps(detail::kSin7));
    pc[g] = _mm256_fmadd_ps(_mm256_set1_ps(detail::kCos8), t2[g], _mm256_set1_ps(detail::kCos6));
  }
  for (int g = 0; g < N; ++g) {
    ps[g] = _mm256_fmadd_ps(ps[g], t2[g], _mm256_set1_ps(detail::kSin5));
    pc[g] = _mm256_fmadd_ps(pc[g], t2[g], _mm256_set1_ps(detail::kCos4));
  }
  for (int g = 0; g < N; ++g) {
    ps[g] = _mm256_fmadd_ps(ps[g], t2[g], _mm256_set1_ps(detail::kSin3));
    pc[g] = _mm256_fmadd_ps(pc[g], t2[g], _mm256_set1_ps(detail::kCos2));
  }
  for (int g = 0; g < N; ++g) {
    ps[g] = _mm256_fmadd_ps(ps[g], t2[g], _mm256_set1_ps(detail::kSin1));
    pc[g] = _mm256_fmadd_ps(pc[g], t2[g], one);
  }
  for (int g = 0; g < N; ++g) {
    const __m256 sin_t = _mm256_mul_ps(t[g], ps[g]);
    const __m256 cos_t = pc[g];
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256i q0 = _mm256_slli_epi32(v[g], 1);  // bit 31: q0 (the rest is not read)
    const __m256 odd = _mm256_castsi256_ps(q0);
    const __m256 a = _mm256_blendv_ps(cos_t, sin_t, odd);
    const __m256 b = _mm256_blendv_ps(sin_t, cos_t, odd);
    const __m256i neg_s = _mm256_and_si256(v[g], sign);                       // q1
    const __m256i neg_c = _mm256_and_si256(_mm256_xor_si256(v[g], q0), sign);  // q0 xor q1
    c_out[g] = _mm256_mul_ps(radius[g], _mm256_xor_ps(a, _mm256_castsi256_ps(neg_c)));
    s_out[g] = _mm256_mul_ps(radius[g], _mm256_xor_ps(b, _mm256_castsi256_ps(neg_s)));
  }
}

// Blocks first .. first + 15 of the noise stream: two Philox calls, then one transform over all
// four groups of word pairs (6-8% fewer cycles per normal than two passes of eight on Zen 3; three
// Philox calls spill). cc[2 h], ss[2 h], cc[2 h + 1], ss[2 h + 1] are the four normals of blocks
// first + 8 h + lane (word pairs (0, 1) and (2, 3), cosine then sine branch).
inline void normals16(const es::NoiseKey& key, std::uint32_t index, std::uint32_t first, const RoundKeys& keys,
                      __m256 cc[4], __m256 ss[4]) {
  __m256i wa[4], wb[4];
  philox8(first, index, key.epoch, key.layer, keys, wa);
  philox8(first + 8u, index, key.epoch, key.layer, keys, wb);
  const __m256i w0[4] = {wa[0], wa[2], wb[0], wb[2]}, w1[4] = {wa[1], wa[3], wb[1], wb[3]};
  normal_pairs8<4>(w0, w1, cc, ss);
}

// Eight blocks' normals (cosine and sine branches of the word pairs (0, 1) and (2, 3), lane l =
// block l) stored in block order: block l -> (c01[l], s01[l], c23[l], s23[l]).
inline void store_blocks8(__m256 c01, __m256 s01, __m256 c23, __m256 s23, float* o) {
  const __m256 t0 = _mm256_unpacklo_ps(c01, s01), t1 = _mm256_unpackhi_ps(c01, s01);
  const __m256 t2 = _mm256_unpacklo_ps(c23, s23), t3 = _mm256_unpackhi_ps(c23, s23);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

void normals_avx2(const es::NoiseKey& key, std::uint32_t index, std::uint32_t first_block, std::uint64_t blocks,
                  float* out) {
  const RoundKeys keys(static_cast<std::uint32_t>(key.seed), static_cast<std::uint32_t>(key.seed >> 32));
  // The last partial group of eight blocks goes through a stack buffer (the extra counters are
  // computed and dropped), so that this TU calls no inline function of the headers: one compiled
  // with AVX2 flags could be picked by the linker for other callers (see kernel_api.hpp).
  alignas(32) float tail[32];
  std::uint64_t b = 0;
  // Sixteen blocks per pass (normals16).
  for (; b + 16 <= blocks; b += 16) {
    __m256 cc[4], ss[4];
    normals16(key, index, first_block + static_cast<std::uint32_t>(b), keys, cc, ss);
    store_blocks8(cc[0], ss[0], cc[1], ss[1], out + 4 * b);
    store_blocks8(cc[2], ss[2], cc[3], ss[3], out + 4 * (b + 8));
  }
  for (; b < blocks; b += 8) {
    const bool full = b + 8 <= blocks;
    __m256i w[4];
    philox8(first_block + static_cast<std::uint32_t>(b), index, key.epoch, key.layer, keys, w);
    const __m256i w0[2] = {w[0], w[2]}, w1[2] = {w[1], w[3]};
    __m256 cc[2], ss[2];
    normal_pairs8<2>(w0, w1, cc, ss);
    store_blocks8(cc[0], ss[0], cc[1], ss[1], full ? out + 4 * b : tail);
    if (!full) {
      for (std::uint64_t q = 0; q < 4 * (blocks - b); ++q) out[4 * b + q] = tail[q];
    }
  }
}

inline float fma1(float a, float b, float c) {
  return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

// Rank 4: block i of the stream is row i of the factor (elements 4 i .. 4 i + 3), so the four
// vectors of normal_pairs8 over eight blocks are already four columns of eight rows.
void rows4_t(const es::NoiseKey& key, std::uint32_t index, std::uint32_t first_block, std::ptrdiff_t rows, float* t,
             std::ptrdiff_t ld) {
  const RoundKeys keys(static_cast<std::uint32_t>(key.seed), static_cast<std::uint32_t>(key.seed >> 32));
  alignas(32) float tail[4][8];
  std::ptrdiff_t i0 = 0;
  // Sixteen rows per pass (normals16).
  for (; i0 + 16 <= rows; i0 += 16) {
    __m256 cc[4], ss[4];
    normals16(key, index, first_block + static_cast<std::uint32_t>(i0), keys, cc, ss);
    for (int h = 0; h < 2; ++h) {
      float* o = t + i0 + 8 * h;
      _mm256_storeu_ps(o, cc[2 * h]);
      _mm256_storeu_ps(o + ld, ss[2 * h]);
      _mm256_storeu_ps(o + 2 * ld, cc[2 * h + 1]);
      _mm256_storeu_ps(o + 3 * ld, ss[2 * h + 1]);
    }
  }
  for (std::ptrdiff_t i = i0; i < rows; i += 8) {
    __m256i w[4];
    philox8(first_block + static_cast<std::uint32_t>(i), index, key.epoch, key.layer, keys, w);
    __m256 col[4];
    const __m256i w0[2] = {w[0], w[2]}, w1[2] = {w[1], w[3]};
    __m256 cc[2], ss[2];
    normal_pairs8<2>(w0, w1, cc, ss);
    col[0] = cc[0], col[1] = ss[0], col[2] = cc[1], col[3] = ss[1];
    if (i + 8 <= rows) {
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(t + j * ld + i, col[j]);
    } else {
      for (int j = 0; j < 4; ++j) _mm256_store_ps(tail[j], col[j]);
      for (int j = 0; j < 4; ++j)
        for (std::ptrdiff_t q = 0; q < rows - i; ++q) t[j * ld + i + q] = tail[j][q];
    }
  }
}

void factors_t4_avx2(const es::NoiseKey& key, std::uint32_t index, std::ptrdiff_t in, std::ptrdiff_t out, float* bt,
                     std::ptrdiff_t ldb, float* at, std::ptrdiff_t lda) {
  rows4_t(key, index, 0, in, bt, ldb);
  rows4_t(key, index, static_cast<std::uint32_t>(in), out, at, lda);
}

// Horizontal sum of the eight lanes in a fixed order.
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// Up to four rank columns per pass: x is read once for their dot products and y once for their
// AXPYs. Each dot product keeps its own two accumulators over the same index split, and each
// y element takes the columns' fused multiply-adds in order j = 0..r-1: the bits do not depend
// on the grouping.
void row_term_avx2(const float* x, const float* bt, const float* at, std::ptrdiff_t in, std::ptrdiff_t out, int r,
                   float scale, float* y) {
  for (int j0 = 0; j0 < r; j0 += 4) {
    const int g = r - j0 < 4 ? r - j0 : 4;
    const float* b[4];
    const float* a[4];
    for (int q = 0; q < 4; ++q) {
      const int j = j0 + (q < g ? q : 0);
      b[q] = bt + j * in;
      a[q] = at + j * out;
    }
    __m256 acc0[4], acc1[4];
    for (int q = 0; q < 4; ++q) acc0[q] = acc1[q] = _mm256_setzero_ps();
    std::ptrdiff_t i = 0;
    for (; i + 16 <= in; i += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      for (int q = 0; q < g; ++q) {
        acc0[q] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(b[q] + i), acc0[q]);
        acc1[q] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(b[q] + i + 8), acc1[q]);
      }
    }
    float c[4] = {0, 0, 0, 0};
    __m256 cv[4];
    for (int q = 0; q < g; ++q) {
      float dot = hsum8(_mm256_add_ps(acc0[q], acc1[q]));
      for (std::ptrdiff_t t = i; t < in; ++t) dot = fma1(x[t], b[q][t], dot);
      c[q] = scale * dot;
      cv[q] = _mm256_set1_ps(c[q]);
    }
    std::ptrdiff_t o = 0;
    for (; o + 8 <= out; o += 8) {
      __m256 acc = _mm256_loadu_ps(y + o);
      for (int q = 0; q < g; ++q) acc = _mm256_fmadd_ps(cv[q], _mm256_loadu_ps(a[q] + o), acc);
      _mm256_storeu_ps(y + o, acc);
    }
    for (; o < out; ++o) {
      float acc = y[o];
      for (int q = 0; q < g; ++q) acc = fma1(c[q], a[q][o], acc);
      y[o] = acc;
    }
  }
}

// Prefetches the line four 16-row chunks ahead of p (a row of X or Y, read a line per chunk,
// about 250 cycles apart: the hardware prefetchers do not keep up; +0.4 to +1.5% on the rank-4
// population forward). The address is formed as an integer: it may lie past the row (prefetches
// never fault).
inline void prefetch_ahead(const float* p) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) + 64 * sizeof(float)), _MM_HINT_T0);
}

// Rank 4, factors generated and applied in one pass: for each row q < rows, bitwise what
// factors_t4 followed by row_term(x[q], bt, at, in, out, 4, scale[q], y[q]) computes. Each
// sixteen-row chunk of B goes straight into the rows' dot products (acc0 takes the chunk's
// first eight rows and acc1 its last eight, the split of row_term's main loop), each chunk of A
// straight into their AXPYs (fused multiply-adds in column order 0..3 on each y element, as in
// row_term); the rows past the last whole chunk go through rows4_t and row_term's tail code.
// Nothing is stored but the accumulators (on the stack), the tails and y itself: the
// factors' 32 (in + out) bytes are neither written nor read back.
void row_terms_t4_avx2(const es::NoiseKey& key, std::uint32_t index, std::ptrdiff_t in, std::ptrdiff_t out, int rows,
                       const float* const* x, float* const* y, const float* scale) {
  const RoundKeys keys(static_cast<std::uint32_t>(key.seed), static_cast<std::uint32_t>(key.seed >> 32));
  __m256 acc[kMaxFusedRows][2][4];
  for (int q = 0; q < rows; ++q)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j) acc[q][h][j] = _mm256_setzero_ps();
  // B: dot products over the sixteen-row chunks.
  const std::ptrdiff_t in16 = in / 16 * 16;
  for (std::ptrdiff_t i0 = 0; i0 < in16; i0 += 16) {
    __m256 cc[4], ss[4];
    normals16(key, index, static_cast<std::uint32_t>(i0), keys, cc, ss);
    for (int q = 0; q < rows; ++q) prefetch_ahead(x[q] + i0);
    for (int q = 0; q < rows; ++q) {
      for (int h = 0; h < 2; ++h) {
        const __m256 xv = _mm256_loadu_ps(x[q] + i0 + 8 * h);
        acc[q][h][0] = _mm256_fmadd_ps(xv, cc[2 * h], acc[q][h][0]);
        acc[q][h][1] = _mm256_fmadd_ps(xv, ss[2 * h], acc[q][h][1]);
        acc[q][h][2] = _mm256_fmadd_ps(xv, cc[2 * h + 1], acc[q][h][2]);
        acc[q][h][3] = _mm256_fmadd_ps(xv, ss[2 * h + 1], acc[q][h][3]);
      }
    }
  }
  // The last in % 16 rows of B, then row_term's horizontal sums and scalar tail.
  alignas(32) float tail[4 * 16];
  if (in16 < in) rows4_t(key, index, static_cast<std::uint32_t>(in16), in - in16, tail, 16);
  __m256 cv[kMaxFusedRows][4];
  for (int q = 0; q < rows; ++q) {
    for (int j = 0; j < 4; ++j) {
      float dot = hsum8(_mm256_add_ps(acc[q][0][j], acc[q][1][j]));
      for (std::ptrdiff_t t = in16; t < in; ++t) dot = fma1(x[q][t], tail[j * 16 + (t - in16)], dot);
      cv[q][j] = _mm256_set1_ps(scale[q] * dot);
    }
  }
  // A: AXPYs over the sixteen-row chunks.
  const std::ptrdiff_t out16 = out / 16 * 16;
  for (std::ptrdiff_t o0 = 0; o0 < out16; o0 += 16) {
    __m256 cc[4], ss[4];
    normals16(key, index, static_cast<std::uint32_t>(in + o0), keys, cc, ss);
    for (int q = 0; q < rows; ++q) prefetch_ahead(y[q] + o0);
    for (int q = 0; q < rows; ++q) {
      for (int h = 0; h < 2; ++h) {
        float* yo = y[q] + o0 + 8 * h;
        __m256 a = _mm256_loadu_ps(yo);
        a = _mm256_fmadd_ps(cv[q][0], cc[2 * h], a);
        a = _mm256_fmadd_ps(cv[q][1], ss[2 * h], a);
        a = _mm256_fmadd_ps(cv[q][2], cc[2 * h + 1], a);
        a = _mm256_fmadd_ps(cv[q][3], ss[2 * h + 1], a);
        _mm256_storeu_ps(yo, a);
      }
    }
  }
  // The last out % 16 rows of A: row_term's eight-wide steps, then its scalar tail.
  if (out16 < out) {
    const std::ptrdiff_t rest = out - out16;
    rows4_t(key, index, static_cast<std::uint32_t>(in + out16), rest, tail, 16);
    for (int q = 0; q < rows; ++q) {
      float* yq = y[q] + out16;
      std::ptrdiff_t o = 0;
      for (; o + 8 <= rest; o += 8) {
        __m256 a = _mm256_loadu_ps(yq + o);
        for (int j = 0; j < 4; ++j) a = _mm256_fmadd_ps(cv[q][j], _mm256_load_ps(tail + j * 16 + o), a);
        _mm256_storeu_ps(yq + o, a);
      }
      for (; o < rest; ++o) {
        float a = yq[o];
        for (int j = 0; j < 4; ++j) a = fma1(_mm256_cvtss_f32(cv[q][j]), tail[j * 16 + o], a);
        yq[o] = a;
      }
    }
  }
}

}  // namespace

const EsKernels es_kernels_avx2{normals_avx2, row_term_avx2, factors_t4_avx2, nullptr, row_terms_t4_avx2};

}  // namespace detail
LOWRANK_END_NAMESPACE

#undef LOWRANK_OPAQUE2
