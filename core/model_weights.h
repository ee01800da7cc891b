// The weights of a DeepSeek-V2/V3 model in the CPU backend's layout
// (MODEL_SPEC.md 2.3), loaded from a checkpoint directory.
#ifndef DMOE_CORE_MODEL_WEIGHTS_H_
#define DMOE_CORE_MODEL_WEIGHTS_H_

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/safetensors.h"
#include "core/tensor.h"

namespace dmoe {

struct MlpWeights {
  Matrix gate_proj;  // [I, D]
  Matrix up_proj;    // [I, D]
  Matrix down_proj;  // [D, I]
  bool loaded() const { return !gate_proj.empty(); }
  int64_t bytes() const { return gate_proj.bytes() + up_proj.bytes() + down_proj.bytes(); }
};

struct AttentionWeights {
  Matrix q_proj;                     // [H*dq, D], when q_lora_rank is null
  Matrix q_a_proj;                   // [rq, D]
  std::vector<float> q_a_layernorm;  // [rq]
  Matrix q_b_proj;                   // [H*dq, rq]
  Matrix kv_a_proj_with_mqa;         // [r + dr, D]
  std::vector<float> kv_a_layernorm; // [r]
  Matrix kv_b_proj;                  // [H*(dn+dv), r]
  Matrix w_uk_t;                     // [H*r, dn]: W_UK[h]^T stacked, for the absorbed form (3.5)
  Matrix o_proj;                     // [D, H*dv]
};

struct MoeWeights {
  Matrix router;                                // mlp.gate.weight [E, D], always F32
  std::vector<float> e_score_correction_bias;   // [E] (v3), empty otherwise
  std::vector<MlpWeights> experts;              // [E]; unloaded entries are empty
  MlpWeights shared_experts;                    // width S * moe_intermediate_size, if S > 0
};

struct LayerWeights {
  std::vector<float> input_layernorm;
  std::vector<float> post_attention_layernorm;
  AttentionWeights attn;
  MlpWeights mlp;  // dense layers
  MoeWeights moe;  // MoE layers
};

// Which weights a process loads: an attention node everything but the
// routed experts, an expert node only its expert shard.
struct WeightSelection {
  bool non_expert = true;
  // Routed experts to load; null: all of them.
  std::function<bool(int64_t layer, int64_t expert)> routed_expert;
  static WeightSelection All() { return {}; }
  static WeightSelection NonExpertOnly() {
    return {true, [](int64_t, int64_t) { return false; }};
  }
};

// Immutable after Load; safe to share across threads.
struct ModelWeights {
  ModelConfig config;
  Matrix embed_tokens;      // [V, D]
  std::vector<float> norm;  // [D]
  Matrix lm_head;           // [V, D] (embed_tokens when tied)
  std::vector<LayerWeights> layers;
  int64_t routed_experts_loaded = 0;
  int64_t routed_expert_bytes = 0;
  int64_t total_bytes = 0;

  // Loads config.json and the safetensors files of `model_dir`. Shows
  // progress for large checkpoints; skips layers >= num_hidden_layers (MTP)
  // with one log line. Errors name the file and the tensor.
  static absl::StatusOr<std::shared_ptr<const ModelWeights>> Load(
      const std::filesystem::path& model_dir, const WeightSelection& selection = WeightSelection::All());
  static absl::StatusOr<std::shared_ptr<const ModelWeights>> Load(
      const ModelConfig& config, const TensorStore& store, const WeightSelection& selection);
};

}  // namespace dmoe

#endif  // DMOE_CORE_MODEL_WEIGHTS_H_
