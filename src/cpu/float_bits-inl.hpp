// Scalar bf16/fp16 <-> fp32 conversions on bit patterns. No include guard and no includes on
// purpose: each per-ISA translation unit includes this inside its own namespace (needs <cstdint>
// <cstdint> first), so no inline function compiled with ISA flags is shared between TUs.

// Storage tags for the 16-bit formats (distinct types so that kernels can overload on them).
struct Bf16 {
  std::uint16_t bits;
};
struct F16 {
  std::uint16_t bits;
};

inline float bf16_bits_to_f32(std::uint16_t h) { return __builtin_bit_cast(float, static_cast<std::uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN (quieted, payload truncated, as x86 conversions do).
inline std::uint16_t f32_to_bf16_bits(float x) {
  const std::uint32_t bits = __builtin_bit_cast(std::uint32_t, x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  return static_cast<std::uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline float f16_bits_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1Fu;
  const std::uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return __builtin_bit_cast(float, sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0x1.0p-24f;  // exact: subnormal or zero
    return sign ? -magnitude : magnitude;
  }
  return __builtin_bit_cast(float, sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest even, overflow to infinity; NaN stays NaN (quieted).
inline std::uint16_t f32_to_f16_bits(float x) {
  const std::uint32_t bits = __builtin_bit_cast(std::uint32_t, x);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  if (abs >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520: rounds to inf
  if (abs >= 0x38800000u) {                                                     // normal half
    const std::uint32_t mantissa = abs & 0x7FFFFFu;
    std::uint32_t h = ((((abs >> 23) - 112u) << 10) | (mantissa >> 13));
    const std::uint32_t rest = mantissa & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
    return static_cast<std::uint16_t>(sign | h);
  }
  // Subnormal or zero half: |x| * 2^24 is exact; adding and subtracting 2^23 rounds it to the
  // nearest even integer in the default rounding mode. 1024 encodes the smallest normal.
  const float scaled = __builtin_bit_cast(float, abs) * 0x1.0p24f;
  const float shifted = scaled + 0x1.0p23f;  // no -ffast-math: this rounding step stays
  const float rounded = shifted - 0x1.0p23f;
  return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(rounded));
}
