// The cluster's membership and expert placement, kept by the scheduler.
//
// Slots: attention nodes 0..N-1, expert nodes N..N+M-1. A node process
// registers (two phases: first for an id and, for expert nodes, the
// expert_shard to load; then again with node_id and the transport address
// created for that id), reports ready, and long-polls the cluster
// (GetCluster with wait_past_epoch) to follow peers' restarts.
//
// Slot states (v1::NodeState): EMPTY -> JOINING (registered) -> READY
// (NodeReady) -> DOWN (its process is gone) -> JOINING (a new process, or the
// same one again) ... Each registration names the process (incarnation), so
//   - the same process registering again keeps its slot;
//   - a new process takes a slot of its kind that is EMPTY, or DOWN (the
//     one of its own grpc_address first; node_id when it asks for one);
//   - a slot whose process is alive is never taken: ALREADY_EXISTS naming
//     that node.
// Liveness: from registration on, the scheduler watches each node's
// grpc.health.v1 (a Watch stream per node, with keepalive pings). The stream
// ending, or the node reporting NOT_SERVING after SERVING (it is stopping),
// marks the slot DOWN with the reason. MarkDown does the same for a failed
// step whose node no longer answers.
//
// A node is serving (gets work) once READY and every READY node of the other
// kind has connected to its current transport address (reported as the
// epoch it has applied: NodeReady.cluster_epoch, GetCluster.wait_past_epoch).
//
// Also totals the expert nodes' load reports (the stats' ground truth; the
// balancer uses the attention nodes' per-step counts instead).
#ifndef DMOE_SCHEDULER_COORDINATOR_H_
#define DMOE_SCHEDULER_COORDINATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "dmoe/v1/control.pb.h"
#include "router/expert_load.h"
#include "router/expert_placement.h"

namespace dmoe::scheduler {

struct CoordinatorOptions {
  // Watch every registered node's grpc.health.v1 (off in tests that
  // register nodes without a server).
  bool watch_health = true;
  // gRPC keepalive of the health watches: a node machine that goes silent
  // is marked down within about twice this.
  absl::Duration keepalive = absl::Seconds(10);
};

// One slot as the serving loop sees it.
struct NodeSlot {
  int id = -1;
  v1::NodeKind kind = v1::NODE_KIND_UNSPECIFIED;
  v1::NodeState state = v1::NODE_STATE_EMPTY;
  std::string grpc_address;
  uint64_t incarnation = 0;
  int64_t cache_pages = 0, page_size = 0;
  bool serving = false;      // see the header comment
  std::string down_reason;   // DOWN: why
  // "attention node 1 (127.0.0.1:4711)", for messages.
  std::string name;
};

// Thread-safe: the gRPC handlers, the health watches and the step loop call
// it concurrently.
class Coordinator {
 public:
  // `placement` covers num_expert_nodes / R nodes ("groups"), R >= 1 being
  // the expert replicas: expert slot N + i hosts group i % groups, so each
  // group's shard lives on R expert nodes.
  // REQUIRES: num_expert_nodes is a multiple of placement.num_nodes().
  Coordinator(const ModelConfig& config, int num_attention_nodes, int num_expert_nodes,
              router::ExpertPlacement placement, CoordinatorOptions options = {});
  ~Coordinator();  // Shutdown(), then joins the health watches

