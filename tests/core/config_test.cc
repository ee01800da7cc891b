// config.json parsing, defaults and validation (MODEL_SPEC.md section 1).
#include "core/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using json = nlohmann::json;

std::string ReadText(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json GoldenJson() { return json::parse(ReadText(testing::GoldenModelDir() / "config.json")); }

ModelConfig ParseOk(const json& j) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(j.dump());
  EXPECT_TRUE(c.ok()) << c.status() << "\n" << j.dump();
  return c.ok() ? *c : ModelConfig();
}

// Parses `j`, expecting INVALID_ARGUMENT whose message has every one of `parts`.
void ExpectInvalid(const json& j, const std::vector<std::string>& parts) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(j.dump());
  ASSERT_FALSE(c.ok()) << "accepted: " << j.dump();
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  for (const std::string& p : parts) {
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(p)) << "input: " << j.dump();
  }
}

// ---- Golden config ----------------------------------------------------------

TEST(ModelConfigTest, GoldenConfigAllFields) {
  absl::StatusOr<ModelConfig> loaded = ModelConfig::Load(testing::GoldenModelDir());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const ModelConfig& c = *loaded;
  EXPECT_EQ(c.model_type, ModelType::kDeepseekV3);
  EXPECT_EQ(c.model_type_name, "deepseek_v3");
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.intermediate_size, 256);
  EXPECT_EQ(c.moe_intermediate_size, 64);
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.q_lora_rank, 64);
  EXPECT_EQ(c.kv_lora_rank, 32);
  EXPECT_EQ(c.qk_nope_head_dim, 16);
  EXPECT_EQ(c.qk_rope_head_dim, 8);
  EXPECT_EQ(c.v_head_dim, 16);
  EXPECT_EQ(c.qk_head_dim(), 24);
  EXPECT_EQ(c.latent_entry_width(), 40);
  EXPECT_EQ(c.n_routed_experts, 16);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(c.scoring_func, ScoringFunc::kSigmoid);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_TRUE(c.rope_scaling.yarn);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
  EXPECT_DOUBLE_EQ(c.rope_scaling.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.beta_slow, 1.0);
  ASSERT_TRUE(c.rope_scaling.mscale.has_value());
  EXPECT_DOUBLE_EQ(*c.rope_scaling.mscale, 1.0);
  ASSERT_TRUE(c.rope_scaling.mscale_all_dim.has_value());
  EXPECT_DOUBLE_EQ(*c.rope_scaling.mscale_all_dim, 1.0);
  EXPECT_FALSE(c.rope_scaling.attention_factor.has_value());
  EXPECT_TRUE(c.rope_scaling.truncate);
  EXPECT_TRUE(c.rope_interleave);
  EXPECT_EQ(c.max_position_embeddings, 256);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(1));
  EXPECT_TRUE(c.IsEos(1));
  EXPECT_FALSE(c.IsEos(0));
  EXPECT_EQ(c.num_nextn_predict_layers, 0);
  EXPECT_FALSE(c.fp8_weight_block_size.has_value());
  EXPECT_TRUE(c.has_moe());
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(3));
}

TEST(ModelConfigTest, FromJsonEqualsLoad) {
  const ModelConfig a = ParseOk(GoldenJson());
  EXPECT_EQ(a.hidden_size, 128);
  EXPECT_DOUBLE_EQ(a.rope_scaling.factor, 4.0);
}

TEST(ModelConfigTest, LoadMissingDirIsNotFoundNamingPath) {
  const std::filesystem::path dir = testing::ScratchDir("config_missing") / "no_such_model";
  absl::StatusOr<ModelConfig> c = ModelConfig::Load(dir);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound) << c.status();
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(dir.string()));
}

TEST(ModelConfigTest, LoadInvalidConfigNamesFile) {
  const std::filesystem::path dir = testing::ScratchDir("config_bad");
  json j = GoldenJson();
  j["hidden_act"] = "gelu";
  std::ofstream(dir / "config.json") << j.dump();
  absl::StatusOr<ModelConfig> c = ModelConfig::Load(dir);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_THAT(std::string(c.status().message()),
              AllOf(HasSubstr((dir / "config.json").string()), HasSubstr("hidden_act"), HasSubstr("gelu")));
}

