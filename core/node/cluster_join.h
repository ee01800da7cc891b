// What both node binaries (dmoe-attention-node, dmoe-expert-node) do to
// join a cluster and stay in it: the client side of the scheduler's
// Coordinator (registration, the membership watch that reconnects restarted
// peers and re-registers with a restarted scheduler), the node's own gRPC
// server (health + reflection), the port file, stop signals and the shared
// main.
#ifndef DMOE_CORE_NODE_CLUSTER_JOIN_H_
#define DMOE_CORE_NODE_CLUSTER_JOIN_H_

#include <grpcpp/grpcpp.h>
#include <atomic>
#include <cstdint>
#include <thread>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/backends.h"
#include "core/model_weights.h"
#include "core/flags/flags.h"
#include "dmoe/v1/control.grpc.pb.h"
#include "router/expert_placement.h"
#include "transport/node_transport.h"
#include "transport/transport.h"

namespace dmoe::node {

// Where a node computes and how it moves hidden states, from the flags both
// node binaries share: --device, --load-format, --transport, --gpu (the GPU
// for the backend and for NCCL). INVALID_ARGUMENT naming a bad value.
struct NodeCompute {
  BackendOptions backend;
  transport::TransportChoice transport = transport::TransportChoice::kUcx;
};
absl::StatusOr<NodeCompute> ParseNodeCompute(const Flags& flags);

// Joining the cluster, for both node kinds. The registration protocol with
// the scheduler's Coordinator (the transport needs the node id, which only
// registration assigns):
//   1. RegisterNode{kind, grpc_address, incarnation, cache_pages, page_size}
//      -> node_id (+ expert_shard and expert_node_index for expert nodes);
//   2. the node creates its transport with node_id;
//   3. RegisterNode again with node_id and the transport_address;
//   4. the node loads its weights;
//   5. GetCluster long polls (wait_past_epoch) until the cluster is complete
//      and every listed node has a transport address;
//   6. the node connects its transport to every node of the other kind,
//      starts its service, reports SERVING on grpc.health.v1 and sends
//      NodeReady{node_id, incarnation, cluster_epoch}.
// From then on (ClusterMember's watch thread) it long-polls GetCluster with
// its identity: each new epoch, it connects to peers whose transport address
// changed (a restarted peer); when the scheduler is unreachable or no longer
// knows it (restarted), it registers again with the same node_id and
// transport address, then NodeReady. A refused re-registration (its slot
// taken by a live node, another expert shard) is fatal: the node stops.
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
  // `request` holds everything but node_id and transport_address.
  absl::StatusOr<Registration> Register(const v1::RegisterNodeRequest& request, const TransportFactory& make_transport,
                                        absl::Duration timeout = absl::Minutes(2));
  // One RegisterNode call (wait_for_ready until `deadline`); `context`, when
  // given, is set up for the call so another thread may TryCancel it.
  absl::StatusOr<v1::RegisterNodeResponse> RegisterOnce(const v1::RegisterNodeRequest& request, absl::Time deadline,
                                                        grpc::ClientContext* context = nullptr);
  absl::Status NodeReady(const v1::NodeReadyRequest& request);
  // Step 5: long polls until complete (each node with a transport
  // address); CANCELLED once a stop signal arrived (checked after each poll
  // of at most a few seconds). DEADLINE_EXCEEDED after `timeout`.
  absl::StatusOr<v1::GetClusterResponse> WaitForCluster(absl::Duration timeout);
  // One GetCluster long poll past `epoch` (see GetClusterRequest).
  absl::StatusOr<v1::GetClusterResponse> WatchOnce(int64_t epoch, int32_t node_id, uint64_t incarnation,
                                                   absl::Duration timeout, grpc::ClientContext* context);
  absl::Status ReportExpertLoad(const v1::ExpertLoadReport& report, absl::Duration timeout = absl::Seconds(2));

 private:
  std::unique_ptr<v1::Coordinator::Stub> stub_;
};

// A node's gRPC server on host:port (port 0: any free one), with
// grpc.health.v1 (initially NOT_SERVING) and reflection besides `services`
// (not owned; they must outlive the server). The port is never shared
// (SO_REUSEPORT off): a second node on a live node's port fails here.
struct NodeServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};
// `max_receive_bytes`: the largest request it takes (0: gRPC's 4 MiB).
absl::StatusOr<NodeServer> StartNodeServer(const std::string& host, int port,
                                           const std::vector<grpc::Service*>& services, int max_receive_bytes = 0);
// Sets grpc.health.v1's status of every service ("" included).
void SetServing(grpc::Server& server, bool serving);
// Writes {"port": P, "metrics_port": M} to `path` atomically (a temporary
// file, then rename); M is -1 when the metrics endpoint is off.
absl::Status WritePortFile(const std::string& path, int port, int metrics_port = -1);

