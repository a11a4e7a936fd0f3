// `lowrank`: inspect and merge safetensors checkpoints and PEFT LoRA adapters.
//
//   lowrank inspect PATH [--json]
//   lowrank merge BASE ADAPTER -o OUT [--dtype keep|f32|bf16|f16] [--rounding nearest|stochastic]
//                 [--seed N] [--force] [--threads N] [--stats]
//
// Exit status: 0 on success, 1 on bad input or a failed operation (one line on stderr), 2 on a
// command-line error.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "lowrank/core/threading.hpp"
#include "lowrank/io/checkpoint.hpp"
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
  auto last = std::chrono::steady_clock::now();
  int shown = -1;
  if (tty) {
    o.progress = [&](const io::MergeProgress& p) {
      const auto now = std::chrono::steady_clock::now();
      const int pct = p.bytes_total ? static_cast<int>(100.0 * static_cast<double>(p.bytes_done) / static_cast<double>(p.bytes_total)) : 100;
      if (pct == shown || (now - last < std::chrono::milliseconds(100) && pct != 100)) return;
      shown = pct;
      last = now;
      const int bar = pct * 30 / 100;
      fmt::print(stderr, "\r[{:#<{}}{:<{}}] {:3d}%  {} / {}  tensor {}/{}", "", bar, "", 30 - bar, pct,
                 human_bytes(static_cast<double>(p.bytes_done)), human_bytes(static_cast<double>(p.bytes_total)),
                 p.tensors_done, p.tensors_total);
    };
  }
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{fmt::format("lowrank {}.{}.{}: inspect and merge safetensors checkpoints and PEFT LoRA adapters",
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

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help, the version, or the error and a hint
    return code == 0 ? 0 : 2;
  }
  const char* command = ins->parsed() ? "inspect" : "merge";
  try {
    if (ins->parsed()) return inspect(inspect_path, inspect_json);
    return merge(m);
  } catch (const std::exception& e) {
    std::string message = e.what();
    for (char& c : message)
      if (c == '\n') c = ' ';
    fmt::print(stderr, "lowrank {}: {}\n", command, message);
    return 1;
  }
}
