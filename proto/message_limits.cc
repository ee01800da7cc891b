#include "proto/message_limits.h"

#include <algorithm>
#include <limits>

namespace dmoe {
namespace {

// Worst-case bytes on the wire (tag, length and varint bytes included).
constexpr int64_t kFixedBytes = int64_t{64} << 10;  // headers, ids, scalars, node addresses
constexpr int64_t kTokenBytes = 6;                   // a packed int32 token id
// A StepSequence's other fields, its free_sequences entry, and its
// SampledTokenResult with the top 20 logprobs (kMaxTopLogprobs).
constexpr int64_t kSequenceBytes = 96 + 11 + 32 + 21 * 16;
// Per (layer, expert): a serving bias (float) and a token count (int64).
constexpr int64_t kExpertSlotBytes = 5 + 11;

}  // namespace

int ControlMessageLimit(int64_t num_layers, int64_t n_routed_experts, int64_t step_tokens, int64_t sequences) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  // Each count is capped first so that the sum cannot overflow.
  auto capped = [](int64_t n, int bits) { return std::clamp<int64_t>(n, 0, int64_t{1} << bits); };
  const int64_t bytes = kFixedBytes + capped(step_tokens, 31) * kTokenBytes + capped(sequences, 31) * kSequenceBytes +
                        capped(num_layers, 24) * capped(n_routed_experts, 24) * kExpertSlotBytes;
  return static_cast<int>(std::min(kMax, 2 * bytes));
}

}  // namespace dmoe
