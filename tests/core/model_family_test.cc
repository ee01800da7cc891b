// The engine on checkpoints the golden data cannot cover (MODEL_SPEC.md 6):
// DeepSeek-V2 layouts, yarn with mscale_all_dim != 1, rotate-half rope,
// tied embeddings, MTP tensors, dense-only models, and the golden checkpoint
// converted to BF16, sharded files and FP8 block-scaled projections. Each
// is checked against an independent float64 reference (reference_model.h).
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "core/engine.h"
#include "core/generate.h"
#include "core/synthetic_checkpoint.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/core/model_test_util.h"
#include "tests/core/reference_model.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using json = nlohmann::json;
using testing::MaxRelativeError;
using testing::ReferenceLogits;
using testing::ScratchDir;

// A small model of the family: 3 layers (1 dense), 8 experts.
json SmallConfig(const std::string& model_type) {
  json c = {{"model_type", model_type}, {"vocab_size", 96}, {"hidden_size", 64}, {"intermediate_size", 96},
            {"moe_intermediate_size", 32}, {"num_hidden_layers", 3}, {"first_k_dense_replace", 1},
            {"num_attention_heads", 4}, {"q_lora_rank", 32}, {"kv_lora_rank", 24}, {"qk_nope_head_dim", 16},
            {"qk_rope_head_dim", 8}, {"v_head_dim", 12}, {"n_routed_experts", 8}, {"n_shared_experts", 1},
            {"num_experts_per_tok", 3}, {"max_position_embeddings", 128}, {"rms_norm_eps", 1e-5},
            {"bos_token_id", 0}, {"eos_token_id", 1}};
  if (model_type == "deepseek_v3") {
    c.update({{"n_group", 4}, {"topk_group", 2}, {"topk_method", "noaux_tc"}, {"scoring_func", "sigmoid"},
              {"norm_topk_prob", true}, {"routed_scaling_factor", 2.5}});
  } else {
    c.update({{"topk_method", "greedy"}, {"scoring_func", "softmax"}, {"norm_topk_prob", false},
              {"routed_scaling_factor", 16.0}});
  }
  return c;
}

std::vector<int32_t> Prompt(int64_t n, int64_t vocab) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(static_cast<int32_t>((i * 37 + 11) % vocab));
  return ids;
}

struct Loaded {
  ModelConfig config;
  std::unique_ptr<TensorStore> store;
  std::unique_ptr<Engine> engine;
};

Loaded Load(const std::filesystem::path& dir, MlaForm form = MlaForm::kAuto) {
  Loaded m;
  auto config = ModelConfig::Load(dir);
  EXPECT_TRUE(config.ok()) << config.status();
  m.config = *config;
  auto store = TensorStore::Open(dir);
  EXPECT_TRUE(store.ok()) << store.status();
  m.store = std::move(store).value();
  auto weights = ModelWeights::Load(dir);
  EXPECT_TRUE(weights.ok()) << weights.status();
  auto engine = Engine::Create(*weights, EngineOptions{form});
  EXPECT_TRUE(engine.ok());
  m.engine = std::move(engine).value();
  return m;
}

std::vector<float> EngineLogits(const Engine& engine, const std::vector<int32_t>& ids) {
  auto cache = LatentCache::Create(engine.CacheOptions(8, 16));
  LocalExperts experts(engine.weights());
  auto out = engine.Step({{1, ids, true}}, **cache, experts);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? (*out)[0].logits : std::vector<float>{};
}

