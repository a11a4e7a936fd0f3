# Decides which per-ISA kernel translation units can be compiled. ISA flags are applied per source
# file (lowrank_simd_sources), never globally.
include(CheckCXXSourceCompiles)
include(CMakePushCheckState)

set(LOWRANK_HAVE_AVX2 OFF)
set(LOWRANK_HAVE_AVX512 OFF)
set(LOWRANK_AVX2_FLAGS -mavx2 -mfma -mf16c)
set(LOWRANK_AVX512_FLAGS -mavx512f -mavx2 -mfma -mf16c)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  # GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on _mm512_undefined_* (GCC bug 105593).
  list(APPEND LOWRANK_AVX512_FLAGS -Wno-maybe-uninitialized -Wno-uninitialized)
endif()
# The scalar kernels round a * b + c twice on every compiler and -march (no contraction to FMA),
# so that their results are the same everywhere and tests can predict them bit for bit.
set(LOWRANK_SCALAR_FLAGS)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  set(LOWRANK_SCALAR_FLAGS -ffp-contract=off)
endif()

if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  cmake_push_check_state(RESET)
  if(LOWRANK_ENABLE_AVX2)
    set(CMAKE_REQUIRED_FLAGS "-mavx2 -mfma -mf16c")
    check_cxx_source_compiles([[
      #include <immintrin.h>
      int main() { __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(1.f), _mm256_set1_ps(2.f), _mm256_setzero_ps());
                   __m128i h = _mm256_cvtps_ph(a, 0); return _mm_extract_epi16(h, 0); }]] LOWRANK_COMPILER_AVX2)
    set(LOWRANK_HAVE_AVX2 ${LOWRANK_COMPILER_AVX2})
  endif()
  if(LOWRANK_ENABLE_AVX512 AND LOWRANK_HAVE_AVX2)
    set(CMAKE_REQUIRED_FLAGS "-mavx512f -mavx2 -mfma -mf16c")
    check_cxx_source_compiles([[
      #include <immintrin.h>
      int main() { __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(1.f), _mm512_set1_ps(2.f), _mm512_setzero_ps());
                   __m256i h = _mm512_cvtps_ph(a, 0); return _mm256_extract_epi16(h, 0); }]] LOWRANK_COMPILER_AVX512)
    set(LOWRANK_HAVE_AVX512 ${LOWRANK_COMPILER_AVX512})
  endif()
  cmake_pop_check_state()
endif()
message(STATUS "lowrank: AVX2 kernels ${LOWRANK_HAVE_AVX2}, AVX-512 kernels ${LOWRANK_HAVE_AVX512}")
