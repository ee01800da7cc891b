// The attention node's ExpertBackend: dispatches each MoE layer's tokens to
// the expert nodes hosting their experts over the transport and combines the
// weighted partial sums they return (DispatchPlan, router/).
#ifndef DMOE_ATTENTION_NODE_REMOTE_EXPERTS_H_
#define DMOE_ATTENTION_NODE_REMOTE_EXPERTS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "core/mlp.h"
#include "router/dispatch_plan.h"
#include "router/expert_placement.h"
#include "transport/transport.h"

namespace dmoe::attention {

// Replicas: each node of `placement` may be served by several expert nodes
// hosting the same shard. A layer's dispatch to it goes to one replica
// (rotating with the step and layer, so replicas share the load); when that
// replica is lost (the transport reports it unavailable, at the send or
// while waiting for its reply), the same dispatch goes to the next replica.
// Only when every replica of a node is lost does the layer fail.
//
// Used by one step loop at a time (Engine::Step); not thread-safe.
class RemoteExperts : public ExpertBackend {
 public:
  // expert_node_ids[i]: transport node id of expert node i of `placement`.
  RemoteExperts(transport::Transport& transport, router::ExpertPlacement placement,
                std::vector<transport::NodeId> expert_node_ids, int64_t hidden_size,
                absl::Duration reply_timeout = absl::Seconds(30));
  // replicas[i]: the transport node ids serving node i of `placement` (non-empty each).
  RemoteExperts(transport::Transport& transport, router::ExpertPlacement placement,
                std::vector<std::vector<transport::NodeId>> replicas, int64_t hidden_size,
                absl::Duration reply_timeout = absl::Seconds(30));

  // How errors name transport node id ("expert node 3 (127.0.0.1:4711)");
  // default "expert node N (transport node N)".
  void SetNodeNames(std::map<transport::NodeId, std::string> names) { names_ = std::move(names); }

  // Tags the next step's messages; call before Engine::Step.
  void BeginStep(uint64_t step_id) override { step_id_ = step_id; }

  absl::Status BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                  const int32_t* topk_idx, const float* topk_weights) override;
  // UNAVAILABLE naming the expert node and the layer when it does not
  // answer in time or its process is gone (the transport lost it).
  absl::Status FinishRoutedExperts(int64_t layer, int micro_batch, float* out) override;

  // Seconds spent waiting for replies in FinishRoutedExperts since the last call.
  double TakeWaitSeconds() override;

 private:
  // One placement node's dispatch of a layer, kept until its reply for a
  // resend to another replica.
  struct Sent {
    int32_t node = -1;
    std::vector<uint8_t> payload;
    int replica = 0;   // index into replicas_[node] now awaited
    int attempts = 0;  // replicas tried
    bool replied = false;
  };
  struct InFlight {
    std::optional<router::DispatchPlan> plan;
    uint64_t tag = 0;
    int64_t layer = 0;
    std::vector<Sent> sent;
    absl::Time sent_at = absl::InfinitePast();  // for the round-trip metric
  };
  // Sends s.payload to its replica, moving on to the next one while a send
  // fails; UNAVAILABLE naming them all when none is left.
  absl::Status SendToReplica(Sent& s, uint64_t tag, int64_t layer, std::string* why);
  std::string NodeName(transport::NodeId id) const;
  std::string ReplicaNames(int32_t node) const;

  transport::Transport& transport_;
  router::ExpertPlacement placement_;
  std::vector<std::vector<transport::NodeId>> replicas_;
  int64_t hidden_size_;
  std::map<transport::NodeId, std::string> names_;
  absl::Duration reply_timeout_;
  uint64_t step_id_ = 0;
  InFlight in_flight_[2];
  double wait_seconds_ = 0;
};

}  // namespace dmoe::attention

#endif  // DMOE_ATTENTION_NODE_REMOTE_EXPERTS_H_
