// Merging a PEFT LoRA adapter into a sharded bf16 checkpoint from C++ with lowrank::io, then
// checking the result against PEFT's own merge_and_unload output. Uses the fixtures committed in
// tests/data/peft (made by the real transformers and peft; see tools/fixtures).
//
//   example_checkpoint_merge [FIXTURE_DIR]   (default: the llama_bf16 fixture of the source tree)
#include <lowrank/io/checkpoint.hpp>
#include <lowrank/io/merge.hpp>
#include <lowrank/io/peft.hpp>
#include <lowrank/io/safetensors.hpp>

#include <bit>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

namespace fs = std::filesystem;
namespace io = lowrank::io;

int main(int argc, char** argv) {
  const fs::path fixture = argc > 1 ? fs::path(argv[1]) : fs::path(LOWRANK_EXAMPLE_DATA) / "llama_bf16";
  const fs::path out = fs::temp_directory_path() / "lowrank_example_merged";
  fs::remove_all(out);

  // What the adapter holds, as PEFT reads it.
  const auto adapter = io::PeftAdapter::open(fixture / "adapter");
  std::printf("adapter: %zu modules, r %d, alpha %g, rsLoRA %s\n", adapter.modules().size(), adapter.config().r,
              adapter.config().lora_alpha, adapter.config().use_rslora ? "yes" : "no");

  // The merge: validated first, streamed block by block, written to a temporary folder renamed at the end.
  io::MergeOptions options;
  options.progress = [](const io::MergeProgress& p) {
    if (p.tensors_done == p.tensors_total) std::printf("merged %zu tensors\n", p.tensors_total);
  };
  const auto report = io::merge_adapter(fixture / "base", fixture / "adapter", out, options);
  std::printf("wrote %zu files to %s (%zu of %zu tensors received a delta)\n", report.files.size(), out.c_str(),
              report.merged, report.tensors);

  // Compare with PEFT's merge, element by element (bf16 bits).
  const auto ours = io::Checkpoint::open(out);
  const auto peft = io::SafetensorsFile::open(fixture / "merged" / "model.safetensors");
  std::size_t elements = 0, differ = 0;
  for (const auto& t : peft.tensors()) {
    const auto e = ours.find(t.name);
    if (e.info == nullptr || e.info->dtype != t.dtype || e.info->shape != t.shape) {
      std::printf("tensor %s missing or different in shape\n", t.name.c_str());
      return 1;
    }
    const auto a = e.shard->file.bytes(*e.info), b = peft.bytes(t);
    const std::size_t size = io::dtype_size(t.dtype);
    for (std::size_t i = 0; i < a.size(); i += size) {
      ++elements;
      differ += std::memcmp(a.data() + i, b.data() + i, size) != 0;
    }
  }
  std::printf("%zu of %zu elements differ from PEFT's merge_and_unload (one-ulp rounding differences)\n", differ,
              elements);
  fs::remove_all(out);
  return differ * 1000 <= elements ? 0 : 1;
}
