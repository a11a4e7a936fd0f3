#pragma once
#include <cstddef>
#include <cstdint>

// In-place streams over `count` elements: data[i] += add (fp32), or the same on 16-bit patterns
// (bf16 bytes), read and written once. `streams` interleaves that many far-apart contiguous runs
// (1, 2, 4, 6 or 8); several concurrent runs reach more bandwidth than one on many machines.
void stream_limit_f32(float* data, std::ptrdiff_t count, float add, int streams);
void stream_limit_u16(std::uint16_t* data, std::ptrdiff_t count, std::uint16_t add, int streams);
