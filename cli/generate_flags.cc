#include "cli/generate_flags.h"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace dmoe::cli {

absl::StatusOr<GenerateFlags> ParseGenerateFlags(const Flags& flags) {
  GenerateFlags g;
  DMOE_ASSIGN_OR_RETURN(g.max_tokens, flags.GetInt("max-tokens", 16));
  DMOE_ASSIGN_OR_RETURN(double temperature, flags.GetDouble("temperature", 0.0));
  DMOE_ASSIGN_OR_RETURN(double top_p, flags.GetDouble("top-p", 1.0));
  DMOE_ASSIGN_OR_RETURN(int64_t top_k, flags.GetInt("top-k", 0));
  DMOE_ASSIGN_OR_RETURN(double min_p, flags.GetDouble("min-p", 0.0));
  DMOE_ASSIGN_OR_RETURN(int64_t seed, flags.GetInt("seed", 0));
  g.sampling.temperature = static_cast<float>(temperature);
  g.sampling.top_p = static_cast<float>(top_p);
  g.sampling.top_k = static_cast<int32_t>(top_k);
  g.sampling.min_p = static_cast<float>(min_p);
  g.sampling.seed = static_cast<uint64_t>(seed);
  g.ignore_eos = flags.Has("ignore-eos");
  DMOE_RETURN_IF_ERROR(ValidateSamplingParams(g.sampling));
  if (g.max_tokens <= 0 || g.max_tokens > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("--max-tokens = ", g.max_tokens, " must be positive"));
  }
  return g;
}

}  // namespace dmoe::cli
