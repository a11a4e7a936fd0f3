// Four fp32 lanes on SSE registers, for the per-ISA lora_forward translation units on x86 (the
// packing of W for the GEMM path). No include guard and no includes on purpose: each TU includes
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
  static void transpose(Q& a, Q& b, Q& c, Q& d) { _MM_TRANSPOSE4_PS(a, b, c, d); }
};
