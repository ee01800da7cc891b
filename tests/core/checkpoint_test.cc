// Typed checkpoint access (MODEL_SPEC.md 2.2, 2.3): CheckpointReader over
// stores written here, and ModelWeights::Load on the golden model and on
// altered copies of it.
#include "core/checkpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/model_weights.h"
#include "core/safetensors.h"
#include "core/safetensors_writer.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

// ---- Helpers ---------------------------------------------------------------------

template <typename T>
std::vector<uint8_t> AsBytes(const std::vector<T>& v) {
  std::vector<uint8_t> out(v.size() * sizeof(T));
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

TensorToWrite Tensor(const std::string& name, DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
  TensorToWrite t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes = std::move(bytes);
  return t;
}

// Independent decoders, from the format definitions.
float Bf16Bits(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

double F16Ref(uint16_t v) {
  const int e = (v >> 10) & 0x1F, m = v & 0x3FF;
  double mag = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  if (e == 31) mag = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  return (v & 0x8000) ? -mag : mag;
}

// E4M3FN: sign, 4-bit exponent with bias 7, 3-bit mantissa; exponent 0 is
// subnormal m/8 * 2^-6; 0x7F / 0xFF are NaN.
double E4M3Ref(uint8_t v) {
  const int e = (v >> 3) & 0xF, m = v & 0x7;
  if (e == 0xF && m == 0x7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? (m / 8.0) * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
  return (v & 0x80) ? -mag : mag;
}

struct Store {
  fs::path file;
  std::unique_ptr<TensorStore> store;
};

Store WriteStore(const std::string& scratch, const std::vector<TensorToWrite>& tensors) {
  Store s;
  s.file = testing::ScratchDir(scratch) / "model.safetensors";
  absl::Status w = WriteSafetensors(s.file, tensors);
  EXPECT_TRUE(w.ok()) << w;
  absl::StatusOr<std::unique_ptr<TensorStore>> st = TensorStore::OpenFile(s.file);
  EXPECT_TRUE(st.ok()) << st.status();
  if (st.ok()) s.store = std::move(*st);
  return s;
}

std::vector<float> Iota(int n, float start, float step) {
  std::vector<float> v(n);
  for (int i = 0; i < n; ++i) v[i] = start + step * i;
  return v;
}

// ---- CheckpointReader ----------------------------------------------------------------

TEST(CheckpointReaderTest, MissingTensorIsDataLossNamingIt) {
  Store s = WriteStore("ck_missing", {Tensor("present.weight", DType::kF32, {2, 2}, AsBytes(Iota(4, 0, 1)))});
  ASSERT_NE(s.store, nullptr);
  CheckpointReader rd(*s.store, std::nullopt);
  EXPECT_TRUE(rd.Has("present.weight"));
  EXPECT_FALSE(rd.Has("absent.weight"));
  absl::StatusOr<Matrix> m = rd.ReadMatrix("absent.weight", 2, 2);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss) << m.status();
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("absent.weight"));
  absl::StatusOr<std::vector<float>> v = rd.ReadVector("absent.norm", 2);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kDataLoss) << v.status();
  EXPECT_THAT(std::string(v.status().message()), HasSubstr("absent.norm"));
}

TEST(CheckpointReaderTest, WrongShapeNamesBothShapes) {
  Store s = WriteStore("ck_shape", {Tensor("w.weight", DType::kF32, {3, 4}, AsBytes(Iota(12, 0, 1))),
                                    Tensor("n.weight", DType::kF32, {5}, AsBytes(Iota(5, 0, 1)))});
  ASSERT_NE(s.store, nullptr);
  CheckpointReader rd(*s.store, std::nullopt);
  absl::StatusOr<Matrix> m = rd.ReadMatrix("w.weight", 4, 3);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss) << m.status();
  EXPECT_THAT(std::string(m.status().message()),
              AllOf(HasSubstr("w.weight"), HasSubstr("[3, 4]"), HasSubstr("[4, 3]"), HasSubstr("model.safetensors")));
  absl::StatusOr<std::vector<float>> v = rd.ReadVector("n.weight", 6);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kDataLoss) << v.status();
  EXPECT_THAT(std::string(v.status().message()), AllOf(HasSubstr("n.weight"), HasSubstr("[5]"), HasSubstr("[6]")));
  // A vector read as a matrix is a shape mismatch too.
  EXPECT_FALSE(rd.ReadMatrix("n.weight", 1, 5).ok());
}