  // See the header comment. INVALID_ARGUMENT for a bad request,
  // ALREADY_EXISTS when the slot it would take is held by a live node (or
  // every slot of its kind is), FAILED_PRECONDITION for a node_id of the
  // wrong kind or an expert_shard that is not the slot's.
  // Every node must register with the same transport_kind (FAILED_PRECONDITION otherwise);
  // NCCL nodes get the cluster's ncclUniqueId and size in the response.
  absl::StatusOr<v1::RegisterNodeResponse> RegisterNode(const v1::RegisterNodeRequest& request);
  // Makes the ncclUniqueId, once, when the first NCCL node registers (NewNcclUniqueId of
  // transport/nccl_transport.h where the scheduler is built with NCCL). Unset: NCCL nodes are
  // refused with FAILED_PRECONDITION. Call before serving.
  using NcclUniqueIdSource = std::function<absl::StatusOr<std::string>()>;
  void SetNcclUniqueIdSource(NcclUniqueIdSource source);
  // FAILED_PRECONDITION unless the caller (node_id, incarnation) holds its slot.
  absl::Status NodeReady(const v1::NodeReadyRequest& request);
  // The cluster now, or with wait_past_epoch once it changed (or at
  // `deadline`, or Shutdown).
  v1::GetClusterResponse GetCluster(const v1::GetClusterRequest& request = {},
                                    absl::Time deadline = absl::InfinitePast());
  absl::Status ReportExpertLoad(const v1::ExpertLoadReport& report);
  // Marks the slot DOWN if `incarnation` (0: whatever) still holds it.
  void MarkDown(int id, uint64_t incarnation, const std::string& reason);
  // Ends long polls, waits and health watches; later ones answer at once.
  void Shutdown();
  // Ends WaitAllReady (now and later) only.
  void StopWaitingForReady();

  // Called after every change of the membership (never with the lock held).
  void SetListener(std::function<void()> listener);
  std::vector<NodeSlot> Slots() const;
  int64_t epoch() const;

  // Every slot READY.
  bool AllReady() const;
  // Blocks until AllReady(), Shutdown() or the deadline; returns AllReady().
  bool WaitAllReady(absl::Time deadline) const;
  int num_attention_nodes() const { return num_attention_; }
  int num_expert_nodes() const { return num_expert_; }
  // The placement's nodes; expert slot id serves group GroupOf(id).
  int num_expert_groups() const { return placement_.num_nodes(); }
  int GroupOf(int expert_slot_id) const { return (expert_slot_id - num_attention_) % placement_.num_nodes(); }
  const router::ExpertPlacement& placement() const { return placement_; }

  // Totals since start: per expert [E] (all layers) and per expert node [M].
  std::vector<int64_t> ExpertTokens() const;
  std::vector<int64_t> ExpertNodeTokens() const;

 private:
  struct Node {
    v1::NodeKind kind = v1::NODE_KIND_UNSPECIFIED;
    v1::NodeState state = v1::NODE_STATE_EMPTY;
    std::string grpc_address;
    std::string transport_address;
    uint64_t incarnation = 0;
    int64_t cache_pages = 0;
    int64_t page_size = 0;
    std::string down_reason;
    int64_t published_epoch = 0;  // when transport_address last changed
    int64_t applied_epoch = -1;   // the epoch this node has connected to
  };
  struct Watch;

  bool AllReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The cluster's one transport kind, and for NCCL the unique id into `response`.
  absl::Status AcceptTransportLocked(const v1::RegisterNodeRequest& request, v1::RegisterNodeResponse& response)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ServingLocked(int id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string NameLocked(int id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::GetClusterResponse SnapshotLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StartWatchLocked(int id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunWatch(Watch* watch);
  void Notify();

  const ModelConfig config_;
  const int num_attention_, num_expert_;
  const router::ExpertPlacement placement_;
  const CoordinatorOptions options_;
  mutable absl::Mutex mu_;
  std::vector<Node> nodes_ ABSL_GUARDED_BY(mu_);          // by node id
  std::vector<int64_t> total_load_ ABSL_GUARDED_BY(mu_);  // [layer * E + e] since start
  std::vector<int64_t> node_load_ ABSL_GUARDED_BY(mu_);   // [expert node index] tokens since start
  int64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_waiting_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::unique_ptr<Watch>> watches_ ABSL_GUARDED_BY(mu_);
  std::optional<v1::TransportKind> transport_kind_ ABSL_GUARDED_BY(mu_);  // of the first node
  NcclUniqueIdSource nccl_unique_id_source_ ABSL_GUARDED_BY(mu_);
  std::string nccl_unique_id_ ABSL_GUARDED_BY(mu_);
  absl::Mutex listener_mu_;
  std::function<void()> listener_ ABSL_GUARDED_BY(listener_mu_);
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_COORDINATOR_H_
