/// \file
/// Extracting a LoRA adapter from a fine-tuned checkpoint: for each targeted weight, the difference
/// `TUNED - BASE` truncated to rank r with the randomized SVD, written as a PEFT adapter.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/io/safetensors.hpp"
#include "lowrank/linalg/svd.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

/// Progress of `extract_adapter`: modules finished and bytes of the two checkpoints read.
struct ExtractProgress {
  std::size_t modules_done = 0, modules_total = 0;
  std::uint64_t bytes_done = 0, bytes_total = 0;
};

struct ExtractOptions {
  /// Rank of every extracted module, in [1, min(in, out)] of each targeted weight.
  int rank = 8;
  /// Targeted modules, matched as PEFT's `target_modules` list (a module is targeted if its name
  /// equals an entry or ends with "." + entry) ...
  std::vector<std::string> target_modules;
  /// ... or one regular expression that must match the whole module name (PEFT's string form).
  /// With neither, the default targets apply (see `extract_adapter`).
  std::optional<std::string> target_regex;
  /// Storage layout of the weights; nullopt: detected from `config.json` (see `detect_layout`).
  std::optional<Layout> layout;
  /// dtype of the written factors: F32 (default) or BF16 (rounded to nearest-even).
  Dtype dtype = Dtype::F32;
  /// Compute the difference and the SVD in fp64 (default: fp32, fp64 only for a module whose base
  /// or tuned tensor is F64).
  bool fp64 = false;
  /// Randomized SVD parameters (`oversample`, `q`, `power_iterations`, `seed`, `method`). `stream`
  /// is ignored: module `m` uses the Philox stream `stream_of(m)` (merge.hpp), so the result does
  /// not depend on the thread count or on the order modules are processed in.
  linalg::SvdOptions svd;
  /// Replace an existing, non-empty output folder.
  bool overwrite = false;
  /// Worker threads, each extracting one module at a time; 0 means `min(num_threads(), 4)`.
  /// Memory grows with it (one dense difference per worker).
  int threads = 0;
  /// Called after each module, from the worker threads, one call at a time; may be empty.
  std::function<void(const ExtractProgress&)> progress;
};

/// What happened to one targeted module.
struct ExtractedModule {
  std::string module;       ///< e.g. `model.layers.0.self_attn.q_proj`
  std::string tensor;       ///< `module + ".weight"`
  std::uint64_t out = 0, in = 0;
  Dtype base_dtype = Dtype::F32, tuned_dtype = Dtype::F32;
  /// False if the difference is exactly zero: the module is skipped (not in the adapter).
  bool written = false;
  int rank = 0;                     ///< rank written (0 if skipped)
  double delta_norm = 0;            ///< ||TUNED - BASE||_F
  double captured_energy = 0;       ///< sum(S_k^2) / ||TUNED - BASE||_F^2 (1 for a skipped module)
  double residual_norm = 0;         ///< ||dW - B A||_F as the SVD reports it
  bool exact_svd = false;           ///< whether the exact SVD was used (small problems)
  std::vector<double> singular_values;  ///< S_k, non-increasing
};

struct ExtractReport {
  Layout layout = Layout::out_in;
  /// Where the layout came from: "option", "config.json model_type <type>", or "default (...)".
  std::string layout_source;
  std::vector<ExtractedModule> modules;  ///< every targeted module, sorted by name
  std::size_t written = 0;               ///< modules in the adapter
  std::size_t skipped = 0;               ///< targeted modules with a zero difference
  /// With the default targets: tensors that exist in one checkpoint only (names), not extracted.
  std::vector<std::string> only_in_base, only_in_tuned;
  std::uint64_t bytes_written = 0;  ///< size of adapter_model.safetensors
  int threads = 0;                  ///< worker threads used
};

/// The storage layout of a checkpoint's linear weights, from the `model_type` of the
/// `config.json` in the checkpoint folder (or next to a checkpoint file): `in_out` (GPT-2's
/// `Conv1D`, PEFT's `fan_in_fan_out`) for "gpt2", "openai-gpt", "imagegpt" and
/// "decision_transformer", `out_in` (`nn.Linear`) for any other type. nullopt if there is no
/// config.json; `source` receives a description ("config.json model_type gpt2"). Never guessed
/// from shapes. \throws Error if config.json exists but is not valid JSON.
[[nodiscard]] std::optional<Layout> detect_layout(const std::filesystem::path& checkpoint, std::string* source = nullptr);

/// Whether `module` looks like an embedding by name: its last segment contains "embed" or is
/// "wte", "wpe" or "shared". Such modules are never extracted (PEFT stores embedding adapters as
/// `lora_embedding_A/B`, which lowrank does not write).
[[nodiscard]] bool is_embedding_like(std::string_view module);

/// Whether `module` is left out of the default targets: `is_embedding_like`, or its last segment
/// contains "lm_head" or is "output" (output heads; they may still be targeted explicitly).
[[nodiscard]] bool excluded_by_default(std::string_view module);

/// Extracts a LoRA adapter with `TUNED ~= BASE + B A` from two checkpoints and writes it to the
/// folder `out` as PEFT saves one (`adapter_config.json` + `adapter_model.safetensors`).
///
/// Targets: with `target_modules` or `target_regex`, every module `<m>` with a tensor
/// `<m>.weight` in BASE that the rule selects; each must exist in TUNED with the same shape, be
/// 2-D and floating-point in both, and not be an embedding (`is_embedding_like`; `lm_head` may be
/// targeted). By default: every tensor named `<m>.weight` that is 2-D and floating-point in both
/// checkpoints with equal shapes, except those `excluded_by_default`; tensors in one checkpoint
/// only are reported, not extracted. The two dtypes may differ (both are widened exactly). In a
/// Conv1D (`in_out`) model whose layout was detected, only GPT-2's Conv1D modules (`c_attn`,
/// `c_proj`, `c_fc`, `q_attn`) can be targeted, since `fan_in_fan_out` applies to every module.
///
/// Per module: `dW = TUNED - BASE` as an (out x in) matrix (stored (in x out) for `in_out`),
/// computed in fp32 (fp64 with `fp64` or an F64 tensor); `U S V^T = linalg::truncated_svd(dW,
/// rank)`; written as PEFT's `convert_to_lora` does: `B = U S` (out x r), `A = V^T` (r x in), with
/// `r = lora_alpha = rank` (scale 1), A and B in these shapes for either layout. A module whose
/// `dW` is exactly zero is skipped and reported. The config lists the written modules by full name
/// in `target_modules`, sets `fan_in_fan_out` for `in_out`, and has no keys PEFT does not know.
///
/// Everything is validated before any SVD runs (targets, shapes, dtypes, rank <= min(in, out) of
/// every module); a non-finite difference is an error. Memory: per worker, one dense `dW` and the
/// SVD's work space (O((in + out) (rank + oversample)) for the randomized method), a 4 MiB read
/// block, plus all factors written (the adapter's size); the checkpoints are mapped and their
/// pages released after each module. Output goes to a temporary folder next to `out`, renamed at
/// the end: on any error nothing is left behind.
///
/// \throws Error naming the module, the tensor, the shapes and the file; `out` must not be, or
/// be inside, an input.
ExtractReport extract_adapter(const std::filesystem::path& base, const std::filesystem::path& tuned,
                              const std::filesystem::path& out, const ExtractOptions& options = {});

}  // namespace io
LOWRANK_END_NAMESPACE
