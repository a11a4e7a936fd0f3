// The bandwidth limit of an in-place update: read and write the same bytes once, nothing else.
// Compiled with AVX2 flags when the compiler has them (benchmarks/CMakeLists.txt); the benchmark
// binary is meant for the machine it was built on.
#include "stream_limit.hpp"

#include <cstdint>

namespace {

template <int S, class T>
void streams_of(T* data, std::ptrdiff_t count, T add) {
  constexpr std::ptrdiff_t kBlock = 64 / sizeof(T);  // one cache line per stream per step
  const std::ptrdiff_t chunk = count / S / kBlock * kBlock;
  for (std::ptrdiff_t j = 0; j < chunk; j += kBlock) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      T* p = data + s * chunk + j;
      for (std::ptrdiff_t e = 0; e < kBlock; ++e) p[e] = static_cast<T>(p[e] + add);
    }
  }
  for (std::ptrdiff_t i = S * chunk; i < count; ++i) data[i] = static_cast<T>(data[i] + add);
}

template <class T>
void dispatch(T* data, std::ptrdiff_t count, T add, int streams) {
  switch (streams) {
    case 1: return streams_of<1>(data, count, add);
    case 2: return streams_of<2>(data, count, add);
    case 4: return streams_of<4>(data, count, add);
    case 6: return streams_of<6>(data, count, add);
    default: return streams_of<8>(data, count, add);
  }
}

}  // namespace

void stream_limit_f32(float* data, std::ptrdiff_t count, float add, int streams) {
  dispatch(data, count, add, streams);
}

void stream_limit_u16(std::uint16_t* data, std::ptrdiff_t count, std::uint16_t add, int streams) {
  dispatch(data, count, add, streams);
}
