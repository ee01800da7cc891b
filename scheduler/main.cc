// dmoe-scheduler: the cluster's client-facing server and coordinator.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/flags/flags.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "core/metrics/metrics.h"
#include "nlohmann/json.hpp"
#include "proto/grpc_credentials.h"
#include "proto/message_limits.h"
#include "router/load_balancer.h"
#include "scheduler/generation_service.h"
#if DMOE_HAVE_NCCL
#include "transport/nccl_transport.h"
#endif

namespace dmoe::scheduler {
namespace {

using json = nlohmann::json;

struct ClusterFile {
  std::optional<router::ExpertPlacement> placement;
  router::BalancerOptions balancer;
  std::optional<int64_t> max_batch_tokens, max_waiting_requests;
};

// --config FILE: {"expert_to_node": [..]} or {"expert_shards": [[..], ..]},
// "balance": {"mode", "gamma", "max_bias", "window_steps"},
// "max_batch_tokens", "max_waiting_requests".
absl::StatusOr<ClusterFile> ReadClusterFile(const std::string& path, const ModelConfig& config) {
  ClusterFile out;
  if (path.empty()) return out;
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  json root = json::parse(ss.str(), nullptr, false);
  if (root.is_discarded() || !root.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  if (root.contains("expert_to_node") || root.contains("expert_shards")) {
    json placement = json::object();
    for (const char* key : {"expert_to_node", "expert_shards", "num_expert_nodes"}) {
      if (root.contains(key)) placement[key] = root[key];
    }
    absl::StatusOr<router::ExpertPlacement> p = router::ExpertPlacement::FromJson(placement.dump(), config.n_routed_experts);
    if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", p.status().message()));
    out.placement = std::move(*p);
  }
  if (root.contains("balance")) {
    const json& b = root["balance"];
    if (!b.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": balance must be an object"));
    if (b.contains("mode")) {
      DMOE_ASSIGN_OR_RETURN(out.balancer.mode, router::ParseBalanceMode(b["mode"].get<std::string>()));
    }
    if (b.contains("gamma")) out.balancer.gamma = b["gamma"].get<double>();
    if (b.contains("max_bias")) out.balancer.max_bias = b["max_bias"].get<double>();
    if (b.contains("window_steps")) out.balancer.window_steps = b["window_steps"].get<int64_t>();
  }
  if (root.contains("max_batch_tokens")) out.max_batch_tokens = root["max_batch_tokens"].get<int64_t>();
  if (root.contains("max_waiting_requests")) out.max_waiting_requests = root["max_waiting_requests"].get<int64_t>();
  return out;
}

absl::Status Serve(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags,
                        Flags::Parse(args,
                                          {"model", "host", "port", "control-port", "attention-nodes", "expert-nodes",
                                           "balance", "config", "port-file", "max-batch-tokens", "max-waiting",
                                           "page-size", "drain-grace-s", "ready-timeout-s", "balance-window-steps",
                                           "expert-replicas", "tls-cert", "tls-key", "tls-client-ca", "max-request-bytes",
                                           "metrics-port"},
                                          {}));
  DMOE_ASSIGN_OR_RETURN(std::string model_dir, flags.Require("model"));
  const std::string host = flags.Get("host").value_or("127.0.0.1");
  DMOE_ASSIGN_OR_RETURN(int64_t port, flags.GetInt("port", 50051));
  DMOE_ASSIGN_OR_RETURN(int64_t control_port, flags.GetInt("control-port", 0));
  DMOE_ASSIGN_OR_RETURN(int64_t num_attention, flags.GetInt("attention-nodes", 1));
  DMOE_ASSIGN_OR_RETURN(int64_t num_expert, flags.GetInt("expert-nodes", 1));
  DMOE_ASSIGN_OR_RETURN(int64_t page_size, flags.GetInt("page-size", 64));
  DMOE_ASSIGN_OR_RETURN(int64_t drain_grace_s, flags.GetInt("drain-grace-s", 30));
  DMOE_ASSIGN_OR_RETURN(int64_t ready_timeout_s, flags.GetInt("ready-timeout-s", 600));
  DMOE_ASSIGN_OR_RETURN(int64_t replicas, flags.GetInt("expert-replicas", 1));
  DMOE_ASSIGN_OR_RETURN(int64_t metrics_port, flags.GetInt("metrics-port", -1));
  // --expert-nodes 0: the attention nodes hold every routed expert
  // themselves (dmoe-attention-node --experts local, e.g. one GPU).
  if (num_attention < 1 || num_expert < 0) {
    return absl::InvalidArgumentError("--attention-nodes must be at least 1 and --expert-nodes at least 0");
  }
  if (replicas < 1 || num_expert % replicas != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--expert-replicas ", replicas,
                                                   " must be at least 1 and divide --expert-nodes ", num_expert));
  }
  DMOE_ASSIGN_OR_RETURN(int64_t max_request_bytes, flags.GetInt("max-request-bytes", kDefaultMaxRequestBytes));
  if (max_request_bytes < 1024 || max_request_bytes > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-request-bytes = ", max_request_bytes, " must be in [1024, ", INT32_MAX, "]"));
  }
  // TLS on the client API only: the control plane stays on the cluster's own network.
  DMOE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> client_credentials,
                        MakeServerCredentials({.cert = flags.Get("tls-cert").value_or(""),
                                               .key = flags.Get("tls-key").value_or(""),
                                               .ca = flags.Get("tls-client-ca").value_or("")}));

  DMOE_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::Load(model_dir));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(model_dir));
  DMOE_ASSIGN_OR_RETURN(ClusterFile cluster, ReadClusterFile(flags.Get("config").value_or(""), config));
  if (flags.Has("balance")) {
    DMOE_ASSIGN_OR_RETURN(cluster.balancer.mode, router::ParseBalanceMode(*flags.Get("balance")));
  }
  DMOE_ASSIGN_OR_RETURN(cluster.balancer.window_steps,
                        flags.GetInt("balance-window-steps", cluster.balancer.window_steps));
  if (!config.has_moe()) return absl::InvalidArgumentError("the model has no routed experts to serve on expert nodes");
  if (num_expert == 0 && cluster.placement.has_value()) {
    return absl::InvalidArgumentError("--config places experts on expert nodes, but --expert-nodes is 0");
  }
  if (!cluster.placement.has_value()) {
    // With no expert nodes no shard is ever handed out; a one-node
    // placement stands in.
    DMOE_ASSIGN_OR_RETURN(router::ExpertPlacement p,
                          router::ExpertPlacement::Contiguous(config.n_routed_experts,
                                                              std::max<int64_t>(num_expert / replicas, 1)));
    cluster.placement = std::move(p);
  } else if (cluster.placement->num_nodes() * replicas != num_expert) {
    return absl::InvalidArgumentError(absl::StrCat("--config places experts on ", cluster.placement->num_nodes(),
                                                   " expert nodes x --expert-replicas ", replicas,
                                                   ", --expert-nodes is ", num_expert));
  }

  Coordinator coordinator(config, static_cast<int>(num_attention), static_cast<int>(num_expert),
                          *cluster.placement);
  const std::string model_name = std::filesystem::path(model_dir).filename().string();
  GenerationService generation(config, *tokenizer, model_name, static_cast<int>(num_attention),
                               static_cast<int>(num_expert));
