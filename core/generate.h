// Single-sequence generation: prefill, then decode over the latent cache
// (MODEL_SPEC.md 4). The cluster's scheduler does the same per request,
// batched; this is the one-process form used by `dmoe generate`.
#ifndef DMOE_CORE_GENERATE_H_
#define DMOE_CORE_GENERATE_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "core/sampling.h"

namespace dmoe {

struct GenerateOptions {
  int64_t max_tokens = 16;
  SamplingParams sampling;
  bool stop_at_eos = true;
  // Prefill runs in chunks of at most this many tokens (0: one pass).
  int64_t prefill_chunk = 0;
};

struct GenerateResult {
  std::vector<int32_t> ids;  // generated tokens only (EOS included when hit)
  std::vector<SampleResult> samples;
  bool stopped_at_eos = false;
};

// Generates from `prompt` (fed as given, from position 0) in a fresh
// sequence of `cache`, freeing it at the end. `on_token` (optional) sees
// each sampled token as it is produced.
absl::StatusOr<GenerateResult> Generate(const Engine& engine, LatentCache& cache, ExpertBackend& experts,
                                        const std::vector<int32_t>& prompt, const GenerateOptions& options,
                                        const std::function<void(const SampleResult&)>& on_token = nullptr);

}  // namespace dmoe

#endif  // DMOE_CORE_GENERATE_H_
