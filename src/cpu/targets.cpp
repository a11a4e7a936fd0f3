#include "lowrank/kernels/targets.hpp"

#include <atomic>
#include <cstdlib>
#include <string>

#include "lowrank/core/error.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define LOWRANK_X86_CPUID 1
#endif

LOWRANK_BEGIN_NAMESPACE

namespace {
constexpr Target kAllTargets[] = {Target::scalar, Target::avx2, Target::avx2_128, Target::avx512};

// AMD family 17h models below 30h (Zen, Zen+) execute each 256-bit operation as two 128-bit
// halves; there the 128-bit AVX2 kernels run faster (docs/performance.md).
bool splits_256bit_ops() noexcept {
#if defined(LOWRANK_X86_CPUID)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amd = ebx == 0x68747541u && edx == 0x69746e65u && ecx == 0x444d4163u;  // "AuthenticAMD"
  if (!amd || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned base_family = (eax >> 8) & 0xFu;
  const unsigned family = base_family == 0xFu ? base_family + ((eax >> 20) & 0xFFu) : base_family;
  const unsigned model = ((eax >> 4) & 0xFu) | (base_family == 0xFu ? ((eax >> 12) & 0xF0u) : 0u);
  return family == 0x17u && model < 0x30u;
#else
  return false;
#endif
}
}  // namespace

std::string_view to_string(Target target) noexcept {
  switch (target) {
    case Target::scalar: return "scalar";
    case Target::avx2: return "avx2";
    case Target::avx512: return "avx512";
    case Target::avx2_128: return "avx2_128";
  }
  return "?";
}

std::optional<Target> parse_target(std::string_view name) noexcept {
  for (Target t : kAllTargets)
    if (name == to_string(t)) return t;
  return std::nullopt;
}

std::uint32_t compiled_targets() noexcept {
  std::uint32_t mask = static_cast<std::uint32_t>(Target::scalar);
#if defined(LOWRANK_HAVE_AVX2)
  mask |= static_cast<std::uint32_t>(Target::avx2) | static_cast<std::uint32_t>(Target::avx2_128);
#endif
#if defined(LOWRANK_HAVE_AVX512)
  mask |= static_cast<std::uint32_t>(Target::avx512);
#endif
  return mask;
}

std::uint32_t supported_targets() noexcept {
  std::uint32_t mask = static_cast<std::uint32_t>(Target::scalar);
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the YMM/ZMM state (XGETBV).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) mask |= static_cast<std::uint32_t>(Target::avx2) | static_cast<std::uint32_t>(Target::avx2_128);
  if (avx2 && __builtin_cpu_supports("avx512f")) mask |= static_cast<std::uint32_t>(Target::avx512);
#endif
  return mask & compiled_targets();
}

namespace {
constexpr std::uint32_t kUnresolved = 0;
std::atomic<std::uint32_t> g_active{kUnresolved};

Target best_of(std::uint32_t mask) noexcept {
  if (mask & static_cast<std::uint32_t>(Target::avx512)) return Target::avx512;
  if (mask & static_cast<std::uint32_t>(Target::avx2)) {
    return splits_256bit_ops() ? Target::avx2_128 : Target::avx2;
  }
  return Target::scalar;
}

std::string names_of(std::uint32_t mask) {
  std::string out;
  for (Target t : kAllTargets) {
    if (!(mask & static_cast<std::uint32_t>(t))) continue;
    if (!out.empty()) out += ", ";
    out += to_string(t);
  }
  return out;
}
}  // namespace

Target active_target() {
  std::uint32_t active = g_active.load(std::memory_order_acquire);
  if (active != kUnresolved) return static_cast<Target>(active);
  Target chosen = best_of(supported_targets());
  if (const char* env = std::getenv("LOWRANK_TARGET"); env != nullptr && *env != '\0') {
    const std::optional<Target> named = parse_target(env);
    if (!named) {
      detail::fail("active_target", "LOWRANK_TARGET='{}' is not a target (scalar, avx2, avx2_128, avx512)", env);
    }
    if (!(supported_targets() & static_cast<std::uint32_t>(*named))) {
      detail::fail("active_target", "LOWRANK_TARGET='{}' is not supported here (supported: {})", env,
                   names_of(supported_targets()));
    }
    chosen = *named;
  }
  g_active.store(static_cast<std::uint32_t>(chosen), std::memory_order_release);
  return chosen;
}

void force_target(Target target) {
  if (!(supported_targets() & static_cast<std::uint32_t>(target))) {
    detail::fail("force_target", "target '{}' is not supported here (compiled: {}; supported: {})",
                 to_string(target), names_of(compiled_targets()), names_of(supported_targets()));
  }
  g_active.store(static_cast<std::uint32_t>(target), std::memory_order_release);
}

void reset_target() noexcept {
  g_active.store(static_cast<std::uint32_t>(best_of(supported_targets())), std::memory_order_release);
}

LOWRANK_END_NAMESPACE