TEST(CheckpointReaderTest, F32MatrixExact) {
  const std::vector<float> vals = {1.5f, -2.25f, 3e-8f, 1e30f, 0.0f, -0.0f};
  Store s = WriteStore("ck_f32", {Tensor("w", DType::kF32, {2, 3}, AsBytes(vals))});
  ASSERT_NE(s.store, nullptr);
  CheckpointReader rd(*s.store, std::nullopt);
  absl::StatusOr<Matrix> m = rd.ReadMatrix("w", 2, 3);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->dtype, DType::kF32);
  EXPECT_EQ(m->rows, 2);
  EXPECT_EQ(m->cols, 3);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(m->f32()[i], vals[i]) << i;
  EXPECT_EQ(m->at(1, 0), 1e30f);
}

TEST(CheckpointReaderTest, Bf16MatrixStaysBf16) {
  const std::vector<uint16_t> codes = {0x3F80, 0xC049, 0x0001, 0x7F7F, 0x8000, 0x3E9A,
                                       0x4120, 0xBF00, 0x0080, 0x477F, 0x1234, 0xC2F7};
  Store s = WriteStore("ck_bf16", {Tensor("w", DType::kBF16, {3, 4}, AsBytes(codes))});
  ASSERT_NE(s.store, nullptr);
  CheckpointReader rd(*s.store, std::nullopt);
  absl::StatusOr<Matrix> m = rd.ReadMatrix("w", 3, 4);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->dtype, DType::kBF16);
  EXPECT_EQ(m->bytes(), 24);
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 4; ++c) {
      EXPECT_EQ(m->bf16()[r * 4 + c], codes[r * 4 + c]);
      EXPECT_EQ(m->at(r, c), Bf16Bits(codes[r * 4 + c])) << r << "," << c;
    }
  }
  // The router reads the same tensor as float32, exactly.
  absl::StatusOr<Matrix> f = rd.ReadMatrixF32("w", 3, 4);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->dtype, DType::kF32);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(f->f32()[i], Bf16Bits(codes[i])) << i;
  // And as a vector.
  Store v = WriteStore("ck_bf16_vec", {Tensor("n", DType::kBF16, {12}, AsBytes(codes))});
  ASSERT_NE(v.store, nullptr);
  absl::StatusOr<std::vector<float>> vec = CheckpointReader(*v.store, std::nullopt).ReadVector("n", 12);
  ASSERT_TRUE(vec.ok()) << vec.status();
  for (int i = 0; i < 12; ++i) EXPECT_EQ((*vec)[i], Bf16Bits(codes[i])) << i;
}

TEST(CheckpointReaderTest, F16BecomesF32Exactly) {
  const std::vector<uint16_t> codes = {0x3C00, 0xC000, 0x0001, 0x03FF, 0x0400, 0x7BFF,
                                       0xFBFF, 0x8000, 0x3555, 0x2E66, 0x8001, 0x5640};
  Store s = WriteStore("ck_f16", {Tensor("w", DType::kF16, {4, 3}, AsBytes(codes)),
                                  Tensor("n", DType::kF16, {12}, AsBytes(codes))});
  ASSERT_NE(s.store, nullptr);
  CheckpointReader rd(*s.store, std::nullopt);
  absl::StatusOr<Matrix> m = rd.ReadMatrix("w", 4, 3);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->dtype, DType::kF32);
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 3; ++c) {
      EXPECT_EQ(static_cast<double>(m->at(r, c)), F16Ref(codes[r * 3 + c])) << r << "," << c;
    }
  }
  EXPECT_TRUE(std::signbit(m->at(2, 1)));  // 0x8000 = -0
  absl::StatusOr<std::vector<float>> v = rd.ReadVector("n", 12);
  ASSERT_TRUE(v.ok()) << v.status();
  for (int i = 0; i < 12; ++i) EXPECT_EQ(static_cast<double>((*v)[i]), F16Ref(codes[i])) << i;
}