#if DMOE_HAVE_NCCL
  coordinator.SetNcclUniqueIdSource(transport::NewNcclUniqueId);  // made only if a node asks for NCCL
#endif
  CoordinatorService coordinator_service(coordinator);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  int bound_port = 0, bound_control = 0;
  grpc::ServerBuilder client_builder;
  client_builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // a second scheduler must not share the port
  client_builder.AddListeningPort(absl::StrCat(host, ":", port), client_credentials, &bound_port);
  client_builder.SetMaxReceiveMessageSize(static_cast<int>(max_request_bytes));
  client_builder.RegisterService(&generation);
  std::unique_ptr<grpc::Server> client_server = client_builder.BuildAndStart();
  grpc::ServerBuilder control_builder;
  control_builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  control_builder.AddListeningPort(absl::StrCat(host, ":", control_port), grpc::InsecureServerCredentials(),
                                   &bound_control);
  control_builder.SetMaxReceiveMessageSize(ControlMessageLimit(config.num_hidden_layers, config.n_routed_experts, 0, 0));
  control_builder.RegisterService(&coordinator_service);
  std::unique_ptr<grpc::Server> control_server = control_builder.BuildAndStart();
  if (client_server == nullptr || bound_port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ":", port,
                                               flags.Has("tls-cert") ? " (do --tls-cert and --tls-key match?)" : ""));
  }
  if (control_server == nullptr || bound_control == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ":", control_port));
  }
  // The client API's readiness, also on the control port under the service's
  // name: `dmoe up` waits for it there, without the client API's TLS.
  auto set_client_serving = [client_health = client_server->GetHealthCheckService(),
                             control_health = control_server->GetHealthCheckService()](bool serving) {
    client_health->SetServingStatus(serving);
    control_health->SetServingStatus(v1::Generation::service_full_name(), serving);
  };
  control_server->GetHealthCheckService()->SetServingStatus(true);
  set_client_serving(false);
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<metrics::MetricsServer> metrics_server,
                        metrics::MetricsServer::Start(host, metrics_port));
  const int bound_metrics = metrics_server ? metrics_server->port() : -1;
  if (auto file = flags.Get("port-file")) {
    const std::string tmp = *file + ".tmp";
    std::ofstream(tmp) << json{{"port", bound_port}, {"control_port", bound_control}, {"metrics_port", bound_metrics}}
                                  .dump()
                           << "\n";
    std::filesystem::rename(tmp, *file);
  }
  DMOE_LOG(kInfo, "scheduler") << "client API on " << host << ":" << bound_port
                               << (flags.Has("tls-cert") ? " (TLS)" : "") << ", control plane on " << host
                               << ":" << bound_control << "; waiting for " << num_attention << " attention and "
                               << num_expert << " expert nodes";

  // Signals are taken by sigwait on this thread (blocked everywhere else).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  std::atomic<bool> terminate{false};
  std::thread signal_thread([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    DMOE_LOG(kInfo, "scheduler") << "signal " << sig << ": draining";
    terminate.store(true);
    coordinator.StopWaitingForReady();
  });

  std::unique_ptr<ServingLoop> loop;
  const absl::Time ready_deadline = absl::Now() + absl::Seconds(ready_timeout_s);
  if (!coordinator.WaitAllReady(ready_deadline) && !terminate.load()) {
    kill(getpid(), SIGTERM);  // unblocks the signal thread
    signal_thread.join();
    return absl::DeadlineExceededError(absl::StrCat("not every node was ready within ", ready_timeout_s, " s"));
  }
  if (!terminate.load()) {
    ServingOptions options;
    options.batching.page_size = page_size;
    DMOE_ASSIGN_OR_RETURN(options.batching.max_batch_tokens,
                          flags.GetInt("max-batch-tokens", cluster.max_batch_tokens.value_or(512)));
    DMOE_ASSIGN_OR_RETURN(options.batching.max_waiting_requests,
                          flags.GetInt("max-waiting", cluster.max_waiting_requests.value_or(256)));
    options.batching.context_length = config.max_position_embeddings;
    options.batching.tokenizer = tokenizer.get();
    options.balancer = cluster.balancer;
    options.on_serving_changed = [set_client_serving, &terminate](bool serving) {
      if (!terminate.load()) set_client_serving(serving);
    };
    DMOE_ASSIGN_OR_RETURN(loop, ServingLoop::Start(config, coordinator, options));
    generation.SetLoop(loop.get());
    coordinator_service.SetLoop(loop.get());
    DMOE_LOG(kInfo, "scheduler") << "serving " << model_name << " on " << host << ":" << bound_port << " (balance "
                                 << router::BalanceModeName(cluster.balancer.mode) << ")";
  }
  signal_thread.join();

  // Drain: refuse new requests, let in-flight ones finish within the grace period.
  set_client_serving(false);
  generation.Drain();
  if (loop != nullptr && !loop->WaitIdle(absl::Now() + absl::Seconds(drain_grace_s))) {
    DMOE_LOG(kWarning, "scheduler") << "grace period over; ending the remaining requests";
  }
  generation.SetLoop(nullptr);
  coordinator_service.SetLoop(nullptr);
  loop.reset();  // ends leftover requests with an error event
  coordinator.Shutdown();  // ends the nodes' long polls and the health watches
  client_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  control_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  DMOE_LOG(kInfo, "scheduler") << "stopped";
  return absl::OkStatus();
}

}  // namespace
}  // namespace dmoe::scheduler

int main(int argc, char** argv) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // before any thread starts
  // Debian's abseil is built without NDEBUG, so every absl::Mutex (gRPC's
  // too) would keep a global lock graph with stack traces; the tests and
  // TSan check the lock order, the server does not pay for it per lock.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  absl::Status st = dmoe::scheduler::Serve(std::vector<std::string>(argv + 1, argv + argc));
  if (!st.ok()) {
    std::fprintf(stderr, "dmoe-scheduler: error: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
