#include "core/node/cluster_join.h"

#include "router/expert_load.h"
#include <fcntl.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <utility>
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/strings/str_join.h"
#include "core/log.h"
#include "core/metrics/metrics.h"
#include "core/status_macros.h"
#include "proto/grpc_status.h"
#include "transport/ucx_transport.h"

namespace dmoe::node {

absl::StatusOr<NodeCompute> ParseNodeCompute(const Flags& flags) {
  NodeCompute c;
  DMOE_ASSIGN_OR_RETURN(c.backend, ParseBackendOptions(flags.Get("device").value_or("cpu"),
                                                       flags.Get("load-format").value_or("auto")));
  DMOE_ASSIGN_OR_RETURN(c.transport, transport::ParseTransportChoice(flags.Get("transport").value_or("ucx")));
  DMOE_ASSIGN_OR_RETURN(const int64_t gpu, flags.GetInt("gpu", 0));
  if (gpu < 0) return absl::InvalidArgumentError(absl::StrCat("--gpu ", gpu, " must be >= 0"));
  c.backend.cuda_device = static_cast<int>(gpu);
  return c;
}
namespace {

// Longest GetCluster long poll: the scheduler answers by then even when
// nothing changed, so a stop or a lost scheduler is noticed within it.
constexpr absl::Duration kWatchPoll = absl::Seconds(5);

std::string KindName(v1::NodeKind kind) {
  switch (kind) {
    case v1::NODE_KIND_ATTENTION:
      return "attention";
    case v1::NODE_KIND_EXPERT:
      return "expert";
    default:
      return absl::StrCat("kind ", static_cast<int>(kind));
  }
}

absl::Status WithContext(const std::string& what, const grpc::Status& status) {
  const absl::Status s = FromGrpcStatus(status);
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

}  // namespace

CoordinatorClient::CoordinatorClient(const std::string& target)
    : stub_(v1::Coordinator::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()))) {}

absl::StatusOr<v1::RegisterNodeResponse> CoordinatorClient::RegisterOnce(const v1::RegisterNodeRequest& request,
                                                                         absl::Time deadline,
                                                                         grpc::ClientContext* context) {
  grpc::ClientContext own;
  grpc::ClientContext& ctx = context != nullptr ? *context : own;
  ctx.set_wait_for_ready(true);  // the scheduler may still be starting
  ctx.set_deadline(absl::ToChronoTime(deadline));
  v1::RegisterNodeResponse reply;
  if (grpc::Status s = stub_->RegisterNode(&ctx, request, &reply); !s.ok()) return WithContext("RegisterNode", s);
  return reply;
}

absl::StatusOr<Registration> CoordinatorClient::Register(const v1::RegisterNodeRequest& request,
                                                         const TransportFactory& make_transport,
                                                         absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  v1::RegisterNodeRequest first = request;
  first.clear_transport_address();
  first.clear_node_id();
  DMOE_ASSIGN_OR_RETURN(const v1::RegisterNodeResponse reply, RegisterOnce(first, deadline));
  Registration reg;
  reg.node_id = reply.node_id();
  reg.expert_shard.assign(reply.expert_shard().begin(), reply.expert_shard().end());
  reg.expert_node_index = reply.expert_node_index();
  if (reg.node_id < 0 || reg.node_id > transport::kMaxNodeId) {
    return absl::FailedPreconditionError(
        absl::StrCat("RegisterNode assigned node id ", reg.node_id, ", outside [0, ", transport::kMaxNodeId, "]"));
  }
  DMOE_ASSIGN_OR_RETURN(reg.transport, make_transport(reply));
  v1::RegisterNodeRequest second = first;
  second.set_node_id(reg.node_id);
  second.set_transport_address(reg.transport->address());
  absl::StatusOr<v1::RegisterNodeResponse> again = RegisterOnce(second, deadline);
  if (!again.ok()) {
    return absl::Status(again.status().code(),
                        absl::StrCat("with the transport address: ", again.status().message()));
  }
  if (again->node_id() != reg.node_id) {
    return absl::FailedPreconditionError(absl::StrCat("RegisterNode with the transport address answered node id ",
                                                      again->node_id(), ", the first registration of ",
                                                      request.grpc_address(), " node id ", reg.node_id));
  }
  return reg;
}