// ---- Defaults -----------------------------------------------------------------

TEST(ModelConfigTest, DefaultsDeepseekV3) {
  const ModelConfig c = ParseOk(json{{"model_type", "deepseek_v3"}});
  EXPECT_EQ(c.model_type, ModelType::kDeepseekV3);
  EXPECT_EQ(c.vocab_size, 129280);
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.intermediate_size, 18432);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.num_hidden_layers, 61);
  EXPECT_EQ(c.num_attention_heads, 128);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(c.scoring_func, ScoringFunc::kSigmoid);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.first_k_dense_replace, 3);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.rope_scaling.yarn);
  EXPECT_TRUE(c.rope_interleave);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(1));
  EXPECT_FALSE(c.fp8_weight_block_size.has_value());
  EXPECT_TRUE(c.has_moe());
  EXPECT_FALSE(c.is_moe_layer(2));
  EXPECT_TRUE(c.is_moe_layer(3));
}

TEST(ModelConfigTest, DefaultsDeepseekV2) {
  const ModelConfig c = ParseOk(json{{"model_type", "deepseek_v2"}});
  EXPECT_EQ(c.model_type, ModelType::kDeepseekV2);
  EXPECT_EQ(c.model_type_name, "deepseek_v2");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 11008);
  EXPECT_EQ(c.moe_intermediate_size, 1407);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.topk_method, TopkMethod::kGreedy);
  EXPECT_EQ(c.scoring_func, ScoringFunc::kSoftmax);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 1.0);
  EXPECT_EQ(c.first_k_dense_replace, 0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.rope_scaling.yarn);
  EXPECT_TRUE(c.rope_interleave);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(2));
  // num_experts_per_tok defaults to null for deepseek_v2: no MoE.
  EXPECT_FALSE(c.has_moe());
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_FALSE(c.is_moe_layer(31));
}

TEST(ModelConfigTest, DeepseekV2WithExperts) {
  const ModelConfig c = ParseOk(json{{"model_type", "deepseek_v2"},
                                     {"n_routed_experts", 64},
                                     {"num_experts_per_tok", 6},
                                     {"first_k_dense_replace", 1}});
  EXPECT_TRUE(c.has_moe());
  EXPECT_EQ(c.n_routed_experts, 64);
  EXPECT_EQ(c.num_experts_per_tok, 6);
  EXPECT_EQ(c.topk_method, TopkMethod::kGreedy);
  EXPECT_EQ(c.scoring_func, ScoringFunc::kSoftmax);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 1.0);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));

  const ModelConfig g = ParseOk(json{{"model_type", "deepseek_v2"},
                                     {"n_routed_experts", 160},
                                     {"num_experts_per_tok", 6},
                                     {"n_group", 8},
                                     {"topk_group", 3},
                                     {"topk_method", "group_limited_greedy"},
                                     {"routed_scaling_factor", 16.0}});
  EXPECT_EQ(g.topk_method, TopkMethod::kGroupLimitedGreedy);
  EXPECT_EQ(g.n_group, 8);
  EXPECT_EQ(g.topk_group, 3);
  EXPECT_DOUBLE_EQ(g.routed_scaling_factor, 16.0);
}

TEST(ModelConfigTest, NullQLoraRankMeansNoCompression) {
  json j = GoldenJson();
  j["q_lora_rank"] = nullptr;
  EXPECT_EQ(ParseOk(j).q_lora_rank, 0);
  json v2 = {{"model_type", "deepseek_v2"}, {"q_lora_rank", nullptr}};
  EXPECT_EQ(ParseOk(v2).q_lora_rank, 0);
}

