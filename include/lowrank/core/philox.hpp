/// \file
/// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11; Random123), written so that
/// the same functions compile for the CPU and for CUDA device code.
///
/// Determinism: a number depends only on (seed, stream, index). The raw bits, the uniform draws and
/// the normal draws are bitwise identical on every thread count, ISA and device: the normal
/// transform (`normal_pair`) uses only IEEE-754 operations that are correctly rounded everywhere
/// (+, -, *, /, sqrt and explicit fused multiply-adds), never a math library's `logf` or `sinf`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE

/// The 128-bit counter and the 128-bit output block of Philox4x32.
struct Philox4x32Block {
  std::uint32_t v[4];
};

/// The 64-bit key of Philox4x32.
struct Philox4x32Key {
  std::uint32_t v[2];
};

namespace detail {
LOWRANK_HOST_DEVICE void mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  lo = static_cast<std::uint32_t>(p);
}
}  // namespace detail

/// Philox4x32 with `Rounds` rounds (10 is the standard, Crush-resistant choice).
/// \return the 4 output words for counter `ctr` under key `key`.
template <int Rounds = 10>
LOWRANK_HOST_DEVICE Philox4x32Block philox4x32(Philox4x32Block ctr, Philox4x32Key key) {
  constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
  constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  for (int round = 0; round < Rounds; ++round) {
    if (round > 0) {
      key.v[0] += kW0;
      key.v[1] += kW1;
    }
    std::uint32_t hi0, lo0, hi1, lo1;
    detail::mulhilo32(kM0, ctr.v[0], hi0, lo0);
    detail::mulhilo32(kM1, ctr.v[2], hi1, lo1);
    ctr = Philox4x32Block{{hi1 ^ ctr.v[1] ^ key.v[0], lo1, hi0 ^ ctr.v[3] ^ key.v[1], lo0}};
  }
  return ctr;
}

/// Uniform float in [0, 1) from the top 24 bits of `bits` (every value a multiple of 2^-24).
LOWRANK_HOST_DEVICE float uniform_from_bits(std::uint32_t bits) {
  return static_cast<float>(bits >> 8) * 0x1.0p-24f;
}

