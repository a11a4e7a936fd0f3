// `lowrank`: inspect and merge safetensors checkpoints and PEFT LoRA adapters, and extract LoRA
// adapters from fine-tuned checkpoints.
//
//   lowrank inspect PATH [--json]
//   lowrank merge BASE ADAPTER -o OUT [--dtype keep|f32|bf16|f16] [--rounding nearest|stochastic]
//                 [--seed N] [--force] [--threads N] [--stats]
//   lowrank extract BASE TUNED -o ADAPTER --rank R [--targets M,...|--target-regex RE]
//                 [--layout auto|out_in|in_out] [--dtype f32|bf16] [--fp64] [--seed N]
//                 [--oversample N] [--power-iterations N] [--svd auto|randomized|exact]
//                 [--threads N] [--force] [--json] [--stats]
//
// Exit status: 0 on success, 1 on bad input or a failed operation (one line on stderr), 2 on a
// command-line error.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "lowrank/core/threading.hpp"
#include "lowrank/io/checkpoint.hpp"
#include "lowrank/io/extract.hpp"
#include "lowrank/io/merge.hpp"
#include "lowrank/io/peft.hpp"
#include "lowrank/io/safetensors.hpp"
#include "lowrank/version.hpp"

namespace fs = std::filesystem;
namespace io = lowrank::io;
using json = nlohmann::ordered_json;

namespace {

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} {}", b, units[u]) : fmt::format("{:.2f} {}", b, units[u]);
}

// Peak resident set size of this process (VmHWM), in bytes; 0 if unknown.
std::uint64_t peak_rss() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

json tensors_json(const io::SafetensorsFile& f) {
  json list = json::array();
  for (const auto& t : f.tensors()) {
    list.push_back({{"name", t.name}, {"dtype", std::string(io::to_string(t.dtype))}, {"shape", t.shape}, {"bytes", t.nbytes()}});
  }
  return list;
}

json metadata_json(const io::SafetensorsFile& f) {
  json m = json::object();
  for (const auto& [k, v] : f.metadata()) m[k] = v;
  return m;
}

void print_tensors(const io::SafetensorsFile& f) {
  std::size_t width = 4;
  for (const auto& t : f.tensors()) width = std::max(width, t.name.size());
  for (const auto& t : f.tensors()) {
    fmt::print("  {:<{}}  {:<5} {:<16} {:>10}\n", t.name, width, io::to_string(t.dtype), io::shape_string(t.shape),
               human_bytes(static_cast<double>(t.nbytes())));
  }
  if (!f.metadata().empty()) {
    fmt::print("  metadata:");
    for (const auto& [k, v] : f.metadata()) fmt::print(" {}={}", k, v);
    fmt::print("\n");
  }
}

