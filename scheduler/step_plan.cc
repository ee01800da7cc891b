#include "scheduler/step_plan.h"

namespace dmoe::scheduler {

int64_t NodeStep::num_tokens() const {
  int64_t n = 0;
  for (const ScheduledSequence& s : sequences) n += static_cast<int64_t>(s.tokens.size());
  return n;
}

int64_t StepPlan::num_tokens() const {
  int64_t n = 0;
  for (const NodeStep& node : nodes) n += node.num_tokens();
  return n;
}

int64_t StepPlan::num_sequences() const {
  int64_t n = 0;
  for (const NodeStep& node : nodes) n += static_cast<int64_t>(node.sequences.size());
  return n;
}

}  // namespace dmoe::scheduler