struct JoinOptions {
  v1::NodeKind kind = v1::NODE_KIND_UNSPECIFIED;
  std::string scheduler;  // the scheduler's control address, host:port
  std::string host = "127.0.0.1";  // where the server binds
  // How the scheduler reaches this node (registered as advertise_host:port):
  // a name that resolves to it, e.g. its pod's DNS name when host is
  // 0.0.0.0. Empty: host.
  std::string advertise_host;
  int port = 0;
  std::vector<grpc::Service*> services;  // served besides health; must outlive the member
  std::string port_file;                 // {"port": P, "metrics_port": M} once listening; empty: none
  int metrics_port = -1;                 // for the port file: the /metrics port, -1 when off
  int64_t cache_pages = 0, page_size = 0;  // attention nodes
  const char* log_component = "node";
  int max_receive_bytes = 0;  // the node server's request limit (0: gRPC's 4 MiB)
  // The data plane (every node of a cluster the same); NCCL uses GPU `gpu`.
  transport::TransportChoice transport = transport::TransportChoice::kUcx;
  int gpu = 0;
  // Loads what the slot needs once registered (weights: the expert shard of
  // an expert node); returns the bytes loaded, for NodeReady.
  std::function<absl::StatusOr<int64_t>(const Registration&)> load;
};

// A node that has joined: its slot, transport and server. Serve() makes it
// ready; the destructor (or Leave) leaves. Thread-safe.
class ClusterMember {
 public:
  ~ClusterMember();

  int32_t node_id() const { return registration_.node_id; }
  const std::vector<int32_t>& expert_shard() const { return registration_.expert_shard; }
  int32_t expert_node_index() const { return registration_.expert_node_index; }
  transport::Transport& transport() { return *registration_.transport; }
  // The transport inside the metrics wrapper (for what only it reports, e.g. the NCCL transport's
  // send records: transport::LogSendTimesPerLayer).
  transport::Transport& unmetered_transport() { return *unmetered_transport_; }
  CoordinatorClient& coordinator() { return coordinator_; }
  // The complete cluster the node connected to (step 6).
  const v1::GetClusterResponse& cluster() const { return cluster_; }
  int port() const { return server_.port; }

  // Reports SERVING, NodeReady, and starts the watch thread. Call once the
  // node's service runs.
  absl::Status Serve();
  // Stops the watch thread, reports NOT_SERVING and shuts the server down
  // (its services may be destroyed afterwards). Idempotent.
  void Leave();
  // OK, or why the node was pushed out of the cluster (it then raised the
  // stop signal).
  absl::Status status() const;

 private:
  friend absl::StatusOr<std::unique_ptr<ClusterMember>> JoinCluster(const JoinOptions& options);
  ClusterMember(const JoinOptions& options, const std::string& grpc_address);
  void WatchLoop();
  // Connects to every node of the other kind in `cluster`; logs failures.
  void ConnectChanged(const v1::GetClusterResponse& cluster);
  // Registers again (same id, incarnation and transport address), waiting
  // for the scheduler as long as it takes, then NodeReady. False: stopped.
  bool Rejoin();
  bool stopping() const;

  const JoinOptions options_;
  const std::string grpc_address_;
  const uint64_t incarnation_;
  CoordinatorClient coordinator_;
  NodeServer server_;
  Registration registration_;
  transport::Transport* unmetered_transport_ = nullptr;  // owned by registration_.transport
  v1::GetClusterResponse cluster_;
  int64_t weight_bytes_ = 0;
  std::thread watch_thread_;
  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool left_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* call_ ABSL_GUARDED_BY(mu_) = nullptr;  // the watch thread's call, for TryCancel
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  int64_t epoch_ = 0;  // watch thread only
};

// Steps 1-6 above but SERVING/NodeReady: starts the server, writes the port
// file, registers, loads (options.load), waits for the complete cluster and
// connects to the peers of the other kind. CANCELLED when a stop signal
// arrives meanwhile.
absl::StatusOr<std::unique_ptr<ClusterMember>> JoinCluster(const JoinOptions& options);

// Connects `transport` to every node of `kind` in `cluster`; returns how many.
absl::StatusOr<int> ConnectPeers(transport::Transport& transport, const v1::GetClusterResponse& cluster,
                                 v1::NodeKind kind);

// The cluster's expert placement over the expert nodes that expert_to_node
// names (which holds transport node ids; in node id order), each one's
// transport node id, and its replicas: it and the other expert nodes with
// the same expert_shard (--expert-replicas). FAILED_PRECONDITION when the
// map names a node that is not an expert node of the cluster, its size is
// not n_routed_experts, or an expert node is neither named nor a replica.
struct ExpertNodes {
  router::ExpertPlacement placement;
  std::vector<transport::NodeId> node_ids;                // [placement node]
  std::vector<std::vector<transport::NodeId>> replicas;   // [placement node]: node_ids[i] first
  std::map<transport::NodeId, std::string> names;         // "expert node 3 (host:port)", for errors
};
absl::StatusOr<ExpertNodes> ExpertNodesFromCluster(const v1::GetClusterResponse& cluster, int64_t n_routed_experts);


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
// Waits up to `timeout` for SIGTERM or SIGINT (or RaiseStop); true once one
// has arrived (and on every later call).
bool WaitForStopSignal(absl::Duration timeout);
// Makes WaitForStopSignal return true, as a stop signal would.
void RaiseStop();

}  // namespace dmoe::node

#endif  // DMOE_CORE_NODE_CLUSTER_JOIN_H_
