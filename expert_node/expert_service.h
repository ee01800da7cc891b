// The expert node's control-plane duties around its ExpertWorker: which
// weights it loads (its expert_shard of every MoE layer) and its expert load
// reports to the scheduler. Joining the cluster is shared with the attention
// node (dmoe::node in node/cluster_join.h).
#ifndef DMOE_EXPERT_NODE_EXPERT_SERVICE_H_
#define DMOE_EXPERT_NODE_EXPERT_SERVICE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/node/cluster_join.h"
#include "core/config.h"
#include "core/model_weights.h"
#include "expert_node/expert_worker.h"

namespace dmoe::expert {

// Loads only the routed experts of `expert_shard` of every MoE layer (no
// attention, dense or shared-expert weights). INVALID_ARGUMENT when the shard
// is empty, repeats an expert or names one outside [0, n_routed_experts).
absl::StatusOr<WeightSelection> ShardSelection(const ModelConfig& config, const std::vector<int32_t>& expert_shard);

// Sends the worker's load (ExpertWorker::TakeLoad) to the scheduler as
// ExpertLoadReport{node_id, steps = dispatches served, tokens[layer * E + e]}.
// A report that fails is kept and added to the next one, so no load is lost
// while the scheduler is briefly unreachable. Used from one thread.
class LoadReporter {
 public:
  // `worker` and `coordinator` must outlive it.
  LoadReporter(ExpertWorker& worker, node::CoordinatorClient& coordinator, int32_t node_id);

  // Takes the load since the last call and reports it (with any unsent load).
  absl::Status ReportOnce();

 private:
  ExpertWorker& worker_;
  node::CoordinatorClient& coordinator_;
  int32_t node_id_;
  std::vector<int64_t> unsent_tokens_;
  int64_t unsent_steps_ = 0;
};

}  // namespace dmoe::expert

#endif  // DMOE_EXPERT_NODE_EXPERT_SERVICE_H_
