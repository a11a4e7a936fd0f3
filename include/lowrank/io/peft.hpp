/// \file
/// PEFT LoRA adapters: `adapter_config.json` and `adapter_model.safetensors`, read with PEFT's
/// conventions (per-module rank and alpha from the patterns, rsLoRA, `fan_in_fan_out`) and written
/// so that PEFT loads them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/core/layout.hpp"
#include "lowrank/io/safetensors.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

/// The fields of `adapter_config.json` that decide what a LoRA adapter means. Unknown keys are
/// ignored when reading (PEFT adds keys often; see peft#2275) and kept when the config is written
/// back by `to_json`.
struct PeftConfig {
  std::string peft_type = "LORA";
  int r = 8;                    ///< default rank
  double lora_alpha = 8;        ///< default alpha
  bool use_rslora = false;      ///< scale alpha / sqrt(r) instead of alpha / r
  bool fan_in_fan_out = false;  ///< base weights stored (in, out), as GPT-2's Conv1D
  /// `target_modules` as a list (a module is targeted if its name equals an entry or ends with
  /// "." + entry) ...
  std::vector<std::string> target_modules;
  /// ... or as one regular expression that must match the whole module name.
  std::optional<std::string> target_modules_regex;
  /// Per-module overrides, in the file's order (the first matching key wins, as in PEFT).
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::string bias = "none";
  bool use_dora = false;
  bool lora_bias = false;
  std::vector<std::string> modules_to_save;
  std::optional<std::string> base_model_name_or_path;
  std::string extra_json = "{}";  ///< every other key of the file, as read (JSON object text)

  /// Parses `adapter_config.json` text; `source` names it in errors. \throws Error on invalid
  /// JSON, a non-object, or a known key of the wrong type or out of range (r < 1, non-finite alpha).
  static PeftConfig parse(std::string_view text, std::string_view source);
  static PeftConfig load(const std::filesystem::path& file);
  /// The config as PEFT writes it (indent 2, sorted keys, `peft_type` "LORA", `inference_mode` true).
  [[nodiscard]] std::string to_json() const;

  /// The rank for `module`: from the first key `k` of `rank_pattern`, in file order, for which the
  /// regular expression `(.*\.)?(k)$` matches `module` from its start (PEFT's rule), else `r`.
  /// Patterns are ECMAScript regular expressions, matched in polynomial time (no back-references:
  /// such a key is compared literally). \throws Error if a key or `module` is longer than 1024
  /// characters or a key's counted repetitions (`{n}`) add up to more than 256 (they would exhaust
  /// the regex engine's stack or memory); `parse` refuses such keys up front.
  [[nodiscard]] int rank_for(std::string_view module) const;
  /// The alpha for `module`, from `alpha_pattern` by the same rule, else `lora_alpha`.
  [[nodiscard]] double alpha_for(std::string_view module) const;
  /// `alpha_for(module) / r` or, with rsLoRA, `/ sqrt(r)`, for the module's rank `r`.
  [[nodiscard]] double scale_for(std::string_view module) const;
  /// Whether `module` is targeted by `target_modules` (same limits as `rank_for`).
  [[nodiscard]] bool targets(std::string_view module) const;
  /// Features of this config that lowrank cannot merge yet (DoRA, trained biases, modules_to_save,
  /// non-LoRA types, ...), each as a short sentence. Empty if the adapter is a plain LoRA.
  [[nodiscard]] std::vector<std::string> unsupported() const;
};

/// One adapted module: `delta = scale * B A`, A (r x in), B (out x r).
struct LoraModule {
  std::string module;       ///< e.g. `model.layers.0.self_attn.q_proj`
  std::string base_tensor;  ///< `module + ".weight"`, the base checkpoint's tensor
  const TensorInfo* A = nullptr;
  const TensorInfo* B = nullptr;
  int rank = 0;
  double alpha = 0;
  double scale = 0;
  std::uint64_t in = 0, out = 0;
  /// Where the base weight is stored transposed (`fan_in_fan_out`).
  [[nodiscard]] Layout layout(const PeftConfig& c) const noexcept {
    return c.fan_in_fan_out ? Layout::in_out : Layout::out_in;
  }
};

/// A PEFT LoRA adapter opened for reading. Checks, before anything is used: every tensor is a
/// `base_model.model.<module>.lora_A.weight` / `lora_B.weight` pair (other adapter tensors, such as
/// DoRA magnitudes, embedding adapters or biases, are refused by name), both halves of each pair
/// present, 2-D and floating-point, A's rows = B's columns = the rank the config gives the module.
class PeftAdapter {
 public:
  /// `path` is the adapter folder (or its `adapter_config.json`). \throws Error.
  static PeftAdapter open(const std::filesystem::path& path);

  [[nodiscard]] const std::filesystem::path& folder() const noexcept { return folder_; }
  [[nodiscard]] const PeftConfig& config() const noexcept { return config_; }
  [[nodiscard]] const SafetensorsFile& file() const noexcept { return file_; }
  /// Modules sorted by name.
  [[nodiscard]] const std::vector<LoraModule>& modules() const noexcept { return modules_; }

 private:
  PeftAdapter(std::filesystem::path folder, PeftConfig config, SafetensorsFile file);
  std::filesystem::path folder_;
  PeftConfig config_;
  SafetensorsFile file_;
  std::vector<LoraModule> modules_;
};

/// The factors of one module to write: A (r x in) and B (out x r), row-major fp32.
struct LoraFactors {
  std::string module;
  std::uint64_t rank = 0, in = 0, out = 0;
  std::span<const float> A;
  std::span<const float> B;
};

/// Writes `folder/adapter_config.json` and `folder/adapter_model.safetensors` (metadata
/// `{"format": "pt"}`, names `base_model.model.<module>.lora_{A,B}.weight`), each through a
/// temporary file renamed into place; creates the folder if needed. \throws Error if a module's
/// factor sizes disagree with its shape, or its rank with the config's rank for it.
void write_peft_adapter(const std::filesystem::path& folder, const PeftConfig& config,
                        std::span<const LoraFactors> modules);

}  // namespace io
LOWRANK_END_NAMESPACE
