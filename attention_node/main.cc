// dmoe-attention-node: one data-parallel attention node. Joins the cluster
// through the scheduler's Coordinator (dmoe::node in scheduler/cluster_join.h),
// loads every weight but the routed experts, connects to the expert nodes
// over UCX (or NCCL with --transport nccl, on GPU --gpu) and serves dmoe.v1.AttentionNode, grpc.health.v1 and reflection.
// Stops on SIGTERM or SIGINT.
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "attention_node/attention_service.h"
#include "scheduler/cluster_join.h"
#include "attention_node/remote_experts.h"
#include "cli/flags.h"
#include "core/log.h"
#include "core/model_weights.h"
#include "core/status_macros.h"
#include "transport/node_transport.h"

namespace dmoe::attention {
namespace {

constexpr char kUsage[] =
    "usage: dmoe-attention-node --model DIR --scheduler HOST:PORT [--host 127.0.0.1] [--port 0]\n"
    "                           [--cache-pages 512] [--page-size 64] [--ping-pong-min-tokens 32]\n"
    "                           [--port-file FILE] [--transport ucx|nccl] [--gpu 0]\n";
constexpr char kLog[] = "attention-node";

absl::Status Run(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(cli::Flags flags, cli::Flags::Parse(args,
                                                            {"model", "scheduler", "host", "port", "cache-pages",
                                                             "page-size", "ping-pong-min-tokens", "port-file",
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
  DMOE_ASSIGN_OR_RETURN(const transport::TransportChoice transport_choice,
                        transport::ParseTransportChoice(flags.Get("transport").value_or("ucx")));
  DMOE_ASSIGN_OR_RETURN(const int64_t gpu, flags.GetInt("gpu", 0));
  if (gpu < 0) return absl::InvalidArgumentError(absl::StrCat("--gpu ", gpu, " must be >= 0"));
  if (options.cache_pages <= 0 || options.page_size <= 0) {
    return absl::InvalidArgumentError("--cache-pages and --page-size must be positive");
  }

  AttentionNodeGrpcService grpc_service;
  DMOE_ASSIGN_OR_RETURN(node::NodeServer server, node::StartNodeServer(host, static_cast<int>(port), {&grpc_service}));
  const std::string grpc_address = absl::StrCat(host, ":", server.port);
  DMOE_LOG(kInfo, kLog) << "listening on " << grpc_address << " (not serving until connected)";
  if (auto file = flags.Get("port-file")) DMOE_RETURN_IF_ERROR(node::WritePortFile(*file, server.port));

  node::CoordinatorClient coordinator(scheduler);
  v1::RegisterNodeRequest request;
  request.set_kind(v1::NODE_KIND_ATTENTION);
  request.set_grpc_address(grpc_address);
  request.set_transport_kind(transport_choice == transport::TransportChoice::kNccl ? v1::TRANSPORT_KIND_NCCL
                                                                                    : v1::TRANSPORT_KIND_UCX);
  request.set_cache_pages(options.cache_pages);
  request.set_page_size(options.page_size);
  DMOE_ASSIGN_OR_RETURN(node::Registration reg, coordinator.Register(request, [&](const v1::RegisterNodeResponse& r) {
    return transport::CreateNodeTransport({.choice = transport_choice,
                                           .node_id = r.node_id(),
                                           .num_nodes = r.num_nodes(),
                                           .nccl_unique_id = r.nccl_unique_id(),
                                           .gpu = static_cast<int>(gpu)});
  }));
  DMOE_LOG(kInfo, kLog) << "registered with " << scheduler << " as node " << reg.node_id;

  const absl::Time load_start = absl::Now();
  DMOE_ASSIGN_OR_RETURN(std::shared_ptr<const ModelWeights> weights,
                        ModelWeights::Load(model, WeightSelection::NonExpertOnly()));
  DMOE_LOG(kInfo, kLog) << "loaded " << weights->total_bytes << " bytes of non-expert weights in "
                        << absl::ToDoubleSeconds(absl::Now() - load_start) << " s";

  DMOE_ASSIGN_OR_RETURN(v1::GetClusterResponse cluster,
                        coordinator.WaitForCluster(absl::Minutes(2), node::WaitForStopSignal));
  DMOE_ASSIGN_OR_RETURN(node::ExpertNodes experts,
                        node::ExpertNodesFromCluster(cluster, weights->config.n_routed_experts));
  DMOE_ASSIGN_OR_RETURN(const int connected, node::ConnectPeers(*reg.transport, cluster, v1::NODE_KIND_EXPERT));
  DMOE_LOG(kInfo, kLog) << "connected to " << connected << " expert nodes";

  RemoteExperts remote(*reg.transport, experts.placement, experts.node_ids, weights->config.hidden_size);
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<AttentionService> service, AttentionService::Create(weights, remote, options));
  grpc_service.SetService(service.get());
  node::SetServing(*server.server, true);
  // Ready only once every peer is connected and the service is up: the
  // scheduler sends steps from then on.
  DMOE_RETURN_IF_ERROR(coordinator.NodeReady(reg.node_id, weights->total_bytes));
  DMOE_LOG(kInfo, kLog) << "serving on port " << server.port << " (" << options.cache_pages << " pages of "
                        << options.page_size << " tokens)";

  while (!node::WaitForStopSignal(absl::Seconds(1))) {
  }
  DMOE_LOG(kInfo, kLog) << "stopping";
  transport::LogSendTimesPerLayer(*reg.transport, kLog);
  node::SetServing(*server.server, false);
  server.server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  grpc_service.SetService(nullptr);
  return absl::OkStatus();
}

}  // namespace
}  // namespace dmoe::attention

int main(int argc, char** argv) {
  return dmoe::node::NodeMain(argc, argv, dmoe::attention::kUsage, dmoe::attention::kLog, dmoe::attention::Run);
}