// A [5, 7] FP8 weight with block [2, 3]: scales [3, 3], the last block row
// (row 4) and block column (column 6) are partial.
struct Fp8Case {
  std::vector<uint8_t> w;
  std::vector<float> scale;  // [3, 3]
};

Fp8Case MakeFp8Case() {
  Fp8Case c;
  c.w.resize(35);
  uint32_t s = 7;
  for (int i = 0; i < 35; ++i) {
    s = s * 1664525u + 1013904223u;
    uint8_t code = static_cast<uint8_t>(s >> 24);
    if ((code & 0x7F) == 0x7F) code ^= 0x01;  // keep it finite
    c.w[i] = code;
  }
  c.w[0] = 0x7E;   // 448
  c.w[1] = 0x01;   // smallest subnormal
  c.w[2] = 0x87;   // -7 * 2^-9
  c.w[3] = 0x00;   // 0
  c.w[34] = 0xB9;  // -1.125, in the partial corner block
  // Distinct, non-power-of-two multipliers (ratios far above bf16 precision).
  c.scale = {0.0123f, 1.7f, 3.3e-3f, 250.25f, 0.5f, 7.77f, 1.0f / 3.0f, 42.0f, 1.1e-5f};
  return c;
}

TEST(CheckpointReaderTest, Fp8DequantizedWithPartialBlocks) {
  const Fp8Case fc = MakeFp8Case();
  Store s = WriteStore("ck_fp8", {Tensor("x.weight", DType::kF8E4M3, {5, 7}, fc.w),
                                  Tensor("x.weight_scale_inv", DType::kF32, {3, 3}, AsBytes(fc.scale))});
  ASSERT_NE(s.store, nullptr);
  CheckpointReader rd(*s.store, std::array<int64_t, 2>{2, 3});
  absl::StatusOr<Matrix> m = rd.ReadMatrix("x.weight", 5, 7);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->dtype, DType::kBF16);
  EXPECT_EQ(m->rows, 5);
  EXPECT_EQ(m->cols, 7);
  for (int i = 0; i < 5; ++i) {
    for (int j = 0; j < 7; ++j) {
      const double exact = E4M3Ref(fc.w[i * 7 + j]) * static_cast<double>(fc.scale[(i / 2) * 3 + (j / 3)]);
      const double got = m->at(i, j);
      // Rounded to bf16 (8 significant bits): within 2^-8 relative.
      EXPECT_LE(std::fabs(got - exact), std::ldexp(std::fabs(exact), -8))
          << "(" << i << ", " << j << ") code 0x" << std::hex << int{fc.w[i * 7 + j]} << std::dec
          << " exact " << exact << " got " << got;
      if (exact == 0.0) EXPECT_EQ(got, 0.0);
    }
  }
  // The router path gets the same values as float32.
  absl::StatusOr<Matrix> f = rd.ReadMatrixF32("x.weight", 5, 7);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->dtype, DType::kF32);
  for (int i = 0; i < 35; ++i) EXPECT_EQ(f->f32()[i], m->at(i / 7, i % 7)) << i;
}

TEST(CheckpointReaderTest, Fp8NanCodeStaysNan) {
  std::vector<uint8_t> w(6, 0x38);  // 1.0
  w[4] = 0x7F;
  w[5] = 0xFF;
  const std::vector<float> scale = {2.0f};
  Store s = WriteStore("ck_fp8_nan", {Tensor("x.weight", DType::kF8E4M3, {2, 3}, w),
                                      Tensor("x.weight_scale_inv", DType::kF32, {1, 1}, AsBytes(scale))});
  ASSERT_NE(s.store, nullptr);
  absl::StatusOr<Matrix> m = CheckpointReader(*s.store, std::array<int64_t, 2>{128, 128}).ReadMatrix("x.weight", 2, 3);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->at(0, 0), 2.0f);
  EXPECT_TRUE(std::isnan(m->at(1, 1)));
  EXPECT_TRUE(std::isnan(m->at(1, 2)));
}