namespace detail {
// Correctly rounded single operations. Device code names the round-to-nearest intrinsics so that
// `--use_fast_math` cannot replace them; host code relies on IEEE-754 arithmetic (SSE/NEON, never
// x87). The transform below never feeds a product into an addition except through `fma_rn`, so
// floating-point contraction (-ffp-contract=fast, nvcc's --fmad) has nothing to fuse.
LOWRANK_HOST_DEVICE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
LOWRANK_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LOWRANK_HOST_DEVICE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
LOWRANK_HOST_DEVICE float float_from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
LOWRANK_HOST_DEVICE std::uint32_t bits_from_float(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Polynomial coefficients (Taylor series; |theta| <= pi/4 and |s| <= 0.172 keep the truncation
// below 3e-8, about fp32 rounding).
// sin(pi t / 2) = t (S1 + t^2 (S3 + ...)), cos(pi t / 2) = C0 + t^2 (C2 + ...), |t| <= 1/2.
inline constexpr float kSin1 = 1.5707963267948966f, kSin3 = -0.6459640975062462f, kSin5 = 0.07969262624616703f,
                       kSin7 = -0.004681754135318687f, kSin9 = 0.00016044118478735975f;
inline constexpr float kCos2 = -1.2337005501361697f, kCos4 = 0.253669507901048f, kCos6 = -0.020863480763352957f,
                       kCos8 = 0.0009192602748394263f;
// ln(m) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + s^6/7), s = (m - 1) / (m + 1) (the next term is
// below 3e-8).
inline constexpr float kAtanh3 = 1.0f / 3, kAtanh5 = 1.0f / 5, kAtanh7 = 1.0f / 7;
// ln 2 split so that e * kLn2Hi is exact for |e| < 2^8.
inline constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
}  // namespace detail

/// Two standard normals from two 32-bit words (Box-Muller; `c` the cosine branch, `s` the sine).
///
/// `u1 = ((w0 >> 8) + 1) 2^-24` in (0, 1] and `j = w1 >> 8` give radius `sqrt(-2 ln u1)` and angle
/// `2 pi j 2^-24`. `ln` is the exponent times ln 2 plus `2 atanh(s)` of the mantissa `m` in
/// [sqrt(1/2), sqrt(2)); the angle is split exactly into a quadrant and `t` in [-1/2, 1/2), and
/// `sin`, `cos` of `pi t / 2` are polynomials. About 2e-7 relative accuracy (fp32 rounding); the
/// largest magnitude is `sqrt(2 * 24 ln 2) = 5.77`.
///
/// Every step is a correctly rounded IEEE-754 operation in a fixed order, so the result is bitwise
/// the same on every CPU target (scalar or SIMD lanes: see `src/cpu/`) and on CUDA devices.
struct NormalPair {
  float c;
  float s;
};

LOWRANK_HOST_DEVICE NormalPair normal_pair(std::uint32_t w0, std::uint32_t w1) {
  using namespace detail;
  // Radius: u1 = k 2^-24 with k in [1, 2^24], exact in fp32.
  const float k = static_cast<float>((w0 >> 8) + 1u);
  const std::uint32_t kb = bits_from_float(k);
  // k = 2^e m, m in [1, 2); fold m into [sqrt(1/2), sqrt(2)) by comparing the mantissa bits with
  // those of sqrt(2) (0x3504f3).
  const std::uint32_t mant = kb & 0x007fffffu;
  const std::uint32_t big = mant > 0x3504f3u ? 1u : 0u;
  const int e = static_cast<int>(kb >> 23) - 127 + static_cast<int>(big) - 24;  // ln u1 = e ln2 + ln m
  const float m = float_from_bits(mant | ((127u - big) << 23));
  const float s = div_rn(m - 1.0f, m + 1.0f);
  const float s2 = s * s;
  float p = fma_rn(kAtanh7, s2, kAtanh5);
  p = fma_rn(p, s2, kAtanh3);
  p = fma_rn(p, s2, 1.0f);
  // -2 ln u1 = e (-2 ln 2) + (-4 s) p (scalings by powers of two are exact).
  const float ef = static_cast<float>(e);
  const float minus2_ln_u = fma_rn(ef, -2.0f * kLn2Hi, fma_rn(ef, -2.0f * kLn2Lo, (-4.0f * s) * p));
  const float radius = sqrt_rn(minus2_ln_u);
  // Angle: j = q 2^22 + t 2^22 with the quadrant q = round(j / 2^22) mod 4, t in [-1/2, 1/2).
  const std::uint32_t j = w1 >> 8;
  const std::uint32_t q = (j + (1u << 21)) >> 22;  // 0..4
  const float t = static_cast<float>(static_cast<std::int32_t>(j) - static_cast<std::int32_t>(q << 22)) * 0x1.0p-22f;
  const float t2 = t * t;
  float ps = fma_rn(kSin9, t2, kSin7);
  ps = fma_rn(ps, t2, kSin5);
  ps = fma_rn(ps, t2, kSin3);
  ps = fma_rn(ps, t2, kSin1);
  const float sin_t = t * ps;
  float pc = fma_rn(kCos8, t2, kCos6);
  pc = fma_rn(pc, t2, kCos4);
  pc = fma_rn(pc, t2, kCos2);
  const float cos_t = fma_rn(pc, t2, 1.0f);
  // Rotate by q quarter turns: (cos, sin) of (theta + q pi / 2).
  float c, sn;
  switch (q & 3u) {
    case 0: c = cos_t, sn = sin_t; break;
    case 1: c = -sin_t, sn = cos_t; break;
    case 2: c = -cos_t, sn = -sin_t; break;
    default: c = sin_t, sn = -cos_t; break;
  }
  return {radius * c, radius * sn};
}

/// A keyed stream of random numbers: `(seed, stream)` select the stream, `index` the position in
/// it. Block `b` of the stream is Philox4x32-10 with key `(seed_lo, seed_hi)` and counter
/// `(b_lo, b_hi, stream_lo, stream_hi)`; word `index` is word `index % 4` of block `index / 4`.
class RandomStream {
 public:
  LOWRANK_HOST_DEVICE constexpr RandomStream(std::uint64_t seed, std::uint64_t stream = 0) noexcept
      : key_{{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}},
        stream_lo_(static_cast<std::uint32_t>(stream)),
        stream_hi_(static_cast<std::uint32_t>(stream >> 32)) {}

  /// The four words of block `block`.
  LOWRANK_HOST_DEVICE Philox4x32Block block(std::uint64_t block) const {
    return philox4x32<10>(Philox4x32Block{{static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
                                           stream_lo_, stream_hi_}},
                          key_);
  }

  /// 32 random bits at position `index`.
  LOWRANK_HOST_DEVICE std::uint32_t bits(std::uint64_t index) const { return block(index / 4).v[index % 4]; }

  /// Uniform in [0, 1) at position `index` (24 bits of resolution).
  LOWRANK_HOST_DEVICE float uniform(std::uint64_t index) const { return uniform_from_bits(bits(index)); }

  /// Standard normal at position `index`: `normal_pair` of the word pair (0, 1) of block
  /// `index / 4` for indices 0 and 1 mod 4 (cosine, sine branch), of the pair (2, 3) for 2 and 3
  /// mod 4.
  LOWRANK_HOST_DEVICE float normal(std::uint64_t index) const {
    const Philox4x32Block b = block(index / 4);
    const unsigned lane = static_cast<unsigned>(index % 4);
    const unsigned pair = lane & 2u;
    const NormalPair z = normal_pair(b.v[pair], b.v[pair + 1]);
    return (lane & 1u) ? z.s : z.c;
  }

  /// Fills `out[0..count)` with `uniform(first + i)`.
  LOWRANK_HOST_DEVICE void fill_uniform(float* out, std::uint64_t count, std::uint64_t first = 0) const {
    for (std::uint64_t i = 0; i < count; ++i) out[i] = uniform(first + i);
  }
  /// Fills `out[0..count)` with `normal(first + i)`.
  LOWRANK_HOST_DEVICE void fill_normal(float* out, std::uint64_t count, std::uint64_t first = 0) const {
    for (std::uint64_t i = 0; i < count; ++i) out[i] = normal(first + i);
  }

 private:
  Philox4x32Key key_;
  std::uint32_t stream_lo_;
  std::uint32_t stream_hi_;
};

LOWRANK_END_NAMESPACE