int inspect(const fs::path& path, bool as_json) {
  const bool adapter = fs::is_directory(path) ? fs::exists(path / "adapter_config.json")
                                              : path.filename() == "adapter_config.json";
  if (adapter) {
    const auto a = io::PeftAdapter::open(path);
    const auto& c = a.config();
    json modules = json::array();
    for (const auto& m : a.modules()) {
      modules.push_back({{"module", m.module}, {"base_tensor", m.base_tensor}, {"rank", m.rank}, {"alpha", m.alpha},
                         {"scale", m.scale}, {"in", m.in}, {"out", m.out},
                         {"dtype", std::string(io::to_string(m.A->dtype))}});
    }
    json targets = c.target_modules_regex ? json(*c.target_modules_regex) : json(c.target_modules);
    const auto unsupported = c.unsupported();
    if (as_json) {
      json doc = {{"kind", "peft_adapter"}, {"path", path.string()}, {"peft_type", c.peft_type}, {"r", c.r},
                  {"lora_alpha", c.lora_alpha}, {"use_rslora", c.use_rslora}, {"fan_in_fan_out", c.fan_in_fan_out},
                  {"target_modules", targets}, {"unsupported", unsupported}, {"modules", modules},
                  {"tensors", tensors_json(a.file())}, {"metadata", metadata_json(a.file())}};
      fmt::print("{}\n", doc.dump(2));
      return 0;
    }
    fmt::print("PEFT adapter {}\n", a.folder().string());
    fmt::print("  type {}, r {}, alpha {}, rsLoRA {}, fan_in_fan_out {}, scale alpha/{}\n", c.peft_type, c.r,
               c.lora_alpha, c.use_rslora ? "yes" : "no", c.fan_in_fan_out ? "yes (Conv1D)" : "no",
               c.use_rslora ? "sqrt(r)" : "r");
    fmt::print("  target_modules {}\n", targets.dump());
    for (const auto& [k, v] : c.rank_pattern) fmt::print("  rank_pattern  {} -> {}\n", k, v);
    for (const auto& [k, v] : c.alpha_pattern) fmt::print("  alpha_pattern {} -> {}\n", k, v);
    for (const auto& u : unsupported) fmt::print("  unsupported: {}\n", u);
    std::size_t width = 6;
    for (const auto& m : a.modules()) width = std::max(width, m.module.size());
    fmt::print("  {} modules:\n  {:<{}}  {:>4} {:>8} {:>10} {:>6} {:>6} {}\n", a.modules().size(), "module", width,
               "rank", "alpha", "scale", "in", "out", "dtype");
    for (const auto& m : a.modules()) {
      fmt::print("  {:<{}}  {:>4} {:>8} {:>10.6g} {:>6} {:>6} {}\n", m.module, width, m.rank, m.alpha, m.scale, m.in,
                 m.out, io::to_string(m.A->dtype));
    }
    return 0;
  }

  const auto ck = io::Checkpoint::open(path);
  std::uint64_t total = 0;
  for (const auto& s : ck.shards())
    for (const auto& t : s.file.tensors()) total += t.nbytes();
  if (as_json) {
    json shards = json::array();
    for (const auto& s : ck.shards()) {
      shards.push_back({{"file", s.file_name}, {"metadata", metadata_json(s.file)}, {"tensors", tensors_json(s.file)}});
    }
    json doc = {{"kind", "checkpoint"}, {"path", path.string()}, {"tensor_count", ck.tensor_count()},
                {"tensor_bytes", total}, {"index", ck.index_name() ? json(*ck.index_name()) : json(nullptr)},
                {"shards", shards}, {"other_files", ck.other_files()}};
    fmt::print("{}\n", doc.dump(2));
    return 0;
  }
  fmt::print("checkpoint {}: {} tensors, {} in {} file{}{}\n", path.string(), ck.tensor_count(),
             human_bytes(static_cast<double>(total)), ck.shards().size(), ck.shards().size() == 1 ? "" : "s",
             ck.index_name() ? fmt::format(" (index {})", *ck.index_name()) : "");
  for (const auto& s : ck.shards()) {
    if (ck.is_folder()) fmt::print("{}:\n", s.file_name);
    print_tensors(s.file);
  }
  if (!ck.other_files().empty()) {
    fmt::print("other files:");
    for (const auto& f : ck.other_files()) fmt::print(" {}", f);
    fmt::print("\n");
  }
  return 0;
}

// A progress callback for a terminal: a bar on stderr with the bytes done of `bytes_total` and the
// `unit`s done (`done` of `total`), redrawn on a new percentage at most every 100 ms (always at 100%).
template <class Progress>
std::function<void(const Progress&)> progress_bar(const char* unit, std::size_t Progress::*done,
                                                  std::size_t Progress::*total) {
  return [unit, done, total, last = std::chrono::steady_clock::now(), shown = -1](const Progress& p) mutable {
    const auto now = std::chrono::steady_clock::now();
    const int pct = p.bytes_total ? static_cast<int>(100.0 * static_cast<double>(p.bytes_done) / static_cast<double>(p.bytes_total)) : 100;
    if (pct == shown || (now - last < std::chrono::milliseconds(100) && pct != 100)) return;
    shown = pct;
    last = now;
    const int bar = pct * 30 / 100;
    fmt::print(stderr, "\r[{:#<{}}{:<{}}] {:3d}%  {} / {}  {} {}/{}", "", bar, "", 30 - bar, pct,
               human_bytes(static_cast<double>(p.bytes_done)), human_bytes(static_cast<double>(p.bytes_total)), unit,
               p.*done, p.*total);
  };
}