TEST(CheckpointReaderTest, Fp8DefaultBlockIs128) {
  const Fp8Case fc = MakeFp8Case();
  const std::vector<float> one_scale = {0.75f};
  Store s = WriteStore("ck_fp8_default", {Tensor("x.weight", DType::kF8E4M3, {5, 7}, fc.w),
                                          Tensor("x.weight_scale_inv", DType::kF32, {1, 1}, AsBytes(one_scale))});
  ASSERT_NE(s.store, nullptr);
  absl::StatusOr<Matrix> m = CheckpointReader(*s.store, std::nullopt).ReadMatrix("x.weight", 5, 7);
  ASSERT_TRUE(m.ok()) << m.status();
  for (int i = 0; i < 35; ++i) {
    const double exact = E4M3Ref(fc.w[i]) * 0.75;
    EXPECT_LE(std::fabs(m->at(i / 7, i % 7) - exact), std::ldexp(std::fabs(exact), -8)) << i;
  }
}

TEST(CheckpointReaderTest, Fp8WithoutScaleIsDataLoss) {
  const Fp8Case fc = MakeFp8Case();
  Store s = WriteStore("ck_fp8_noscale", {Tensor("x.weight", DType::kF8E4M3, {5, 7}, fc.w)});
  ASSERT_NE(s.store, nullptr);
  absl::StatusOr<Matrix> m = CheckpointReader(*s.store, std::array<int64_t, 2>{2, 3}).ReadMatrix("x.weight", 5, 7);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss) << m.status();
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("x.weight_scale_inv"));
}

TEST(CheckpointReaderTest, Fp8ScaleOfWrongShapeIsError) {
  const Fp8Case fc = MakeFp8Case();
  // [5, 3] would fit a [1, 3] block; the config says [2, 3] -> [3, 3].
  const std::vector<float> scale(15, 1.0f);
  Store s = WriteStore("ck_fp8_badscale", {Tensor("x.weight", DType::kF8E4M3, {5, 7}, fc.w),
                                           Tensor("x.weight_scale_inv", DType::kF32, {5, 3}, AsBytes(scale))});
  ASSERT_NE(s.store, nullptr);
  absl::StatusOr<Matrix> m = CheckpointReader(*s.store, std::array<int64_t, 2>{2, 3}).ReadMatrix("x.weight", 5, 7);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss) << m.status();
  EXPECT_THAT(std::string(m.status().message()), AllOf(HasSubstr("x.weight_scale_inv"), HasSubstr("[5, 3]")));
  // Same tensors, default block [128, 128] -> [1, 1]: also wrong.
  EXPECT_FALSE(CheckpointReader(*s.store, std::nullopt).ReadMatrix("x.weight", 5, 7).ok());
}

TEST(CheckpointReaderTest, DequantizeFp8Directly) {
  const Fp8Case fc = MakeFp8Case();
  const std::vector<float> out = DequantizeFp8(fc.w.data(), 5, 7, fc.scale.data(), 2, 3);
  ASSERT_EQ(out.size(), 35u);
  for (int i = 0; i < 5; ++i) {
    for (int j = 0; j < 7; ++j) {
      const double exact = E4M3Ref(fc.w[i * 7 + j]) * static_cast<double>(fc.scale[(i / 2) * 3 + (j / 3)]);
      // float product of an exact fp8 value and a float scale: one rounding.
      EXPECT_LE(std::fabs(out[i * 7 + j] - exact), std::ldexp(std::fabs(exact), -24)) << i << "," << j;
    }
  }
}

// ---- ModelWeights on the golden model and altered copies -----------------------------

constexpr int64_t kGoldenLayers = 4;
constexpr int64_t kGoldenExperts = 16;

