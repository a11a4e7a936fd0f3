#pragma once
#include <cstddef>
#include <cstdint>

// In-place streams: data[i] += add over `count` elements (fp32, or 16-bit patterns for bf16).
void stream_limit_f32(float* data, std::ptrdiff_t count, float add);
void stream_limit_u16(std::uint16_t* data, std::ptrdiff_t count, std::uint16_t add);
