// Fuzzes config.json parsing and validation: any text parses into a config
// that satisfies the invariants the forward pass relies on, or fails with
// INVALID_ARGUMENT.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/config.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<dmoe::ModelConfig> c = dmoe::ModelConfig::FromJson(text);
  if (!c.ok()) {
    FUZZ_CHECK(c.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  FUZZ_CHECK(c->vocab_size > 0 && c->hidden_size > 0 && c->num_hidden_layers > 0);
  FUZZ_CHECK(c->num_attention_heads > 0 && c->kv_lora_rank > 0 && c->v_head_dim > 0);
  FUZZ_CHECK(c->qk_nope_head_dim > 0 && c->qk_rope_head_dim > 0 && c->qk_rope_head_dim % 2 == 0);
  FUZZ_CHECK(c->max_position_embeddings > 0 && c->q_lora_rank >= 0);
  FUZZ_CHECK(c->rms_norm_eps > 0 && c->rope_theta > 0);
  FUZZ_CHECK(!c->eos_token_ids.empty());
  if (c->has_moe()) {
    FUZZ_CHECK(c->num_experts_per_tok <= c->n_routed_experts);
    FUZZ_CHECK(c->moe_intermediate_size > 0 && c->n_shared_experts >= 0);
    if (c->topk_method != dmoe::TopkMethod::kGreedy) {
      FUZZ_CHECK(c->n_group > 0 && c->n_routed_experts % c->n_group == 0);
      FUZZ_CHECK(c->topk_group >= 1 && c->topk_group <= c->n_group);
    }
  }
  if (c->rope_scaling.yarn) {
    FUZZ_CHECK(c->rope_scaling.factor > 0 && c->rope_scaling.original_max_position_embeddings > 0);
  }
  (void)c->latent_entry_width();
  (void)c->qk_head_dim();
  for (int64_t layer = 0; layer < 4; ++layer) (void)c->is_moe_layer(layer);
  return 0;
}
