// The scheduler's view of a generation request and what it reports back:
// the plain C++ counterparts of dmoe.v1.GenerateRequest / GenerateResponse
// (proto/dmoe/v1/generation.proto). The gRPC server validates and maps the
// wire types; nothing here depends on protobuf.
#ifndef DMOE_SCHEDULER_REQUEST_H_
#define DMOE_SCHEDULER_REQUEST_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/sampling.h"

namespace dmoe::scheduler {

// Also the sequence id of the request's latent cache on its attention node.
using RequestId = int64_t;

struct Request {
  RequestId id = 0;
  // Fed as given from position 0. Non-empty.
  std::vector<int32_t> prompt;
  // Tokens to generate at most, >= 1; prompt + max_tokens <= context_length.
  int32_t max_tokens = 16;
  SamplingParams sampling;
  // Stop strings, matched on the generated text across token boundaries;
  // the matched string and anything after it are not part of the text.
  // Needs BatchScheduler::Options::tokenizer. Empty strings are ignored.
  std::vector<std::string> stop;
  // Stop after generating one of these (the token is part of the output).
  std::vector<int32_t> stop_token_ids;
  // The model's EOS ids (ModelConfig::eos_token_ids); generating one stops
  // the request (the token is part of the output) unless ignore_eos.
  std::vector<int64_t> eos_token_ids;
  bool ignore_eos = false;
  // When the server received it (informational: queue order is Submit order).
  absl::Time arrival = absl::InfinitePast();
  // The request finishes with kCancelled at the first PlanStep(now) with
  // now > deadline. InfiniteFuture: none.
  absl::Time deadline = absl::InfiniteFuture();
};

// One token an attention node sampled for a request.
struct SampledToken {
  RequestId id = 0;
  int32_t token = 0;
  float logprob = 0.0f;
  // The most likely alternatives (token, logprob), when asked for.
  std::vector<std::pair<int32_t, float>> top;
};

// FINISH_REASON_* of generation.proto.
enum class FinishReason {
  kStop,       // EOS, a stop token id or a stop string
  kLength,     // max_tokens or the model's context
  kCancelled,  // Cancel() or the deadline
  kError,      // see RequestEvent::error
};

std::string_view FinishReasonName(FinishReason reason);

// What happened to one request in one step: the GenerateResponse to stream.
struct RequestEvent {
  RequestId id = 0;
  // Tokens generated since the previous event (0 or 1 per step).
  std::vector<int32_t> new_tokens;
  std::vector<SampledToken> samples;  // one per new_tokens entry
  // Text safe to stream now: never splits a UTF-8 character and never holds
  // the beginning of a stop string. Always empty without a tokenizer.
  std::string text_delta;
  // Set on the last event of a request, and only there.
  bool finished = false;
  FinishReason reason = FinishReason::kStop;  // meaningful when finished
  // Why, for kError ("deadline exceeded" for a kCancelled deadline; empty for
  // Cancel() and normal ends).
  std::string error;
  // For kError: the status to end the request's call with (UNAVAILABLE when
  // a node it needed was lost, INTERNAL for a result that never came).
  absl::StatusCode error_code = absl::StatusCode::kInternal;
};

// See the lifecycle diagram in batch_scheduler.h.
enum class RequestState { kWaiting, kPrefill, kDecode, kFinished };

std::string_view RequestStateName(RequestState state);

// A snapshot of one request, for tests and metrics.
struct RequestView {
  RequestState state = RequestState::kWaiting;
  int node = -1;                 // attention node holding its cache; -1 while waiting
  int64_t length = 0;            // tokens reserved in that node's cache
  int64_t prompt_tokens = 0;     // of the original prompt
  int64_t generated_tokens = 0;  // sampled so far
  int64_t preemptions = 0;       // times its cache was dropped for recompute
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_REQUEST_H_