TEST(ModelConfigTest, NullExpertsMeansNoMoe) {
  json j = GoldenJson();
  j["n_routed_experts"] = nullptr;
  const ModelConfig c = ParseOk(j);
  EXPECT_FALSE(c.has_moe());
  for (int l = 0; l < 4; ++l) EXPECT_FALSE(c.is_moe_layer(l)) << l;

  json k = GoldenJson();
  k["num_experts_per_tok"] = nullptr;
  const ModelConfig d = ParseOk(k);
  EXPECT_FALSE(d.has_moe());
  EXPECT_FALSE(d.is_moe_layer(3));
}

TEST(ModelConfigTest, NullKeyValueHeadsMeansH) {
  json j = GoldenJson();
  j["num_key_value_heads"] = nullptr;
  EXPECT_EQ(ParseOk(j).num_attention_heads, 4);
  j.erase("num_key_value_heads");
  EXPECT_EQ(ParseOk(j).num_attention_heads, 4);
}

// MODEL_SPEC table: n_shared_experts "0 or null: none".
TEST(ModelConfigTest, SharedExpertsZeroOrNullMeansNone) {
  json j = GoldenJson();
  j["n_shared_experts"] = 0;
  EXPECT_EQ(ParseOk(j).n_shared_experts, 0);
  j["n_shared_experts"] = nullptr;
  EXPECT_EQ(ParseOk(j).n_shared_experts, 0) << "n_shared_experts: null must mean no shared experts";
  json v2 = {{"model_type", "deepseek_v2"}, {"n_shared_experts", nullptr}};
  EXPECT_EQ(ParseOk(v2).n_shared_experts, 0) << "n_shared_experts: null must mean no shared experts";
}

TEST(ModelConfigTest, EosTokenIdList) {
  json j = GoldenJson();
  j["eos_token_id"] = {1, 7, 300};
  const ModelConfig c = ParseOk(j);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(1, 7, 300));
  EXPECT_TRUE(c.IsEos(7));
  EXPECT_TRUE(c.IsEos(300));
  EXPECT_FALSE(c.IsEos(2));
}

TEST(ModelConfigTest, OtherKeysParsed) {
  json j = GoldenJson();
  j["tie_word_embeddings"] = true;
  j["rope_interleave"] = false;
  j["num_nextn_predict_layers"] = 1;
  j["bos_token_id"] = 5;
  j["rms_norm_eps"] = 1e-5;
  j["torch_dtype"] = "bfloat16";
  j["aux_loss_alpha"] = 0.001;
  j["mlp_bias"] = false;
  j["attention_bias"] = false;
  const ModelConfig c = ParseOk(j);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.rope_interleave);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_EQ(c.bos_token_id, 5);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
}

// ---- RoPE scaling ---------------------------------------------------------------

TEST(ModelConfigTest, RopeScalingNullOrDefaultIsNone) {
  json j = GoldenJson();
  j["rope_scaling"] = nullptr;
  EXPECT_FALSE(ParseOk(j).rope_scaling.yarn);
  j["rope_scaling"] = {{"type", "default"}};
  EXPECT_FALSE(ParseOk(j).rope_scaling.yarn);
  j.erase("rope_scaling");
  EXPECT_FALSE(ParseOk(j).rope_scaling.yarn);
}

TEST(ModelConfigTest, RopeParametersKeyMeansTheSame) {
  json j = GoldenJson();
  json rs = j["rope_scaling"];
  j.erase("rope_scaling");
  rs.erase("type");
  rs["rope_type"] = "yarn";
  rs["rope_theta"] = 50000.0;
  j["rope_parameters"] = rs;
  const ModelConfig c = ParseOk(j);
  EXPECT_TRUE(c.rope_scaling.yarn);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
  EXPECT_DOUBLE_EQ(*c.rope_scaling.mscale, 1.0);
  EXPECT_DOUBLE_EQ(*c.rope_scaling.mscale_all_dim, 1.0);
  // rope_theta inside the dict overrides the top-level one (10000).
  EXPECT_DOUBLE_EQ(c.rope_theta, 50000.0);
}

