// An independent, deliberately naive float64 implementation of
// MODEL_SPEC.md section 3 (expanded MLA only, per-token loops), used to
// check the engine on checkpoints the golden data does not cover.
#ifndef DMOE_TESTS_CORE_REFERENCE_MODEL_H_
#define DMOE_TESTS_CORE_REFERENCE_MODEL_H_

#include <cstdint>
#include <vector>

#include "core/config.h"
#include "core/safetensors.h"

namespace dmoe::testing {

// Logits [ids.size(), vocab] for every position, as float.
std::vector<float> ReferenceLogits(const ModelConfig& config, const TensorStore& store,
                                   const std::vector<int32_t>& ids);

// The reference gate for one token (MODEL_SPEC.md 3.7), in float64:
// returns the chosen experts (ascending) and their weights.
void ReferenceGate(const ModelConfig& config, const std::vector<double>& router_logits,
                   const std::vector<double>& correction_bias, std::vector<int>& experts,
                   std::vector<double>& weights);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_CORE_REFERENCE_MODEL_H_
