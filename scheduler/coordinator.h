// The cluster's membership and expert placement, kept by the scheduler:
// nodes register (two phases: first for an id and, for expert nodes, the
// expert_shard to load; then again with the transport address created for
// that id), report ready, and read the whole cluster once complete. Also
// totals the expert nodes' load reports (the stats' ground truth; the
// balancer uses the attention nodes' per-step counts instead).
#ifndef DMOE_SCHEDULER_COORDINATOR_H_
#define DMOE_SCHEDULER_COORDINATOR_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/config.h"
#include "dmoe/v1/control.pb.h"
#include "router/expert_load.h"
#include "router/expert_placement.h"

namespace dmoe::scheduler {

// Thread-safe: the gRPC handlers and the step loop call it concurrently.
class Coordinator {
 public:
  // `placement` covers num_expert_nodes nodes.
  Coordinator(const ModelConfig& config, int num_attention_nodes, int num_expert_nodes,
              router::ExpertPlacement placement);

  // Same grpc_address again: the same id (updates the transport address).
  // FAILED_PRECONDITION when all nodes of that kind are registered already.
  // Every node must register with the same transport_kind (FAILED_PRECONDITION otherwise);
  // NCCL nodes get the cluster's ncclUniqueId and size in the response.
  absl::StatusOr<v1::RegisterNodeResponse> RegisterNode(const v1::RegisterNodeRequest& request);
  // Makes the ncclUniqueId, once, when the first NCCL node registers (NewNcclUniqueId of
  // transport/nccl_transport.h where the scheduler is built with NCCL). Unset: NCCL nodes are
  // refused with FAILED_PRECONDITION. Call before serving.
  using NcclUniqueIdSource = std::function<absl::StatusOr<std::string>()>;
  void SetNcclUniqueIdSource(NcclUniqueIdSource source);
  absl::Status NodeReady(const v1::NodeReadyRequest& request);
  v1::GetClusterResponse GetCluster() const;
  absl::Status ReportExpertLoad(const v1::ExpertLoadReport& report);

  // Every node registered with a transport address and reported ready.
  bool AllReady() const;
  // Blocks until AllReady() or the timeout; returns AllReady().
  bool WaitAllReady(absl::Duration timeout) const;
  // Attention node i's gRPC address and latent cache size (REQUIRES: registered).
  std::string AttentionAddress(int index) const;
  int64_t AttentionCachePages(int index) const;
  int64_t AttentionPageSize(int index) const;
  int num_attention_nodes() const { return num_attention_; }
  int num_expert_nodes() const { return num_expert_; }
  const router::ExpertPlacement& placement() const { return placement_; }

  // Totals since start: per expert [E] (all layers) and per expert node [M].
  std::vector<int64_t> ExpertTokens() const;
  std::vector<int64_t> ExpertNodeTokens() const;

 private:
  struct Node {
    v1::NodeKind kind = v1::NODE_KIND_UNSPECIFIED;
    std::string grpc_address;
    std::string transport_address;
    int64_t cache_pages = 0;
    int64_t page_size = 0;
    bool ready = false;
  };
  bool AllReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The cluster's one transport kind, and for NCCL the unique id into `response`.
  absl::Status AcceptTransportLocked(const v1::RegisterNodeRequest& request, v1::RegisterNodeResponse& response)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ModelConfig config_;
  const int num_attention_, num_expert_;
  const router::ExpertPlacement placement_;
  mutable absl::Mutex mu_;
  std::vector<Node> nodes_ ABSL_GUARDED_BY(mu_);            // by node id: attention 0..N-1, expert N..N+M-1
  std::vector<int64_t> total_load_ ABSL_GUARDED_BY(mu_);    // [layer * E + e] since start
  std::optional<v1::TransportKind> transport_kind_ ABSL_GUARDED_BY(mu_);  // of the first node
  NcclUniqueIdSource nccl_unique_id_source_ ABSL_GUARDED_BY(mu_);
  std::string nccl_unique_id_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_COORDINATOR_H_
