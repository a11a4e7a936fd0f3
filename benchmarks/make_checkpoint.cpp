// Writes a synthetic Llama-shaped checkpoint and a PEFT adapter targeting every linear weight, for
// the merge benchmark (scripts/bench-merge.sh).
//
//   lowrank_make_checkpoint OUT_DIR [--layers N] [--hidden H] [--intermediate I] [--vocab V]
//                           [--rank R] [--dtype bf16|f32] [--shard-bytes B]
//
// OUT_DIR/base: config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json
// OUT_DIR/adapter: adapter_config.json, adapter_model.safetensors (fp32 factors, r = R, alpha = 2R)
#include <bit>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "lowrank/core/philox.hpp"
#include "lowrank/io/checkpoint.hpp"
#include "lowrank/io/peft.hpp"
#include "lowrank/io/safetensors.hpp"

namespace fs = std::filesystem;
namespace io = lowrank::io;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR [--layers N] [--hidden H] [--intermediate I] [--vocab V] [--rank R] "
                         "[--dtype bf16|f32] [--shard-bytes B]\n", argv[0]);
    return 2;
  }
  const fs::path out = argv[1];
  std::uint64_t layers = 9, hidden = 2048, inter = 5632, vocab = 8192, rank = 16, shard_bytes = 500u << 20;
  std::string dtype = "bf16";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const std::string v = argv[i + 1];
    if (k == "--layers") layers = std::stoull(v);
    else if (k == "--hidden") hidden = std::stoull(v);
    else if (k == "--intermediate") inter = std::stoull(v);
    else if (k == "--vocab") vocab = std::stoull(v);
    else if (k == "--rank") rank = std::stoull(v);
    else if (k == "--dtype") dtype = v;
    else if (k == "--shard-bytes") shard_bytes = std::stoull(v);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  const io::Dtype dt = dtype == "f32" ? io::Dtype::F32 : io::Dtype::BF16;
  const std::size_t es = io::dtype_size(dt);

  struct T {
    std::string name;
    std::vector<std::uint64_t> shape;
    bool linear;
  };
  std::vector<T> all{{"model.embed_tokens.weight", {vocab, hidden}, false}};
  for (std::uint64_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    all.push_back({p + "input_layernorm.weight", {hidden}, false});
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"}) all.push_back({p + "self_attn." + n + ".weight", {hidden, hidden}, true});
    all.push_back({p + "post_attention_layernorm.weight", {hidden}, false});
    all.push_back({p + "mlp.gate_proj.weight", {inter, hidden}, true});
    all.push_back({p + "mlp.up_proj.weight", {inter, hidden}, true});
    all.push_back({p + "mlp.down_proj.weight", {hidden, inter}, true});
  }
  all.push_back({"model.norm.weight", {hidden}, false});
  all.push_back({"lm_head.weight", {vocab, hidden}, false});

  // Group into shards of about shard_bytes.
  std::vector<std::vector<const T*>> shards(1);
  std::uint64_t in_shard = 0;
  for (const auto& t : all) {
    std::uint64_t b = es;
    for (auto d : t.shape) b *= d;
    if (in_shard > 0 && in_shard + b > shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(&t);
    in_shard += b;
  }
  fs::create_directories(out / "base");
  std::vector<std::pair<std::string, std::string>> weight_map;
  std::uint64_t total = 0, stream = 0;
  std::vector<std::byte> buffer;
  for (std::size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    std::vector<io::TensorSpec> specs;
    for (const T* t : shards[s]) specs.push_back({t->name, dt, t->shape});
    io::SafetensorsWriter w(out / "base" / name, specs, {{"format", "pt"}}, io::TensorOrder::as_given);
    for (const T* t : shards[s]) {
      const auto& info = w.at(t->name);
      buffer.resize(info.nbytes());
      const lowrank::RandomStream rng(1234, stream++);
      const std::uint64_t n = info.numel();
      const float scale = t->linear ? 0.02f : 1.0f;
      for (std::uint64_t i = 0; i < n; ++i) {
        const float x = scale * (rng.uniform(i) * 2.0f - 1.0f);
        if (dt == io::Dtype::F32) {
          std::memcpy(buffer.data() + 4 * i, &x, 4);
        } else {
          const auto h = std::bit_cast<std::uint16_t>(lowrank::bf16(x));
          std::memcpy(buffer.data() + 2 * i, &h, 2);
        }
      }
      w.write(t->name, buffer, 0);
      weight_map.emplace_back(t->name, name);
      total += info.nbytes();
    }
    w.commit();
  }
  io::write_index(out / "base" / "model.safetensors.index.json", "{}", total, weight_map);
  std::ofstream(out / "base" / "config.json") << R"({"architectures": ["LlamaForCausalLM"], "hidden_size": )" << hidden
                                               << R"(, "intermediate_size": )" << inter << R"(, "num_hidden_layers": )"
                                               << layers << R"(, "vocab_size": )" << vocab << R"(, "torch_dtype": ")"
                                               << (dt == io::Dtype::F32 ? "float32" : "bfloat16") << "\"}\n";

  io::PeftConfig c;
  c.r = static_cast<int>(rank);
  c.lora_alpha = 2.0 * static_cast<double>(rank);
  c.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  std::vector<std::vector<float>> keep;
  std::vector<io::LoraFactors> f;
  keep.reserve(2 * all.size());
  for (const auto& t : all) {
    if (!t.linear) continue;
    const std::uint64_t o = t.shape[0], i = t.shape[1];
    const lowrank::RandomStream rng(99, stream++);
    keep.emplace_back(rank * i);
    for (std::size_t k = 0; k < keep.back().size(); ++k) keep.back()[k] = 0.01f * rng.normal(k);
    keep.emplace_back(o * rank);
    for (std::size_t k = 0; k < keep.back().size(); ++k) keep.back()[k] = 0.01f * rng.normal(k + (1ull << 40));
    f.push_back({t.name.substr(0, t.name.size() - 7), rank, i, o, keep[keep.size() - 2], keep.back()});
  }
  io::write_peft_adapter(out / "adapter", c, f);
  std::printf("wrote %s: %zu tensors, %.3f GiB in %zu shards; adapter with %zu modules, r = %llu\n",
              (out / "base").c_str(), all.size(), static_cast<double>(total) / (1u << 30), shards.size(), f.size(),
              static_cast<unsigned long long>(rank));
  return 0;
}
