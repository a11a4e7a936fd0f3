#include "lowrank/io/peft.hpp"

// GCC 12 reports -Wmaybe-uninitialized inside libstdc++'s <regex> (a std::function member of a
// temporary NFA state) when optimising with sanitizers: a false positive in the library's code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cctype>
#include <cmath>
#include <regex>

#include <nlohmann/json.hpp>

#include "file_util.hpp"
#include "lowrank/core/error.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

using lowrank::detail::fail;
namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

constexpr std::string_view kPrefix = "base_model.model.";

// libstdc++'s std::regex compiles and matches recursively, about one stack frame per pattern term
// and per character of the string matched: a pattern of ~90,000 characters, or a module name of
// ~26,000, overflows an 8 MiB stack (fewer under sanitizers or on smaller thread stacks). PEFT's
// pattern keys and module names are far shorter; longer ones are refused before std::regex sees them.
constexpr std::size_t kMaxRegexLength = 1024;

// Counted repetitions ({n}, {m,n}) are expanded into states by libstdc++'s compiler, and counts
// near INT_MAX overflow inside it (GCC PR 106607): their sum is limited.
constexpr long kMaxRepetitions = 256;

void check_regex(std::string_view what, std::string_view text) {
  if (text.size() > kMaxRegexLength) {
    fail("peft", "{} \"{:.40}...\" has {} characters; at most {} are supported", what, text, text.size(),
         kMaxRegexLength);
  }
  long counted = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(text[i]))) continue;
    std::size_t j = i;
    while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) ++j;
    const char before = i > 0 ? text[i - 1] : ' ';
    if (before == '{' || before == ',') {  // a repetition count (a literal "{12" or ",12" counts too)
      counted += j - i > 6 ? kMaxRepetitions + 1 : std::stol(std::string(text.substr(i, j - i)));
      if (counted > kMaxRepetitions) {
        fail("peft", "{} \"{:.40}\": counted repetitions add up to more than {}; not supported", what, text,
             kMaxRepetitions);
      }
    }
    i = j;
  }
}

// The pattern compiled as ECMAScript; with libstdc++, with its polynomial-time (breadth-first)
// matcher, so that patterns such as "(.*)*x" cannot take exponential time. That matcher has no
// back-references (regex_error, which the callers treat as "not a regular expression").
std::regex compile(const std::string& pattern) {
#if defined(__GLIBCXX__)
  return std::regex(pattern, std::regex::ECMAScript | std::regex_constants::__polynomial);
#else
  return std::regex(pattern, std::regex::ECMAScript);
#endif
}

// PEFT (utils/other.py, get_pattern_key): the first key k of the pattern dict for which
// re.match(rf"(.*\.)?({k})$", module) succeeds. re.match anchors at the start only; `$` ends it.
bool pattern_matches(const std::string& key, std::string_view module) {
  check_regex("pattern key", key);
  check_regex("module name", module);
  try {
    const std::regex re = compile("(.*\\.)?(" + key + ")$");
    return std::regex_search(module.begin(), module.end(), re, std::regex_constants::match_continuous);
  } catch (const std::regex_error&) {
    return key == module;
  }
}

template <class V>
const std::pair<std::string, V>* find_pattern(const std::vector<std::pair<std::string, V>>& patterns,
                                              std::string_view module) {
  for (const auto& p : patterns)
    if (pattern_matches(p.first, module)) return &p;
  return nullptr;
}

}  // namespace