absl::Status CoordinatorClient::NodeReady(const v1::NodeReadyRequest& request) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  v1::NodeReadyResponse reply;
  if (grpc::Status s = stub_->NodeReady(&context, request, &reply); !s.ok()) return WithContext("NodeReady", s);
  return absl::OkStatus();
}

absl::StatusOr<v1::GetClusterResponse> CoordinatorClient::WatchOnce(int64_t epoch, int32_t node_id,
                                                                    uint64_t incarnation, absl::Duration timeout,
                                                                    grpc::ClientContext* context) {
  context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v1::GetClusterRequest request;
  request.set_wait_past_epoch(epoch);
  if (node_id >= 0) request.set_node_id(node_id);
  request.set_incarnation(incarnation);
  v1::GetClusterResponse cluster;
  if (grpc::Status s = stub_->GetCluster(context, request, &cluster); !s.ok()) return WithContext("GetCluster", s);
  return cluster;
}

absl::StatusOr<v1::GetClusterResponse> CoordinatorClient::WaitForCluster(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  std::string last;
  int64_t epoch = -1;
  for (;;) {
    grpc::ClientContext context;
    context.set_wait_for_ready(true);  // the scheduler may be starting
    absl::StatusOr<v1::GetClusterResponse> cluster =
        WatchOnce(epoch, -1, 0, std::min(kWatchPoll, std::max(deadline - absl::Now(), absl::Milliseconds(1))),
                  &context);
    if (cluster.ok()) {
      const int missing =
          static_cast<int>(std::count_if(cluster->nodes().begin(), cluster->nodes().end(),
                                         [](const v1::ClusterNode& n) { return n.transport_address().empty(); }));
      if (cluster->complete() && missing == 0) return *std::move(cluster);
      epoch = cluster->epoch();
      last = absl::StrCat(cluster->nodes_size(), " node slots, complete = ", cluster->complete(), ", ", missing,
                          " without a transport address");
    } else if (cluster.status().code() != absl::StatusCode::kUnavailable &&
               cluster.status().code() != absl::StatusCode::kDeadlineExceeded) {
      return cluster.status();
    } else {
      last = cluster.status().ToString();
      epoch = -1;
    }
    if (WaitForStopSignal(absl::ZeroDuration())) return absl::CancelledError("stopped while waiting for the cluster");
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("the cluster was not complete within ", absl::FormatDuration(timeout), " (", last, ")"));
    }
  }
}

absl::Status CoordinatorClient::ReportExpertLoad(const v1::ExpertLoadReport& report, absl::Duration timeout) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  v1::ExpertLoadAck ack;
  if (grpc::Status s = stub_->ReportExpertLoad(&context, report, &ack); !s.ok()) {
    return WithContext("ReportExpertLoad", s);
  }
  return absl::OkStatus();
}

absl::StatusOr<int> ConnectPeers(transport::Transport& transport, const v1::GetClusterResponse& cluster,
                                 v1::NodeKind kind) {
  int connected = 0;
  for (const v1::ClusterNode& n : cluster.nodes()) {
    if (n.kind() != kind || n.node_id() == transport.node_id()) continue;
    if (absl::Status st = transport.Connect(n.node_id(), n.transport_address()); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("connecting to ", KindName(kind), " node ", n.node_id(), " (",
                                                  n.grpc_address(), "): ", st.message()));
    }
    ++connected;
  }
  return connected;
}

