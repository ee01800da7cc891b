#include "core/generate.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace dmoe {
namespace {

// Sequence id used for one-off generations in a caller's cache.
constexpr SequenceId kGenerateSequence = -1;

}  // namespace

absl::StatusOr<GenerateResult> Generate(const Engine& engine, LatentCache& cache, ExpertBackend& experts,
                                        const std::vector<int32_t>& prompt, const GenerateOptions& options,
                                        const std::function<void(const SampleResult&)>& on_token) {
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  if (options.max_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens = ", options.max_tokens, " must be positive"));
  }
  DMOE_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  const ModelConfig& c = engine.config();
  const int64_t total = static_cast<int64_t>(prompt.size()) + options.max_tokens - 1;
  if (total > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", prompt.size(), " tokens + max_tokens ",
                                                   options.max_tokens, " exceeds the context of ",
                                                   c.max_position_embeddings, " positions"));
  }
  const SequenceId seq = kGenerateSequence;
  cache.Free(seq);
  struct FreeAtExit {
    LatentCache& cache;
    SequenceId seq;
    ~FreeAtExit() { cache.Free(seq); }
  } free_at_exit{cache, seq};

  Sampler sampler(options.sampling);
  GenerateResult result;
  const int64_t chunk = options.prefill_chunk > 0 ? options.prefill_chunk : static_cast<int64_t>(prompt.size());
  std::vector<float> last_logits;
  for (size_t begin = 0; begin < prompt.size(); begin += chunk) {
    const size_t end = std::min(prompt.size(), begin + static_cast<size_t>(chunk));
    StepSequence s{seq, std::vector<int32_t>(prompt.begin() + begin, prompt.begin() + end), false};
    DMOE_ASSIGN_OR_RETURN(std::vector<SequenceLogits> out, engine.Step({s}, cache, experts));
    last_logits = std::move(out[0].logits);
  }
  for (int64_t n = 0; n < options.max_tokens; ++n) {
    SampleResult sample = sampler.Sample(last_logits);
    result.ids.push_back(sample.token);
    if (on_token) on_token(sample);
    result.samples.push_back(std::move(sample));
    if (options.stop_at_eos && c.IsEos(result.ids.back())) {
      result.stopped_at_eos = true;
      break;
    }
    if (n + 1 == options.max_tokens) break;
    StepSequence s{seq, {result.ids.back()}, false};
    DMOE_ASSIGN_OR_RETURN(std::vector<SequenceLogits> out, engine.Step({s}, cache, experts));
    last_logits = std::move(out[0].logits);
  }
  return result;
}

}  // namespace dmoe
