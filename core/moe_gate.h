// The MoE gate: scores, top-k selection and routing weights for one token
// (MODEL_SPEC.md 3.7), in float32.
#ifndef DMOE_CORE_MOE_GATE_H_
#define DMOE_CORE_MOE_GATE_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "core/config.h"

namespace dmoe {

// Immutable; safe to share across threads.
class MoeGate {
 public:
  explicit MoeGate(const ModelConfig& config);

  int64_t num_experts() const { return num_experts_; }
  int64_t top_k() const { return top_k_; }

  // Routes one token from its router logits z = W_router x ([E]).
  // `e_score_correction_bias` (v3, trained) and `serving_bias` (dmoe's
  // balancer; empty = none) shift the selection score only; the weights use
  // the unbiased scores. Writes top_k experts in descending selection-score
  // order (ties: lower index first) and their weights.
  void Route(absl::Span<const float> router_logits, absl::Span<const float> e_score_correction_bias,
             absl::Span<const float> serving_bias, int32_t* topk_idx, float* topk_weights) const;

 private:
  ModelType model_type_;
  TopkMethod topk_method_;
  int64_t num_experts_, top_k_, n_group_, topk_group_;
  bool norm_topk_prob_;
  float routed_scaling_factor_;
};

}  // namespace dmoe

#endif  // DMOE_CORE_MOE_GATE_H_
