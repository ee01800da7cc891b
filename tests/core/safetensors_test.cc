// safetensors reading and writing (MODEL_SPEC.md 2.1): round trips through
// WriteSafetensors / WriteCheckpoint, and one corruption per test, written by
// hand, each expected to be reported naming the file and the tensor.
#include "core/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/safetensors_writer.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using json = nlohmann::json;
namespace fs = std::filesystem;

// Deterministic bytes: a simple LCG seeded by `seed`.
std::vector<uint8_t> Bytes(size_t n, uint32_t seed) {
  std::vector<uint8_t> out(n);
  uint32_t s = seed * 2654435761u + 12345u;
  for (size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    out[i] = static_cast<uint8_t>(s >> 24);
  }
  return out;
}

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

TensorToWrite MakeTensor(const std::string& name, DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  TensorToWrite t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes = Bytes(static_cast<size_t>(Numel(t.shape) * DTypeSize(dtype)), seed);
  return t;
}

std::string ReadText(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteText(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
}

// A safetensors file by hand: u64 little-endian `header_len` (default: the
// header's size), the header text, then `data`.
void WriteRaw(const fs::path& p, const std::string& header, const std::vector<uint8_t>& data,
              std::optional<uint64_t> header_len = std::nullopt) {
  const uint64_t n = header_len.value_or(header.size());
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(data.data()), data.size());
  WriteText(p, bytes);
}

void ExpectTensorsEqual(const TensorStore& store, const std::vector<TensorToWrite>& tensors) {
  EXPECT_EQ(store.tensors().size(), tensors.size());
  int64_t total = 0;
  for (const TensorToWrite& t : tensors) {
    const TensorInfo* info = store.Find(t.name);
    ASSERT_NE(info, nullptr) << t.name;
    EXPECT_EQ(info->name, t.name);
    EXPECT_EQ(info->dtype, t.dtype) << t.name;
    EXPECT_EQ(info->shape, t.shape) << t.name;
    EXPECT_EQ(info->numel(), Numel(t.shape)) << t.name;
    ASSERT_EQ(info->nbytes, static_cast<int64_t>(t.bytes.size())) << t.name;
    if (!t.bytes.empty()) {
      ASSERT_NE(info->data, nullptr) << t.name;
      EXPECT_EQ(std::memcmp(info->data, t.bytes.data(), t.bytes.size()), 0) << t.name;
    }
    total += info->nbytes;
  }
  EXPECT_EQ(store.total_bytes(), total);
}

std::vector<TensorToWrite> MixedTensors() {
  return {
      MakeTensor("model.embed_tokens.weight", DType::kBF16, {16, 8}, 1),
      MakeTensor("model.layers.0.self_attn.q_a_proj.weight", DType::kF8E4M3, {12, 8}, 2),
      MakeTensor("model.layers.0.self_attn.q_a_proj.weight_scale_inv", DType::kF32, {1, 1}, 3),
      MakeTensor("model.layers.0.input_layernorm.weight", DType::kF32, {8}, 4),
      MakeTensor("model.layers.0.mlp.gate_proj.weight", DType::kF16, {5, 8}, 5),
      MakeTensor("model.norm.weight", DType::kF32, {8}, 6),
      MakeTensor("odd.bytes", DType::kF8E4M3, {3, 1, 7}, 7),
      MakeTensor("lm_head.weight", DType::kBF16, {16, 8}, 8),
  };
}

absl::Status OpenStatus(const fs::path& file) {
  absl::StatusOr<std::unique_ptr<TensorStore>> s = TensorStore::OpenFile(file);
  return s.status();
}

// Expects DATA_LOSS whose message contains each of `parts`.
void ExpectDataLoss(const absl::Status& status, const std::vector<std::string>& parts) {
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  for (const std::string& p : parts) EXPECT_THAT(std::string(status.message()), HasSubstr(p)) << status;
}

// ---- Round trips ----------------------------------------------------------------

