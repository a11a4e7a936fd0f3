/// \file
/// safetensors files: a validating, memory-mapped reader with zero-copy tensor views, and a writer
/// that streams tensors into a temporary file renamed into place at the end.
///
/// Format (huggingface/safetensors): 8 bytes little-endian header length N, N bytes of JSON
/// `{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`
/// (possibly right-padded with spaces), then the data buffer. Offsets are relative to the buffer;
/// data is little-endian and row-major.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lowrank/core/config.hpp"
#include "lowrank/core/error.hpp"
#include "lowrank/core/scalar.hpp"
#include "lowrank/core/view.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

/// Element types of safetensors. The F8 types are read as raw bytes (or converted with
/// `to_float`); the others map to C++ types.
enum class Dtype : std::uint8_t { BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F16, BF16, F32, F64, F8_E4M3, F8_E5M2 };

/// The safetensors spelling ("F32", "BF16", ...).
[[nodiscard]] std::string_view to_string(Dtype dtype) noexcept;
/// Parses a safetensors dtype string; `nullopt` if unknown or unsupported.
[[nodiscard]] std::optional<Dtype> parse_dtype(std::string_view text) noexcept;
/// Bytes per element.
[[nodiscard]] std::size_t dtype_size(Dtype dtype) noexcept;
/// F64, F32, BF16, F16 (the storage types lowrank computes on).
[[nodiscard]] bool is_float(Dtype dtype) noexcept;
/// A shape as `[2, 3]`, as in lowrank's messages.
[[nodiscard]] std::string shape_string(std::span<const std::uint64_t> shape);
/// The Dtype of a storage type.
template <SupportedScalar T>
[[nodiscard]] constexpr Dtype dtype_of() noexcept {
  if constexpr (std::same_as<T, double>) return Dtype::F64;
  else if constexpr (std::same_as<T, float>) return Dtype::F32;
  else if constexpr (std::same_as<T, bf16>) return Dtype::BF16;
  else return Dtype::F16;
}

/// One entry of a safetensors header.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0;  ///< byte offset in the data buffer
  std::uint64_t end = 0;    ///< one past the last byte

  [[nodiscard]] std::uint64_t nbytes() const noexcept { return end - begin; }
  [[nodiscard]] std::uint64_t numel() const noexcept;
};

/// A validated, memory-mapped safetensors file. Movable, not copyable; views stay valid while the
/// object lives.
///
/// `open` validates the whole header before anything is handed out: the header length (at least 2,
/// at most 100,000,000 bytes and inside the file), a JSON object starting with `{`, no duplicate
/// keys at any level, `__metadata__` a string-to-string map, every entry with exactly `dtype`,
/// `shape` and `data_offsets`, a known dtype, non-negative integer dimensions, `numel * dtype size`
/// without overflow and equal to `end - begin`, and the entries tiling the data buffer exactly
/// (sorted by offset, each starting where the previous ends, the last ending at the end of the
/// file). Data values are not checked (NaN and infinity are legal). Alignment is not required.
class SafetensorsFile {
 public:
  /// Maps and validates `path`. \throws Error naming the file and, where one is at fault, the tensor.
  static SafetensorsFile open(const std::filesystem::path& path);
  /// Validates a buffer that holds a whole file (not copied: it must outlive the object). `name`
  /// is used in error messages. This is what `open` does after mapping, and what the fuzzer calls.
  static SafetensorsFile from_bytes(std::span<const std::byte> bytes, std::string name);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  /// The file's path (or the name given to `from_bytes`).
  [[nodiscard]] const std::filesystem::path& path() const noexcept;
  /// Entries in the order of their data offsets.
  [[nodiscard]] std::span<const TensorInfo> tensors() const noexcept;
  /// The entry named `name`, or null.
  [[nodiscard]] const TensorInfo* find(std::string_view name) const noexcept;
  /// The entry named `name`. \throws Error if there is none.
  [[nodiscard]] const TensorInfo& at(std::string_view name) const;
  /// `__metadata__` (empty if absent).
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const noexcept;
  /// Header length N (the data buffer starts at byte 8 + N).
  [[nodiscard]] std::uint64_t header_size() const noexcept;
  /// Size of the whole file in bytes.
  [[nodiscard]] std::uint64_t file_size() const noexcept;

