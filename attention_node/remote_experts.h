// The attention node's ExpertBackend: dispatches each MoE layer's tokens to
// the expert nodes hosting their experts over the transport and combines the
// weighted partial sums they return (DispatchPlan, router/).
#ifndef DMOE_ATTENTION_NODE_REMOTE_EXPERTS_H_
#define DMOE_ATTENTION_NODE_REMOTE_EXPERTS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "core/mlp.h"
#include "router/dispatch_plan.h"
#include "router/expert_placement.h"
#include "transport/transport.h"

namespace dmoe::attention {

// Used by one step loop at a time (Engine::Step); not thread-safe.
class RemoteExperts : public ExpertBackend {
 public:
  // expert_node_ids[i]: transport node id of expert node i of `placement`.
  RemoteExperts(transport::Transport& transport, router::ExpertPlacement placement,
                std::vector<transport::NodeId> expert_node_ids, int64_t hidden_size,
                absl::Duration reply_timeout = absl::Seconds(30));

  // How errors name expert node i ("expert node 3 (127.0.0.1:4711)");
  // default "expert node i (transport node N)".
  void SetNodeNames(std::vector<std::string> names) { names_ = std::move(names); }

  // Tags the next step's messages; call before Engine::Step.
  void BeginStep(uint64_t step_id) { step_id_ = step_id; }

  absl::Status BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                  const int32_t* topk_idx, const float* topk_weights) override;
  // UNAVAILABLE naming the expert node and the layer when it does not
  // answer in time or its process is gone (the transport lost it).
  absl::Status FinishRoutedExperts(int64_t layer, int micro_batch, float* out) override;

  // Seconds spent waiting for replies in FinishRoutedExperts since the last call.
  double TakeWaitSeconds();

 private:
  struct InFlight {
    std::optional<router::DispatchPlan> plan;
    uint64_t tag = 0;
    std::vector<int32_t> nodes_sent;  // expert node indices awaiting replies
  };
  transport::Transport& transport_;
  router::ExpertPlacement placement_;
  std::vector<transport::NodeId> expert_node_ids_;
  std::string NodeName(int32_t node) const;

  int64_t hidden_size_;
  std::vector<std::string> names_;
  absl::Duration reply_timeout_;
  uint64_t step_id_ = 0;
  InFlight in_flight_[2];
  double wait_seconds_ = 0;
};

}  // namespace dmoe::attention

#endif  // DMOE_ATTENTION_NODE_REMOTE_EXPERTS_H_