TEST(ModelConfigTest, RopeParametersDefaultWithTheta) {
  json j = GoldenJson();
  j.erase("rope_scaling");
  j["rope_theta"] = 10000.0;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 123456.0}};
  const ModelConfig c = ParseOk(j);
  EXPECT_FALSE(c.rope_scaling.yarn);
  EXPECT_DOUBLE_EQ(c.rope_theta, 123456.0);
}

TEST(ModelConfigTest, RopeThetaInsideRopeScalingOverridesTopLevel) {
  json j = GoldenJson();
  j["rope_theta"] = 10000.0;
  j["rope_scaling"]["rope_theta"] = 20000.0;
  EXPECT_DOUBLE_EQ(ParseOk(j).rope_theta, 20000.0);
}

TEST(ModelConfigTest, RopeTypeWinsOverType) {
  json j = GoldenJson();
  j["rope_scaling"]["type"] = "linear";
  j["rope_scaling"]["rope_type"] = "yarn";
  EXPECT_TRUE(ParseOk(j).rope_scaling.yarn);

  json k = GoldenJson();
  k["rope_scaling"]["type"] = "yarn";
  k["rope_scaling"]["rope_type"] = "default";
  EXPECT_FALSE(ParseOk(k).rope_scaling.yarn);
}

TEST(ModelConfigTest, YarnFactorFallsBackToPositionRatio) {
  json j = GoldenJson();
  j["rope_scaling"].erase("factor");
  j["max_position_embeddings"] = 1000;
  const ModelConfig c = ParseOk(j);
  EXPECT_TRUE(c.rope_scaling.yarn);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 1000.0 / 64.0);

  json k = GoldenJson();
  k["rope_scaling"]["factor"] = nullptr;
  EXPECT_DOUBLE_EQ(ParseOk(k).rope_scaling.factor, 256.0 / 64.0);
}

