#include "lowrank/io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "file_util.hpp"

LOWRANK_BEGIN_NAMESPACE
namespace io {

using lowrank::detail::fail;

namespace {

struct DtypeEntry {
  Dtype dtype;
  std::string_view name;
  std::size_t size;
};
constexpr std::array<DtypeEntry, 15> kDtypes{{
    {Dtype::BOOL, "BOOL", 1},
    {Dtype::U8, "U8", 1},
    {Dtype::I8, "I8", 1},
    {Dtype::I16, "I16", 2},
    {Dtype::U16, "U16", 2},
    {Dtype::I32, "I32", 4},
    {Dtype::U32, "U32", 4},
    {Dtype::I64, "I64", 8},
    {Dtype::U64, "U64", 8},
    {Dtype::F16, "F16", 2},
    {Dtype::BF16, "BF16", 2},
    {Dtype::F32, "F32", 4},
    {Dtype::F64, "F64", 8},
    {Dtype::F8_E4M3, "F8_E4M3", 1},
    {Dtype::F8_E5M2, "F8_E5M2", 1},
}};

constexpr std::uint64_t kMaxHeader = 100'000'000;  // the safetensors library's MAX_HEADER_SIZE

// Thrown from the JSON callback to abort parsing with a message.
struct HeaderProblem {
  std::string message;
};

}  // namespace

std::string shape_string(std::span<const std::uint64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string_view to_string(Dtype dtype) noexcept { return kDtypes[static_cast<std::size_t>(dtype)].name; }

std::optional<Dtype> parse_dtype(std::string_view text) noexcept {
  for (const auto& e : kDtypes)
    if (e.name == text) return e.dtype;
  return std::nullopt;
}

std::size_t dtype_size(Dtype dtype) noexcept { return kDtypes[static_cast<std::size_t>(dtype)].size; }

bool is_float(Dtype dtype) noexcept {
  return dtype == Dtype::F64 || dtype == Dtype::F32 || dtype == Dtype::BF16 || dtype == Dtype::F16;
}

std::uint64_t TensorInfo::numel() const noexcept {
  std::uint64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

// ---- reader ---------------------------------------------------------------------------------------

struct SafetensorsFile::Impl {
  std::filesystem::path path;
  detail::Fd fd;
  void* map = nullptr;
  std::size_t map_size = 0;
  const std::byte* base = nullptr;  // whole file
  std::uint64_t size = 0;
  std::uint64_t header = 0;
  std::vector<TensorInfo> tensors;
  std::unordered_map<std::string_view, std::size_t> by_name;
  std::map<std::string, std::string> metadata;

  ~Impl() {
    if (map != nullptr) ::munmap(map, map_size);
  }
  [[nodiscard]] const std::byte* data() const noexcept { return base + 8 + header; }
  void parse();
};

void SafetensorsFile::Impl::parse() {
  const std::string file = path.string();
  if (size < 8) fail("safetensors", "{}: the file has {} bytes, fewer than the 8 of the header length", file, size);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint8_t>(base[i]);
  if (n > kMaxHeader) fail("safetensors", "{}: header length {} exceeds the limit of {} bytes", file, n, kMaxHeader);
  if (n > size - 8) fail("safetensors", "{}: header length {} runs past the end of the {}-byte file", file, n, size);
  if (n < 2) fail("safetensors", "{}: header length {} is too short for a JSON object", file, n);
  header = n;
  const char* text = reinterpret_cast<const char*>(base + 8);
  if (text[0] != '{') fail("safetensors", "{}: the header does not start with '{{' (not a safetensors file?)", file);

  // Parse into a DOM, rejecting duplicate keys at every level and nesting deeper than the format.
  std::vector<std::set<std::string>> keys;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (depth > 3) throw HeaderProblem{"the header nests deeper than the format allows"};
    if (event == E::object_start) keys.emplace_back();
    if (event == E::object_end && !keys.empty()) keys.pop_back();
    if (event == E::key && !keys.empty()) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(k).second) {
        throw HeaderProblem{depth == 1 ? fmt::format("tensor \"{}\": the name appears twice", k)
                                       : fmt::format("key \"{}\" appears twice in one entry", k)};
      }
    }
    return true;
  };
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text, text + n, callback, /*allow_exceptions=*/true);
  } catch (const HeaderProblem& p) {
    fail("safetensors", "{}: {}", file, p.message);
  } catch (const nlohmann::json::exception& e) {
    fail("safetensors", "{}: the header is not valid JSON ({})", file, e.what());
  }
  if (!doc.is_object()) fail("safetensors", "{}: the header is not a JSON object", file);

  for (auto& [name, entry] : doc.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail("safetensors", "{}: __metadata__ is not an object", file);
      for (auto& [k, v] : entry.items()) {
        if (!v.is_string()) fail("safetensors", "{}: __metadata__ \"{}\" is not a string (the format allows strings only)", file, k);
        metadata.emplace(k, v.get<std::string>());
      }
      continue;
    }
    const std::string& tensor = name;  // a reference, not the binding: Clang < 16 cannot capture bindings
    auto bad = [&](std::string_view what) { fail("safetensors", "{}: tensor \"{}\": {}", file, tensor, what); };
    if (!entry.is_object()) bad("the entry is not an object");
    if (entry.size() != 3 || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets")) {
      bad("the entry must have exactly \"dtype\", \"shape\" and \"data_offsets\"");
    }
    TensorInfo t;
    t.name = name;
    const auto& dt = entry["dtype"];
    if (!dt.is_string()) bad("dtype is not a string");
    const auto parsed = parse_dtype(dt.get_ref<const std::string&>());
    if (!parsed) bad(fmt::format("unknown or unsupported dtype \"{}\"", dt.get_ref<const std::string&>()));
    t.dtype = *parsed;
    const auto& sh = entry["shape"];
    if (!sh.is_array()) bad("shape is not an array");
    for (const auto& d : sh) {
      if (!d.is_number_unsigned()) bad(fmt::format("shape {} has an entry that is not a non-negative integer", sh.dump()));
      t.shape.push_back(d.get<std::uint64_t>());
    }
    const auto& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      bad(fmt::format("data_offsets {} is not a pair of non-negative integers", off.dump()));
    }
    t.begin = off[0].get<std::uint64_t>();
    t.end = off[1].get<std::uint64_t>();
    if (t.end < t.begin) bad(fmt::format("data_offsets [{}, {}] end before they begin", t.begin, t.end));
    // The element count first, then the bytes (as the safetensors library checks).
    std::uint64_t numel = 1, bytes = 0;
    for (auto d : t.shape) {
      if (__builtin_mul_overflow(numel, d, &numel)) {
        bad(fmt::format("shape {} overflows 64-bit element counts", shape_string(t.shape)));
      }
    }
    if (__builtin_mul_overflow(numel, dtype_size(t.dtype), &bytes)) {
      bad(fmt::format("shape {} of {} overflows 64-bit byte counts", shape_string(t.shape), to_string(t.dtype)));
    }
    if (bytes != t.end - t.begin) {
      bad(fmt::format("data_offsets [{}, {}] hold {} bytes, but {} {} needs {}", t.begin, t.end, t.end - t.begin,
                      to_string(t.dtype), shape_string(t.shape), bytes));
    }
    tensors.push_back(std::move(t));
  }

  // The entries must tile the data buffer exactly.
  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t at = 0;
  for (const auto& t : tensors) {
    if (t.begin != at) {
      if (t.begin < at) {
        fail("safetensors", "{}: tensor \"{}\": data_offsets [{}, {}] overlap the previous tensor, which ends at {}",
             file, t.name, t.begin, t.end, at);
      }
      fail("safetensors", "{}: tensor \"{}\": data_offsets [{}, {}] leave a hole after byte {} of the data buffer", file,
           t.name, t.begin, t.end, at);
    }
    at = t.end;
  }
  const std::uint64_t available = size - 8 - header;
  if (at != available) {
    if (at > available) {
      fail("safetensors", "{}: the tensors need a {}-byte data buffer but the file holds {} (truncated?)", file, at,
           available);
    }
    fail("safetensors", "{}: {} bytes after the last tensor (the data buffer is {} bytes, the file holds {})", file,
         available - at, at, available);
  }
  by_name.reserve(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) by_name.emplace(tensors[i].name, i);
}

