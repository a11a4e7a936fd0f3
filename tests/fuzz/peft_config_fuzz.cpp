// libFuzzer target: PeftConfig::parse on arbitrary adapter_config.json text.
//
// A rejected input must throw lowrank::Error and nothing else; any other exception, a crash, a
// sanitizer report or a timeout is a finding. An accepted config is queried (rank_for, alpha_for,
// scale_for, targets, unsupported) for fixed module names and for names taken from the config
// itself (its pattern keys and target modules, so that the regular expressions get exercised on
// strings they match), and `to_json()` must parse again to the same config and be stable.
//
// rank_pattern / alpha_pattern are compared as sorted key lists: to_json writes sorted keys, as
// PEFT does (json.dump(sort_keys=True)), so a file whose pattern keys are not sorted comes back in
// sorted order.
//
// Set LOWRANK_FUZZ_VERBOSE=1 to print each rejection message (useful when checking seeds).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lowrank/io/peft.hpp"

namespace {

namespace io = lowrank::io;

[[noreturn]] void finding(const char* what, std::string_view detail = {}) {
  std::fprintf(stderr, "peft_config_fuzz: invariant violated: %s%s%.*s\n", what, detail.empty() ? "" : " -- ",
               static_cast<int>(detail.size()), detail.data());
  std::abort();
}

bool verbose() {
  static const bool v = std::getenv("LOWRANK_FUZZ_VERBOSE") != nullptr;
  return v;
}

template <class V>
std::vector<std::pair<std::string, V>> sorted(std::vector<std::pair<std::string, V>> v) {
  std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  return v;
}

void check_same(const io::PeftConfig& a, const io::PeftConfig& b, std::string_view json) {
  if (a.r != b.r) finding("to_json changed r", json);
  if (a.lora_alpha != b.lora_alpha) finding("to_json changed lora_alpha", json);
  if (a.use_rslora != b.use_rslora) finding("to_json changed use_rslora", json);
  if (a.fan_in_fan_out != b.fan_in_fan_out) finding("to_json changed fan_in_fan_out", json);
  if (sorted(a.rank_pattern) != b.rank_pattern) finding("to_json changed rank_pattern", json);
  if (sorted(a.alpha_pattern) != b.alpha_pattern) finding("to_json changed alpha_pattern", json);
  if (a.peft_type != b.peft_type) finding("to_json changed peft_type", json);
  if (a.target_modules != b.target_modules) finding("to_json changed target_modules", json);
  if (a.target_modules_regex != b.target_modules_regex) finding("to_json changed target_modules (regex)", json);
  if (a.bias != b.bias) finding("to_json changed bias", json);
  if (a.use_dora != b.use_dora) finding("to_json changed use_dora", json);
  if (a.lora_bias != b.lora_bias) finding("to_json changed lora_bias", json);
  if (a.modules_to_save != b.modules_to_save) finding("to_json changed modules_to_save", json);
  if (a.base_model_name_or_path != b.base_model_name_or_path) finding("to_json changed base_model_name_or_path", json);
}

// src/io/peft.cpp refuses (with lowrank::Error) module names longer than this before std::regex
// sees them; a refusal of a shorter name is a finding.
constexpr std::size_t kLongestModule = 1024;

void query_unchecked(const io::PeftConfig& c, std::string_view module) {
  const int rank = c.rank_for(module);
  if (rank < 1) finding("rank_for gave a rank below 1", module);
  const double alpha = c.alpha_for(module);
  if (!std::isfinite(alpha)) finding("alpha_for gave a non-finite alpha", module);
  const double scale = c.scale_for(module);
  if (!std::isfinite(scale)) finding("scale_for gave a non-finite scale", module);
  (void)c.targets(module);
}

void query(const io::PeftConfig& c, std::string_view module) {
  try {
    query_unchecked(c, module);
  } catch (const lowrank::Error& e) {
    if (module.size() <= kLongestModule) {
      std::fprintf(stderr, "%s\n", e.what());
      finding("a query threw for a module name of ordinary length", module);
    }
  }
}

void exercise(const io::PeftConfig& c) {
  static constexpr std::string_view kModules[] = {
      "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "transformer.h.0.attn.c_attn",
      "lm_head",                         "q_proj",                       "",
  };
  for (std::string_view m : kModules) query(c, m);
  // Names taken from the config: a few of each kind, bare and as a suffix of a dotted path.
  std::vector<std::string> names;
  for (std::size_t i = 0; i < c.rank_pattern.size() && i < 2; ++i) names.push_back(c.rank_pattern[i].first);
  for (std::size_t i = 0; i < c.alpha_pattern.size() && i < 2; ++i) names.push_back(c.alpha_pattern[i].first);
  for (std::size_t i = 0; i < c.target_modules.size() && i < 2; ++i) names.push_back(c.target_modules[i]);
  if (c.target_modules_regex) names.push_back(*c.target_modules_regex);
  for (const auto& n : names) {
    query(c, n);
    query(c, "model.layers.7." + n);
  }
  // A target_modules list entry names its module and every module ending in "." + entry.
  if (!c.target_modules_regex) {
    for (std::size_t i = 0; i < c.target_modules.size() && i < 2; ++i) {
      const std::string& t = c.target_modules[i];
      if (!c.targets(t) || !c.targets("base.x." + t)) finding("targets() misses a module in target_modules", t);
    }
  }
  const auto unsupported = c.unsupported();
  if (c.peft_type != "LORA" && unsupported.empty()) finding("unsupported() accepts a non-LoRA peft_type", c.peft_type);

  const std::string json = c.to_json();
  std::optional<io::PeftConfig> again;
  try {
    again.emplace(io::PeftConfig::parse(json, "to_json"));
  } catch (const lowrank::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    finding("to_json() output does not parse", json);
  }
  check_same(c, *again, json);
  if (again->to_json() != json) finding("to_json() is not stable across a parse", json);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::optional<io::PeftConfig> config;
  try {
    config.emplace(io::PeftConfig::parse(text, "fuzz-input"));
  } catch (const lowrank::Error& e) {
    if (verbose()) std::fprintf(stderr, "rejected: %s\n", e.what());
    return 0;  // a clean rejection; anything else that escapes is a finding
  }
  if (verbose()) std::fprintf(stderr, "accepted: r=%d\n", config->r);
  exercise(*config);
  return 0;
}
