#include "scheduler/cluster_join.h"

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
#include <utility>
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "proto/grpc_status.h"

namespace dmoe::node {
namespace {

constexpr absl::Duration kClusterPollInterval = absl::Milliseconds(100);

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

absl::StatusOr<Registration> CoordinatorClient::Register(const v1::RegisterNodeRequest& request,
                                                         const TransportFactory& make_transport,
                                                         absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  auto call = [&](const v1::RegisterNodeRequest& r, v1::RegisterNodeResponse* reply) {
    grpc::ClientContext context;
    context.set_wait_for_ready(true);  // the scheduler may still be starting
    context.set_deadline(absl::ToChronoTime(deadline));
    return stub_->RegisterNode(&context, r, reply);
  };
  v1::RegisterNodeRequest first = request;
  first.clear_transport_address();
  v1::RegisterNodeResponse reply;
  if (grpc::Status s = call(first, &reply); !s.ok()) return WithContext("RegisterNode", s);
  Registration reg;
  reg.node_id = reply.node_id();
  reg.expert_shard.assign(reply.expert_shard().begin(), reply.expert_shard().end());
  reg.expert_node_index = reply.expert_node_index();
  if (reg.node_id < 0 || reg.node_id > transport::kMaxNodeId) {
    return absl::FailedPreconditionError(
        absl::StrCat("RegisterNode assigned node id ", reg.node_id, ", outside [0, ", transport::kMaxNodeId, "]"));
  }
  DMOE_ASSIGN_OR_RETURN(reg.transport, make_transport(reply));
  v1::RegisterNodeRequest second = request;
  second.set_transport_address(reg.transport->address());
  v1::RegisterNodeResponse again;
  if (grpc::Status s = call(second, &again); !s.ok()) {
    return WithContext("RegisterNode with the transport address", s);
  }
  if (again.node_id() != reg.node_id) {
    return absl::FailedPreconditionError(absl::StrCat("RegisterNode with the transport address answered node id ",
                                                      again.node_id(), ", the first registration of ",
                                                      request.grpc_address(), " node id ", reg.node_id));
  }
  return reg;
}

absl::Status CoordinatorClient::NodeReady(int32_t node_id, int64_t weight_bytes) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  v1::NodeReadyRequest request;
  request.set_node_id(node_id);
  request.set_weight_bytes(weight_bytes);
  v1::NodeReadyResponse reply;
  if (grpc::Status s = stub_->NodeReady(&context, request, &reply); !s.ok()) return WithContext("NodeReady", s);
  return absl::OkStatus();
}

absl::StatusOr<v1::GetClusterResponse> CoordinatorClient::WaitForCluster(
    absl::Duration timeout, const std::function<bool(absl::Duration)>& sleep_or_stop) {
  const absl::Time deadline = absl::Now() + timeout;
  std::string last;
  for (;;) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(deadline));
    v1::GetClusterRequest request;
    request.set_wait_until_complete(true);
    v1::GetClusterResponse cluster;
    grpc::Status s = stub_->GetCluster(&context, request, &cluster);
    if (s.ok()) {
      const int missing =
          static_cast<int>(std::count_if(cluster.nodes().begin(), cluster.nodes().end(),
                                         [](const v1::ClusterNode& n) { return n.transport_address().empty(); }));
      if (cluster.complete() && missing == 0) return cluster;
      last = absl::StrCat(cluster.nodes_size(), " nodes registered, complete = ", cluster.complete(), ", ", missing,
                          " without a transport address");
    } else if (s.error_code() != grpc::StatusCode::UNAVAILABLE &&
               s.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      return WithContext("GetCluster", s);
    } else {
      last = FromGrpcStatus(s).ToString();
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("the cluster was not complete within ", absl::FormatDuration(timeout), " (", last, ")"));
    }
    if (sleep_or_stop(std::min(kClusterPollInterval, deadline - absl::Now()))) {
      return absl::CancelledError("stopped while waiting for the cluster");
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
  std::vector<transport::NodeId> ids;
  for (const v1::ClusterNode& n : cluster.nodes()) {
    if (n.kind() == v1::NODE_KIND_EXPERT) ids.push_back(n.node_id());
  }
  std::sort(ids.begin(), ids.end());
  if (ids.empty()) return absl::FailedPreconditionError("the cluster has no expert nodes");
  if (cluster.expert_to_node_size() != n_routed_experts) {
    return absl::FailedPreconditionError(absl::StrCat("the cluster's expert_to_node has ",
                                                      cluster.expert_to_node_size(), " entries, the model ",
                                                      n_routed_experts, " routed experts"));
  }
  std::map<transport::NodeId, int32_t> index_of;
  for (size_t i = 0; i < ids.size(); ++i) index_of[ids[i]] = static_cast<int32_t>(i);
  std::vector<int32_t> expert_to_index(n_routed_experts);
  for (int64_t e = 0; e < n_routed_experts; ++e) {
    const auto it = index_of.find(cluster.expert_to_node(e));
    if (it == index_of.end()) {
      return absl::FailedPreconditionError(absl::StrCat("expert_to_node[", e, "] = ", cluster.expert_to_node(e),
                                                        " is not an expert node of the cluster (",
                                                        absl::StrJoin(ids, ", "), ")"));
    }
    expert_to_index[e] = it->second;
  }
  absl::StatusOr<router::ExpertPlacement> placement =
      router::ExpertPlacement::FromMap(n_routed_experts, static_cast<int64_t>(ids.size()), std::move(expert_to_index));
  if (!placement.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the cluster's expert placement: ", placement.status().message()));
  }
  return ExpertNodes{std::move(*placement), std::move(ids)};
}

absl::StatusOr<NodeServer> StartNodeServer(const std::string& host, int port,
                                           const std::vector<grpc::Service*>& services) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  NodeServer out;
  const std::string address = absl::StrCat(host, ":", port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &out.port);
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

absl::Status WritePortFile(const std::string& path, int port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << "{\"port\": " << port << "}\n";
    out.close();
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write port file ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, " to ", path, ": ", ec.message()));
  return absl::OkStatus();
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

bool WaitForStopSignal(absl::Duration timeout) {
  if (stop_seen.load()) return true;
  pollfd pfd{stop_pipe[0], POLLIN, 0};
  const int ms = static_cast<int>(absl::ToInt64Milliseconds(std::max(timeout, absl::ZeroDuration())));
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