// Both MLA forms against the reference at every position, and greedy decoding
// through the absorbed form against the reference's argmax chain.
void ExpectMatchesReference(const std::filesystem::path& dir, double tolerance = 1e-4) {
  Loaded expanded = Load(dir, MlaForm::kExpanded);
  Loaded absorbed = Load(dir, MlaForm::kAbsorbed);
  const int64_t V = expanded.config.vocab_size;
  const std::vector<int32_t> prompt = Prompt(40, V);
  const std::vector<float> ref = ReferenceLogits(expanded.config, *expanded.store, prompt);
  const double err_expanded = MaxRelativeError(EngineLogits(*expanded.engine, prompt), ref, V);
  const double err_absorbed = MaxRelativeError(EngineLogits(*absorbed.engine, prompt), ref, V);
  std::printf("[family] %s: expanded %.3g, absorbed %.3g relative to the float64 reference\n",
              dir.filename().c_str(), err_expanded, err_absorbed);
  EXPECT_LE(err_expanded, tolerance);
  EXPECT_LE(err_absorbed, tolerance);

  // Greedy: 6 tokens decoded over the cache vs the reference recomputed per step.
  Loaded automatic = Load(dir);
  auto cache = LatentCache::Create(automatic.engine->CacheOptions(8, 16));
  LocalExperts experts(automatic.engine->weights());
  GenerateOptions opts;
  opts.max_tokens = 6;
  opts.stop_at_eos = false;
  auto got = Generate(*automatic.engine, **cache, experts, prompt, opts);
  ASSERT_TRUE(got.ok()) << got.status();
  std::vector<int32_t> seq = prompt;
  for (int32_t token : got->ids) {
    const std::vector<float> logits = ReferenceLogits(automatic.config, *automatic.store, seq);
    const float* last = logits.data() + (seq.size() - 1) * V;
    std::vector<float> sorted(last, last + V);
    std::sort(sorted.rbegin(), sorted.rend());
    const int32_t best = static_cast<int32_t>(std::max_element(last, last + V) - last);
    if (sorted[0] - sorted[1] > 1e-3) EXPECT_EQ(token, best) << "greedy step " << seq.size() - prompt.size();
    seq.push_back(token);
  }
}

std::filesystem::path WriteModel(const std::string& name, const json& config, DType dtype = DType::kF32) {
  const std::filesystem::path dir = ScratchDir(name);
  absl::Status st = WriteRandomModel(config.dump(), dtype, 7, dir);
  EXPECT_TRUE(st.ok()) << st;
  return dir;
}

TEST(ReferenceModel, MatchesTheGoldenData) {
  // The reference itself is checked against HF transformers first.
  Loaded golden = Load(testing::GoldenModelDir());
  const auto cases = testing::LoadGoldenCases(testing::GoldenModelDir());
  const auto& gc = cases[2];
  const double err = MaxRelativeError(ReferenceLogits(golden.config, *golden.store, gc.prompt_ids), gc.logits,
                                      golden.config.vocab_size);
  std::printf("[family] float64 reference vs golden: %.3g\n", err);
  EXPECT_LE(err, 1e-5);
}

TEST(ModelFamily, DeepseekV2GreedySoftmaxWithoutQLora) {
  json c = SmallConfig("deepseek_v2");
  c["q_lora_rank"] = nullptr;
  c["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32},
                       {"beta_fast", 32}, {"beta_slow", 1}, {"mscale", 0.707}, {"mscale_all_dim", 0.707}};
  ExpectMatchesReference(WriteModel("v2_greedy", c));
}

TEST(ModelFamily, DeepseekV2GroupLimitedGreedy) {
  json c = SmallConfig("deepseek_v2");
  c.update({{"topk_method", "group_limited_greedy"}, {"n_group", 4}, {"topk_group", 2}, {"n_shared_experts", 2}});
  ExpectMatchesReference(WriteModel("v2_group_limited", c));
}

TEST(ModelFamily, YarnWithMscaleAllDimDifferentFromMscale) {
  // attention_factor = m(f, mscale) / m(f, mscale_all_dim) != 1 scales cos/sin.
  json c = SmallConfig("deepseek_v2");
  c["rope_scaling"] = {{"type", "yarn"}, {"factor", 8.0}, {"original_max_position_embeddings", 16},
                       {"mscale", 1.0}, {"mscale_all_dim", 0.5}};
  ExpectMatchesReference(WriteModel("v2_mscale", c));
}

TEST(ModelFamily, DeepseekV3RotateHalfRope) {
  json c = SmallConfig("deepseek_v3");
  c["rope_interleave"] = false;
  ExpectMatchesReference(WriteModel("v3_rotate_half", c));
}

TEST(ModelFamily, TiedEmbeddingsWithoutLmHead) {
  json c = SmallConfig("deepseek_v3");
  c["tie_word_embeddings"] = true;
  const std::filesystem::path dir = WriteModel("v3_tied", c);
  auto store = TensorStore::Open(dir);
  ASSERT_TRUE(store.ok());
  EXPECT_EQ((*store)->Find("lm_head.weight"), nullptr);
  ExpectMatchesReference(dir);
}

