// Second-moment statistics as safetensors (include/lowrank/io/moments.hpp).
#include "lowrank/io/moments.hpp"

#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "lowrank/core/error.hpp"
#include "lowrank/io/safetensors.hpp"

LOWRANK_BEGIN_NAMESPACE

namespace io {
namespace {

constexpr const char* kFormat = "lowrank.second_moment";

}  // namespace

void write_second_moment(const std::filesystem::path& path, const linalg::SecondMoment& moment) {
  constexpr const char* fn = "lowrank::io::write_second_moment";
  const Index d = moment.dim();
  if (d == 0) detail::fail(fn, "{}: the accumulator is empty (default-constructed)", path.string());
  const RowMatrix<double> mom2 = moment.scatter();  // symmetric: row-major = column-major
  const std::int64_t count = moment.count();
  const auto ud = static_cast<std::uint64_t>(d);
  const std::vector<TensorData> tensors{
      {{"count", Dtype::I64, {1}}, std::as_bytes(std::span(&count, 1))},
      {{"mom2", Dtype::F64, {ud, ud}}, std::as_bytes(std::span(mom2.data(), static_cast<std::size_t>(d * d)))},
      {{"sum", Dtype::F64, {ud}}, std::as_bytes(std::span(moment.sum().data(), static_cast<std::size_t>(d)))}};
  write_safetensors(path, tensors, {{"format", kFormat}, {"centered", moment.centered() ? "true" : "false"}});
}

linalg::SecondMoment read_second_moment(const std::filesystem::path& path) {
  constexpr const char* fn = "lowrank::io::read_second_moment";
  const SafetensorsFile file = SafetensorsFile::open(path);
  const std::string name = path.string();
  const auto& meta = file.metadata();
  const auto format = meta.find("format");
  if (format == meta.end() || format->second != kFormat) {
    detail::fail(fn, "{}: metadata \"format\" is {}, expected \"{}\" (not a file written by write_second_moment)",
                 name, format == meta.end() ? std::string("missing") : "\"" + format->second + "\"", kFormat);
  }
  const auto centered = meta.find("centered");
  if (centered == meta.end() || (centered->second != "true" && centered->second != "false"))
    detail::fail(fn, "{}: metadata \"centered\" must be \"true\" or \"false\"", name);
  auto tensor = [&](const char* tname, Dtype dtype, std::vector<std::uint64_t> shape) -> const TensorInfo& {
    const TensorInfo* t = file.find(tname);
    if (t == nullptr) detail::fail(fn, "{}: tensor \"{}\" is missing", name, tname);
    if (t->dtype != dtype || t->shape != shape) {
      detail::fail(fn, "{}: tensor \"{}\" is {} {}, expected {} {}", name, tname, to_string(t->dtype),
                   shape_string(t->shape), to_string(dtype), shape_string(shape));
    }
    return *t;
  };
  const TensorInfo& count_info = tensor("count", Dtype::I64, {1});
  std::int64_t count = 0;
  std::memcpy(&count, file.bytes(count_info).data(), sizeof count);
  if (count < 0) detail::fail(fn, "{}: tensor \"count\" is {}; it must be >= 0", name, count);
  const TensorInfo* mom2_probe = file.find("mom2");
  if (mom2_probe == nullptr) detail::fail(fn, "{}: tensor \"mom2\" is missing", name);
  if (mom2_probe->shape.size() != 2 || mom2_probe->shape[0] == 0 || mom2_probe->shape[0] > (1u << 20))
    detail::fail(fn, "{}: tensor \"mom2\" has shape {}, expected [d, d] with 1 <= d <= 2^20", name,
                 shape_string(mom2_probe->shape));
  const std::uint64_t d = mom2_probe->shape[0];
  const TensorInfo& mom2_info = tensor("mom2", Dtype::F64, {d, d});
  const TensorInfo& sum_info = tensor("sum", Dtype::F64, {d});
  const auto dim = static_cast<Index>(d);
  RowMatrix<double> mom2(dim, dim);
  Vector<double> sum(dim);
  file.read_as(mom2_info, std::span<double>(mom2.data(), static_cast<std::size_t>(d * d)));
  file.read_as(sum_info, std::span<double>(sum.data(), static_cast<std::size_t>(d)));
  if (!mom2.allFinite() || !sum.allFinite()) detail::fail(fn, "{}: \"mom2\" or \"sum\" has a NaN or infinity", name);
  return linalg::SecondMoment::from_parts(count, ColMatrix<double>(mom2), sum, centered->second == "true");
}

}  // namespace io

LOWRANK_END_NAMESPACE
