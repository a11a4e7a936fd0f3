/// \file
/// Instruction-set targets of the CPU kernels, chosen at run time.
///
/// Every kernel has a scalar body (always built) and SIMD bodies compiled in their own
/// translation units (AVX2+FMA+F16C on 256-bit and on 128-bit vectors, AVX-512F). The best target
/// the CPU supports is chosen on first use: avx512, else avx2, except on cores that split 256-bit
/// operations into two halves (AMD family 17h models below 30h: Zen, Zen+), where avx2_128 is
/// faster. It can be forced, so that every path is tested on one machine:
/// - from code: `lowrank::force_target(lowrank::Target::avx2)`, undone by `reset_target()`;
/// - from the environment: `LOWRANK_TARGET=scalar|avx2|avx2_128|avx512`, read on first use.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE

/// A CPU instruction-set target. Values are bits so that sets of targets fit in a mask.
enum class Target : std::uint32_t {
  scalar = 1u << 0,  ///< portable C++, always built
  avx2 = 1u << 1,    ///< x86-64 AVX2 + FMA + F16C
  avx512 = 1u << 2,  ///< x86-64 AVX-512F (+ FMA, F16C)
  avx2_128 = 1u << 3,  ///< x86-64 AVX2 + FMA + F16C instructions on 128-bit vectors
};

/// "scalar", "avx2", "avx2_128" or "avx512".
[[nodiscard]] std::string_view to_string(Target target) noexcept;

/// The target named `name` ("scalar", "avx2", "avx2_128", "avx512"), if any.
[[nodiscard]] std::optional<Target> parse_target(std::string_view name) noexcept;

/// Mask of the targets compiled into this build of the library.
[[nodiscard]] std::uint32_t compiled_targets() noexcept;

/// Mask of the compiled targets this CPU (and OS) can run.
[[nodiscard]] std::uint32_t supported_targets() noexcept;

/// The target the kernels use now (resolving it on first use: `LOWRANK_TARGET`, else the best
/// supported). \throws Error if `LOWRANK_TARGET` names an unknown or unsupported target.
[[nodiscard]] Target active_target();

/// Forces every kernel onto `target`, for all threads, until `reset_target()`.
/// \throws Error if `target` is not in `supported_targets()`.
void force_target(Target target);

/// Returns to the automatic choice (the best supported target; `LOWRANK_TARGET` is ignored).
void reset_target() noexcept;

LOWRANK_END_NAMESPACE