PeftConfig PeftConfig::parse(std::string_view text, std::string_view source) {
  ojson doc;
  try {
    doc = ojson::parse(text);
  } catch (const ojson::exception& e) {
    fail("peft", "{}: not valid JSON ({})", source, e.what());
  }
  if (!doc.is_object()) fail("peft", "{}: the config is not a JSON object", source);
  PeftConfig c;
  ojson extra = ojson::object();
  auto bad = [&](std::string_view key, std::string_view what) {
    fail("peft", "{}: \"{}\" {} (found {})", source, key, what, doc[std::string(key)].dump());
  };
  for (auto& [key, v] : doc.items()) {
    if (key == "peft_type") {
      if (!v.is_string()) bad(key, "must be a string");
      c.peft_type = v.get<std::string>();
    } else if (key == "r") {
      if (!v.is_number_integer() || v.get<std::int64_t>() < 1 || v.get<std::int64_t>() > (1 << 30)) {
        bad(key, "must be a positive integer");
      }
      c.r = v.get<int>();
    } else if (key == "lora_alpha") {
      if (!v.is_number() || !std::isfinite(v.get<double>())) bad(key, "must be a finite number");
      c.lora_alpha = v.get<double>();
    } else if (key == "use_rslora" || key == "fan_in_fan_out" || key == "use_dora" || key == "lora_bias") {
      if (v.is_null()) continue;
      if (!v.is_boolean()) bad(key, "must be true or false");
      bool& field = key == "use_rslora"       ? c.use_rslora
                    : key == "fan_in_fan_out" ? c.fan_in_fan_out
                    : key == "use_dora"       ? c.use_dora
                                              : c.lora_bias;
      field = v.get<bool>();
    } else if (key == "target_modules") {
      if (v.is_string()) {
        check_regex(fmt::format("{}: target_modules", source), v.get_ref<const std::string&>());
        c.target_modules_regex = v.get<std::string>();
      } else if (v.is_array()) {
        for (const auto& t : v) {
          if (!t.is_string()) bad(key, "must be a list of strings or a string");
          c.target_modules.push_back(t.get<std::string>());
        }
      } else if (!v.is_null()) {
        bad(key, "must be a list of strings or a string");
      }
    } else if (key == "rank_pattern") {
      if (v.is_null()) continue;
      if (!v.is_object()) bad(key, "must be an object");
      for (auto& [k, x] : v.items()) {
        check_regex(fmt::format("{}: rank_pattern key", source), k);
        if (!x.is_number_integer() || x.get<std::int64_t>() < 1 || x.get<std::int64_t>() > (1 << 30)) {
          fail("peft", "{}: rank_pattern \"{}\" is {}, not a positive integer", source, k, x.dump());
        }
        c.rank_pattern.emplace_back(k, x.get<int>());
      }
    } else if (key == "alpha_pattern") {
      if (v.is_null()) continue;
      if (!v.is_object()) bad(key, "must be an object");
      for (auto& [k, x] : v.items()) {
        check_regex(fmt::format("{}: alpha_pattern key", source), k);
        if (!x.is_number() || !std::isfinite(x.get<double>())) {
          fail("peft", "{}: alpha_pattern \"{}\" is {}, not a finite number", source, k, x.dump());
        }
        c.alpha_pattern.emplace_back(k, x.get<double>());
      }
    } else if (key == "bias") {
      if (!v.is_string()) bad(key, "must be a string");
      c.bias = v.get<std::string>();
    } else if (key == "modules_to_save") {
      if (v.is_null()) continue;
      if (!v.is_array()) bad(key, "must be a list of strings");
      for (const auto& t : v) {
        if (!t.is_string()) bad(key, "must be a list of strings");
        c.modules_to_save.push_back(t.get<std::string>());
      }
    } else if (key == "base_model_name_or_path") {
      if (v.is_string()) c.base_model_name_or_path = v.get<std::string>();
    } else {
      extra[key] = v;
    }
  }
  c.extra_json = extra.dump();
  return c;
}

PeftConfig PeftConfig::load(const fs::path& file) {
  return parse(detail::read_small_file(file, 64u << 20, "peft"), file.string());
}

std::string PeftConfig::to_json() const {
  nlohmann::json doc = nlohmann::json::parse(extra_json);  // sorted keys, as PEFT's sort_keys=True
  doc["peft_type"] = peft_type;
  doc["r"] = r;
  if (lora_alpha == std::floor(lora_alpha) && std::abs(lora_alpha) < 1e15) {
    doc["lora_alpha"] = static_cast<std::int64_t>(lora_alpha);
  } else {
    doc["lora_alpha"] = lora_alpha;
  }
  doc["use_rslora"] = use_rslora;
  doc["fan_in_fan_out"] = fan_in_fan_out;
  if (target_modules_regex) {
    doc["target_modules"] = *target_modules_regex;
  } else {
    doc["target_modules"] = target_modules;
  }
  auto& rp = doc["rank_pattern"] = nlohmann::json::object();
  for (const auto& [k, v] : rank_pattern) rp[k] = v;
  auto& ap = doc["alpha_pattern"] = nlohmann::json::object();
  for (const auto& [k, v] : alpha_pattern) ap[k] = v;
  doc["bias"] = bias;
  doc["use_dora"] = use_dora;
  doc["lora_bias"] = lora_bias;
  doc["modules_to_save"] = modules_to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(modules_to_save);
  doc["base_model_name_or_path"] = base_model_name_or_path ? nlohmann::json(*base_model_name_or_path) : nlohmann::json(nullptr);
  doc["inference_mode"] = true;
  if (!doc.contains("task_type")) doc["task_type"] = nullptr;
  return doc.dump(2) + "\n";
}