absl::StatusOr<ExpertNodes> ExpertNodesFromCluster(const v1::GetClusterResponse& cluster, int64_t n_routed_experts) {
  std::map<transport::NodeId, const v1::ClusterNode*> experts;
  for (const v1::ClusterNode& n : cluster.nodes()) {
    if (n.kind() == v1::NODE_KIND_EXPERT) experts[n.node_id()] = &n;
  }
  if (experts.empty()) return absl::FailedPreconditionError("the cluster has no expert nodes");
  if (cluster.expert_to_node_size() != n_routed_experts) {
    return absl::FailedPreconditionError(absl::StrCat("the cluster's expert_to_node has ",
                                                      cluster.expert_to_node_size(), " entries, the model ",
                                                      n_routed_experts, " routed experts"));
  }
  std::vector<transport::NodeId> all;
  for (const auto& [id, n] : experts) all.push_back(id);
  std::vector<transport::NodeId> ids;  // the placement's nodes
  for (int64_t e = 0; e < n_routed_experts; ++e) {
    const transport::NodeId id = cluster.expert_to_node(e);
    if (!experts.contains(id)) {
      return absl::FailedPreconditionError(absl::StrCat("expert_to_node[", e, "] = ", id,
                                                        " is not an expert node of the cluster (",
                                                        absl::StrJoin(all, ", "), ")"));
    }
    ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  std::map<transport::NodeId, int32_t> index_of;
  for (size_t i = 0; i < ids.size(); ++i) index_of[ids[i]] = static_cast<int32_t>(i);
  std::vector<int32_t> expert_to_index(n_routed_experts);
  for (int64_t e = 0; e < n_routed_experts; ++e) expert_to_index[e] = index_of.at(cluster.expert_to_node(e));
  absl::StatusOr<router::ExpertPlacement> placement =
      router::ExpertPlacement::FromMap(n_routed_experts, static_cast<int64_t>(ids.size()), std::move(expert_to_index));
  if (!placement.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the cluster's expert placement: ", placement.status().message()));
  }
  ExpertNodes out{std::move(*placement), ids, {}, {}};
  for (transport::NodeId id : ids) out.replicas.push_back({id});
  auto same_shard = [](const v1::ClusterNode& a, const v1::ClusterNode& b) {
    return a.expert_shard_size() > 0 && std::equal(a.expert_shard().begin(), a.expert_shard().end(),
                                                   b.expert_shard().begin(), b.expert_shard().end());
  };
  for (const auto& [id, n] : experts) {
    out.names[id] = absl::StrCat("expert node ", id, " (", n->grpc_address(), ")");
    if (index_of.contains(id)) continue;
    bool placed = false;
    for (size_t i = 0; i < ids.size() && !placed; ++i) {
      if (same_shard(*n, *experts.at(ids[i]))) {
        out.replicas[i].push_back(id);
        placed = true;
      }
    }
    if (!placed) {
      return absl::FailedPreconditionError(
          absl::StrCat("expert node ", id, " hosts no expert of expert_to_node and is no node's replica"));
    }
  }
  return out;
}

absl::StatusOr<NodeServer> StartNodeServer(const std::string& host, int port,
                                           const std::vector<grpc::Service*>& services, int max_receive_bytes) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // One node per port: without this a second process could bind a live
  // node's port and take its traffic.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // The scheduler's health watch pings to notice a silent peer machine.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 1000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  NodeServer out;
  const std::string address = absl::StrCat(host, ":", port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &out.port);
  if (max_receive_bytes > 0) builder.SetMaxReceiveMessageSize(max_receive_bytes);
  for (grpc::Service* s : services) builder.RegisterService(s);
  out.server = builder.BuildAndStart();
  if (out.server == nullptr || out.port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  SetServing(*out.server, false);
  return out;
}

void SetServing(grpc::Server& server, bool serving) {
  if (grpc::HealthCheckServiceInterface* health = server.GetHealthCheckService()) health->SetServingStatus(serving);
}

absl::Status WritePortFile(const std::string& path, int port, int metrics_port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << "{\"port\": " << port << ", \"metrics_port\": " << metrics_port << "}\n";
    out.close();
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write port file ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, " to ", path, ": ", ec.message()));
  return absl::OkStatus();
}

