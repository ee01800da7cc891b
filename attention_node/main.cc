// dmoe-attention-node: one data-parallel attention node. Joins the cluster
// through the scheduler's Coordinator (node::JoinCluster),
// loads every weight but the routed experts, connects to the expert nodes
// over UCX (or NCCL with --transport nccl, on GPU --gpu) and serves
// dmoe.v1.AttentionNode, grpc.health.v1 and reflection.
// Stops on SIGTERM or SIGINT.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "attention_node/attention_service.h"
#include "core/node/cluster_join.h"
#include "attention_node/remote_experts.h"
#include "core/backends.h"
#include "core/flags/flags.h"
#include "core/config.h"
#include "core/log.h"
#include "core/model_weights.h"
#include "core/status_macros.h"
#include "proto/message_limits.h"
#include "core/metrics/metrics.h"
#include "transport/node_transport.h"

namespace dmoe::attention {
namespace {

constexpr char kUsage[] =
    "usage: dmoe-attention-node --model DIR --scheduler HOST:PORT [--host 127.0.0.1] [--port 0]\n"
    "                           [--cache-pages 512] [--page-size 64] [--ping-pong-min-tokens 32]\n"
    "                           [--port-file FILE] [--metrics-port -1] [--advertise-address HOST]\n"
    "                           [--device cpu|cuda] [--load-format auto|dummy]\n"
    "                           [--gpu-memory-fraction F (cuda: size the cache by memory, default 0.9)]\n"
    "                           [--experts remote|local (local: every routed expert in this process, on its\n"
    "                            device, for a cluster of no expert nodes)]\n"
    "                           [--transport ucx|nccl] [--gpu 0 (the GPU of the cuda backend and NCCL)]\n";
constexpr char kLog[] = "attention-node";

absl::Status Run(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args,
                                                            {"model", "scheduler", "host", "port", "cache-pages",
                                                             "page-size", "ping-pong-min-tokens", "port-file",
                                                             "metrics-port", "advertise-address", "device",
                                                             "load-format", "gpu-memory-fraction", "experts",
                                                             "transport", "gpu"},
                                                            {}));
  DMOE_ASSIGN_OR_RETURN(const std::string model, flags.Require("model"));
  DMOE_ASSIGN_OR_RETURN(const std::string scheduler, flags.Require("scheduler"));
  const std::string host = flags.Get("host").value_or("127.0.0.1");
  DMOE_ASSIGN_OR_RETURN(const int64_t port, flags.GetInt("port", 0));
  AttentionServiceOptions options;
  DMOE_ASSIGN_OR_RETURN(options.cache_pages, flags.GetInt("cache-pages", options.cache_pages));
  DMOE_ASSIGN_OR_RETURN(options.page_size, flags.GetInt("page-size", options.page_size));
  DMOE_ASSIGN_OR_RETURN(options.ping_pong_min_tokens,
                        flags.GetInt("ping-pong-min-tokens", options.ping_pong_min_tokens));
  if (port < 0 || port > 65535) return absl::InvalidArgumentError(absl::StrCat("--port ", port, " outside [0, 65535]"));
  if (options.cache_pages <= 0 || options.page_size <= 0) {
    return absl::InvalidArgumentError("--cache-pages and --page-size must be positive");
  }
  DMOE_ASSIGN_OR_RETURN(node::NodeCompute compute, node::ParseNodeCompute(flags));
  BackendOptions& backend_options = compute.backend;
  const transport::TransportChoice transport_choice = compute.transport;
  DMOE_ASSIGN_OR_RETURN(const double memory_fraction, flags.GetDouble("gpu-memory-fraction", 0.9));
  if (flags.Has("gpu-memory-fraction") && backend_options.device != Device::kCuda) {
    return absl::InvalidArgumentError("--gpu-memory-fraction needs --device cuda");
  }
  if (!(memory_fraction > 0 && memory_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu-memory-fraction ", memory_fraction, " outside (0, 1]"));
  }
  const std::string experts_where = flags.Get("experts").value_or("remote");
  if (experts_where != "remote" && experts_where != "local") {
    return absl::InvalidArgumentError(absl::StrCat("--experts '", experts_where, "' must be remote or local"));
  }
  const bool local_experts = experts_where == "local";
  // Micro-batch ping-pong hides the expert exchange behind attention; with
  // the experts in this process there is nothing to hide, only smaller
  // batches: off unless asked for.
  if (local_experts && !flags.Has("ping-pong-min-tokens")) options.ping_pong_min_tokens = 0;
  // The weights first: on a GPU the cache takes the memory they leave, and
  // its page count goes into the registration.
  const absl::Time load_start = absl::Now();
  DMOE_ASSIGN_OR_RETURN(
      std::shared_ptr<ComputeBackend> backend,
      LoadComputeBackend(model, local_experts ? WeightSelection::All() : WeightSelection::NonExpertOnly(),
                         backend_options));
  const ModelWeights* weights = &backend->weights();
  DMOE_LOG(kInfo, kLog) << "loaded the " << (local_experts ? "whole model" : "non-expert weights") << " on "
                        << backend->name() << " in " << absl::ToDoubleSeconds(absl::Now() - load_start) << " s";
  if (backend_options.device == Device::kCuda && !flags.Has("cache-pages")) {
    DMOE_ASSIGN_OR_RETURN(options.cache_pages, backend->CachePagesForMemoryFraction(memory_fraction, options.page_size));
    DMOE_LOG(kInfo, kLog) << "latent cache: " << options.cache_pages << " pages of " << options.page_size
                          << " tokens in " << memory_fraction << " of the GPU memory";
  }

  // A step cannot bring more tokens than the cache holds, nor free more
  // sequences than it has pages.
  DMOE_ASSIGN_OR_RETURN(const ModelConfig config, ModelConfig::Load(model));
  const int64_t pages = std::min<int64_t>(options.cache_pages, INT32_MAX);
  AttentionNodeGrpcService grpc_service;
  node::JoinOptions join;
  join.max_receive_bytes = ControlMessageLimit(config.num_hidden_layers, config.n_routed_experts,
                                               pages * std::min<int64_t>(options.page_size, INT32_MAX), pages);
  join.kind = v1::NODE_KIND_ATTENTION;
  join.scheduler = scheduler;
  join.host = host;
  join.port = static_cast<int>(port);
  join.services = {&grpc_service};
  join.port_file = flags.Get("port-file").value_or("");
  join.advertise_host = flags.Get("advertise-address").value_or("");
  DMOE_ASSIGN_OR_RETURN(const int64_t metrics_port, flags.GetInt("metrics-port", -1));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<metrics::MetricsServer> metrics_server,
                        metrics::MetricsServer::Start(host, metrics_port));
  join.metrics_port = metrics_server ? metrics_server->port() : -1;
  join.cache_pages = options.cache_pages;
  join.page_size = options.page_size;
  join.log_component = kLog;
  join.transport = transport_choice;
  join.gpu = backend_options.cuda_device;
  // Loaded before joining: the cache's page count goes into the registration.
  join.load = [&](const node::Registration&) -> absl::StatusOr<int64_t> { return weights->total_bytes; };
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<node::ClusterMember> member, node::JoinCluster(join));
  // Routed experts: on the expert nodes over the transport, or here on the
  // backend's own buffers (one process, no host round trip on a GPU).
  std::unique_ptr<ExpertBackend> experts;
  if (local_experts) {
    experts = std::make_unique<BackendExperts>(*backend);
    DMOE_LOG(kInfo, kLog) << "routed experts run in this process on " << backend->name();
  } else {
    DMOE_ASSIGN_OR_RETURN(node::ExpertNodes nodes,
                          node::ExpertNodesFromCluster(member->cluster(), weights->config.n_routed_experts));
    auto remote = std::make_unique<RemoteExperts>(member->transport(), nodes.placement, nodes.replicas,
                                                  weights->config.hidden_size);
    remote->SetNodeNames(nodes.names);
    experts = std::move(remote);
  }
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<AttentionService> service,
                        AttentionService::Create(backend, *experts, options));
  grpc_service.SetService(service.get());
  // The server goes before the service it calls into.
  absl::Cleanup leave = [&] {
    member->Leave();
    grpc_service.SetService(nullptr);
  };
  DMOE_RETURN_IF_ERROR(member->Serve());
  DMOE_LOG(kInfo, kLog) << options.cache_pages << " pages of " << options.page_size << " tokens";

  node::WaitForStopSignal(absl::InfiniteDuration());
  DMOE_LOG(kInfo, kLog) << "stopping";
  transport::LogSendTimesPerLayer(member->unmetered_transport(), kLog);
  std::move(leave).Invoke();
  return member->status();
}

}  // namespace
}  // namespace dmoe::attention

int main(int argc, char** argv) {
  return dmoe::node::NodeMain(argc, argv, dmoe::attention::kUsage, dmoe::attention::kLog, dmoe::attention::Run);
}
