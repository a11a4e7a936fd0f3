// Helpers for the io tests: temporary folders, raw safetensors bytes, file listings.
#pragma once

#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace lowrank_test {

namespace fs = std::filesystem;

/// A fresh folder under the system temp dir, removed with its contents at the end of the scope.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "lowrank-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
  /// Every entry below the folder (relative paths), hidden temporaries included.
  std::set<std::string> listing() const {
    std::set<std::string> out;
    for (const auto& e : fs::recursive_directory_iterator(path)) out.insert(fs::relative(e.path(), path).string());
    return out;
  }
};

/// The bytes of a safetensors file with the given header text and data buffer (no padding).
inline std::vector<std::byte> raw_safetensors(const std::string& header, std::size_t data_bytes,
                                              std::uint64_t length_override = 0) {
  std::vector<std::byte> out(8 + header.size() + data_bytes, std::byte{0});
  const std::uint64_t n = length_override ? length_override : header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
  for (std::size_t i = 0; i < header.size(); ++i) out[8 + i] = static_cast<std::byte>(header[i]);
  for (std::size_t i = 0; i < data_bytes; ++i) out[8 + header.size() + i] = static_cast<std::byte>(i * 7 + 1);
  return out;
}

inline void write_bytes(const fs::path& file, const std::vector<std::byte>& bytes) {
  std::ofstream out(file, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

inline std::vector<std::byte> read_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::vector<char> v((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<std::byte>(v[i]);
  return out;
}

inline void write_text(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary);
  out << text;
}

/// The path of a committed test fixture.
inline fs::path data_path(const std::string& relative) { return fs::path(LOWRANK_TEST_DATA) / relative; }

/// Asserts `call` throws lowrank::Error whose message contains every fragment.
#define LOWRANK_EXPECT_ERROR(call, ...)                                                              \
  do {                                                                                               \
    try {                                                                                            \
      call;                                                                                          \
      ADD_FAILURE() << "no lowrank::Error from " #call;                                              \
    } catch (const lowrank::Error& e) {                                                              \
      for (const char* fragment : {__VA_ARGS__})                                                     \
        EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos)                           \
            << "message \"" << e.what() << "\" lacks \"" << fragment << "\"";                       \
    }                                                                                                \
  } while (0)

}  // namespace lowrank_test
