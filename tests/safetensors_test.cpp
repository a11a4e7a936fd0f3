// safetensors reader and writer: format details, round trips, and every malformed case.
#include <bit>
#include <cstring>
#include <numeric>

#include <gtest/gtest.h>

#include "io_util.hpp"
#include "lowrank/io/safetensors.hpp"

namespace {

using namespace lowrank_test;
using lowrank::bf16;
using lowrank::io::Dtype;
using lowrank::io::SafetensorsFile;
using lowrank::io::SafetensorsWriter;
using lowrank::io::TensorData;
using lowrank::io::TensorSpec;

SafetensorsFile parse(const std::vector<std::byte>& bytes) { return SafetensorsFile::from_bytes(bytes, "mem.safetensors"); }

std::uint64_t header_length(const std::vector<std::byte>& file) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint8_t>(file[static_cast<std::size_t>(i)]);
  return n;
}

TEST(Safetensors, ReadsAValidFileWithMetadataScalarsAndEmptyTensors) {
  const std::string header =
      R"({"__metadata__":{"format":"pt","note":"x"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("s":{"dtype":"I64","shape":[],"data_offsets":[24,32]},"e":{"dtype":"BF16","shape":[0,5],"data_offsets":[32,32]},)"
      R"("b":{"dtype":"U8","shape":[3],"data_offsets":[32,35]}}   )";
  const auto bytes = raw_safetensors(header, 35);
  const auto f = parse(bytes);
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "x");
  const auto& a = f.at("a");
  EXPECT_EQ(a.dtype, Dtype::F32);
  EXPECT_EQ(a.shape, (std::vector<std::uint64_t>{2, 3}));
  EXPECT_EQ(a.numel(), 6u);
  EXPECT_EQ(f.at("s").numel(), 1u);  // a 0-rank scalar
  EXPECT_EQ(f.at("e").nbytes(), 0u);
  EXPECT_EQ(f.bytes(f.at("b")).data(), bytes.data() + 8 + header.size() + 32);
  EXPECT_EQ(f.find("missing"), nullptr);
  LOWRANK_EXPECT_ERROR((void)f.at("missing"), "mem.safetensors", "missing");
  // Tensors come back in data order.
  EXPECT_EQ(f.tensors()[0].name, "a");
  EXPECT_EQ(f.tensors()[3].name, "b");
}

TEST(Safetensors, WriterPadsSortsAndRoundTrips) {
  TempDir dir;
  std::vector<double> d{1.5, -2.25};
  std::vector<float> x(12);
  std::iota(x.begin(), x.end(), 0.5f);
  std::vector<bf16> h{bf16(1.0f), bf16(-3.0f), bf16(0.5f)};
  std::vector<std::int8_t> i8{-1, 2, -3};
  const std::vector<TensorData> tensors{
      {{"z.int8", Dtype::I8, {3}}, std::as_bytes(std::span(i8))},
      {{"b.f32", Dtype::F32, {3, 4}}, std::as_bytes(std::span(x))},
      {{"h.bf16", Dtype::BF16, {3}}, std::as_bytes(std::span(h))},
      {{"a.f32", Dtype::F32, {2}}, std::as_bytes(std::span(x).subspan(0, 2))},
      {{"d.f64", Dtype::F64, {2, 1}}, std::as_bytes(std::span(d))},
  };
  lowrank::io::write_safetensors(dir / "t.safetensors", tensors, {{"format", "pt"}, {"k", "v"}});
  const auto bytes = read_bytes(dir / "t.safetensors");
  EXPECT_EQ(header_length(bytes) % 8, 0u) << "header padded to 8 bytes";
  const std::string text(reinterpret_cast<const char*>(bytes.data() + 8), header_length(bytes));
  EXPECT_EQ(text.rfind(R"({"__metadata__":{"format":"pt","k":"v"})", 0), 0u) << text;

  const auto f = SafetensorsFile::open(dir / "t.safetensors");
  std::vector<std::string> order;
  for (const auto& t : f.tensors()) order.push_back(t.name);
  // The safetensors library's order: larger dtypes first, then by name; every tensor aligned.
  EXPECT_EQ(order, (std::vector<std::string>{"d.f64", "a.f32", "b.f32", "h.bf16", "z.int8"}));
  for (const auto& t : f.tensors()) {
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(f.bytes(t).data()) % lowrank::io::dtype_size(t.dtype), 0u) << t.name;
  }
  EXPECT_EQ(f.metadata().at("k"), "v");
  const auto m = f.matrix<float>("b.f32");
  ASSERT_EQ(m.rows, 3);
  ASSERT_EQ(m.cols, 4);
  EXPECT_EQ(m(2, 3), x[11]);
  EXPECT_EQ(f.matrix<double>("d.f64")(1, 0), -2.25);
  std::vector<float> hf(3);
  f.read_as<float>(f.at("h.bf16"), hf);
  EXPECT_EQ(hf, (std::vector<float>{1.0f, -3.0f, 0.5f}));
  std::vector<float> part(2);
  f.read_as<float>(f.at("b.f32"), part, 10);
  EXPECT_EQ(part, (std::vector<float>{x[10], x[11]}));
  LOWRANK_EXPECT_ERROR((void)f.matrix<float>("h.bf16"), "h.bf16", "BF16");
  LOWRANK_EXPECT_ERROR(f.read_as<float>(f.at("z.int8"), part), "z.int8", "I8");
  std::vector<std::byte> raw(3);
  f.read_bytes(f.at("z.int8"), 0, raw);
  EXPECT_EQ(static_cast<std::int8_t>(raw[2]), -3);
  EXPECT_EQ(dir.listing(), (std::set<std::string>{"t.safetensors"})) << "no temporary file left";
}

