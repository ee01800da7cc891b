// dmoe-expert-node: one expert-parallel expert node. Joins the cluster
// through the scheduler's Coordinator (node::JoinCluster), loads its expert_shard of every MoE
// layer, connects to the attention nodes over UCX (or NCCL: --transport nccl, on GPU --gpu),
// serves their dispatches
// (ExpertWorker) and reports expert load every --report-interval-ms. Its
// gRPC port serves grpc.health.v1 and reflection. Stops on SIGTERM or SIGINT
// (exit 0).
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "core/node/cluster_join.h"
#include "transport/node_transport.h"
#include "core/flags/flags.h"
#include "core/config.h"
#include "core/backends.h"
#include "core/log.h"
#include "core/model_weights.h"
#include "core/status_macros.h"
#include "core/metrics/metrics.h"
#include "expert_node/expert_service.h"
#include "expert_node/expert_worker.h"

namespace dmoe::expert {
namespace {

constexpr char kUsage[] =
    "usage: dmoe-expert-node --model DIR --scheduler HOST:PORT [--host 127.0.0.1] [--port 0]\n"
    "                        [--report-interval-ms 200] [--port-file FILE] [--metrics-port -1]\n"
    "                        [--advertise-address HOST] [--device cpu|cuda] [--load-format auto|dummy]\n"
    "                        [--transport ucx|nccl] [--gpu 0 (the GPU of the cuda backend and NCCL)]\n";
constexpr char kLog[] = "expert-node";

absl::Status Run(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(
      Flags flags,
      Flags::Parse(args,
                   {"model", "scheduler", "host", "port", "report-interval-ms", "port-file", "metrics-port",
                    "advertise-address", "device", "load-format", "transport", "gpu"},
                   {}));
  DMOE_ASSIGN_OR_RETURN(const std::string model, flags.Require("model"));
  DMOE_ASSIGN_OR_RETURN(const std::string scheduler, flags.Require("scheduler"));
  const std::string host = flags.Get("host").value_or("127.0.0.1");
  DMOE_ASSIGN_OR_RETURN(const int64_t port, flags.GetInt("port", 0));
  DMOE_ASSIGN_OR_RETURN(const int64_t report_ms, flags.GetInt("report-interval-ms", 200));
  if (port < 0 || port > 65535) return absl::InvalidArgumentError(absl::StrCat("--port ", port, " outside [0, 65535]"));
  if (report_ms <= 0)
    return absl::InvalidArgumentError(absl::StrCat("--report-interval-ms ", report_ms, " must be positive"));
  DMOE_ASSIGN_OR_RETURN(node::NodeCompute compute, node::ParseNodeCompute(flags));
  BackendOptions& backend_options = compute.backend;
  const transport::TransportChoice transport_choice = compute.transport;
  DMOE_ASSIGN_OR_RETURN(const ModelConfig config, ModelConfig::Load(model));
  if (!config.has_moe()) return absl::InvalidArgumentError(absl::StrCat(model, ": the model has no routed experts"));

  node::JoinOptions join;
  join.kind = v1::NODE_KIND_EXPERT;
  join.scheduler = scheduler;
  join.host = host;
  join.port = static_cast<int>(port);
  join.port_file = flags.Get("port-file").value_or("");
  join.advertise_host = flags.Get("advertise-address").value_or("");
  DMOE_ASSIGN_OR_RETURN(const int64_t metrics_port, flags.GetInt("metrics-port", -1));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<metrics::MetricsServer> metrics_server,
                        metrics::MetricsServer::Start(host, metrics_port));
  join.metrics_port = metrics_server ? metrics_server->port() : -1;
  join.log_component = kLog;
  join.transport = transport_choice;
  join.gpu = backend_options.cuda_device;
  std::shared_ptr<ComputeBackend> backend;
  join.load = [&](const node::Registration& reg) -> absl::StatusOr<int64_t> {
    const absl::Time load_start = absl::Now();
    DMOE_ASSIGN_OR_RETURN(WeightSelection selection, ShardSelection(config, reg.expert_shard));
    DMOE_ASSIGN_OR_RETURN(backend, LoadComputeBackend(model, selection, backend_options));
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) moe_layers += config.is_moe_layer(l) ? 1 : 0;
    DMOE_LOG(kInfo, kLog) << "loaded " << reg.expert_shard.size() << " experts x " << moe_layers << " layers, "
                          << backend->weights().total_bytes << " bytes on " << backend->name() << " in "
                          << absl::ToDoubleSeconds(absl::Now() - load_start) << " s";
    return backend->weights().total_bytes;
  };
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<node::ClusterMember> member, node::JoinCluster(join));

  ExpertWorker worker(backend, member->transport());
  std::thread worker_thread([&worker] { worker.Run(); });
  absl::Cleanup stop_worker = [&] {
    member->Leave();
    worker.Stop();
    worker_thread.join();
    transport::LogSendTimesPerLayer(member->unmetered_transport(), kLog);
  };
  DMOE_RETURN_IF_ERROR(member->Serve());

  LoadReporter reporter(worker, member->coordinator(), member->node_id());
  bool reporting = true;  // logs only the first failure of a streak
  while (!node::WaitForStopSignal(absl::Milliseconds(report_ms))) {
    const absl::Status st = reporter.ReportOnce();
    if (!st.ok() && reporting) DMOE_LOG(kWarning, kLog) << st << " (load kept for the next report)";
    if (st.ok() && !reporting) DMOE_LOG(kInfo, kLog) << "load reports delivered again";
    reporting = st.ok();
  }
  DMOE_LOG(kInfo, kLog) << "stopping after " << worker.messages_served() << " dispatches";
  std::move(stop_worker).Invoke();
  return member->status();
}

}  // namespace
}  // namespace dmoe::expert

int main(int argc, char** argv) {
  return dmoe::node::NodeMain(argc, argv, dmoe::expert::kUsage, dmoe::expert::kLog, dmoe::expert::Run);
}