TEST(SafetensorsTest, SingleFileRoundTrip) {
  const fs::path dir = testing::ScratchDir("st_single");
  const std::vector<TensorToWrite> tensors = MixedTensors();
  ASSERT_TRUE(WriteSafetensors(dir / "x.safetensors", tensors).ok());
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::OpenFile(dir / "x.safetensors");
  ASSERT_TRUE(store.ok()) << store.status();
  ExpectTensorsEqual(**store, tensors);
  EXPECT_EQ((*store)->Find("missing"), nullptr);
  EXPECT_EQ((*store)->Find("model.norm.weight")->file, "x.safetensors");
  EXPECT_EQ((*store)->Find("model.embed_tokens.weight")->ShapeString(), "[16, 8]");
}

TEST(SafetensorsTest, WrittenHeaderFollowsTheFormat) {
  const fs::path dir = testing::ScratchDir("st_format");
  const std::vector<TensorToWrite> tensors = MixedTensors();
  ASSERT_TRUE(WriteSafetensors(dir / "x.safetensors", tensors).ok());
  const std::string bytes = ReadText(dir / "x.safetensors");
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  ASSERT_LE(8 + n, bytes.size());
  EXPECT_EQ(n % 8, 0u);  // padded
  const json header = json::parse(bytes.substr(8, n));
  int64_t data_bytes = 0;
  for (const TensorToWrite& t : tensors) {
    ASSERT_TRUE(header.contains(t.name)) << t.name;
    const json& e = header[t.name];
    EXPECT_EQ(e["dtype"].get<std::string>(), std::string(DTypeName(t.dtype)));
    EXPECT_EQ(e["shape"].get<std::vector<int64_t>>(), t.shape);
    const uint64_t begin = e["data_offsets"][0].get<uint64_t>(), end = e["data_offsets"][1].get<uint64_t>();
    ASSERT_EQ(end - begin, t.bytes.size());
    EXPECT_EQ(bytes.compare(8 + n + begin, t.bytes.size(),
                            std::string(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size())),
              0)
        << t.name;
    data_bytes += static_cast<int64_t>(t.bytes.size());
  }
  EXPECT_EQ(static_cast<int64_t>(bytes.size()), 8 + static_cast<int64_t>(n) + data_bytes);
}

TEST(SafetensorsTest, CheckpointSingleShardIsModelSafetensors) {
  const fs::path dir = testing::ScratchDir("st_ckpt_single");
  const std::vector<TensorToWrite> tensors = MixedTensors();
  ASSERT_TRUE(WriteCheckpoint(dir, tensors, int64_t{1} << 30).ok());
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  ExpectTensorsEqual(**store, tensors);
}

std::vector<TensorToWrite> ShardedTensors() {
  std::vector<TensorToWrite> tensors;
  for (int i = 0; i < 10; ++i) {
    const DType dt = i % 3 == 0 ? DType::kF32 : (i % 3 == 1 ? DType::kBF16 : DType::kF8E4M3);
    tensors.push_back(MakeTensor("model.layers." + std::to_string(i) + ".w", dt, {10, 10 + i}, 100 + i));
  }
  return tensors;
}

TEST(SafetensorsTest, ShardedCheckpointRoundTrip) {
  const fs::path dir = testing::ScratchDir("st_sharded");
  const std::vector<TensorToWrite> tensors = ShardedTensors();
  ASSERT_TRUE(WriteCheckpoint(dir, tensors, 500).ok());
  ASSERT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  const json index = json::parse(ReadText(dir / "model.safetensors.index.json"));
  ASSERT_TRUE(index.contains("weight_map"));
  std::set<std::string> shards;
  for (const auto& [name, file] : index["weight_map"].items()) shards.insert(file.get<std::string>());
  EXPECT_GE(shards.size(), 3u);
  EXPECT_EQ(index["weight_map"].size(), tensors.size());
  for (const std::string& s : shards) EXPECT_TRUE(fs::exists(dir / s)) << s;

  // A stray safetensors file that the index does not list is not read.
  WriteSafetensors(dir / "stray.safetensors", {MakeTensor("stray.weight", DType::kF32, {2}, 9)}).IgnoreError();

  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  ExpectTensorsEqual(**store, tensors);
  EXPECT_EQ((*store)->Find("stray.weight"), nullptr);
  for (const TensorToWrite& t : tensors) {
    EXPECT_EQ((*store)->Find(t.name)->file, index["weight_map"][t.name].get<std::string>()) << t.name;
  }
}

