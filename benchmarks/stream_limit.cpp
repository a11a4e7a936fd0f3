// The bandwidth limit of an in-place update: read and write the same bytes once, nothing else.
// Compiled with AVX2 flags when the compiler has them (see benchmarks/CMakeLists.txt) and only
// called after a runtime check, so that the limit is not held back by the baseline ISA.
#include "stream_limit.hpp"

#include <cstdint>

void stream_limit_f32(float* data, std::ptrdiff_t count, float add) {
  for (std::ptrdiff_t i = 0; i < count; ++i) data[i] += add;
}

void stream_limit_u16(std::uint16_t* data, std::ptrdiff_t count, std::uint16_t add) {
  for (std::ptrdiff_t i = 0; i < count; ++i) data[i] = static_cast<std::uint16_t>(data[i] + add);
}
