// The flags `dmoe generate` shares between its offline and --server forms:
// one parser, so both take the same defaults and give the same errors.
#ifndef DMOE_CLI_GENERATE_FLAGS_H_
#define DMOE_CLI_GENERATE_FLAGS_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "core/flags/flags.h"
#include "core/sampling.h"

namespace dmoe::cli {

// --max-tokens (default 16), --temperature, --top-p, --top-k, --min-p,
// --seed, --ignore-eos; checked (INVALID_ARGUMENT naming the flag).
struct GenerateFlags {
  int64_t max_tokens = 16;
  SamplingParams sampling;
  bool ignore_eos = false;
};
absl::StatusOr<GenerateFlags> ParseGenerateFlags(const Flags& flags);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_GENERATE_FLAGS_H_