TEST(SafetensorsTest, MetadataAndPaddingAccepted) {
  const fs::path file = testing::ScratchDir("st_meta") / "m.safetensors";
  std::vector<uint8_t> data = Bytes(24 + 8, 1);
  WriteRaw(file,
           R"({"__metadata__": {"format": "pt"}, "a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},)"
           R"( "b.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}      )",
           data);
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::OpenFile(file);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->tensors().size(), 2u);
  EXPECT_EQ((*store)->Find("__metadata__"), nullptr);
  const TensorInfo* b = (*store)->Find("b.weight");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kBF16);
  EXPECT_EQ(std::memcmp(b->data, data.data() + 24, 8), 0);
}

// ---- Corruptions of one file ------------------------------------------------------

// The valid baseline the hand-written cases below deviate from in one spot.
const char* const kGoodHeader =
    R"({"first.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, )"
    R"("second.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}})";

TEST(SafetensorsCorruptTest, BaselineIsValid) {
  const fs::path file = testing::ScratchDir("st_base") / "good.safetensors";
  WriteRaw(file, kGoodHeader, Bytes(32, 2));
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::OpenFile(file);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->tensors().size(), 2u);
}

TEST(SafetensorsCorruptTest, TruncatedFile) {
  const fs::path file = testing::ScratchDir("st_trunc") / "trunc.safetensors";
  ASSERT_TRUE(WriteSafetensors(file, {MakeTensor("alpha.weight", DType::kF32, {4, 4}, 1),
                                      MakeTensor("beta.weight", DType::kF32, {4, 4}, 2),
                                      MakeTensor("gamma.weight", DType::kF32, {4, 4}, 3)})
                  .ok());
  fs::resize_file(file, fs::file_size(file) - 3);
  // gamma.weight is last in the data section; its end now lies past the file.
  ExpectDataLoss(OpenStatus(file), {"trunc.safetensors", "gamma.weight"});
}

TEST(SafetensorsCorruptTest, FileShorterThanEightBytes) {
  const fs::path dir = testing::ScratchDir("st_short");
  WriteText(dir / "short.safetensors", std::string("\x05\x00\x00\x00\x00", 5));
  ExpectDataLoss(OpenStatus(dir / "short.safetensors"), {"short.safetensors"});
  WriteText(dir / "empty.safetensors", "");
  ExpectDataLoss(OpenStatus(dir / "empty.safetensors"), {"empty.safetensors"});
}

TEST(SafetensorsCorruptTest, HeaderLengthLargerThanFile) {
  const fs::path file = testing::ScratchDir("st_hlen") / "hlen.safetensors";
  const std::string header = kGoodHeader;
  WriteRaw(file, header, Bytes(32, 2), header.size() + 32 + 1);
  ExpectDataLoss(OpenStatus(file), {"hlen.safetensors"});
}

TEST(SafetensorsCorruptTest, HeaderLengthHuge) {
  const fs::path file = testing::ScratchDir("st_hhuge") / "huge.safetensors";
  WriteRaw(file, kGoodHeader, Bytes(32, 2), uint64_t{1} << 60);
  ExpectDataLoss(OpenStatus(file), {"huge.safetensors"});
  WriteRaw(file, kGoodHeader, Bytes(32, 2), ~uint64_t{0});
  ExpectDataLoss(OpenStatus(file), {"huge.safetensors"});
}

TEST(SafetensorsCorruptTest, HeaderNotJson) {
  const fs::path file = testing::ScratchDir("st_notjson") / "notjson.safetensors";
  WriteRaw(file, R"({"first.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, )", Bytes(24, 2));
  ExpectDataLoss(OpenStatus(file), {"notjson.safetensors"});
}