namespace {

uint64_t NewIncarnation() {
  std::random_device random;
  uint64_t v = 0;
  while (v == 0) v = (static_cast<uint64_t>(random()) << 32) ^ random();
  return v;
}


}  // namespace

ClusterMember::ClusterMember(const JoinOptions& options, const std::string& grpc_address)
    : options_(options),
      grpc_address_(grpc_address),
      incarnation_(NewIncarnation()),
      coordinator_(options.scheduler) {}

ClusterMember::~ClusterMember() { Leave(); }

absl::StatusOr<std::unique_ptr<ClusterMember>> JoinCluster(const JoinOptions& options) {
  const char* log = options.log_component;
  DMOE_ASSIGN_OR_RETURN(NodeServer server, StartNodeServer(options.host, options.port, options.services,
                                                                   options.max_receive_bytes));
  const std::string grpc_address =
      absl::StrCat(options.advertise_host.empty() ? options.host : options.advertise_host, ":", server.port);
  auto member = std::unique_ptr<ClusterMember>(new ClusterMember(options, grpc_address));
  member->server_ = std::move(server);
  DMOE_LOG(kInfo, log) << "listening on " << grpc_address << " (not serving until connected)";
  if (!options.port_file.empty()) {
    DMOE_RETURN_IF_ERROR(WritePortFile(options.port_file, member->server_.port, options.metrics_port));
  }

  v1::RegisterNodeRequest request;
  request.set_kind(options.kind);
  request.set_grpc_address(grpc_address);
  request.set_incarnation(member->incarnation_);
  if (options.kind == v1::NODE_KIND_ATTENTION) {
    request.set_cache_pages(options.cache_pages);
    request.set_page_size(options.page_size);
  }
  request.set_transport_kind(options.transport == transport::TransportChoice::kNccl ? v1::TRANSPORT_KIND_NCCL
                                                                                     : v1::TRANSPORT_KIND_UCX);
  DMOE_ASSIGN_OR_RETURN(member->registration_,
                        member->coordinator_.Register(request, [&](const v1::RegisterNodeResponse& r) {
                          absl::StatusOr<std::unique_ptr<transport::Transport>> t = transport::CreateNodeTransport(
                              {.choice = options.transport,
                               .node_id = r.node_id(),
                               .num_nodes = r.num_nodes(),
                               .nccl_unique_id = r.nccl_unique_id(),
                               .gpu = options.gpu});
                          if (t.ok()) member->unmetered_transport_ = t->get();
                          return metrics::Metered(std::move(t));
                        }));
  const Registration& reg = member->registration_;
  DMOE_LOG(kInfo, log) << "registered with " << options.scheduler << " as node " << reg.node_id
                       << (options.kind == v1::NODE_KIND_EXPERT
                               ? absl::StrCat(" (expert node ", reg.expert_node_index, ", experts ",
                                              absl::StrJoin(reg.expert_shard, ","), ")")
                               : "");
  if (options.load) {
    DMOE_ASSIGN_OR_RETURN(member->weight_bytes_, options.load(reg));
  }
  DMOE_ASSIGN_OR_RETURN(member->cluster_, member->coordinator_.WaitForCluster(absl::Minutes(2)));
  const v1::NodeKind peers = options.kind == v1::NODE_KIND_ATTENTION ? v1::NODE_KIND_EXPERT : v1::NODE_KIND_ATTENTION;
  DMOE_ASSIGN_OR_RETURN(const int connected, ConnectPeers(*reg.transport, member->cluster_, peers));
  DMOE_LOG(kInfo, log) << "connected to " << connected << " " << KindName(peers) << " nodes";
  member->epoch_ = member->cluster_.epoch();
  return member;
}

absl::Status ClusterMember::Serve() {
  SetServing(*server_.server, true);
  // Ready only once every peer is connected and the service is up: the
  // scheduler sends work from then on.
  v1::NodeReadyRequest ready;
  ready.set_node_id(node_id());
  ready.set_weight_bytes(weight_bytes_);
  ready.set_incarnation(incarnation_);
  ready.set_cluster_epoch(epoch_);
  DMOE_RETURN_IF_ERROR(coordinator_.NodeReady(ready));
  watch_thread_ = std::thread([this] { WatchLoop(); });
  DMOE_LOG(kInfo, options_.log_component) << "serving on port " << server_.port;
  return absl::OkStatus();
}

