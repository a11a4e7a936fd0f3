/// \file
/// Key statistics as files: a `linalg::SecondMoment` saved as safetensors, so that statistics
/// (days of GPU time for ROME/MEMIT on a large model) are computed once and shared.
#pragma once

#include <filesystem>

#include "lowrank/core/config.hpp"
#include "lowrank/linalg/moments.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace io {

/// Writes `moment` to `path` (replaced atomically: a temporary file in the same folder, then a
/// rename). Tensors: `mom2` F64 `[d, d]` (the symmetric scatter, as ROME's `SecondMoment.mom2`:
/// the raw sum of `k k^T`, or of the centred outer products in centred mode), `sum` F64 `[d]`
/// (sum of the keys), `count` I64 `[1]`. Metadata: `format` = `lowrank.second_moment`,
/// `centered` = `true` / `false`. fp64 throughout, so a round trip is bit-exact.
/// \throws Error naming the file if it cannot be written, or if `moment` is default-constructed.
void write_second_moment(const std::filesystem::path& path, const linalg::SecondMoment& moment);

/// Reads a file written by `write_second_moment`.
/// \throws Error naming the file and the tensor if the file is not valid safetensors, the format
///   metadata is missing or different, a tensor is missing or has another dtype or shape, the count
///   is negative, or a value is not finite.
linalg::SecondMoment read_second_moment(const std::filesystem::path& path);

}  // namespace io

LOWRANK_END_NAMESPACE
