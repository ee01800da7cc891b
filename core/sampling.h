// Token sampling from a logits vector: greedy, temperature, top-k, top-p,
// min-p, per-request seeds and log-probabilities.
//
// Filter order:
//   1. temperature: logits / temperature (temperature == 0 means greedy:
//      argmax, lowest token id on ties; no filter and no RNG draw apply);
//   2. top-k: keep the k highest logits (ties broken by lower token id);
//   3. top-p: over the probabilities of what survived top-k, sorted
//      descending (ties by lower id), keep the shortest prefix whose mass is
//      >= top_p (always at least one token); sums are accumulated in double;
//   4. min-p: drop tokens whose probability is < min_p * p_max, where p_max
//      is the highest probability (the ratio is the same before and after
//      renormalizing, so it does not matter which distribution it is taken
//      from);
//   5. renormalize what is left and draw one token with the request's RNG.
//
// Reported log-probabilities are those of the model's distribution,
// log_softmax(logits), unmodified by temperature or the filters (vLLM's
// default "raw logprobs"): they measure what the model thinks of a token,
// independent of how the request chose to sample.
//
// Non-finite logits: NaN is treated as -inf (the token can never be drawn
// and its logprob is -inf). If some logit is +inf, the +inf tokens take all
// the mass: the lowest-id one is chosen and each reports -log(count of +inf
// tokens). If every logit is -inf or NaN, token 0 is chosen with logprob
// -inf. These fallbacks are greedy (they still advance the RNG by one draw
// when temperature > 0, like any other non-greedy sample).
#ifndef DMOE_CORE_SAMPLING_H_
#define DMOE_CORE_SAMPLING_H_

#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace dmoe {

inline constexpr int32_t kMaxTopLogprobs = 20;

struct SamplingParams {
  float temperature = 0.0f;  // >= 0, finite; 0 = greedy
  int32_t top_k = 0;         // >= 0; 0 = off (k >= vocab size is also off)
  float top_p = 1.0f;        // (0, 1]; 1 = off
  float min_p = 0.0f;        // [0, 1]; 0 = off
  // Per-request seed: the same seed and the same logits give the same tokens.
  uint64_t seed = 0;
  // How many of the most likely tokens to report with each sample
  // (0..kMaxTopLogprobs).
  int32_t top_logprobs = 0;
};

// OK, or INVALID_ARGUMENT naming the first bad field and its value:
// temperature negative, NaN or infinite; top_k < 0; top_p outside (0, 1];
// min_p outside [0, 1]; top_logprobs outside [0, kMaxTopLogprobs].
absl::Status ValidateSamplingParams(const SamplingParams& params);

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;  // under log_softmax(logits)
};

struct SampleResult {
  int32_t token = 0;
  float logprob = 0.0f;  // of `token`, under log_softmax(logits)
  // min(top_logprobs, vocab) most likely tokens under the model's
  // distribution, by descending logprob, ties by lower token id. Independent
  // of the chosen token (which may or may not be among them).
  std::vector<TokenLogprob> top;
};

// Samples the tokens of one request. Holds the request's RNG
// (std::mt19937_64 seeded with params.seed); every Sample with
// temperature > 0 consumes exactly one 64-bit output of it (greedy ones
// none), so the n-th sample's uniform draw depends on the seed and n alone,
// not on the logits. Scratch memory is thread-local and shared between
// samplers, so a Sampler holds only its params and RNG state (~2.5 KB).
// Not thread-safe: one request, one thread at a time.
class Sampler {
 public:
  // REQUIRES: ValidateSamplingParams(params).ok() (aborts otherwise).
  explicit Sampler(const SamplingParams& params);

  const SamplingParams& params() const { return params_; }

  // REQUIRES: logits non-empty, at most INT32_MAX entries (aborts otherwise).
  SampleResult Sample(absl::Span<const float> logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace dmoe

#endif  // DMOE_CORE_SAMPLING_H_