TEST(ModelConfigTest, YarnOptionalFields) {
  json j = GoldenJson();
  j["rope_scaling"] = {{"type", "yarn"},
                       {"factor", 40},
                       {"original_max_position_embeddings", 4096},
                       {"beta_fast", nullptr},
                       {"beta_slow", 0},
                       {"mscale", 0.707},
                       {"attention_factor", 1.25},
                       {"truncate", false}};
  const ModelConfig c = ParseOk(j);
  const RopeScaling& y = c.rope_scaling;
  EXPECT_TRUE(y.yarn);
  EXPECT_DOUBLE_EQ(y.factor, 40.0);
  EXPECT_EQ(y.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(y.beta_fast, 32.0);  // null -> default
  EXPECT_DOUBLE_EQ(y.beta_slow, 1.0);   // 0 -> default
  ASSERT_TRUE(y.mscale.has_value());
  EXPECT_DOUBLE_EQ(*y.mscale, 0.707);
  EXPECT_FALSE(y.mscale_all_dim.has_value());
  ASSERT_TRUE(y.attention_factor.has_value());
  EXPECT_DOUBLE_EQ(*y.attention_factor, 1.25);
  EXPECT_FALSE(y.truncate);

  json k = GoldenJson();
  k["rope_scaling"]["beta_fast"] = 16;
  k["rope_scaling"]["beta_slow"] = 2;
  EXPECT_DOUBLE_EQ(ParseOk(k).rope_scaling.beta_fast, 16.0);
  EXPECT_DOUBLE_EQ(ParseOk(k).rope_scaling.beta_slow, 2.0);
}

// ---- quantization_config -----------------------------------------------------------

TEST(ModelConfigTest, Fp8QuantizationConfig) {
  json j = GoldenJson();
  j["quantization_config"] = {{"quant_method", "fp8"},
                              {"fmt", "e4m3"},
                              {"weight_block_size", {64, 32}},
                              {"activation_scheme", "dynamic"}};
  const ModelConfig c = ParseOk(j);
  ASSERT_TRUE(c.fp8_weight_block_size.has_value());
  EXPECT_EQ((*c.fp8_weight_block_size)[0], 64);
  EXPECT_EQ((*c.fp8_weight_block_size)[1], 32);

  j["quantization_config"].erase("weight_block_size");
  const ModelConfig d = ParseOk(j);
  ASSERT_TRUE(d.fp8_weight_block_size.has_value());
  EXPECT_EQ((*d.fp8_weight_block_size)[0], 128);
  EXPECT_EQ((*d.fp8_weight_block_size)[1], 128);
}

// ---- Rejections --------------------------------------------------------------------

TEST(ModelConfigRejectTest, UnknownModelType) {
  json j = GoldenJson();
  j["model_type"] = "llama";
  ExpectInvalid(j, {"model_type", "llama"});
}

TEST(ModelConfigRejectTest, MissingModelType) {
  json j = GoldenJson();
  j.erase("model_type");
  ExpectInvalid(j, {"model_type"});
}

TEST(ModelConfigRejectTest, V3ScoringSoftmax) {
  json j = GoldenJson();
  j["scoring_func"] = "softmax";
  ExpectInvalid(j, {"scoring_func", "softmax"});
}

TEST(ModelConfigRejectTest, V3TopkGreedy) {
  json j = GoldenJson();
  j["topk_method"] = "greedy";
  ExpectInvalid(j, {"topk_method", "greedy"});
}

TEST(ModelConfigRejectTest, V2ScoringSigmoid) {
  ExpectInvalid(json{{"model_type", "deepseek_v2"}, {"scoring_func", "sigmoid"}}, {"scoring_func", "sigmoid"});
}

TEST(ModelConfigRejectTest, V2TopkNoauxTc) {
  ExpectInvalid(json{{"model_type", "deepseek_v2"}, {"topk_method", "noaux_tc"}}, {"topk_method", "noaux_tc"});
}

TEST(ModelConfigRejectTest, V2NormTopkProbTrue) {
  ExpectInvalid(json{{"model_type", "deepseek_v2"}, {"norm_topk_prob", true}}, {"norm_topk_prob", "true"});
}

TEST(ModelConfigRejectTest, HiddenActGelu) {
  json j = GoldenJson();
  j["hidden_act"] = "gelu";
  ExpectInvalid(j, {"hidden_act", "gelu"});
}

TEST(ModelConfigRejectTest, RopeTypeLinear) {
  json j = GoldenJson();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  ExpectInvalid(j, {"rope_scaling", "linear"});
  json k = GoldenJson();
  k.erase("rope_scaling");
  k["rope_parameters"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  ExpectInvalid(k, {"rope_", "dynamic"});
}

TEST(ModelConfigRejectTest, ExpertsNotDivisibleByGroups) {
  json j = GoldenJson();  // n_group 4, topk_group 2, k 4
  j["n_routed_experts"] = 10;
  ExpectInvalid(j, {"n_routed_experts", "10", "n_group"});
}

TEST(ModelConfigRejectTest, TopkGroupZero) {
  json j = GoldenJson();
  j["topk_group"] = 0;
  ExpectInvalid(j, {"topk_group", "0"});
}

TEST(ModelConfigRejectTest, TopkGroupAboveNGroup) {
  json j = GoldenJson();
  j["topk_group"] = 5;
  ExpectInvalid(j, {"topk_group", "5"});
}

TEST(ModelConfigRejectTest, TooFewExpertsInSelectedGroups) {
  json j = GoldenJson();  // E 16, G 4: 4 experts per group
  j["topk_group"] = 1;
  j["num_experts_per_tok"] = 5;  // 1 * 16 / 4 = 4 < 5
  ExpectInvalid(j, {"topk_group", "1", "num_experts_per_tok"});
  j["num_experts_per_tok"] = 4;  // 4 >= 4: fine
  ParseOk(j);
}

TEST(ModelConfigRejectTest, NoauxTcNeedsTwoExpertsPerGroup) {
  json j = GoldenJson();
  j["n_group"] = 16;  // 16 experts / 16 groups = 1 per group
  j["topk_group"] = 4;
  ExpectInvalid(j, {"n_group", "16"});
  j["n_group"] = 8;  // 2 per group is enough
  ParseOk(j);
}

TEST(ModelConfigRejectTest, KeyValueHeadsDiffer) {
  json j = GoldenJson();
  j["num_key_value_heads"] = 2;
  ExpectInvalid(j, {"num_key_value_heads", "2"});
}

TEST(ModelConfigRejectTest, MoeLayerFreq) {
  json j = GoldenJson();
  j["moe_layer_freq"] = 2;
  ExpectInvalid(j, {"moe_layer_freq", "2"});
}

TEST(ModelConfigRejectTest, AttentionBias) {
  json j = GoldenJson();
  j["attention_bias"] = true;
  ExpectInvalid(j, {"attention_bias", "true"});
  json k = GoldenJson();
  k["mlp_bias"] = true;
  ExpectInvalid(k, {"mlp_bias", "true"});
}

TEST(ModelConfigRejectTest, OddRopeHeadDim) {
  json j = GoldenJson();
  j["qk_rope_head_dim"] = 7;
  ExpectInvalid(j, {"qk_rope_head_dim", "7"});
}

TEST(ModelConfigRejectTest, YarnWithoutOriginalMaxPositions) {
  json j = GoldenJson();
  j["rope_scaling"].erase("original_max_position_embeddings");
  ExpectInvalid(j, {"original_max_position_embeddings"});
}

TEST(ModelConfigRejectTest, NotJson) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson("{\"model_type\": \"deepseek_v3\",");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  absl::StatusOr<ModelConfig> d = ModelConfig::FromJson("not json at all");
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
  absl::StatusOr<ModelConfig> e = ModelConfig::FromJson("[1, 2, 3]");
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
}

TEST(ModelConfigRejectTest, StringWhereIntExpected) {
  json j = GoldenJson();
  j["hidden_size"] = "big";
  ExpectInvalid(j, {"hidden_size", "big"});
  json k = GoldenJson();
  k["num_hidden_layers"] = 2.5;
  ExpectInvalid(k, {"num_hidden_layers", "2.5"});
  json m = GoldenJson();
  m["norm_topk_prob"] = "yes";
  ExpectInvalid(m, {"norm_topk_prob", "yes"});
}

TEST(ModelConfigRejectTest, QuantMethodAwq) {
  json j = GoldenJson();
  j["quantization_config"] = {{"quant_method", "awq"}, {"bits", 4}};
  ExpectInvalid(j, {"quant_method", "awq"});
}

TEST(ModelConfigRejectTest, BadWeightBlockSize) {
  json j = GoldenJson();
  j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128}}};
  ExpectInvalid(j, {"weight_block_size"});
}

