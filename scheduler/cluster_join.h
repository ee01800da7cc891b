// What both node binaries (dmoe-attention-node, dmoe-expert-node) do to
// join a cluster: the client side of the scheduler's Coordinator with the
// two-phase registration, the node's own gRPC server (health + reflection),
// the port file, stop signals and the shared main.
#ifndef DMOE_SCHEDULER_CLUSTER_JOIN_H_
#define DMOE_SCHEDULER_CLUSTER_JOIN_H_

#include <grpcpp/grpcpp.h>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/model_weights.h"
#include "dmoe/v1/control.grpc.pb.h"
#include "router/expert_placement.h"
#include "transport/transport.h"

namespace dmoe::node {

// Joining the cluster, for both node kinds. The registration protocol with
// the scheduler's Coordinator (the transport needs the node id, which only
// registration assigns):
//   1. RegisterNode{kind, grpc_address, cache_pages, page_size,
//      transport_address empty} -> node_id (+ expert_shard and
//      expert_node_index for expert nodes);
//   2. the node creates its transport with node_id;
//   3. RegisterNode again with the same request plus transport_address: the
//      scheduler recognizes grpc_address and records the address, answering
//      the same node_id (anything else is FAILED_PRECONDITION here);
//   4. the node loads its weights, then NodeReady{node_id, weight_bytes};
//   5. GetCluster{wait_until_complete} polled every 100 ms until complete
//      and every listed node has a transport address;
//   6. the node connects its transport to every node of the other kind,
//      then reports SERVING on grpc.health.v1 (NOT_SERVING until then).
struct Registration {
  int32_t node_id = -1;
  std::vector<int32_t> expert_shard;  // expert nodes
  int32_t expert_node_index = -1;     // expert nodes
  std::unique_ptr<transport::Transport> transport;
};

// Gets the first registration's answer (node id; for NCCL also the unique id and size).
using TransportFactory =
    std::function<absl::StatusOr<std::unique_ptr<transport::Transport>>(const v1::RegisterNodeResponse&)>;

// Calls the scheduler's Coordinator service. Thread-safe.
class CoordinatorClient {
 public:
  // `target`: the scheduler's control port, host:port.
  explicit CoordinatorClient(const std::string& target);

  // Steps 1-3 above. Waits up to `timeout` for the scheduler to come up.
  // `request` holds everything but transport_address.
  absl::StatusOr<Registration> Register(const v1::RegisterNodeRequest& request, const TransportFactory& make_transport,
                                        absl::Duration timeout = absl::Minutes(2));
  absl::Status NodeReady(int32_t node_id, int64_t weight_bytes);
  // Step 5. `sleep_or_stop(d)` waits up to d between polls and returns true
  // to give up (CANCELLED). DEADLINE_EXCEEDED after `timeout`.
  absl::StatusOr<v1::GetClusterResponse> WaitForCluster(absl::Duration timeout,
                                                        const std::function<bool(absl::Duration)>& sleep_or_stop);
  absl::Status ReportExpertLoad(const v1::ExpertLoadReport& report, absl::Duration timeout = absl::Seconds(2));

 private:
  std::unique_ptr<v1::Coordinator::Stub> stub_;
};

// Connects `transport` to every node of `kind` in `cluster`; returns how many.
absl::StatusOr<int> ConnectPeers(transport::Transport& transport, const v1::GetClusterResponse& cluster,
                                 v1::NodeKind kind);

// The cluster's expert placement over expert node indices (expert nodes in
// node id order) and each index's transport node id, from expert_to_node
// (which holds transport node ids). FAILED_PRECONDITION when the map names a
// node that is not an expert node of the cluster or its size is not
// n_routed_experts.
struct ExpertNodes {
  router::ExpertPlacement placement;
  std::vector<transport::NodeId> node_ids;  // [expert node index]
};
absl::StatusOr<ExpertNodes> ExpertNodesFromCluster(const v1::GetClusterResponse& cluster, int64_t n_routed_experts);

// A node's gRPC server on host:port (port 0: any free one), with
// grpc.health.v1 (initially NOT_SERVING) and reflection besides `services`
// (not owned; they must outlive the server).
struct NodeServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};
absl::StatusOr<NodeServer> StartNodeServer(const std::string& host, int port,
                                           const std::vector<grpc::Service*>& services);
// Sets grpc.health.v1's status of every service ("" included).
void SetServing(grpc::Server& server, bool serving);
// Writes {"port": P} to `path` atomically (a temporary file, then rename).
absl::Status WritePortFile(const std::string& path, int port);

// The main() of a node binary around `run(args)`: sets UCX_NET_DEVICES=lo
// unless set, installs the stop signal handlers, prints `usage` for --help
// (exit 0) and after an INVALID_ARGUMENT error. Exit status: 0 when `run`
// returns OK or CANCELLED (stopped while starting), 1 after logging any
// other error under `component`.
int NodeMain(int argc, char** argv, const char* usage, const char* component,
             const std::function<absl::Status(const std::vector<std::string>& args)>& run);

// Installs handlers for SIGTERM and SIGINT that WaitForStopSignal observes
// (instead of terminating the process). Call once, early in main. A handler,
// not a blocked mask, because libraries start threads before main (OpenBLAS)
// that would otherwise take the signal with its default action.
void InstallStopSignalHandlers();
// Waits up to `timeout` for SIGTERM or SIGINT; true once one has arrived
// (and on every later call).
bool WaitForStopSignal(absl::Duration timeout);

}  // namespace dmoe::node

#endif  // DMOE_SCHEDULER_CLUSTER_JOIN_H_