TEST(Safetensors, ReaderAcceptsUnalignedFilesAndCopiesThem) {
  // A 2-byte-aligned header (legal: readers must not require alignment).
  const std::string header = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";  // 56 chars
  auto bytes = raw_safetensors(header + " ", 8);
  const float v[2] = {3.5f, -1.0f};
  std::memcpy(bytes.data() + 8 + header.size() + 1, v, 8);
  const auto f = parse(bytes);
  std::vector<float> out(2);
  f.read_as<float>(f.at("x"), out);
  EXPECT_EQ(out, (std::vector<float>{3.5f, -1.0f}));
}

TEST(Safetensors, WriterStreamsPartsAndRefusesIncompleteFiles) {
  TempDir dir;
  std::vector<float> x(10, 2.0f);
  {
    SafetensorsWriter w(dir / "p.safetensors", {{"x", Dtype::F32, {10}}, {"y", Dtype::F32, {2}}});
    w.write("x", std::as_bytes(std::span(x).subspan(0, 4)), 0);
    w.write("x", std::as_bytes(std::span(x).subspan(4)), 16);
    LOWRANK_EXPECT_ERROR(w.commit(), "p.safetensors", "\"y\"", "0 of its 8 bytes");
    LOWRANK_EXPECT_ERROR(w.write("x", std::as_bytes(std::span(x)), 8), "outside");
    LOWRANK_EXPECT_ERROR(w.write("nope", std::as_bytes(std::span(x)), 0), "nope");
    LOWRANK_EXPECT_ERROR(w.write<double>("x", std::span<const double>()), "F32", "F64");
  }
  // Destroyed without a successful commit: nothing is left, not even the temporary file.
  EXPECT_TRUE(dir.listing().empty());
  LOWRANK_EXPECT_ERROR(SafetensorsWriter(dir / "d.safetensors", {{"x", Dtype::F32, {1}}, {"x", Dtype::F32, {1}}}),
                       "\"x\"", "twice");
  LOWRANK_EXPECT_ERROR(SafetensorsWriter(dir / "o.safetensors", {{"x", Dtype::F32, {1ull << 40, 1ull << 40}}}), "overflows");
  EXPECT_TRUE(dir.listing().empty());
}

TEST(Safetensors, CommitReplacesTheTargetAtomically) {
  TempDir dir;
  write_text(dir / "t.safetensors", "old contents");
  std::vector<float> x{1, 2};
  lowrank::io::write_safetensors(dir / "t.safetensors", std::vector<TensorData>{{{"x", Dtype::F32, {2}}, std::as_bytes(std::span(x))}});
  EXPECT_EQ(SafetensorsFile::open(dir / "t.safetensors").at("x").numel(), 2u);
  EXPECT_EQ(dir.listing(), (std::set<std::string>{"t.safetensors"}));
}

// ---- malformed files: each one a clear error naming the file and (where one is at fault) the tensor

struct Bad {
  const char* what;
  std::string header;
  std::size_t data;
  std::vector<const char*> fragments;
  std::uint64_t length_override = 0;
};

class SafetensorsMalformed : public testing::TestWithParam<Bad> {};

TEST_P(SafetensorsMalformed, IsRejectedWithAClearError) {
  const Bad& b = GetParam();
  const auto bytes = raw_safetensors(b.header, b.data, b.length_override);
  try {
    (void)parse(bytes);
    FAIL() << b.what << ": accepted";
  } catch (const lowrank::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("mem.safetensors"), std::string::npos) << msg;
    for (const char* f : b.fragments) EXPECT_NE(msg.find(f), std::string::npos) << b.what << ": \"" << msg << "\" lacks " << f;
  }
  // The same through a real file.
  TempDir dir;
  write_bytes(dir / "bad.safetensors", bytes);
  EXPECT_THROW((void)SafetensorsFile::open(dir / "bad.safetensors"), lowrank::Error) << b.what;
}

