#include "core/in_process/in_process_experts.h"

namespace dmoe::in_process {

absl::StatusOr<std::unique_ptr<InProcessExperts>> InProcessExperts::Create(
    const ModelWeights& weights, const router::ExpertPlacement& placement) {
  if (!weights.config.has_moe()) return absl::InvalidArgumentError("the model has no routed experts");
  auto cluster = std::unique_ptr<InProcessExperts>(new InProcessExperts());
  // Node 0 is the attention side; expert node i is transport node i + 1.
  cluster->attention_endpoint_ = cluster->fabric_.CreateEndpoint(0);
  std::vector<transport::NodeId> ids;
  for (int32_t i = 0; i < placement.num_nodes(); ++i) {
    ids.push_back(i + 1);
    cluster->expert_endpoints_.push_back(cluster->fabric_.CreateEndpoint(i + 1));
  }
  for (int32_t i = 0; i < placement.num_nodes(); ++i) {
    absl::Status st = cluster->attention_endpoint_->Connect(ids[i], cluster->expert_endpoints_[i]->address());
    if (st.ok()) st = cluster->expert_endpoints_[i]->Connect(0, cluster->attention_endpoint_->address());
    if (!st.ok()) return st;
    cluster->workers_.push_back(std::make_unique<expert::ExpertWorker>(weights, *cluster->expert_endpoints_[i]));
  }
  for (auto& worker : cluster->workers_) cluster->threads_.emplace_back([w = worker.get()] { w->Run(); });
  cluster->backend_ = std::make_unique<attention::RemoteExperts>(*cluster->attention_endpoint_, placement, ids,
                                                                 weights.config.hidden_size);
  return cluster;
}

InProcessExperts::~InProcessExperts() {
  for (auto& worker : workers_) worker->Stop();
  for (std::thread& t : threads_) t.join();
}

}  // namespace dmoe::in_process
