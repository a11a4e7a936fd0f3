// Replaces the global operator new/delete for lowrank_es_tests and lowrank_optim_tests: records
// the largest single allocation while `g_track` is set, and fails every allocation of more than
// `g_fail_above` bytes (none by default) as if memory were exhausted (a separate file, so that no
// allocation and its release are visible together to the compiler).
#include <atomic>
#include <cstdlib>
#include <new>

std::atomic<bool> g_track{false};
std::atomic<std::size_t> g_largest{0};
std::atomic<std::size_t> g_fail_above{static_cast<std::size_t>(-1)};

namespace {
void note(std::size_t n) {
  if (!g_track.load(std::memory_order_relaxed)) return;
  std::size_t cur = g_largest.load(std::memory_order_relaxed);
  while (n > cur && !g_largest.compare_exchange_weak(cur, n)) {
  }
}
void* allocate_nothrow(std::size_t n) noexcept {
  if (n > g_fail_above.load(std::memory_order_relaxed)) return nullptr;
  note(n);
  return std::malloc(n ? n : 1);
}
void* allocate(std::size_t n) {
  if (void* p = allocate_nothrow(n)) return p;
  throw std::bad_alloc();
}
}  // namespace

// Every replaceable form that pairs with std::free, the nothrow ones included (the standard
// library's temporary buffers, e.g. std::stable_sort's, use them): a form left to the runtime
// would allocate elsewhere and be freed here.
void* operator new(std::size_t n) { return allocate(n); }
void* operator new[](std::size_t n) { return allocate(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate_nothrow(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate_nothrow(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

// The over-aligned forms (the library's cache-aligned workspaces use them), with std::aligned_alloc
// (also released by std::free).
namespace {
void* allocate_aligned_nothrow(std::size_t n, std::align_val_t a) noexcept {
  const auto al = static_cast<std::size_t>(a);
  if (n > g_fail_above.load(std::memory_order_relaxed) || n > static_cast<std::size_t>(-1) - al) return nullptr;
  note(n);
  return std::aligned_alloc(al, (n + al - 1) / al * al + (n == 0 ? al : 0));
}
void* allocate_aligned(std::size_t n, std::align_val_t a) {
  if (void* p = allocate_aligned_nothrow(n, a)) return p;
  throw std::bad_alloc();
}
}  // namespace
void* operator new(std::size_t n, std::align_val_t a) { return allocate_aligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return allocate_aligned(n, a); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate_aligned_nothrow(n, a);
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate_aligned_nothrow(n, a);
}
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