SafetensorsFile::SafetensorsFile(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("safetensors", "{}: cannot open: {}", path.string(), detail::last_error());
  impl->fd = detail::Fd(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail("safetensors", "{}: cannot stat: {}", path.string(), detail::last_error());
  if (!S_ISREG(st.st_mode)) fail("safetensors", "{}: not a regular file", path.string());
  impl->size = static_cast<std::uint64_t>(st.st_size);
  if (impl->size > 0) {
    void* map = ::mmap(nullptr, static_cast<std::size_t>(impl->size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) fail("safetensors", "{}: cannot map: {}", path.string(), detail::last_error());
    impl->map = map;
    impl->map_size = static_cast<std::size_t>(impl->size);
    impl->base = static_cast<const std::byte*>(map);
  }
  impl->parse();
  return SafetensorsFile(std::move(impl));
}

SafetensorsFile SafetensorsFile::from_bytes(std::span<const std::byte> bytes, std::string name) {
  auto impl = std::make_unique<Impl>();
  impl->path = std::move(name);
  impl->base = bytes.data();
  impl->size = bytes.size();
  impl->parse();
  return SafetensorsFile(std::move(impl));
}

const std::filesystem::path& SafetensorsFile::path() const noexcept { return impl_->path; }
std::span<const TensorInfo> SafetensorsFile::tensors() const noexcept { return impl_->tensors; }
const std::map<std::string, std::string>& SafetensorsFile::metadata() const noexcept { return impl_->metadata; }
std::uint64_t SafetensorsFile::header_size() const noexcept { return impl_->header; }
std::uint64_t SafetensorsFile::file_size() const noexcept { return impl_->size; }
int SafetensorsFile::fd() const noexcept { return impl_->fd.get(); }

const TensorInfo* SafetensorsFile::find(std::string_view name) const noexcept {
  const auto it = impl_->by_name.find(name);
  return it == impl_->by_name.end() ? nullptr : &impl_->tensors[it->second];
}

const TensorInfo& SafetensorsFile::at(std::string_view name) const {
  const TensorInfo* t = find(name);
  if (t == nullptr) fail("safetensors", "{}: no tensor named \"{}\"", impl_->path.string(), name);
  return *t;
}

std::span<const std::byte> SafetensorsFile::bytes(const TensorInfo& t) const noexcept {
  return {impl_->data() + t.begin, static_cast<std::size_t>(t.nbytes())};
}

template <SupportedScalar T>
MatrixView<const T> SafetensorsFile::matrix(std::string_view name) const {
  const TensorInfo& t = at(name);
  const std::string file = impl_->path.string();
  if (t.dtype != dtype_of<T>()) {
    fail("safetensors", "{}: tensor \"{}\" is {}, not {}", file, name, to_string(t.dtype), to_string(dtype_of<T>()));
  }
  if (t.shape.size() != 1 && t.shape.size() != 2) {
    fail("safetensors", "{}: tensor \"{}\" has shape {}; a matrix view needs 1 or 2 dimensions", file, name,
         shape_string(t.shape));
  }
  for (auto d : t.shape) {  // possible only when another dimension is 0
    if (d > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) {
      fail("safetensors", "{}: tensor \"{}\" has shape {}; a matrix view's dimensions must fit in Index", file, name,
           shape_string(t.shape));
    }
  }
  const std::byte* p = impl_->data() + t.begin;
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) {
    fail("safetensors", "{}: tensor \"{}\" is not {}-byte aligned in this file; use read_as to copy it", file, name,
         alignof(T));
  }
  const auto rows = static_cast<Index>(t.shape.size() == 2 ? t.shape[0] : 1);
  const auto cols = static_cast<Index>(t.shape.back());
  return row_major(reinterpret_cast<const T*>(p), rows, cols);
}

namespace {
template <class T>
T convert_element(const std::byte* p, Dtype dtype) {
  switch (dtype) {
    case Dtype::F64: {
      double x;
      std::memcpy(&x, p, 8);
      return static_cast<T>(x);
    }
    case Dtype::F32: {
      float x;
      std::memcpy(&x, p, 4);
      return static_cast<T>(x);
    }
    case Dtype::BF16: {
      std::uint16_t h;
      std::memcpy(&h, p, 2);
      return static_cast<T>(static_cast<float>(std::bit_cast<bf16>(h)));
    }
    default: {  // F16
      std::uint16_t h;
      std::memcpy(&h, p, 2);
      return static_cast<T>(static_cast<float>(std::bit_cast<f16>(h)));
    }
  }
}
}  // namespace

template <SupportedScalar T>
void SafetensorsFile::read_as(const TensorInfo& t, std::span<T> out, std::uint64_t first) const {
  if (!is_float(t.dtype)) {
    fail("safetensors", "{}: tensor \"{}\" is {}, not a floating-point type", impl_->path.string(), t.name,
         to_string(t.dtype));
  }
  if (first > t.numel() || out.size() > t.numel() - first) {
    fail("safetensors", "{}: tensor \"{}\": elements [{}, {}) are outside its {}", impl_->path.string(), t.name, first,
         first + out.size(), t.numel());
  }
  if (out.empty()) return;  // out.data() may be null, which memcpy must not be given
  const std::size_t size = dtype_size(t.dtype);
  const std::byte* p = impl_->data() + t.begin + first * size;
  if (t.dtype == dtype_of<T>()) {
    std::memcpy(out.data(), p, out.size() * sizeof(T));
    return;
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    if constexpr (std::same_as<T, double> || std::same_as<T, float>) {
      out[i] = convert_element<T>(p + i * size, t.dtype);
    } else {
      // Narrowing to half types: go through double for F64 (one rounding), float otherwise (exact).
      if (t.dtype == Dtype::F64) {
        out[i] = T(static_cast<float>(convert_element<double>(p + i * size, t.dtype)));  // two roundings
      } else {
        out[i] = T(convert_element<float>(p + i * size, t.dtype));
      }
    }
  }
}

void SafetensorsFile::read_bytes(const TensorInfo& t, std::uint64_t offset, std::span<std::byte> out) const {
  if (offset > t.nbytes() || out.size() > t.nbytes() - offset) {
    fail("safetensors", "{}: tensor \"{}\": bytes [{}, {}) are outside its {}", impl_->path.string(), t.name, offset,
         offset + out.size(), t.nbytes());
  }
  if (out.empty()) return;  // out.data() may be null, which memcpy must not be given
  const std::uint64_t at = 8 + impl_->header + t.begin + offset;
  if (impl_->fd.get() < 0) {
    std::memcpy(out.data(), impl_->base + at, out.size());
    return;
  }
  detail::pread_all(impl_->fd.get(), out, at, fmt::format("{}: tensor \"{}\"", impl_->path.string(), t.name));
}

void SafetensorsFile::release(const TensorInfo& t) const noexcept {
  if (impl_->map == nullptr || t.nbytes() == 0) return;
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  auto first = reinterpret_cast<std::uintptr_t>(impl_->data() + t.begin);
  auto last = reinterpret_cast<std::uintptr_t>(impl_->data() + t.end);
  first = (first + page - 1) / page * page;  // whole pages inside the tensor only
  last = last / page * page;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

#define LOWRANK_IO_INSTANTIATE(T)                                                            \
  template MatrixView<const T> SafetensorsFile::matrix<T>(std::string_view) const;          \
  template void SafetensorsFile::read_as<T>(const TensorInfo&, std::span<T>, std::uint64_t) const;
LOWRANK_IO_INSTANTIATE(double)
LOWRANK_IO_INSTANTIATE(float)
LOWRANK_IO_INSTANTIATE(bf16)
LOWRANK_IO_INSTANTIATE(f16)
#undef LOWRANK_IO_INSTANTIATE

// ---- writer ---------------------------------------------------------------------------------------

struct SafetensorsWriter::Impl {
  detail::TempFile temp;
  std::vector<TensorInfo> tensors;
  std::unordered_map<std::string_view, std::size_t> by_name;
  std::vector<std::uint64_t> written;
  std::mutex written_mutex;  // writes of distinct ranges may come from several threads
  std::uint64_t data_start = 0;
  std::uint64_t size = 0;
  bool committed = false;

  explicit Impl(const std::filesystem::path& target) : temp(target) {}
  std::size_t index(std::string_view name) const {
    const auto it = by_name.find(name);
    if (it == by_name.end()) fail("SafetensorsWriter", "{}: no tensor \"{}\" in this file", temp.target().string(), name);
    return it->second;
  }
};

SafetensorsWriter::SafetensorsWriter(std::filesystem::path target, std::vector<TensorSpec> specs,
                                     std::map<std::string, std::string> metadata, TensorOrder order) {
  const std::string file = target.string();
  std::set<std::string_view> names;
  for (const auto& s : specs) {
    if (s.name.empty()) fail("SafetensorsWriter", "{}: a tensor has an empty name", file);
    if (s.name == "__metadata__") fail("SafetensorsWriter", "{}: \"__metadata__\" is reserved", file);
    if (!names.insert(s.name).second) fail("SafetensorsWriter", "{}: tensor \"{}\" is given twice", file, s.name);
  }
  if (order == TensorOrder::canonical) {
    std::stable_sort(specs.begin(), specs.end(), [](const TensorSpec& a, const TensorSpec& b) {
      const auto sa = dtype_size(a.dtype), sb = dtype_size(b.dtype);
      return sa != sb ? sa > sb : a.name < b.name;
    });
  }
  std::vector<TensorInfo> infos;
  infos.reserve(specs.size());
  std::uint64_t at = 0;
  for (auto& s : specs) {
    std::uint64_t bytes = dtype_size(s.dtype);
    for (auto d : s.shape) {
      if (__builtin_mul_overflow(bytes, d, &bytes)) {
        fail("SafetensorsWriter", "{}: tensor \"{}\": shape {} overflows", file, s.name, shape_string(s.shape));
      }
    }
    TensorInfo t{std::move(s.name), s.dtype, std::move(s.shape), at, at + bytes};
    at += bytes;
    infos.push_back(std::move(t));
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& m = header["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
  }
  for (const auto& t : infos) {
    header[t.name] = {{"dtype", std::string(to_string(t.dtype))}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  impl_ = std::make_unique<Impl>(target);
  impl_->tensors = std::move(infos);
  for (std::size_t i = 0; i < impl_->tensors.size(); ++i) impl_->by_name.emplace(impl_->tensors[i].name, i);
  impl_->written.assign(impl_->tensors.size(), 0);
  impl_->data_start = 8 + text.size();
  impl_->size = impl_->data_start + at;

  std::array<std::byte, 8> length{};
  for (int i = 0; i < 8; ++i) length[static_cast<std::size_t>(i)] = static_cast<std::byte>((text.size() >> (8 * i)) & 0xFF);
  detail::pwrite_all(impl_->temp.fd(), length, 0, impl_->temp.path().string());
  detail::pwrite_all(impl_->temp.fd(), std::as_bytes(std::span(text)), 8, impl_->temp.path().string());
  if (::ftruncate(impl_->temp.fd(), static_cast<off_t>(impl_->size)) != 0) {
    fail("SafetensorsWriter", "{}: cannot size the temporary file to {} bytes: {}", file, impl_->size,
         detail::last_error());
  }
}

SafetensorsWriter::SafetensorsWriter(SafetensorsWriter&&) noexcept = default;
SafetensorsWriter& SafetensorsWriter::operator=(SafetensorsWriter&&) noexcept = default;
SafetensorsWriter::~SafetensorsWriter() = default;

std::span<const TensorInfo> SafetensorsWriter::tensors() const noexcept { return impl_->tensors; }
const TensorInfo& SafetensorsWriter::at(std::string_view name) const { return impl_->tensors[impl_->index(name)]; }
std::uint64_t SafetensorsWriter::file_size() const noexcept { return impl_->size; }

void SafetensorsWriter::check_dtype(std::string_view name, Dtype dtype) const {
  const auto& t = at(name);
  if (t.dtype != dtype) {
    fail("SafetensorsWriter", "{}: tensor \"{}\" is {}, the data is {}", impl_->temp.target().string(), name,
         to_string(t.dtype), to_string(dtype));
  }
}

void SafetensorsWriter::write(std::string_view name, std::span<const std::byte> data, std::uint64_t offset) {
  const std::size_t i = impl_->index(name);
  const auto& t = impl_->tensors[i];
  if (offset > t.nbytes() || data.size() > t.nbytes() - offset) {
    fail("SafetensorsWriter", "{}: tensor \"{}\": bytes [{}, {}) are outside its {}", impl_->temp.target().string(),
         name, offset, offset + data.size(), t.nbytes());
  }
  detail::pwrite_all(impl_->temp.fd(), data, impl_->data_start + t.begin + offset, impl_->temp.path().string());
  const std::lock_guard lock(impl_->written_mutex);
  impl_->written[i] += data.size();
}

void SafetensorsWriter::copy_from(std::string_view name, const SafetensorsFile& file, const TensorInfo& source) {
  const std::size_t i = impl_->index(name);
  const auto& t = impl_->tensors[i];
  if (t.dtype != source.dtype || t.nbytes() != source.nbytes()) {
    fail("SafetensorsWriter", "{}: tensor \"{}\" ({}, {} bytes) cannot be copied from {} \"{}\" ({}, {} bytes)",
         impl_->temp.target().string(), name, to_string(t.dtype), t.nbytes(), file.path().string(), source.name,
         to_string(source.dtype), source.nbytes());
  }
  if (file.fd() < 0) {
    write(name, file.bytes(source), 0);
    return;
  }
  detail::copy_range(file.fd(), 8 + file.header_size() + source.begin, impl_->temp.fd(), impl_->data_start + t.begin,
                     t.nbytes(), fmt::format("copying \"{}\" from {}", source.name, file.path().string()));
  const std::lock_guard lock(impl_->written_mutex);
  impl_->written[i] += t.nbytes();
}

void SafetensorsWriter::commit() {
  for (std::size_t i = 0; i < impl_->tensors.size(); ++i) {
    if (impl_->written[i] < impl_->tensors[i].nbytes()) {
      fail("SafetensorsWriter", "{}: tensor \"{}\" has {} of its {} bytes written", impl_->temp.target().string(),
           impl_->tensors[i].name, impl_->written[i], impl_->tensors[i].nbytes());
    }
  }
  impl_->temp.commit();
  impl_->committed = true;
}

void write_safetensors(const std::filesystem::path& target, std::span<const TensorData> tensors,
                       const std::map<std::string, std::string>& metadata, TensorOrder order) {
  std::vector<TensorSpec> specs;
  for (const auto& t : tensors) specs.push_back(t.spec);
  SafetensorsWriter writer(target, std::move(specs), metadata, order);
  for (const auto& t : tensors) writer.write(t.spec.name, t.bytes, 0);
  writer.commit();
}

}  // namespace io
LOWRANK_END_NAMESPACE