void ClusterMember::Leave() {
  {
    absl::MutexLock lock(&mu_);
    if (left_) return;
    left_ = true;
    stopping_ = true;
    if (call_ != nullptr) call_->TryCancel();
  }
  if (watch_thread_.joinable()) watch_thread_.join();
  if (server_.server != nullptr) {
    SetServing(*server_.server, false);
    server_.server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  }
}

absl::Status ClusterMember::status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

bool ClusterMember::stopping() const {
  absl::MutexLock lock(&mu_);
  return stopping_;
}

void ClusterMember::ConnectChanged(const v1::GetClusterResponse& cluster) {
  const v1::NodeKind peers = options_.kind == v1::NODE_KIND_ATTENTION ? v1::NODE_KIND_EXPERT : v1::NODE_KIND_ATTENTION;
  for (const v1::ClusterNode& n : cluster.nodes()) {
    // A down peer's address is dead; its next process publishes a new one.
    if (n.kind() != peers || n.transport_address().empty() || n.state() == v1::NODE_STATE_DOWN) continue;
    // Idempotent for an unchanged address; a new one (the peer restarted)
    // replaces the dead endpoint.
    if (absl::Status st = transport().Connect(n.node_id(), n.transport_address()); !st.ok()) {
      DMOE_LOG(kWarning, options_.log_component)
          << "connecting to " << KindName(peers) << " node " << n.node_id() << " (" << n.grpc_address() << "): " << st;
    }
  }
}

bool ClusterMember::Rejoin() {
  v1::RegisterNodeRequest request;
  request.set_kind(options_.kind);
  request.set_grpc_address(grpc_address_);
  request.set_incarnation(incarnation_);
  request.set_node_id(node_id());
  request.set_transport_address(transport().address());
  if (options_.kind == v1::NODE_KIND_ATTENTION) {
    request.set_cache_pages(options_.cache_pages);
    request.set_page_size(options_.page_size);
  } else {
    for (int32_t e : expert_shard()) request.add_expert_shard(e);
  }
  for (;;) {
    grpc::ClientContext context;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return false;
      call_ = &context;
    }
    absl::StatusOr<v1::RegisterNodeResponse> reply =
        coordinator_.RegisterOnce(request, absl::Now() + kWatchPoll, &context);
    {
      absl::MutexLock lock(&mu_);
      call_ = nullptr;
      if (stopping_) return false;
    }
    if (reply.ok()) break;
    const absl::StatusCode code = reply.status().code();
    if (code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kDeadlineExceeded) continue;
    // Refused: this process cannot be the node of its slot any more.
    const absl::Status fatal(code, absl::StrCat("the scheduler refused the re-registration of node ", node_id(), ": ",
                                                reply.status().message()));
    DMOE_LOG(kError, options_.log_component) << fatal << "; stopping";
    absl::MutexLock lock(&mu_);
    status_ = fatal;
    stopping_ = true;
    RaiseStop();
    return false;
  }
  // Peers may have restarted meanwhile: connect to what the scheduler knows
  // now before saying ready.
  grpc::ClientContext context;
  absl::StatusOr<v1::GetClusterResponse> cluster = coordinator_.WatchOnce(-1, node_id(), incarnation_, kWatchPoll,
                                                                          &context);
  if (cluster.ok()) {
    ConnectChanged(*cluster);
    epoch_ = cluster->epoch();
  }
  v1::NodeReadyRequest ready;
  ready.set_node_id(node_id());
  ready.set_weight_bytes(weight_bytes_);
  ready.set_incarnation(incarnation_);
  ready.set_cluster_epoch(epoch_);
  if (absl::Status st = coordinator_.NodeReady(ready); !st.ok()) {
    DMOE_LOG(kWarning, options_.log_component) << st << " (retrying)";
    return true;  // the watch finds it unregistered and comes back here
  }
  DMOE_LOG(kInfo, options_.log_component) << "registered again with " << options_.scheduler << " as node "
                                          << node_id();
  return true;
}

