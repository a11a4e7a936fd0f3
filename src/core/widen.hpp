// The value of a storage-type scalar (fp64, fp32, bf16, fp16) as a double: exact for every type.
// Shared by the library's fp64 code paths (statistics, editing).
#pragma once

#include <type_traits>

#include "lowrank/core/config.hpp"
#include "lowrank/core/scalar.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

template <class T>
double widen(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<double>(static_cast<float>(x));
  }
}

}  // namespace detail
LOWRANK_END_NAMESPACE
