// Cache-line aligned std::vector storage for the kernels' packed operands and scratch, and the
// grow-only workspace helper shared by the entry points.
//
// glibc serves allocations of 128 KiB and more from mmap, 16 bytes past a page boundary: a packed
// panel read with 32-byte vector loads from such a buffer splits a cache line on every other
// load. On Zen 3, 64-byte aligned GEMM workspaces made linear_forward's 512 x 1024 x 1024 GEMM
// path 0.7-2.4% faster (in-process A/B, one thread; same bits).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

inline constexpr std::size_t kCacheLine = 64;

template <class T>
struct CacheAlignedAllocator {
  using value_type = T;
  CacheAlignedAllocator() noexcept = default;
  template <class U>
  CacheAlignedAllocator(const CacheAlignedAllocator<U>&) noexcept {}  // NOLINT: rebinding
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kCacheLine}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{kCacheLine}); }
  template <class U>
  bool operator==(const CacheAlignedAllocator<U>&) const noexcept {
    return true;
  }
};

template <class T>
using AlignedVector = std::vector<T, CacheAlignedAllocator<T>>;

// A workspace that only grows: room for n elements, its data returned (a warmed-up call does not
// allocate).
template <class T, class A>
T* grow(std::vector<T, A>& v, std::size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace detail
LOWRANK_END_NAMESPACE