void ClusterMember::WatchLoop() {
  bool reachable = true;  // logs each loss of the scheduler once
  for (;;) {
    grpc::ClientContext context;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      call_ = &context;
    }
    absl::StatusOr<v1::GetClusterResponse> cluster =
        coordinator_.WatchOnce(epoch_, node_id(), incarnation_, kWatchPoll + absl::Seconds(2), &context);
    {
      absl::MutexLock lock(&mu_);
      call_ = nullptr;
      if (stopping_) return;
    }
    if (!cluster.ok()) {
      if (reachable) {
        DMOE_LOG(kWarning, options_.log_component)
            << "scheduler " << options_.scheduler << " unreachable (" << cluster.status()
            << "); registering again once it is back";
      }
      reachable = false;
      if (!Rejoin()) return;
      continue;
    }
    reachable = true;
    if (!cluster->caller_registered()) {
      DMOE_LOG(kWarning, options_.log_component) << "the scheduler does not know this node (restarted, or it "
                                                    "marked the node down); registering again";
      if (!Rejoin()) return;
      continue;
    }
    if (cluster->epoch() != epoch_) {
      ConnectChanged(*cluster);
      epoch_ = cluster->epoch();
    }
  }
}

namespace {

// Self-pipe: the handler writes a byte, WaitForStopSignal polls the read end.
int stop_pipe[2] = {-1, -1};
std::atomic<bool> stop_seen{false};

void OnStopSignal(int) {
  const char byte = 1;
  const int saved = errno;
  (void)!write(stop_pipe[1], &byte, 1);
  errno = saved;
}

}  // namespace

void InstallStopSignalHandlers() {
  if (stop_pipe[0] >= 0) return;
  if (pipe2(stop_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    DMOE_LOG(kError, "node") << "pipe2 for stop signals: " << std::strerror(errno);
    return;
  }
  struct sigaction action {};
  action.sa_handler = OnStopSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

void RaiseStop() { OnStopSignal(0); }

bool WaitForStopSignal(absl::Duration timeout) {
  if (stop_seen.load()) return true;
  pollfd pfd{stop_pipe[0], POLLIN, 0};
  const int ms = timeout == absl::InfiniteDuration()
                     ? -1
                     : static_cast<int>(std::min<int64_t>(
                           absl::ToInt64Milliseconds(std::max(timeout, absl::ZeroDuration())), 1 << 30));
  if (poll(&pfd, 1, ms) == 1 && (pfd.revents & POLLIN) != 0) {
    char byte;
    (void)!read(stop_pipe[0], &byte, 1);
    stop_seen.store(true);
    return true;
  }
  return false;
}

int NodeMain(int argc, char** argv, const char* usage, const char* component,
             const std::function<absl::Status(const std::vector<std::string>& args)>& run) {
  // One-machine default (UCX reads it when a transport starts). Not
  // UCX_WARN_UNUSED_ENV_VARS: libucs reads that one when it is loaded, so
  // setting it here would only make UCX warn about that very variable.
  setenv("UCX_NET_DEVICES", "lo", /*overwrite=*/0);
  // As dmoe-scheduler's main: no per-lock deadlock graph in a server.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  InstallStopSignalHandlers();
  const std::vector<std::string> args(argv + 1, argv + argc);
  for (const std::string& a : args) {
    if (a == "--help" || a == "-h") {
      std::fputs(usage, stdout);
      return 0;
    }
  }
  const absl::Status status = run(args);
  if (status.ok() || status.code() == absl::StatusCode::kCancelled) return 0;
  DMOE_LOG(kError, component) << status;
  if (status.code() == absl::StatusCode::kInvalidArgument) std::fputs(usage, stderr);
  return 1;
}

}  // namespace dmoe::node
