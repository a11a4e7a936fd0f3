// libFuzzer target: SafetensorsFile::from_bytes on arbitrary bytes.
//
// A rejected input must throw lowrank::Error and nothing else; any other exception, a crash or a
// sanitizer report is a finding. An accepted input must satisfy the documented invariants (entries
// sorted by offset and tiling the data buffer, byte counts equal to numel * dtype size), and every
// view the file hands out is read in full so that ASan sees any view outside the input buffer
// (libFuzzer passes a heap copy of exactly `size` bytes).
//
// Set LOWRANK_FUZZ_VERBOSE=1 to print each rejection message (useful when checking seeds).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lowrank/io/safetensors.hpp"

namespace {

namespace io = lowrank::io;

// Element counts above this are not converted with read_as (keeps each run fast).
constexpr std::uint64_t kMaxConvert = 1u << 16;

[[noreturn]] void finding(const char* what, const io::TensorInfo* t = nullptr) {
  std::fprintf(stderr, "safetensors_fuzz: invariant violated: %s%s%s\n", what, t ? " -- tensor " : "",
               t ? t->name.c_str() : "");
  std::abort();
}

bool verbose() {
  static const bool v = std::getenv("LOWRANK_FUZZ_VERBOSE") != nullptr;
  return v;
}

// Reads every byte so that ASan checks the whole range.
std::uint8_t touch(std::span<const std::byte> s) {
  std::uint8_t acc = 0;
  for (std::byte b : s) acc ^= static_cast<std::uint8_t>(b);
  return acc;
}

template <class Fn>
void expect_error(Fn&& fn, const char* what, const io::TensorInfo& t) {
  try {
    fn();
  } catch (const lowrank::Error&) {
    return;
  }
  finding(what, &t);
}

// read_as<T> over the whole tensor and over its second half, plus the out-of-range calls that must
// be refused.
template <class T>
void exercise_read_as(const io::SafetensorsFile& f, const io::TensorInfo& t) {
  const std::uint64_t n = t.numel();
  std::vector<T> out(static_cast<std::size_t>(n));
  f.read_as<T>(t, std::span<T>(out));
  if constexpr (std::is_same_v<T, float>) {
    if (t.dtype == io::Dtype::F32 && n != 0 && std::memcmp(out.data(), f.bytes(t).data(), n * sizeof(float)) != 0) {
      finding("read_as<float> of an F32 tensor differs from its bytes", &t);
    }
  }
  const std::uint64_t half = n / 2;
  f.read_as<T>(t, std::span<T>(out.data(), static_cast<std::size_t>(n - half)), half);
  f.read_as<T>(t, std::span<T>(), n);  // empty read at the end: allowed
  T one[1]{};
  expect_error([&] { f.read_as<T>(t, std::span<T>(one, 1), n); }, "read_as past the end did not throw", t);
  if (n > 0) {
    expect_error([&] { f.read_as<T>(t, std::span<T>(out.data(), out.size()), 1); },
                 "read_as overrunning the end did not throw", t);
  }
}

template <class T>
void exercise_matrix(const io::SafetensorsFile& f, const io::TensorInfo& t) {
  if (t.dtype != io::dtype_of<T>()) {
    expect_error([&] { (void)f.matrix<T>(t.name); }, "matrix<T> of another dtype did not throw", t);
    return;
  }
  if (t.shape.size() != 1 && t.shape.size() != 2) {
    expect_error([&] { (void)f.matrix<T>(t.name); }, "matrix<T> of a tensor that is not 1-D or 2-D did not throw", t);
    return;
  }
  std::optional<lowrank::MatrixView<const T>> m;
  try {
    m.emplace(f.matrix<T>(t.name));
  } catch (const lowrank::Error&) {
    return;  // not aligned for T in this buffer
  }
  if (m->rows < 0 || m->cols < 0 || m->row_stride < 0) finding("matrix<T> gave a view with a negative extent", &t);
  if (static_cast<std::uint64_t>(m->rows) * static_cast<std::uint64_t>(m->cols) != t.numel()) {
    finding("matrix<T> gave a view whose size is not the tensor's", &t);
  }
  if (t.numel() > kMaxConvert || m->empty()) return;  // (an empty view may have 2^62 rows)
  std::uint8_t acc = 0;
  for (lowrank::Index i = 0; i < m->rows; ++i)
    for (lowrank::Index j = 0; j < m->cols; ++j) acc ^= touch(std::as_bytes(std::span<const T>(&(*m)(i, j), 1)));
  volatile std::uint8_t sink = acc;
  (void)sink;
}

void exercise(const io::SafetensorsFile& f, std::span<const std::byte> input) {
  if (f.file_size() != input.size()) finding("file_size() is not the input size");
  if (f.header_size() < 2 || f.header_size() > input.size() - 8) finding("header_size() outside the input");
  const std::byte* data = input.data() + 8 + f.header_size();
  const std::uint64_t buffer = input.size() - 8 - f.header_size();

  volatile std::uint8_t sink = 0;
  for (const auto& [k, v] : f.metadata()) sink = sink ^ static_cast<std::uint8_t>(k.size() + v.size());

  std::uint64_t at = 0;
  for (const io::TensorInfo& t : f.tensors()) {
    if (t.begin != at || t.end < t.begin) finding("entries do not tile the data buffer", &t);
    at = t.end;
    if (t.nbytes() != t.numel() * io::dtype_size(t.dtype)) finding("nbytes() != numel() * dtype_size", &t);
    if (f.find(t.name) != &t || &f.at(t.name) != &t) finding("find/at do not return the entry", &t);
    if (io::parse_dtype(io::to_string(t.dtype)) != t.dtype) finding("dtype does not round-trip", &t);

    const auto bytes = f.bytes(t);
    if (bytes.size() != t.nbytes()) finding("bytes() has the wrong size", &t);
    if (bytes.size() != 0 && bytes.data() != data + t.begin) finding("bytes() does not point at the tensor", &t);
    sink = sink ^ touch(bytes);

    if (t.nbytes() != 0 && t.nbytes() <= kMaxConvert) {
      std::vector<std::byte> copy(static_cast<std::size_t>(t.nbytes()));
      f.read_bytes(t, 0, copy);
      if (std::memcmp(copy.data(), bytes.data(), copy.size()) != 0) finding("read_bytes differs from bytes()", &t);
    }
    std::byte b[1]{};
    expect_error([&] { f.read_bytes(t, t.nbytes(), b); }, "read_bytes past the end did not throw", t);
    f.release(t);

    if (io::is_float(t.dtype)) {
      if (t.numel() <= kMaxConvert) {
        exercise_read_as<float>(f, t);
        exercise_read_as<double>(f, t);
        exercise_read_as<lowrank::bf16>(f, t);
        exercise_read_as<lowrank::f16>(f, t);
      }
    } else {
      float one[1]{};
      expect_error([&] { f.read_as<float>(t, std::span<float>(one, 0)); }, "read_as of a non-float dtype did not throw",
                   t);
    }
    exercise_matrix<float>(f, t);
    exercise_matrix<double>(f, t);
    exercise_matrix<lowrank::bf16>(f, t);
    exercise_matrix<lowrank::f16>(f, t);
  }
  if (at != buffer) finding("the entries do not end at the end of the input");
  if (f.find("__metadata__") != nullptr) finding("__metadata__ became a tensor");
  expect_error([&] { (void)f.at("\x01no such tensor"); }, "at() of a missing name did not throw",
               f.tensors().empty() ? io::TensorInfo{} : f.tensors().front());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> input(reinterpret_cast<const std::byte*>(data), size);
  std::optional<io::SafetensorsFile> file;
  try {
    file.emplace(io::SafetensorsFile::from_bytes(input, "fuzz-input"));
  } catch (const lowrank::Error& e) {
    if (verbose()) std::fprintf(stderr, "rejected: %s\n", e.what());
    return 0;  // a clean rejection; anything else that escapes is a finding
  }
  if (verbose()) std::fprintf(stderr, "accepted: %zu tensors\n", file->tensors().size());
  exercise(*file, input);
  return 0;
}