TEST(SafetensorsCorruptTest, HeaderJsonArray) {
  const fs::path file = testing::ScratchDir("st_array") / "array.safetensors";
  WriteRaw(file, R"([{"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}])", Bytes(24, 2));
  ExpectDataLoss(OpenStatus(file), {"array.safetensors"});
}

TEST(SafetensorsCorruptTest, EntryMissingDataOffsets) {
  const fs::path file = testing::ScratchDir("st_nooff") / "nooff.safetensors";
  WriteRaw(file,
           R"({"first.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, )"
           R"("second.weight": {"dtype": "BF16", "shape": [4]}})",
           Bytes(32, 2));
  ExpectDataLoss(OpenStatus(file), {"nooff.safetensors", "second.weight"});
}

TEST(SafetensorsCorruptTest, UnsupportedDtype) {
  const fs::path dir = testing::ScratchDir("st_dtype");
  for (const std::string dtype : {"I64", "F64"}) {
    const fs::path file = dir / (dtype + ".safetensors");
    WriteRaw(file,
             R"({"first.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, )"
             R"("second.weight": {"dtype": ")" +
                 dtype + R"(", "shape": [1], "data_offsets": [24, 32]}})",
             Bytes(32, 2));
    ExpectDataLoss(OpenStatus(file), {file.filename().string(), "second.weight", dtype});
  }
}

TEST(SafetensorsCorruptTest, DtypeTimesShapeNotByteLength) {
  const fs::path file = testing::ScratchDir("st_len") / "len.safetensors";
  // BF16 [4] is 8 bytes, the offsets span 10.
  WriteRaw(file,
           R"({"first.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, )"
           R"("second.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 34]}})",
           Bytes(34, 2));
  ExpectDataLoss(OpenStatus(file), {"len.safetensors", "second.weight"});
}

TEST(SafetensorsCorruptTest, OverlappingOffsets) {
  const fs::path file = testing::ScratchDir("st_overlap") / "overlap.safetensors";
  // second.weight [16, 24) lies inside first.weight [0, 24).
  WriteRaw(file,
           R"({"first.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, )"
           R"("second.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}})",
           Bytes(24, 2));
  absl::Status s = OpenStatus(file);
  ExpectDataLoss(s, {"overlap.safetensors"});
  // Names at least one of the two tensors.
  const std::string msg(s.message());
  EXPECT_TRUE(msg.find("first.weight") != std::string::npos || msg.find("second.weight") != std::string::npos)
      << msg;
}

TEST(SafetensorsCorruptTest, NegativeShapeDim) {
  const fs::path file = testing::ScratchDir("st_neg") / "neg.safetensors";
  // [-2, -3] has "numel" 6 = 24 / 4: only the sign is wrong.
  WriteRaw(file,
           R"({"first.weight": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}, )"
           R"("second.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}})",
           Bytes(32, 2));
  ExpectDataLoss(OpenStatus(file), {"neg.safetensors", "first.weight"});
}

TEST(SafetensorsCorruptTest, BeginAfterEnd) {
  const fs::path file = testing::ScratchDir("st_rev") / "rev.safetensors";
  WriteRaw(file,
           R"({"first.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, )"
           R"("second.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [32, 24]}})",
           Bytes(32, 2));
  ExpectDataLoss(OpenStatus(file), {"rev.safetensors", "second.weight"});
}

TEST(SafetensorsCorruptTest, NegativeOffset) {
  const fs::path file = testing::ScratchDir("st_negoff") / "negoff.safetensors";
  WriteRaw(file,
           R"({"first.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, )"
           R"("second.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [-8, 0]}})",
           Bytes(32, 2));
  ExpectDataLoss(OpenStatus(file), {"negoff.safetensors", "second.weight"});
}

TEST(SafetensorsCorruptTest, OffsetsPastTheData) {
  const fs::path file = testing::ScratchDir("st_past") / "past.safetensors";
  // Valid entries, but the data section is 4 bytes short.
  WriteRaw(file, kGoodHeader, Bytes(28, 2));
  ExpectDataLoss(OpenStatus(file), {"past.safetensors", "second.weight"});
}

