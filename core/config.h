// config.json of the DeepSeek-V2 / V3 family (MODEL_SPEC.md section 1).
#ifndef DMOE_CORE_CONFIG_H_
#define DMOE_CORE_CONFIG_H_

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe {

enum class ModelType { kDeepseekV2, kDeepseekV3 };
enum class ScoringFunc { kSoftmax, kSigmoid };
enum class TopkMethod { kGreedy, kGroupLimitedGreedy, kNoauxTc };

// RoPE frequencies and magnitudes, resolved from rope_theta / rope_scaling
// (MODEL_SPEC.md 3.4).
struct RopeScaling {
  bool yarn = false;
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  std::optional<double> mscale;
  std::optional<double> mscale_all_dim;
  std::optional<double> attention_factor;
  bool truncate = true;
};

// Every field the math depends on, with the defaults transformers fills in.
// Names are the config.json keys. Immutable after parsing.
struct ModelConfig {
  ModelType model_type = ModelType::kDeepseekV3;
  std::string model_type_name;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t moe_intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t q_lora_rank = 0;  // 0: no query compression (q_proj)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t n_routed_experts = 0;     // 0: no MoE, every layer dense
  int64_t num_experts_per_tok = 0;
  int64_t n_shared_experts = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  TopkMethod topk_method = TopkMethod::kNoauxTc;
  ScoringFunc scoring_func = ScoringFunc::kSigmoid;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  int64_t first_k_dense_replace = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool rope_interleave = true;
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 0;
  std::vector<int64_t> eos_token_ids;
  // quantization_config.weight_block_size of FP8 checkpoints.
  std::optional<std::array<int64_t, 2>> fp8_weight_block_size;
  int64_t num_nextn_predict_layers = 0;

  bool has_moe() const { return n_routed_experts > 0 && num_experts_per_tok > 0; }
  bool is_moe_layer(int64_t layer) const { return has_moe() && layer >= first_k_dense_replace; }
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Values per token per layer in the latent cache: kv_lora_rank + qk_rope_head_dim.
  int64_t latent_entry_width() const { return kv_lora_rank + qk_rope_head_dim; }
  bool IsEos(int64_t token) const;

  // Parses and validates config.json text. Errors are INVALID_ARGUMENT
  // naming the field and the value.
  static absl::StatusOr<ModelConfig> FromJson(const std::string& json_text);
  // Reads <model_dir>/config.json; errors name the file.
  static absl::StatusOr<ModelConfig> Load(const std::filesystem::path& model_dir);
};

}  // namespace dmoe

#endif  // DMOE_CORE_CONFIG_H_
