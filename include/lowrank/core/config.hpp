/// \file
/// Namespace, portability and assertion macros shared by every lowrank header.
#pragma once

#include <cassert>

#include "lowrank/version.hpp"

/// Opens `lowrank` and the inline ABI namespace `v0`; mismatched copies fail at link time.
#define LOWRANK_BEGIN_NAMESPACE \
  namespace lowrank {           \
  inline namespace v0 {
#define LOWRANK_END_NAMESPACE \
  }                           \
  }

/// Functions usable from both host and CUDA device code.
#if defined(__CUDACC__)
#define LOWRANK_HOST_DEVICE __host__ __device__ inline
#else
#define LOWRANK_HOST_DEVICE inline
#endif

/// Internal invariants: checked in debug and sanitizer builds only.
#ifndef LOWRANK_DASSERT
#ifndef NDEBUG
#define LOWRANK_DASSERT(cond) assert(cond)
#else
#define LOWRANK_DASSERT(cond) ((void)0)
#endif
#endif
