// Multi-Head Latent Attention over the paged latent cache (MODEL_SPEC.md
// 3.3 expanded form, 3.5 absorbed form).
#ifndef DMOE_CORE_MLA_H_
#define DMOE_CORE_MLA_H_

#include <cstdint>
#include <vector>

#include "core/config.h"
#include "core/latent_cache.h"
#include "core/model_weights.h"
#include "core/rope.h"

namespace dmoe {

// Which MLA form computes a sequence's attention. kAuto: expanded for
// chunks of several tokens (prefill), absorbed for single tokens (decode).
enum class MlaForm { kAuto, kExpanded, kAbsorbed };

// One sequence's tokens in a step: rows [row_begin, row_begin + num_tokens)
// of the step's activations, at positions [start_pos, start_pos + num_tokens).
struct MlaSequence {
  SequenceId seq = 0;
  int64_t row_begin = 0;
  int64_t num_tokens = 0;
  int64_t start_pos = 0;
};

// Computes out[n, D] = MLA(h[n, D]) for one layer, writing every token's
// latent cache entry (normalized latent + roped key) first.
// REQUIRES: the cache holds start_pos + num_tokens positions for each
// sequence. Sequences never interact.
void MlaForward(const ModelConfig& config, const AttentionWeights& weights, const Rope& rope, int64_t layer,
                const std::vector<MlaSequence>& sequences, MlaForm form, const float* h, int64_t n,
                LatentCache& cache, float* out);

}  // namespace dmoe

#endif  // DMOE_CORE_MLA_H_
