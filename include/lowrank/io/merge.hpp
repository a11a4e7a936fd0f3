/// \file
/// Merging a PEFT LoRA adapter into a checkpoint, as PEFT's `merge_and_unload` does, streaming
/// tensor by tensor.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/io/safetensors.hpp"
#include "lowrank/kernels/rank_update.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

struct MergeProgress {
  std::uint64_t bytes_done = 0, bytes_total = 0;
  std::size_t tensors_done = 0, tensors_total = 0;
};

struct MergeOptions {
  /// Output dtype of the floating-point tensors (F64/F32/BF16/F16); nullopt keeps each tensor's.
  std::optional<Dtype> dtype;
  /// Rounding into bf16/fp16 outputs (merged tensors and converted ones).
  Rounding rounding = Rounding::nearest_even;
  /// Key of stochastic rounding; tensor `name` uses the Philox stream `stream_of(name)`.
  std::uint64_t seed = 0;
  /// Replace an existing output folder (an existing output file is always replaced atomically).
  bool overwrite = false;
  /// Worker threads; 0 means `num_threads()`. Each works on its own blocks (read, update, write),
  /// so that I/O and arithmetic overlap. The output does not depend on it.
  int threads = 0;
  /// Called after each block, from the worker threads, one call at a time; may be empty.
  std::function<void(const MergeProgress&)> progress;
};

struct MergeReport {
  std::size_t tensors = 0;         ///< tensors written
  std::size_t merged = 0;          ///< of which received a delta
  std::uint64_t bytes_written = 0; ///< safetensors bytes written
  std::vector<std::string> files;  ///< files written, relative to the output
};

/// The Philox stream of a tensor for stochastic rounding: FNV-1a 64 of its name.
[[nodiscard]] std::uint64_t stream_of(std::string_view tensor_name) noexcept;

/// Merges the adapter at `adapter` into the checkpoint at `base` and writes the result to `out`.
///
/// For each adapted module, `W += scale * B A` (transposed for `fan_in_fan_out`) with the
/// rank-update kernel: fp32 accumulation (fp64 for fp64 tensors), one rounding into the output
/// dtype. Bitwise, each merged tensor equals `rank_update(WeightView{W, layout}, B, A^T, scale,
/// {rounding, seed, stream_of(name)})` on the whole tensor. Other tensors are copied byte for byte
/// (or converted, with `dtype`).
///
/// Everything is validated before any output exists: the checkpoint and the adapter (see
/// `Checkpoint::open`, `PeftAdapter::open`), unsupported adapter features, every module's base
/// tensor present, 2-D, floating-point and of the adapter's shape, every factor finite and the
/// delta bounded away from overflow. `out` mirrors `base`: a file for a file; for a folder, the same
/// shard files, the index (with its total size updated) and copies of the other files. Output is
/// written to temporary files or a temporary folder next to `out` and renamed at the end; on any
/// error nothing is left behind and the inputs are untouched. Memory: a chunk buffer of a few MiB
/// plus the adapter's factors; the inputs are read with `pread`, untouched tensors copied in the
/// kernel.
///
/// \throws Error naming the file, the tensor and the problem; `out` must not be, or be inside of,
/// an input.
MergeReport merge_adapter(const std::filesystem::path& base, const std::filesystem::path& adapter,
                          const std::filesystem::path& out, const MergeOptions& options = {});

}  // namespace io
LOWRANK_END_NAMESPACE
