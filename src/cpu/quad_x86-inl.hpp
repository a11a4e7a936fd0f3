// Four fp32 lanes on SSE registers, for the per-ISA lora_forward translation units on x86 (the
// packing of W and X for the GEMM path). No include guard and no includes on purpose: each TU includes
// this inside its own namespace after <immintrin.h> and float_bits-inl.hpp, and compiles it with
// its own flags (F16C for the fp16 widening).
struct Quad {
  using Q = __m128;
  static Q load(const float* p) { return _mm_loadu_ps(p); }
  static Q load(const Bf16* p) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
  }
  static Q load(const F16* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, Q x) { _mm_storeu_ps(p, x); }
  static Q zero() { return _mm_setzero_ps(); }
  static void transpose(Q& a, Q& b, Q& c, Q& d) { _MM_TRANSPOSE4_PS(a, b, c, d); }
  // The pairs (a[k], b[k]) for k = 0..3 at p + k * stride.
  static void store_pairs(float* p, std::ptrdiff_t stride, Q a, Q b) {
    const Q lo = _mm_unpacklo_ps(a, b), hi = _mm_unpackhi_ps(a, b);
    _mm_storel_pi(reinterpret_cast<__m64*>(p), lo);
    _mm_storeh_pi(reinterpret_cast<__m64*>(p + stride), lo);
    _mm_storel_pi(reinterpret_cast<__m64*>(p + 2 * stride), hi);
    _mm_storeh_pi(reinterpret_cast<__m64*>(p + 3 * stride), hi);
  }
};