TEST(SafetensorsCorruptTest, MissingFileIsNotFound) {
  const fs::path file = testing::ScratchDir("st_missing") / "absent.safetensors";
  absl::Status s = OpenStatus(file);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("absent.safetensors"));
}

TEST(SafetensorsCorruptTest, EmptyDirIsNotFound) {
  const fs::path dir = testing::ScratchDir("st_emptydir");
  absl::StatusOr<std::unique_ptr<TensorStore>> s = TensorStore::Open(dir);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound) << s.status();
  EXPECT_THAT(std::string(s.status().message()), HasSubstr(dir.string()));
}

// ---- Corruptions of a sharded checkpoint --------------------------------------------

// Writes the sharded checkpoint and returns its parsed index.
json WriteSharded(const fs::path& dir) {
  EXPECT_TRUE(WriteCheckpoint(dir, ShardedTensors(), 500).ok());
  return json::parse(ReadText(dir / "model.safetensors.index.json"));
}

TEST(SafetensorsShardedCorruptTest, MissingShardFile) {
  const fs::path dir = testing::ScratchDir("st_sh_missing");
  const json index = WriteSharded(dir);
  const std::string shard = index["weight_map"]["model.layers.5.w"].get<std::string>();
  ASSERT_TRUE(fs::remove(dir / shard));
  absl::StatusOr<std::unique_ptr<TensorStore>> s = TensorStore::Open(dir);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(s.status().code() == absl::StatusCode::kNotFound ||
              s.status().code() == absl::StatusCode::kDataLoss)
      << s.status();
  EXPECT_THAT(std::string(s.status().message()), HasSubstr(shard));
}

TEST(SafetensorsShardedCorruptTest, IndexListsTensorTheShardLacks) {
  const fs::path dir = testing::ScratchDir("st_sh_ghost");
  json index = WriteSharded(dir);
  const std::string shard = index["weight_map"]["model.layers.3.w"].get<std::string>();
  index["weight_map"]["model.layers.3.ghost"] = shard;
  WriteText(dir / "model.safetensors.index.json", index.dump(2));
  absl::StatusOr<std::unique_ptr<TensorStore>> s = TensorStore::Open(dir);
  ExpectDataLoss(s.status(), {shard, "model.layers.3.ghost"});
}

TEST(SafetensorsShardedCorruptTest, IndexNotJson) {
  const fs::path dir = testing::ScratchDir("st_sh_notjson");
  WriteSharded(dir);
  WriteText(dir / "model.safetensors.index.json", "{\"weight_map\": {\"model.layers.0.w\": ");
  absl::StatusOr<std::unique_ptr<TensorStore>> s = TensorStore::Open(dir);
  ExpectDataLoss(s.status(), {"model.safetensors.index.json"});
}

TEST(SafetensorsShardedCorruptTest, IndexWithoutWeightMap) {
  const fs::path dir = testing::ScratchDir("st_sh_nomap");
  WriteSharded(dir);
  WriteText(dir / "model.safetensors.index.json", R"({"metadata": {"total_size": 0}})");
  absl::StatusOr<std::unique_ptr<TensorStore>> s = TensorStore::Open(dir);
  ExpectDataLoss(s.status(), {"model.safetensors.index.json"});
}

TEST(SafetensorsShardedCorruptTest, CorruptShardNamesShard) {
  const fs::path dir = testing::ScratchDir("st_sh_trunc");
  const json index = WriteSharded(dir);
  const std::string shard = index["weight_map"]["model.layers.9.w"].get<std::string>();
  fs::resize_file(dir / shard, fs::file_size(dir / shard) - 1);
  absl::StatusOr<std::unique_ptr<TensorStore>> s = TensorStore::Open(dir);
  ExpectDataLoss(s.status(), {shard, "model.layers.9.w"});
}

}  // namespace
}  // namespace dmoe