TEST(ModelWeightsTest, LoadsGoldenModel) {
  absl::StatusOr<std::shared_ptr<const ModelWeights>> w = ModelWeights::Load(testing::GoldenModelDir());
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelWeights& m = **w;
  const ModelConfig& c = m.config;
  EXPECT_EQ(c.num_hidden_layers, kGoldenLayers);
  EXPECT_EQ(m.embed_tokens.rows, 512);
  EXPECT_EQ(m.embed_tokens.cols, 128);
  EXPECT_EQ(m.lm_head.rows, 512);
  EXPECT_EQ(m.lm_head.cols, 128);
  EXPECT_EQ(m.norm.size(), 128u);
  ASSERT_EQ(m.layers.size(), 4u);
  EXPECT_EQ(m.routed_experts_loaded, 3 * kGoldenExperts);
  EXPECT_GT(m.routed_expert_bytes, 0);
  EXPECT_GT(m.total_bytes, m.routed_expert_bytes);

  // Layer 0 is dense (first_k_dense_replace = 1).
  EXPECT_TRUE(m.layers[0].mlp.loaded());
  EXPECT_EQ(m.layers[0].mlp.gate_proj.rows, 256);
  EXPECT_EQ(m.layers[0].mlp.down_proj.cols, 256);
  EXPECT_TRUE(m.layers[0].moe.experts.empty() || !m.layers[0].moe.experts[0].loaded());
  for (int l = 0; l < 4; ++l) {
    const LayerWeights& lw = m.layers[l];
    EXPECT_EQ(lw.input_layernorm.size(), 128u) << l;
    EXPECT_EQ(lw.post_attention_layernorm.size(), 128u) << l;
    EXPECT_TRUE(lw.attn.q_proj.empty()) << l;  // q_lora_rank = 64
    EXPECT_EQ(lw.attn.q_a_proj.rows, 64) << l;
    EXPECT_EQ(lw.attn.q_a_layernorm.size(), 64u) << l;
    EXPECT_EQ(lw.attn.q_b_proj.rows, 4 * 24) << l;
    EXPECT_EQ(lw.attn.kv_a_proj_with_mqa.rows, 32 + 8) << l;
    EXPECT_EQ(lw.attn.kv_a_layernorm.size(), 32u) << l;
    EXPECT_EQ(lw.attn.kv_b_proj.rows, 4 * (16 + 16)) << l;
    EXPECT_EQ(lw.attn.o_proj.rows, 128) << l;
    EXPECT_EQ(lw.attn.o_proj.cols, 4 * 16) << l;
    if (l == 0) continue;
    EXPECT_EQ(lw.moe.router.rows, kGoldenExperts) << l;
    EXPECT_EQ(lw.moe.router.dtype, DType::kF32) << l;
    EXPECT_EQ(lw.moe.e_score_correction_bias.size(), static_cast<size_t>(kGoldenExperts)) << l;
    EXPECT_TRUE(lw.moe.shared_experts.loaded()) << l;
    EXPECT_EQ(lw.moe.shared_experts.gate_proj.rows, 64) << l;
    ASSERT_EQ(lw.moe.experts.size(), static_cast<size_t>(kGoldenExperts)) << l;
    for (int e = 0; e < kGoldenExperts; ++e) {
      EXPECT_TRUE(lw.moe.experts[e].loaded()) << l << "/" << e;
      EXPECT_EQ(lw.moe.experts[e].up_proj.rows, 64);
      EXPECT_EQ(lw.moe.experts[e].down_proj.rows, 128);
    }
  }

  // Values are the checkpoint's.
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::Open(testing::GoldenModelDir());
  ASSERT_TRUE(store.ok()) << store.status();
  const TensorInfo* emb = (*store)->Find("model.embed_tokens.weight");
  ASSERT_NE(emb, nullptr);
  ASSERT_EQ(emb->dtype, DType::kF32);
  const float* ef = reinterpret_cast<const float*>(emb->data);
  EXPECT_EQ(m.embed_tokens.at(0, 0), ef[0]);
  EXPECT_EQ(m.embed_tokens.at(511, 127), ef[511 * 128 + 127]);
  const TensorInfo* e5 = (*store)->Find("model.layers.2.mlp.experts.5.down_proj.weight");
  ASSERT_NE(e5, nullptr);
  const float* e5f = reinterpret_cast<const float*>(e5->data);
  EXPECT_EQ(m.layers[2].moe.experts[5].down_proj.at(3, 7), e5f[3 * 64 + 7]);
}

