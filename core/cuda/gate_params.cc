// GateParamsFor (kernels.h): a model's gate as the device gate's parameters.
#include "core/config.h"
#include "core/cuda/kernels.h"

namespace dmoe::cuda {

MoeGateParams GateParamsFor(const ModelConfig& c) {
  MoeGateParams g;
  g.num_experts = c.n_routed_experts;
  g.top_k = c.num_experts_per_tok;
  g.n_group = c.n_group;
  g.topk_group = c.topk_group;
  g.scoring = c.model_type == ModelType::kDeepseekV3 ? GateScoring::kSigmoid : GateScoring::kSoftmax;
  g.topk_method = c.topk_method == TopkMethod::kGreedy               ? GateTopk::kGreedy
                  : c.topk_method == TopkMethod::kGroupLimitedGreedy ? GateTopk::kGroupLimitedGreedy
                                                                     : GateTopk::kNoauxTc;
  g.renormalize = c.model_type == ModelType::kDeepseekV3 && c.norm_topk_prob;
  g.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  return g;
}

}  // namespace dmoe::cuda
