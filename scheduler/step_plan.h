// One iteration of the cluster as the BatchScheduler planned it: per
// attention node, the sequences to free and the tokens to run. The server
// maps each NodeStep to a dmoe.v1.StepRequest (proto/dmoe/v1/control.proto).
#ifndef DMOE_SCHEDULER_STEP_PLAN_H_
#define DMOE_SCHEDULER_STEP_PLAN_H_

#include <cstdint>
#include <vector>

#include "core/sampling.h"
#include "scheduler/request.h"

namespace dmoe::scheduler {

// One sequence's share of a step (StepSequence of control.proto).
struct ScheduledSequence {
  RequestId id = 0;  // the sequence id on the node
  // Cache length before this step: the tokens go to positions
  // [position, position + tokens.size()).
  int64_t position = 0;
  // A prefill chunk, or the one token of a decode.
  std::vector<int32_t> tokens;
  // Sample after the chunk (false for a non-final prefill chunk).
  bool sample = false;
  // Tokens the request sampled before: the node positions the request's RNG
  // after them, so a recomputed (preempted) request draws the same tokens.
  int64_t sample_index = 0;
  SamplingParams sampling;
};

struct NodeStep {
  // Sequences whose pages the node frees before running the step (finished,
  // cancelled, expired, preempted). Never also in `sequences`.
  std::vector<RequestId> frees;
  std::vector<ScheduledSequence> sequences;

  int64_t num_tokens() const;
  bool empty() const { return frees.empty() && sequences.empty(); }
};

struct StepPlan {
  // Identifies the plan to ApplyResults (StepRequest.step_id).
  int64_t step_id = 0;
  // One entry per attention node, indexed by node.
  std::vector<NodeStep> nodes;
  // Requests that finished while planning (Cancel, deadline, a step whose
  // results never came): stream these now.
  std::vector<RequestEvent> events;
  // Requests whose cache was dropped this step; they are waiting again and
  // will be recomputed (for metrics).
  std::vector<RequestId> preempted;

  int64_t num_tokens() const;
  int64_t num_sequences() const;
  // Whether some node has tokens to run (otherwise no sample will come back;
  // frees may still have to be sent).
  bool has_tokens() const { return num_tokens() > 0; }
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_STEP_PLAN_H_
