/// \file
/// Checkpoints as PyTorch users save them: one safetensors file, or a folder with one file or with
/// shards listed by a `*.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor: file}}`).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/io/safetensors.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

/// A checkpoint opened for reading: every shard mapped and validated, every tensor name unique.
class Checkpoint {
 public:
  struct Shard {
    std::string file_name;  ///< relative to the folder (or the file's own name)
    SafetensorsFile file;
  };
  struct Entry {
    const Shard* shard = nullptr;
    const TensorInfo* info = nullptr;
  };

  /// Opens a `.safetensors` file, or a folder: with a `*.safetensors.index.json` its shards (every
  /// listed file must exist and hold exactly the tensors the weight map gives it), otherwise every
  /// `*.safetensors` file in it. \throws Error naming the file and what is wrong.
  static Checkpoint open(const std::filesystem::path& path);

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  [[nodiscard]] bool is_folder() const noexcept { return folder_; }
  /// The index file's name, if the checkpoint is sharded with one.
  [[nodiscard]] const std::optional<std::string>& index_name() const noexcept { return index_name_; }
  /// The index's `metadata` object as JSON text (`{}` if none).
  [[nodiscard]] const std::string& index_metadata_json() const noexcept { return index_metadata_; }
  [[nodiscard]] const std::vector<Shard>& shards() const noexcept { return shards_; }
  /// The tensor named `name` anywhere in the checkpoint, or an empty entry.
  [[nodiscard]] Entry find(std::string_view name) const noexcept;
  /// Number of tensors in all shards.
  [[nodiscard]] std::size_t tensor_count() const noexcept;
  /// Regular files of the folder that are neither shards nor the index (config.json, tokenizer
  /// files, ...), relative names, sorted. Empty for a single file.
  [[nodiscard]] const std::vector<std::string>& other_files() const noexcept { return others_; }

 private:
  std::filesystem::path path_;
  bool folder_ = false;
  std::optional<std::string> index_name_;
  std::string index_metadata_ = "{}";
  std::vector<Shard> shards_;
  std::vector<std::string> others_;
};

/// Writes a `model.safetensors.index.json`-style index: `{"metadata": metadata, "weight_map":
/// {tensor: file}}` with `metadata.total_size` set to `total_size`, keys sorted, via a temporary
/// file renamed into place.
void write_index(const std::filesystem::path& target, const std::string& metadata_json, std::uint64_t total_size,
                 const std::vector<std::pair<std::string, std::string>>& weight_map);

}  // namespace io
LOWRANK_END_NAMESPACE
