#include "lowrank/core/error.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace detail {

[[gnu::cold]] void throw_error(const std::string& message) { throw Error(message); }

}  // namespace detail
LOWRANK_END_NAMESPACE