  /// The bytes of a tensor (zero-copy, in the mapping).
  [[nodiscard]] std::span<const std::byte> bytes(const TensorInfo& tensor) const noexcept;
  /// A zero-copy row-major view of a 2-D (or 1-D, as one row) tensor of storage type `T`.
  /// \throws Error if the dtype is not `T`, the tensor is not 1-D or 2-D, or its data is not
  /// aligned for `T` in this file (use `read_as` then).
  template <SupportedScalar T>
  [[nodiscard]] MatrixView<const T> matrix(std::string_view name) const;

  /// Copies elements `[first, first + out.size())` of a floating-point tensor (F64, F32, BF16, F16)
  /// into `out`, converted to `T` (rounded to nearest-even when narrowing). Works on any alignment.
  template <SupportedScalar T>
  void read_as(const TensorInfo& tensor, std::span<T> out, std::uint64_t first = 0) const;

  /// Copies the raw bytes `[offset, offset + out.size())` of a tensor with `pread` (no page faults
  /// on the mapping). \throws Error on an I/O error or a range outside the tensor.
  void read_bytes(const TensorInfo& tensor, std::uint64_t offset, std::span<std::byte> out) const;

  /// Tells the kernel the mapped pages of `tensor` are no longer needed by this process (they stay
  /// in the page cache); keeps the resident set bounded when streaming through a large file.
  void release(const TensorInfo& tensor) const noexcept;

  /// The open file descriptor (-1 for `from_bytes`), for `copy_file_range`.
  [[nodiscard]] int fd() const noexcept;

 private:
  struct Impl;
  explicit SafetensorsFile(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

/// Name, dtype and shape of a tensor to write.
struct TensorSpec {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
};

/// Order of tensors in a written file.
enum class TensorOrder {
  canonical,  ///< as the safetensors library writes: by dtype size (largest first), then by name
  as_given,   ///< the order of the specs passed in
};

/// Writes one safetensors file. The header is fixed up front from the specs, so tensors can be
/// streamed in any order and in parts; data goes to a temporary file in the target's folder that
/// `commit` renames over the target. If the writer is destroyed without `commit` (an error, an
/// exception, an interrupted run), the temporary file is removed and the target is untouched.
///
/// The header JSON lists `__metadata__` first, then the tensors in file order, and is padded with
/// spaces to a multiple of 8 bytes, so every tensor of the canonical order is naturally aligned.
class SafetensorsWriter {
 public:
  /// \throws Error on duplicate or empty names, shape overflow, or if the folder is not writable.
  SafetensorsWriter(std::filesystem::path target, std::vector<TensorSpec> tensors,
                    std::map<std::string, std::string> metadata = {{"format", "pt"}},
                    TensorOrder order = TensorOrder::canonical);
  SafetensorsWriter(SafetensorsWriter&&) noexcept;
  SafetensorsWriter& operator=(SafetensorsWriter&&) noexcept;
  ~SafetensorsWriter();

  /// The entries as they will be in the file (final offsets).
  [[nodiscard]] std::span<const TensorInfo> tensors() const noexcept;
  [[nodiscard]] const TensorInfo& at(std::string_view name) const;
  /// Writes bytes `[offset, offset + data.size())` of tensor `name`. `write` and `copy_from` may be
  /// called concurrently from several threads for disjoint ranges.
  void write(std::string_view name, std::span<const std::byte> data, std::uint64_t offset = 0);
  /// Writes a whole tensor from typed elements (the dtype must match).
  template <SupportedScalar T>
  void write(std::string_view name, std::span<const T> data) {
    check_dtype(name, dtype_of<T>());
    write(name, std::as_bytes(data), 0);
  }
  /// Copies tensor `source` of `file` (same dtype and byte size) in the kernel
  /// (`copy_file_range`), without passing the data through user memory.
  void copy_from(std::string_view name, const SafetensorsFile& file, const TensorInfo& source);
  /// Checks every byte of every tensor was written, flushes, and renames the temporary file over
  /// the target. \throws Error if a tensor is incomplete (the target is then untouched).
  void commit();
  /// Bytes of the finished file.
  [[nodiscard]] std::uint64_t file_size() const noexcept;

 private:
  void check_dtype(std::string_view name, Dtype dtype) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Writes a whole file at once from in-memory tensors (a convenience over `SafetensorsWriter`).
struct TensorData {
  TensorSpec spec;
  std::span<const std::byte> bytes;
};
void write_safetensors(const std::filesystem::path& target, std::span<const TensorData> tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}},
                       TensorOrder order = TensorOrder::canonical);

}  // namespace io
LOWRANK_END_NAMESPACE