// Copies the golden model to `scratch` with `drop` left out and `extra` added.
fs::path RewriteGolden(const std::string& scratch, const std::vector<std::string>& drop,
                       const std::vector<TensorToWrite>& extra) {
  const fs::path dir = testing::ScratchDir(scratch);
  fs::copy_file(testing::GoldenModelDir() / "config.json", dir / "config.json");
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::Open(testing::GoldenModelDir());
  EXPECT_TRUE(store.ok()) << store.status();
  if (!store.ok()) return dir;
  std::vector<TensorToWrite> tensors;
  for (const auto& [name, t] : (*store)->tensors()) {
    if (std::find(drop.begin(), drop.end(), name) != drop.end()) continue;
    tensors.push_back(Tensor(name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes)));
  }
  EXPECT_EQ(tensors.size() + drop.size(), (*store)->tensors().size());
  for (const TensorToWrite& t : extra) tensors.push_back(t);
  absl::Status w = WriteSafetensors(dir / "model.safetensors", tensors);
  EXPECT_TRUE(w.ok()) << w;
  return dir;
}

TEST(ModelWeightsTest, RewrittenGoldenLoads) {
  const fs::path dir = RewriteGolden("mw_copy", {}, {});
  absl::StatusOr<std::shared_ptr<const ModelWeights>> w = ModelWeights::Load(dir);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->routed_experts_loaded, 48);
}

TEST(ModelWeightsTest, MissingTensorFailsNamingIt) {
  for (const std::string name : {"model.layers.2.mlp.experts.5.up_proj.weight",
                                 "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.3.mlp.gate.e_score_correction_bias",
                                 "model.layers.1.mlp.shared_experts.down_proj.weight", "model.norm.weight",
                                 "lm_head.weight"}) {
    const fs::path dir = RewriteGolden("mw_drop", {name}, {});
    absl::StatusOr<std::shared_ptr<const ModelWeights>> w = ModelWeights::Load(dir);
    ASSERT_FALSE(w.ok()) << name;
    EXPECT_EQ(w.status().code(), absl::StatusCode::kDataLoss) << w.status();
    EXPECT_THAT(std::string(w.status().message()), HasSubstr(name));
  }
}

TEST(ModelWeightsTest, MtpLayerTensorsAreSkipped) {
  std::vector<TensorToWrite> extra;
  // Layer index 4 >= num_hidden_layers = 4; shapes need not match anything.
  extra.push_back(Tensor("model.layers.4.self_attn.q_a_proj.weight", DType::kF32, {3, 5},
                         AsBytes(Iota(15, 0, 0.5f))));
  extra.push_back(Tensor("model.layers.4.mlp.experts.0.gate_proj.weight", DType::kBF16, {2, 2},
                         AsBytes(std::vector<uint16_t>{0x3F80, 0x4000, 0x4040, 0x4080})));
  extra.push_back(Tensor("model.layers.4.eh_proj.weight", DType::kF32, {2, 4}, AsBytes(Iota(8, 1, 1))));
  extra.push_back(Tensor("model.layers.61.embed_tokens.weight", DType::kF32, {2}, AsBytes(Iota(2, 1, 1))));
  const fs::path dir = RewriteGolden("mw_mtp", {}, extra);
  absl::StatusOr<std::shared_ptr<const ModelWeights>> w = ModelWeights::Load(dir);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->layers.size(), 4u);
  EXPECT_EQ((*w)->routed_experts_loaded, 48);
}