const std::string kOk = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

INSTANTIATE_TEST_SUITE_P(
    Cases, SafetensorsMalformed,
    testing::Values(
        Bad{"header length past the end", kOk, 8, {"runs past the end"}, 1000},
        Bad{"huge header length", kOk, 8, {"exceeds the limit"}, 200'000'000},
        Bad{"not JSON", "{\"t\": nonsense}", 0, {"not valid JSON"}},
        Bad{"JSON array", "[1,2,3]", 0, {"does not start with"}},
        Bad{"not an object inside", R"({"t":5})", 0, {"\"t\"", "not an object"}},
        Bad{"unknown dtype", R"({"t":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}})", 8, {"\"t\"", "F12"}},
        Bad{"negative dim", R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, {"\"t\"", "non-negative"}},
        Bad{"float dim", R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8, {"\"t\"", "non-negative integer"}},
        Bad{"shape overflow", R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8,
            {"\"t\"", "overflows"}},
        Bad{"wrong byte count", R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, {"\"t\"", "needs 12"}},
        Bad{"offsets reversed", R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8, {"\"t\"", "end before"}},
        Bad{"offsets not a pair", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, {"\"t\"", "pair"}},
        Bad{"overlap",
            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
            12, {"\"b\"", "overlap"}},
        Bad{"hole",
            R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
            12, {"\"b\"", "hole"}},
        Bad{"out of range (truncated data)", kOk, 4, {"truncated"}},
        Bad{"trailing bytes", kOk, 12, {"4 bytes after the last tensor"}},
        Bad{"duplicate name",
            R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
            8, {"\"t\"", "twice"}},
        Bad{"duplicate key in an entry", R"({"t":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", 8,
            {"dtype", "twice"}},
        Bad{"extra key in an entry", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8,
            {"\"t\"", "exactly"}},
        Bad{"missing key", R"({"t":{"dtype":"F32","shape":[2]}})", 0, {"\"t\"", "exactly"}},
        Bad{"metadata not strings", R"({"__metadata__":{"a":1}})", 0, {"__metadata__", "string"}},
        Bad{"deep nesting", R"({"t":{"dtype":"F32","shape":[[[[1]]]],"data_offsets":[0,4]}})", 4, {"nests"}},
        Bad{"tiny header", "{", 0, {"too short"}}),
    [](const testing::TestParamInfo<Bad>& info) {
      std::string s = info.param.what;
      for (char& c : s)
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
      return s;
    });

TEST(Safetensors, TruncatedFilesAndOddPaths) {
  TempDir dir;
  write_bytes(dir / "short.safetensors", {std::byte{1}, std::byte{2}});
  LOWRANK_EXPECT_ERROR((void)SafetensorsFile::open(dir / "short.safetensors"), "short.safetensors", "fewer than the 8");
  write_bytes(dir / "empty.safetensors", {});
  LOWRANK_EXPECT_ERROR((void)SafetensorsFile::open(dir / "empty.safetensors"), "empty.safetensors");
  LOWRANK_EXPECT_ERROR((void)SafetensorsFile::open(dir / "none.safetensors"), "none.safetensors", "cannot open");
  LOWRANK_EXPECT_ERROR((void)SafetensorsFile::open(dir.path), "not a regular file");
  // A real file cut short in its data buffer.
  auto good = read_bytes(data_path("peft/gpt2/adapter/adapter_model.safetensors"));
  good.resize(good.size() - 100);
  write_bytes(dir / "cut.safetensors", good);
  LOWRANK_EXPECT_ERROR((void)SafetensorsFile::open(dir / "cut.safetensors"), "cut.safetensors", "truncated");
}

TEST(Safetensors, ReadsFilesWrittenByTheSafetensorsLibrary) {
  // Written by transformers' save_pretrained (tools/fixtures/make_fixtures.py).
  const auto f = SafetensorsFile::open(data_path("peft/llama_rslora/base/model.safetensors"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.header_size() % 8, 0u);
  const auto& q = f.at("model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(q.dtype, Dtype::F32);
  EXPECT_EQ(q.shape, (std::vector<std::uint64_t>{32, 32}));
  // Re-written by lowrank's writer in canonical order: the same bytes, header included.
  std::vector<TensorData> all;
  for (const auto& t : f.tensors()) all.push_back({{t.name, t.dtype, t.shape}, f.bytes(t)});
  TempDir dir;
  lowrank::io::write_safetensors(dir / "copy.safetensors", all, f.metadata());
  EXPECT_EQ(read_bytes(dir / "copy.safetensors"), read_bytes(data_path("peft/llama_rslora/base/model.safetensors")));
}

}  // namespace