struct MergeArgs {
  std::string base, adapter, out, dtype = "keep", rounding = "nearest";
  std::uint64_t seed = 0;
  int threads = 0;
  bool force = false, stats = false;
};

int merge(const MergeArgs& args) {
  io::MergeOptions o;
  if (args.dtype == "f32") o.dtype = io::Dtype::F32;
  else if (args.dtype == "bf16") o.dtype = io::Dtype::BF16;
  else if (args.dtype == "f16") o.dtype = io::Dtype::F16;
  else if (args.dtype == "f64") o.dtype = io::Dtype::F64;
  o.rounding = args.rounding == "stochastic" ? lowrank::Rounding::stochastic : lowrank::Rounding::nearest_even;
  o.seed = args.seed;
  o.overwrite = args.force;
  o.threads = args.threads;
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  if (tty) o.progress = progress_bar("tensor", &io::MergeProgress::tensors_done, &io::MergeProgress::tensors_total);
  const auto t0 = std::chrono::steady_clock::now();
  const auto report = io::merge_adapter(args.base, args.adapter, args.out, o);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (tty) fmt::print(stderr, "\n");
  if (tty || args.stats) {
    fmt::print(stderr, "merged {} of {} tensors into {} ({}, {} file{}) in {:.2f} s\n", report.merged, report.tensors,
               args.out, human_bytes(static_cast<double>(report.bytes_written)), report.files.size(),
               report.files.size() == 1 ? "" : "s", seconds);
  }
  if (args.stats) {
    fmt::print(stderr, "stats: seconds {:.3f} bytes {} peak_rss {} threads {}\n", seconds, report.bytes_written,
               peak_rss(), lowrank::num_threads());
  }
  return 0;
}

struct ExtractArgs {
  std::string base, tuned, out, target_regex, layout = "auto", dtype = "f32", svd = "auto";
  std::vector<std::string> targets;
  int rank = 0, power_iterations = 2, threads = 0;
  lowrank::Index oversample = 10;
  std::uint64_t seed = 0;
  bool fp64 = false, force = false, as_json = false, stats = false;
};

