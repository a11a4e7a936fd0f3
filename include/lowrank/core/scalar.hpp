/// \file
/// Storage scalar types (fp64, fp32, bf16, fp16) and their compute (accumulation) types.
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include <Eigen/Core>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE

/// bfloat16 storage (1 sign, 8 exponent, 7 mantissa bits); Eigen's type, so that Eigen matrices
/// of it can be viewed without copies.
using bf16 = Eigen::bfloat16;
/// IEEE binary16 storage; Eigen's type.
using f16 = Eigen::half;

/// The storage types every lowrank kernel accepts.
template <class T>
concept SupportedScalar = std::same_as<std::remove_cv_t<T>, double> ||
                          std::same_as<std::remove_cv_t<T>, float> ||
                          std::same_as<std::remove_cv_t<T>, bf16> ||
                          std::same_as<std::remove_cv_t<T>, f16>;

/// Accumulation type for a storage type: fp64 for fp64, fp32 for everything else.
template <SupportedScalar T>
using compute_t = std::conditional_t<std::same_as<std::remove_cv_t<T>, double>, double, float>;

/// Runtime tag of a storage type.
enum class ScalarType : std::uint8_t { f64, f32, bf16, f16 };

/// The runtime tag of `T`.
template <SupportedScalar T>
inline constexpr ScalarType scalar_type_of = std::same_as<std::remove_cv_t<T>, double> ? ScalarType::f64
                                             : std::same_as<std::remove_cv_t<T>, float>
                                                 ? ScalarType::f32
                                             : std::same_as<std::remove_cv_t<T>, bf16> ? ScalarType::bf16
                                                                                      : ScalarType::f16;

/// Short name of a storage type: "f64", "f32", "bf16", "f16".
constexpr std::string_view to_string(ScalarType t) noexcept {
  switch (t) {
    case ScalarType::f64: return "f64";
    case ScalarType::f32: return "f32";
    case ScalarType::bf16: return "bf16";
    case ScalarType::f16: return "f16";
  }
  return "?";
}

LOWRANK_END_NAMESPACE
