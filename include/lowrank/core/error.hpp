/// \file
/// `lowrank::Error`, the exception thrown for caller errors (bad shapes, ranks, scales).
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "lowrank/core/config.hpp"

LOWRANK_BEGIN_NAMESPACE

/// Thrown when a caller passes invalid arguments. The message names the function, the argument
/// and the shapes involved, e.g. `rank_update: U has 511 rows, W is 512x1024`. When it is thrown,
/// the caller's data has not been modified (strong guarantee).
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// Throws `Error(message)`. Out of line and cold so that checks stay cheap on the hot path.
[[noreturn]] void throw_error(const std::string& message);

/// Formats `"<function>: <message>"` and throws `Error`.
template <class... Args>
[[noreturn]] void fail(const char* function, fmt::format_string<Args...> format, Args&&... args) {
  throw_error(fmt::format("{}: {}", function, fmt::format(format, std::forward<Args>(args)...)));
}

}  // namespace detail

LOWRANK_END_NAMESPACE