int PeftConfig::rank_for(std::string_view module) const {
  const auto* p = find_pattern(rank_pattern, module);
  return p != nullptr ? p->second : r;
}

double PeftConfig::alpha_for(std::string_view module) const {
  const auto* p = find_pattern(alpha_pattern, module);
  return p != nullptr ? p->second : lora_alpha;
}

double PeftConfig::scale_for(std::string_view module) const {
  const double rank = rank_for(module);
  return use_rslora ? alpha_for(module) / std::sqrt(rank) : alpha_for(module) / rank;
}

bool PeftConfig::targets(std::string_view module) const {
  if (target_modules_regex) {
    check_regex("target_modules", *target_modules_regex);
    check_regex("module name", module);
    try {
      return std::regex_match(module.begin(), module.end(), compile(*target_modules_regex));
    } catch (const std::regex_error&) {
      return false;
    }
  }
  for (const auto& t : target_modules) {
    if (module == t) return true;
    if (module.size() > t.size() && module.substr(module.size() - t.size()) == t &&
        module[module.size() - t.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

std::vector<std::string> PeftConfig::unsupported() const {
  std::vector<std::string> out;
  if (peft_type != "LORA") out.push_back(fmt::format("peft_type \"{}\" (only LORA is supported)", peft_type));
  if (use_dora) out.emplace_back("use_dora (DoRA's magnitude rescaling is not merged yet)");
  if (lora_bias) out.emplace_back("lora_bias (a trained bias on lora_B is not merged yet)");
  if (bias != "none") out.push_back(fmt::format("bias \"{}\" (trained base biases are not merged yet)", bias));
  if (!modules_to_save.empty()) out.emplace_back("modules_to_save (fully trained modules are not merged yet)");
  const auto extra = nlohmann::json::parse(extra_json);
  // Keys that change what the adapter computes (or how it merges), when set.
  for (const char* key : {"use_qalora", "use_bdlora", "layer_replication", "target_parameters", "trainable_token_indices",
                          "alora_invocation_tokens", "kasa_config", "monteclora_config", "arrow_config", "velora_config"}) {
    if (!extra.contains(key)) continue;
    const auto& v = extra[key];
    const bool set = !(v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_array() && v.empty()) ||
                       (v.is_object() && v.empty()));
    if (set) out.push_back(fmt::format("{} = {} (not supported yet)", key, v.dump()));
  }
  return out;
}

// ---- the adapter ----------------------------------------------------------------------------------

PeftAdapter::PeftAdapter(fs::path folder, PeftConfig config, SafetensorsFile file)
    : folder_(std::move(folder)), config_(std::move(config)), file_(std::move(file)) {}

PeftAdapter PeftAdapter::open(const fs::path& path) {
  fs::path folder = path;
  if (fs::is_regular_file(path) && path.filename() == "adapter_config.json") folder = path.parent_path();
  if (!fs::is_directory(folder)) {
    fail("peft", "{}: not an adapter folder (expected adapter_config.json and adapter_model.safetensors)", path.string());
  }
  const fs::path config_file = folder / "adapter_config.json";
  const fs::path tensors_file = folder / "adapter_model.safetensors";
  if (!fs::is_regular_file(config_file)) fail("peft", "{}: missing adapter_config.json", folder.string());
  if (!fs::is_regular_file(tensors_file)) {
    if (fs::exists(folder / "adapter_model.bin")) {
      fail("peft", "{}: adapter_model.bin (pickle) is not read; save the adapter with safe_serialization=True",
           folder.string());
    }
    fail("peft", "{}: missing adapter_model.safetensors", folder.string());
  }
  PeftAdapter a(folder, PeftConfig::load(config_file), SafetensorsFile::open(tensors_file));
  const std::string file = tensors_file.string();

  struct Pair {
    const TensorInfo* A = nullptr;
    const TensorInfo* B = nullptr;
  };
  std::map<std::string, Pair> pairs;
  for (const auto& t : a.file_.tensors()) {
    std::string_view name = t.name;
    const bool is_a = name.ends_with(".lora_A.weight"), is_b = name.ends_with(".lora_B.weight");
    if (!name.starts_with(kPrefix) || !(is_a || is_b)) {
      fail("peft", "{}: tensor \"{}\" is not a LoRA factor (base_model.model.<module>.lora_A.weight / lora_B.weight); "
           "adapters with other tensors (DoRA magnitudes, embedding adapters, biases, saved modules) are not supported yet",
           file, t.name);
    }
    const std::string module(name.substr(kPrefix.size(), name.size() - kPrefix.size() - 14));
    if (module.empty()) fail("peft", "{}: tensor \"{}\" names no module", file, t.name);
    (is_a ? pairs[module].A : pairs[module].B) = &t;
  }
  for (const auto& [module, p] : pairs) {
    if (p.A == nullptr || p.B == nullptr) {
      fail("peft", "{}: module {} has {} but no {}", file, module, p.A ? "lora_A" : "lora_B", p.A ? "lora_B" : "lora_A");
    }
    for (const TensorInfo* t : {p.A, p.B}) {
      if (t->shape.size() != 2) {
        fail("peft", "{}: tensor \"{}\" has {} dimensions; LoRA factors are matrices (conv adapters are not supported yet)",
             file, t->name, t->shape.size());
      }
      if (!is_float(t->dtype)) fail("peft", "{}: tensor \"{}\" is {}, not floating-point", file, t->name, to_string(t->dtype));
    }
    const auto ra = p.A->shape[0], rb = p.B->shape[1];
    if (ra != rb) {
      fail("peft", "{}: module {}: lora_A is {}x{} and lora_B is {}x{}; A's rows and B's columns (the rank) differ", file,
           module, p.A->shape[0], p.A->shape[1], p.B->shape[0], p.B->shape[1]);
    }
    const int rank = a.config_.rank_for(module);
    if (ra != static_cast<std::uint64_t>(rank)) {
      fail("peft", "{}: module {}: the tensors have rank {} but adapter_config.json gives it rank {}", file, module, ra, rank);
    }
    LoraModule m;
    m.module = module;
    m.base_tensor = module + ".weight";
    m.A = p.A;
    m.B = p.B;
    m.rank = rank;
    m.alpha = a.config_.alpha_for(module);
    m.scale = a.config_.scale_for(module);
    m.in = p.A->shape[1];
    m.out = p.B->shape[0];
    a.modules_.push_back(std::move(m));
  }
  return a;
}

void write_peft_adapter(const fs::path& folder, const PeftConfig& config, std::span<const LoraFactors> modules) {
  std::vector<TensorData> tensors;
  std::vector<std::string> seen;
  for (const auto& m : modules) {
    const int expected = config.rank_for(m.module);
    if (m.rank != static_cast<std::uint64_t>(expected)) {
      fail("write_peft_adapter", "module {}: rank {} but the config gives it rank {}", m.module, m.rank, expected);
    }
    if (m.A.size() != m.rank * m.in) {
      fail("write_peft_adapter", "module {}: A has {} elements, expected {}x{}", m.module, m.A.size(), m.rank, m.in);
    }
    if (m.B.size() != m.out * m.rank) {
      fail("write_peft_adapter", "module {}: B has {} elements, expected {}x{}", m.module, m.B.size(), m.out, m.rank);
    }
    const std::string base = std::string(kPrefix) + m.module;
    tensors.push_back({{base + ".lora_A.weight", Dtype::F32, {m.rank, m.in}}, std::as_bytes(m.A)});
    tensors.push_back({{base + ".lora_B.weight", Dtype::F32, {m.out, m.rank}}, std::as_bytes(m.B)});
  }
  std::error_code ec;
  fs::create_directories(folder, ec);
  if (ec) fail("write_peft_adapter", "cannot create {}: {}", folder.string(), ec.message());
  write_safetensors(folder / "adapter_model.safetensors", tensors);
  const std::string text = config.to_json();
  detail::TempFile temp(folder / "adapter_config.json");
  detail::pwrite_all(temp.fd(), std::as_bytes(std::span(text)), 0, temp.path().string());
  temp.commit();
}

}  // namespace io
LOWRANK_END_NAMESPACE