TEST(ModelFamily, DenseOnlyModel) {
  json c = SmallConfig("deepseek_v3");
  c["n_routed_experts"] = nullptr;
  ExpectMatchesReference(WriteModel("v3_dense", c));
}

// Copies `src`'s tensors, transformed, into a new checkpoint dir.
std::filesystem::path Convert(const std::string& name, const std::filesystem::path& src, const json& config,
                              DType projection_dtype, int64_t shard_bytes,
                              const std::vector<TensorToWrite>& extra = {}) {
  const std::filesystem::path dir = ScratchDir(name);
  auto store = TensorStore::Open(src);
  EXPECT_TRUE(store.ok());
  std::vector<TensorToWrite> tensors = extra;
  for (const auto& [tname, info] : (*store)->tensors()) {
    auto values = ReadAsFloats(**store, tname);
    EXPECT_TRUE(values.ok());
    const bool projection = IsFp8Projection(tname);
    const DType dtype = info.shape.size() == 1 ? DType::kF32
                        : projection_dtype == DType::kF8E4M3 && !projection ? DType::kBF16
                                                                            : projection_dtype;
    for (TensorToWrite& t : EncodeTensor(tname, *values, info.shape, dtype, {128, 128})) tensors.push_back(t);
  }
  EXPECT_TRUE(WriteCheckpoint(dir, tensors, shard_bytes).ok());
  std::ofstream(dir / "config.json") << config.dump(2);
  return dir;
}

json GoldenConfig() {
  std::ifstream in(testing::GoldenModelDir() / "config.json");
  return json::parse(in);
}

double GoldenError(const std::filesystem::path& dir) {
  Loaded m = Load(dir);
  const auto cases = testing::LoadGoldenCases(testing::GoldenModelDir());
  double worst = 0;
  for (const auto& gc : cases) {
    worst = std::max(worst, MaxRelativeError(EngineLogits(*m.engine, gc.prompt_ids), gc.logits, m.config.vocab_size));
  }
  return worst;
}

TEST(GoldenConversions, Bf16Checkpoint) {
  const auto dir = Convert("golden_bf16", testing::GoldenModelDir(), GoldenConfig(), DType::kBF16, 0);
  Loaded m = Load(dir);
  EXPECT_EQ(m.engine->weights().layers[0].attn.o_proj.dtype, DType::kBF16) << "bf16 must stay bf16 in memory";
  // Same (bf16-rounded) weights in the reference: only arithmetic differs.
  const auto prompt = testing::LoadGoldenCases(testing::GoldenModelDir())[3].prompt_ids;
  const double vs_ref =
      MaxRelativeError(EngineLogits(*m.engine, prompt), ReferenceLogits(m.config, *m.store, prompt), m.config.vocab_size);
  // Against golden (f32 weights) there is no tight bound: tiny-v3's routing
  // margins (8e-5) flip under bf16 rounding, so this is printed, not asserted.
  std::printf("[family] bf16 weights: %.3g vs reference on the same weights (%.3g vs golden's f32 weights)\n", vs_ref,
              GoldenError(dir));
  EXPECT_LE(vs_ref, 1e-4);
}

TEST(GoldenConversions, ShardedCheckpointGivesIdenticalLogits) {
  const auto dir = Convert("golden_sharded", testing::GoldenModelDir(), GoldenConfig(), DType::kF32, 1 << 20);
  ASSERT_TRUE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  ASSERT_TRUE(std::filesystem::exists(dir / "model-00003-of-00007.safetensors"));
  Loaded sharded = Load(dir);
  Loaded single = Load(testing::GoldenModelDir());
  const auto prompt = testing::LoadGoldenCases(testing::GoldenModelDir())[1].prompt_ids;
  EXPECT_EQ(EngineLogits(*sharded.engine, prompt), EngineLogits(*single.engine, prompt));
}