int extract(const ExtractArgs& args) {
  io::ExtractOptions o;
  o.rank = args.rank;
  o.target_modules = args.targets;
  if (!args.target_regex.empty()) o.target_regex = args.target_regex;
  if (args.layout == "out_in") o.layout = lowrank::Layout::out_in;
  else if (args.layout == "in_out") o.layout = lowrank::Layout::in_out;
  o.dtype = args.dtype == "bf16" ? io::Dtype::BF16 : io::Dtype::F32;
  o.fp64 = args.fp64;
  o.svd.seed = args.seed;
  o.svd.oversample = args.oversample;
  o.svd.power_iterations = args.power_iterations;
  o.svd.method = args.svd == "exact"        ? lowrank::linalg::SvdMethod::exact
                 : args.svd == "randomized" ? lowrank::linalg::SvdMethod::randomized
                                            : lowrank::linalg::SvdMethod::automatic;
  o.overwrite = args.force;
  o.threads = args.threads;
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  if (tty) o.progress = progress_bar("module", &io::ExtractProgress::modules_done, &io::ExtractProgress::modules_total);
  const auto t0 = std::chrono::steady_clock::now();
  const auto report = io::extract_adapter(args.base, args.tuned, args.out, o);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (tty) fmt::print(stderr, "\n");
  double worst = 1;
  for (const auto& m : report.modules) worst = std::min(worst, m.captured_energy);
  if (args.as_json) {
    json modules = json::array();
    for (const auto& m : report.modules) {
      modules.push_back({{"module", m.module}, {"tensor", m.tensor}, {"out", m.out}, {"in", m.in},
                         {"base_dtype", std::string(io::to_string(m.base_dtype))},
                         {"tuned_dtype", std::string(io::to_string(m.tuned_dtype))}, {"written", m.written},
                         {"rank", m.rank}, {"delta_norm", m.delta_norm}, {"captured_energy", m.captured_energy},
                         {"residual_norm", m.residual_norm}, {"exact_svd", m.exact_svd},
                         {"singular_values", m.singular_values}});
    }
    json doc = {{"kind", "extract"}, {"base", args.base}, {"tuned", args.tuned}, {"output", args.out},
                {"rank", args.rank}, {"lora_alpha", args.rank}, {"dtype", std::string(io::to_string(o.dtype))},
                {"layout", std::string(lowrank::to_string(report.layout))},
                {"fan_in_fan_out", report.layout == lowrank::Layout::in_out}, {"layout_source", report.layout_source},
                {"written", report.written}, {"skipped", report.skipped}, {"min_captured_energy", worst},
                {"bytes_written", report.bytes_written}, {"seconds", seconds}, {"modules", modules},
                {"only_in_base", report.only_in_base}, {"only_in_tuned", report.only_in_tuned}};
    fmt::print("{}\n", doc.dump(2));
  }
  if (args.stats) {
    std::size_t width = 6;
    for (const auto& m : report.modules) width = std::max(width, m.module.size());
    fmt::print(stderr, "{:<{}}  {:>6} {:>6} {:>4} {:>12} {:>10} {}\n", "module", width, "out", "in", "rank", "||dW||_F",
               "energy", "svd");
    for (const auto& m : report.modules) {
      if (m.written) {
        fmt::print(stderr, "{:<{}}  {:>6} {:>6} {:>4} {:>12.6g} {:>10.6f} {}\n", m.module, width, m.out, m.in, m.rank,
                   m.delta_norm, m.captured_energy, m.exact_svd ? "exact" : "randomized");
      } else {
        fmt::print(stderr, "{:<{}}  {:>6} {:>6} {:>4} {:>12} {:>10} skipped (unchanged)\n", m.module, width, m.out, m.in,
                   "-", 0, "-");
      }
    }
  }
  if (tty || args.stats) {
    fmt::print(stderr, "extracted {} module{} at rank {} ({} unchanged, skipped) into {} ({}, layout {}), lowest captured "
               "energy {:.4f}, in {:.2f} s\n", report.written, report.written == 1 ? "" : "s", args.rank, report.skipped,
               args.out, human_bytes(static_cast<double>(report.bytes_written)), lowrank::to_string(report.layout), worst,
               seconds);
  }
  if (args.stats) {
    fmt::print(stderr, "stats: seconds {:.3f} bytes {} peak_rss {} threads {}\n", seconds, report.bytes_written,
               peak_rss(), report.threads);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{fmt::format("lowrank {}.{}.{}: inspect and merge safetensors checkpoints and PEFT LoRA adapters, "
                           "and extract adapters from fine-tuned checkpoints",
                           LOWRANK_VERSION_MAJOR, LOWRANK_VERSION_MINOR, LOWRANK_VERSION_PATCH),
               "lowrank"};
  app.require_subcommand(1);
  app.set_version_flag("--version", fmt::format("{}.{}.{}", LOWRANK_VERSION_MAJOR, LOWRANK_VERSION_MINOR, LOWRANK_VERSION_PATCH));

  std::string inspect_path;
  bool inspect_json = false;
  auto* ins = app.add_subcommand("inspect", "List the tensors and metadata of a safetensors file, a checkpoint folder "
                                            "(sharded or not) or a PEFT adapter folder");
  ins->add_option("PATH", inspect_path, "a .safetensors file, a checkpoint folder, or an adapter folder")->required();
  ins->add_flag("--json", inspect_json, "machine-readable output");

  MergeArgs m;
  auto* mer = app.add_subcommand("merge", "Merge a PEFT LoRA adapter into a checkpoint as PEFT's merge_and_unload "
                                          "does (W += scale * B A), tensor by tensor");
  mer->add_option("BASE", m.base, "the base checkpoint: a .safetensors file or a folder (sharded or not)")->required();
  mer->add_option("ADAPTER", m.adapter, "the adapter folder (adapter_config.json + adapter_model.safetensors)")->required();
  mer->add_option("-o,--output", m.out, "output file (for a file BASE) or folder (for a folder BASE)")->required();
  mer->add_option("--dtype", m.dtype, "dtype of the floating-point output tensors")
      ->check(CLI::IsMember({"keep", "f32", "bf16", "f16", "f64"}))
      ->capture_default_str();
  mer->add_option("--rounding", m.rounding, "rounding into bf16/fp16")
      ->check(CLI::IsMember({"nearest", "stochastic"}))
      ->capture_default_str();
  mer->add_option("--seed", m.seed, "seed of stochastic rounding")->capture_default_str();
  mer->add_option("--threads", m.threads, "worker threads (default: all cores)")->check(CLI::PositiveNumber);
  mer->add_flag("--force", m.force, "replace an existing, non-empty output folder");
  mer->add_flag("--stats", m.stats, "print time, bytes written and peak resident memory to stderr");

  ExtractArgs x;
  auto* ext = app.add_subcommand("extract", "Extract a PEFT LoRA adapter from a fine-tuned checkpoint: TUNED - BASE "
                                            "truncated to rank R per weight with the randomized SVD");
  ext->add_option("BASE", x.base, "the base checkpoint: a .safetensors file or a folder (sharded or not)")->required();
  ext->add_option("TUNED", x.tuned, "the fine-tuned checkpoint, with the same tensor names")->required();
  ext->add_option("-o,--output", x.out, "the adapter folder to write (adapter_config.json + adapter_model.safetensors)")
      ->required();
  ext->add_option("-r,--rank", x.rank, "rank of every extracted module (lora_alpha = rank, scale 1)")
      ->required()
      ->check(CLI::PositiveNumber);
  auto* targets = ext->add_option("--targets", x.targets, "PEFT target_modules names (comma-separated or repeated): "
                                                          "a module is targeted if its name equals one or ends in .NAME "
                                                          "(default: every 2-D .weight but embeddings and lm_head)")
                      ->delimiter(',');
  ext->add_option("--target-regex", x.target_regex, "a regular expression that must match whole module names "
                                                    "(PEFT's string target_modules)")
      ->excludes(targets);
  ext->add_option("--layout", x.layout, "weight layout: auto (from config.json's model_type), out_in (nn.Linear), "
                                        "in_out (GPT-2 Conv1D, written as fan_in_fan_out)")
      ->check(CLI::IsMember({"auto", "out_in", "in_out"}))
      ->capture_default_str();
  ext->add_option("--dtype", x.dtype, "dtype of the adapter's factors")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  ext->add_flag("--fp64", x.fp64, "difference and SVD in fp64 (default fp32; fp64 anyway for F64 tensors)");
  ext->add_option("--seed", x.seed, "seed of the randomized SVD's test matrices")->capture_default_str();
  ext->add_option("--oversample", x.oversample, "randomized SVD: extra range columns")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  ext->add_option("--power-iterations", x.power_iterations, "randomized SVD: power iterations")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  ext->add_option("--svd", x.svd, "SVD method: auto (exact for small weights), randomized, exact")
      ->check(CLI::IsMember({"auto", "randomized", "exact"}))
      ->capture_default_str();
  ext->add_option("--threads", x.threads, "modules extracted at once (default: min(cores, 4)); memory grows with it")
      ->check(CLI::PositiveNumber);
  ext->add_flag("--force", x.force, "replace an existing, non-empty output folder");
  ext->add_flag("--json", x.as_json, "print the report (per-module captured energy, rank, singular values) as JSON");
  ext->add_flag("--stats", x.stats, "print a per-module table, time and peak resident memory to stderr");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help, the version, or the error and a hint
    return code == 0 ? 0 : 2;
  }
  const char* command = ins->parsed() ? "inspect" : ext->parsed() ? "extract" : "merge";
  try {
    if (ins->parsed()) return inspect(inspect_path, inspect_json);
    if (ext->parsed()) return extract(x);
    return merge(m);
  } catch (const std::exception& e) {
    std::string message = e.what();
    for (char& c : message)
      if (c == '\n') c = ' ';
    fmt::print(stderr, "lowrank {}: {}\n", command, message);
    return 1;
  }
}