// Found by tests/fuzz/config_fuzz: an integer written as a float beyond
// int64 (1e107) was cast to int64_t, which is undefined behaviour.
TEST(ModelConfigRejectTest, HugeFloatWhereIntExpected) {
  json j = GoldenJson();
  j["max_position_embeddings"] = 1.11e107;
  ExpectInvalid(j, {"max_position_embeddings", "expected an integer"});
  json k = GoldenJson();
  k["hidden_size"] = -9.3e18;
  ExpectInvalid(k, {"hidden_size"});
  json m = GoldenJson();
  m["vocab_size"] = 512.0;  // an integral float is still an integer
  EXPECT_EQ(ParseOk(m).vocab_size, 512);
}

TEST(ModelConfigRejectTest, SizesBeyondAnyModel) {
  json j = GoldenJson();
  j["vocab_size"] = uint64_t{18446744073709551615u};
  ExpectInvalid(j, {"vocab_size", "out of range"});
  json k = GoldenJson();
  k["hidden_size"] = int64_t{1} << 40;
  ExpectInvalid(k, {"hidden_size", "exceeds the limit"});
  json m = GoldenJson();
  m["q_lora_rank"] = int64_t{1} << 40;
  ExpectInvalid(m, {"q_lora_rank"});
}

}  // namespace
}  // namespace dmoe