// E4M3FN decoded from its definition, independently of core/dtype.cc.
float DecodeE4M3(uint8_t code) {
  const int sign = code >> 7, exponent = (code >> 3) & 15, mantissa = code & 7;
  if ((code & 0x7f) == 0x7f) return NAN;
  const double magnitude = exponent == 0 ? mantissa / 8.0 * std::pow(2.0, -6)
                                         : (1.0 + mantissa / 8.0) * std::pow(2.0, exponent - 7);
  return static_cast<float>(sign ? -magnitude : magnitude);
}

TEST(GoldenConversions, Fp8BlockScaledProjections) {
  json config = GoldenConfig();
  config["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {128, 128}},
                                   {"activation_scheme", "dynamic"}};
  const auto dir = Convert("golden_fp8", testing::GoldenModelDir(), config, DType::kF8E4M3, 0);
  auto store = TensorStore::Open(dir);
  ASSERT_TRUE(store.ok());
  ASSERT_EQ((*store)->Find("model.layers.1.mlp.experts.3.up_proj.weight")->dtype, DType::kF8E4M3);
  ASSERT_EQ((*store)->Find("model.layers.1.mlp.gate.weight")->dtype, DType::kBF16);
  ASSERT_NE((*store)->Find("model.layers.1.self_attn.q_b_proj.weight_scale_inv"), nullptr);

  // The weights the engine should hold: bf16(e4m3(w) * scale_inv[block]),
  // decoded here, written as an F32 checkpoint for the reference.
  std::vector<TensorToWrite> expected;
  for (const auto& [name, t] : (*store)->tensors()) {
    if (name.find("_scale_inv") != std::string::npos) continue;
    std::vector<float> values;
    if (t.dtype == DType::kF8E4M3) {
      const TensorInfo* s = (*store)->Find(name + "_scale_inv");
      const int64_t rows = t.shape[0], cols = t.shape[1], scale_cols = s->shape[1];
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          float scale;
          std::memcpy(&scale, s->data + 4 * ((i / 128) * scale_cols + j / 128), 4);
          values.push_back(Bf16ToFloat(FloatToBf16(DecodeE4M3(t.data[i * cols + j]) * scale)));
        }
    } else {
      values = *ReadAsFloats(**store, name);
    }
    for (TensorToWrite& w : EncodeTensor(name, values, t.shape, DType::kF32)) expected.push_back(w);
  }
  const auto expected_dir = ScratchDir("golden_fp8_expected");
  ASSERT_TRUE(WriteCheckpoint(expected_dir, expected, 0).ok());
  auto expected_store = TensorStore::Open(expected_dir);
  ASSERT_TRUE(expected_store.ok());

  Loaded m = Load(dir);
  const auto prompt = testing::LoadGoldenCases(testing::GoldenModelDir())[3].prompt_ids;
  const double vs_ref = MaxRelativeError(EngineLogits(*m.engine, prompt),
                                         ReferenceLogits(m.config, **expected_store, prompt), m.config.vocab_size);
  // FP8 rounds every projection to 3 mantissa bits: a different model from
  // golden's, so that comparison is printed, not asserted.
  std::printf("[family] fp8 projections: %.3g vs reference on the independently decoded weights (%.3g vs golden)\n",
              vs_ref, GoldenError(dir));
  EXPECT_LE(vs_ref, 1e-4);
}

TEST(GoldenConversions, MtpLayersAreSkipped) {
  json config = GoldenConfig();
  config["num_nextn_predict_layers"] = 1;
  std::vector<TensorToWrite> mtp;
  for (const std::string name : {"model.layers.4.eh_proj.weight", "model.layers.4.self_attn.q_a_proj.weight"}) {
    for (TensorToWrite& t : EncodeTensor(name, std::vector<float>(128 * 64, 0.5f), {128, 64}, DType::kBF16)) {
      mtp.push_back(t);
    }
  }
  const auto dir = Convert("golden_mtp", testing::GoldenModelDir(), config, DType::kF32, 0, mtp);
  Loaded with_mtp = Load(dir);
  Loaded golden = Load(testing::GoldenModelDir());
  const auto prompt = testing::LoadGoldenCases(testing::GoldenModelDir())[1].prompt_ids;
  EXPECT_EQ(EngineLogits(*with_mtp.engine, prompt), EngineLogits(*golden.engine, prompt));
}

}  // namespace
}  // namespace dmoe
