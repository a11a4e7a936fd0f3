#include "lowrank/io/checkpoint.hpp"

#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "file_util.hpp"
#include "lowrank/core/error.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

using lowrank::detail::fail;
namespace fs = std::filesystem;

namespace {

// A shard name from an index must be a plain file name in the same folder.
bool plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

}  // namespace

Checkpoint Checkpoint::open(const fs::path& path) {
  Checkpoint c;
  c.path_ = path;
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec || !fs::exists(status)) fail("checkpoint", "{}: no such file or folder", path.string());
  if (fs::is_regular_file(status)) {
    c.shards_.push_back({path.filename().string(), SafetensorsFile::open(path)});
    return c;
  }
  if (!fs::is_directory(status)) fail("checkpoint", "{}: neither a file nor a folder", path.string());
  c.folder_ = true;

  std::vector<std::string> indexes, files, others;
  for (const auto& e : fs::directory_iterator(path)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    if (name.ends_with(".safetensors.index.json")) {
      indexes.push_back(name);
    } else if (name.ends_with(".safetensors")) {
      files.push_back(name);
    } else {
      others.push_back(name);
    }
  }
  std::sort(indexes.begin(), indexes.end());
  std::sort(files.begin(), files.end());
  std::sort(others.begin(), others.end());
  if (indexes.size() > 1) {
    fail("checkpoint", "{}: several index files ({}, {}); expected one", path.string(), indexes[0], indexes[1]);
  }

  std::map<std::string, std::vector<std::string>> expected;  // shard -> tensors the index gives it
  if (indexes.size() == 1) {
    const fs::path index = path / indexes[0];
    c.index_name_ = indexes[0];
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(detail::read_small_file(index, 256u << 20, "checkpoint"));
    } catch (const nlohmann::json::exception& e) {
      fail("checkpoint", "{}: not valid JSON ({})", index.string(), e.what());
    }
    if (!doc.is_object() || !doc.contains("weight_map") || !doc["weight_map"].is_object()) {
      fail("checkpoint", "{}: no \"weight_map\" object", index.string());
    }
    if (doc.contains("metadata")) {
      if (!doc["metadata"].is_object()) fail("checkpoint", "{}: \"metadata\" is not an object", index.string());
      c.index_metadata_ = doc["metadata"].dump();
    }
    for (const auto& [tensor, file] : doc["weight_map"].items()) {
      if (!file.is_string() || !plain_file_name(file.get<std::string>())) {
        fail("checkpoint", "{}: tensor \"{}\" maps to {}, not a file name in the folder", index.string(), tensor, file.dump());
      }
      expected[file.get<std::string>()].push_back(tensor);
    }
    for (auto& [file, tensors] : expected) {
      const fs::path shard = path / file;
      if (!fs::is_regular_file(shard)) {
        fail("checkpoint", "{}: shard {} (of tensor \"{}\") does not exist", index.string(), file, tensors.front());
      }
      c.shards_.push_back({file, SafetensorsFile::open(shard)});
      const auto& sf = c.shards_.back().file;
      for (const auto& t : tensors) {
        if (sf.find(t) == nullptr) fail("checkpoint", "{}: tensor \"{}\" is not in shard {}", index.string(), t, file);
      }
      if (sf.tensors().size() != tensors.size()) {
        for (const auto& t : sf.tensors()) {
          if (std::find(tensors.begin(), tensors.end(), t.name) == tensors.end()) {
            fail("checkpoint", "{}: shard {} holds tensor \"{}\", which the weight map does not list", index.string(),
                 file, t.name);
          }
        }
      }
    }
    // Files of the folder that are neither shards nor the index are copied along.
    for (const auto& f : files) {
      if (!expected.contains(f)) others.push_back(f);
    }
    std::sort(others.begin(), others.end());
  } else {
    if (files.empty()) fail("checkpoint", "{}: no .safetensors file in the folder", path.string());
    for (const auto& f : files) c.shards_.push_back({f, SafetensorsFile::open(path / f)});
  }
  c.others_ = std::move(others);

  std::unordered_map<std::string_view, const std::string*> seen;
  for (const auto& s : c.shards_) {
    for (const auto& t : s.file.tensors()) {
      const auto [it, fresh] = seen.emplace(t.name, &s.file_name);
      if (!fresh) {
        fail("checkpoint", "{}: tensor \"{}\" is in both {} and {}", path.string(), t.name, *it->second, s.file_name);
      }
    }
  }
  return c;
}

Checkpoint::Entry Checkpoint::find(std::string_view name) const noexcept {
  for (const auto& s : shards_) {
    if (const TensorInfo* t = s.file.find(name)) return {&s, t};
  }
  return {};
}

std::size_t Checkpoint::tensor_count() const noexcept {
  std::size_t n = 0;
  for (const auto& s : shards_) n += s.file.tensors().size();
  return n;
}

void write_index(const fs::path& target, const std::string& metadata_json, std::uint64_t total_size,
                 const std::vector<std::pair<std::string, std::string>>& weight_map) {
  nlohmann::json doc;
  doc["metadata"] = nlohmann::json::parse(metadata_json);
  doc["metadata"]["total_size"] = total_size;
  auto& map = doc["weight_map"] = nlohmann::json::object();
  for (const auto& [tensor, file] : weight_map) map[tensor] = file;
  const std::string text = doc.dump(2) + "\n";
  detail::TempFile temp(target);
  detail::pwrite_all(temp.fd(), std::as_bytes(std::span(text)), 0, temp.path().string());
  temp.commit();
}

}  // namespace io
LOWRANK_END_NAMESPACE