TEST(ModelWeightsTest, TiedEmbeddingsWithoutLmHead) {
  const fs::path dir = RewriteGolden("mw_tied", {"lm_head.weight"}, {});
  absl::StatusOr<ModelConfig> c = ModelConfig::Load(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  // Without tying, the missing lm_head is an error naming it.
  absl::StatusOr<std::shared_ptr<const ModelWeights>> untied = ModelWeights::Load(dir);
  ASSERT_FALSE(untied.ok());
  EXPECT_THAT(std::string(untied.status().message()), HasSubstr("lm_head.weight"));
  ModelConfig tied = *c;
  tied.tie_word_embeddings = true;
  absl::StatusOr<std::unique_ptr<TensorStore>> store = TensorStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  absl::StatusOr<std::shared_ptr<const ModelWeights>> w = ModelWeights::Load(tied, **store, WeightSelection::All());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->lm_head.rows, 512);
  EXPECT_EQ((*w)->lm_head.cols, 128);
  EXPECT_EQ((*w)->lm_head.at(7, 9), (*w)->embed_tokens.at(7, 9));
}

TEST(ModelWeightsTest, NonExpertOnlyLoadsNoRoutedExperts) {
  absl::StatusOr<std::shared_ptr<const ModelWeights>> w =
      ModelWeights::Load(testing::GoldenModelDir(), WeightSelection::NonExpertOnly());
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelWeights& m = **w;
  EXPECT_EQ(m.routed_experts_loaded, 0);
  EXPECT_EQ(m.routed_expert_bytes, 0);
  EXPECT_FALSE(m.embed_tokens.empty());
  EXPECT_FALSE(m.lm_head.empty());
  for (int l = 1; l < 4; ++l) {
    EXPECT_FALSE(m.layers[l].moe.router.empty()) << l;
    EXPECT_TRUE(m.layers[l].moe.shared_experts.loaded()) << l;
    for (const MlpWeights& e : m.layers[l].moe.experts) EXPECT_FALSE(e.loaded()) << l;
  }
  EXPECT_TRUE(m.layers[0].mlp.loaded());
}

TEST(ModelWeightsTest, NonExpertOnlyDoesNotNeedExpertTensors) {
  const fs::path dir = RewriteGolden("mw_noexp", {"model.layers.2.mlp.experts.5.up_proj.weight"}, {});
  absl::StatusOr<std::shared_ptr<const ModelWeights>> w = ModelWeights::Load(dir, WeightSelection::NonExpertOnly());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->routed_experts_loaded, 0);
}

TEST(ModelWeightsTest, SelectedExpertsOnly) {
  WeightSelection sel;
  sel.non_expert = true;
  sel.routed_expert = [](int64_t layer, int64_t expert) { return layer >= 1 && layer <= 3 && expert < 4; };
  absl::StatusOr<std::shared_ptr<const ModelWeights>> w = ModelWeights::Load(testing::GoldenModelDir(), sel);
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelWeights& m = **w;
  EXPECT_EQ(m.routed_experts_loaded, 12);
  for (int l = 1; l < 4; ++l) {
    ASSERT_EQ(m.layers[l].moe.experts.size(), 16u);
    for (int e = 0; e < 16; ++e) EXPECT_EQ(m.layers[l].moe.experts[e].loaded(), e < 4) << l << "/" << e;
  }
  EXPECT_EQ(m.routed_expert_bytes, 12 * m.layers[1].moe.experts[0].bytes());
}

TEST(ModelWeightsTest, ExpertShardOnly) {
  WeightSelection sel;
  sel.non_expert = false;
  sel.routed_expert = [](int64_t layer, int64_t expert) { return layer == 2 && expert % 2 == 1; };
  absl::StatusOr<std::shared_ptr<const ModelWeights>> w = ModelWeights::Load(testing::GoldenModelDir(), sel);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->routed_experts_loaded, 8);
  EXPECT_TRUE((*w)->embed_tokens.empty());
  EXPECT_TRUE((*w)->layers[2].moe.experts[1].loaded());
  EXPECT_FALSE((*w)->layers[2].moe.experts[0].loaded());
}

}  // namespace
}  // namespace dmoe
