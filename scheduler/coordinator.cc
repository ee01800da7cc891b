#include "scheduler/coordinator.h"

#include "absl/strings/str_cat.h"
#include "core/log.h"

namespace dmoe::scheduler {

Coordinator::Coordinator(const ModelConfig& config, int num_attention_nodes, int num_expert_nodes,
                         router::ExpertPlacement placement)
    : config_(config),
      num_attention_(num_attention_nodes),
      num_expert_(num_expert_nodes),
      placement_(std::move(placement)) {
  nodes_.resize(num_attention_ + num_expert_);
  for (int i = 0; i < num_attention_ + num_expert_; ++i) {
    nodes_[i].kind = i < num_attention_ ? v1::NODE_KIND_ATTENTION : v1::NODE_KIND_EXPERT;
  }
  total_load_.assign(config_.num_hidden_layers * config_.n_routed_experts, 0);
}

absl::StatusOr<v1::RegisterNodeResponse> Coordinator::RegisterNode(const v1::RegisterNodeRequest& request) {
  if (request.kind() != v1::NODE_KIND_ATTENTION && request.kind() != v1::NODE_KIND_EXPERT) {
    return absl::InvalidArgumentError("RegisterNode: kind must be attention or expert");
  }
  if (request.grpc_address().empty())
    return absl::InvalidArgumentError("RegisterNode: grpc_address is empty");
  absl::MutexLock lock(&mu_);
  v1::RegisterNodeResponse response;
  if (absl::Status s = AcceptTransportLocked(request, response); !s.ok()) return s;
  int id = -1;
  for (int i = 0; i < static_cast<int>(nodes_.size()); ++i) {
    if (nodes_[i].kind == request.kind() && nodes_[i].grpc_address == request.grpc_address()) id = i;
  }
  if (id < 0) {
    for (int i = 0; i < static_cast<int>(nodes_.size()) && id < 0; ++i) {
      if (nodes_[i].kind == request.kind() && nodes_[i].grpc_address.empty()) id = i;
    }
    if (id < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("RegisterNode from ", request.grpc_address(), ": all ",
                       request.kind() == v1::NODE_KIND_ATTENTION ? num_attention_ : num_expert_, " ",
                       request.kind() == v1::NODE_KIND_ATTENTION ? "attention" : "expert",
                       " nodes are registered already"));
    }
    nodes_[id].grpc_address = request.grpc_address();
    DMOE_LOG(kInfo, "scheduler") << "registered "
                                 << (request.kind() == v1::NODE_KIND_ATTENTION ? "attention" : "expert")
                                 << " node " << id << " at " << request.grpc_address();
  }
  if (!request.transport_address().empty()) nodes_[id].transport_address = request.transport_address();
  if (request.kind() == v1::NODE_KIND_ATTENTION) {
    if (request.cache_pages() <= 0 || request.page_size() <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("RegisterNode: attention node needs cache_pages > 0 and page_size > 0, got ",
                       request.cache_pages(), " and ", request.page_size()));
    }
    nodes_[id].cache_pages = request.cache_pages();
    nodes_[id].page_size = request.page_size();
  }
  response.set_node_id(id);
  if (request.kind() == v1::NODE_KIND_EXPERT) {
    const int index = id - num_attention_;
    response.set_expert_node_index(index);
    for (int32_t e : placement_.ExpertsOf(index)) response.add_expert_shard(e);
  }
  return response;
}

absl::Status Coordinator::NodeReady(const v1::NodeReadyRequest& request) {
  absl::MutexLock lock(&mu_);
  if (request.node_id() < 0 || request.node_id() >= static_cast<int>(nodes_.size()) ||
      nodes_[request.node_id()].grpc_address.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("NodeReady: node ", request.node_id(), " is not registered"));
  }
  nodes_[request.node_id()].ready = true;
  DMOE_LOG(kInfo, "scheduler") << "node " << request.node_id() << " ready ("
                               << request.weight_bytes() / (1 << 20) << " MiB of weights)";
  return absl::OkStatus();
}

v1::GetClusterResponse Coordinator::GetCluster() const {
  absl::MutexLock lock(&mu_);
  v1::GetClusterResponse response;
  bool complete = true;
  for (int i = 0; i < static_cast<int>(nodes_.size()); ++i) {
    const Node& n = nodes_[i];
    if (n.transport_address.empty()) complete = false;
    v1::ClusterNode* c = response.add_nodes();
    c->set_node_id(i);
    c->set_kind(n.kind);
    c->set_grpc_address(n.grpc_address);
    c->set_transport_address(n.transport_address);
    if (n.kind == v1::NODE_KIND_EXPERT) {
      for (int32_t e : placement_.ExpertsOf(i - num_attention_)) c->add_expert_shard(e);
    }
  }
  for (int32_t node : placement_.expert_to_node()) response.add_expert_to_node(node + num_attention_);
  response.set_complete(complete);
  return response;
}

absl::Status Coordinator::ReportExpertLoad(const v1::ExpertLoadReport& report) {
  absl::MutexLock lock(&mu_);
  if (report.tokens_size() != 0 && report.tokens_size() != static_cast<int>(total_load_.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("ReportExpertLoad: ", report.tokens_size(),
                     " counts, expected layers x experts = ", total_load_.size()));
  }
  for (int i = 0; i < report.tokens_size(); ++i) total_load_[i] += report.tokens(i);
  return absl::OkStatus();
}

void Coordinator::SetNcclUniqueIdSource(NcclUniqueIdSource source) {
  absl::MutexLock lock(&mu_);
  nccl_unique_id_source_ = std::move(source);
}

absl::Status Coordinator::AcceptTransportLocked(const v1::RegisterNodeRequest& request,
                                                v1::RegisterNodeResponse& response) {
  const v1::TransportKind kind =
      request.transport_kind() == v1::TRANSPORT_KIND_UNSPECIFIED ? v1::TRANSPORT_KIND_UCX : request.transport_kind();
  if (transport_kind_.has_value() && *transport_kind_ != kind) {
    return absl::FailedPreconditionError(absl::StrCat("RegisterNode from ", request.grpc_address(), ": transport ",
                                                      v1::TransportKind_Name(kind), ", but the cluster's nodes use ",
                                                      v1::TransportKind_Name(*transport_kind_)));
  }
  if (kind == v1::TRANSPORT_KIND_NCCL) {
    if (nccl_unique_id_.empty()) {
      if (!nccl_unique_id_source_) {
        return absl::FailedPreconditionError(absl::StrCat(
            "RegisterNode from ", request.grpc_address(),
            ": NCCL transport asked for, but this scheduler cannot make an NCCL unique id (built without NCCL)"));
      }
      absl::StatusOr<std::string> id = nccl_unique_id_source_();
      if (!id.ok()) {
        return absl::UnavailableError(absl::StrCat("RegisterNode: making the NCCL unique id: ", id.status().message()));
      }
      nccl_unique_id_ = *std::move(id);
      DMOE_LOG(kInfo, "scheduler") << "made the NCCL unique id (" << nccl_unique_id_.size() << " bytes) for "
                                   << nodes_.size() << " ranks";
    }
    response.set_nccl_unique_id(nccl_unique_id_);
    response.set_num_nodes(static_cast<int32_t>(nodes_.size()));
  }
  transport_kind_ = kind;
  return absl::OkStatus();
}

bool Coordinator::AllReadyLocked() const {
  for (const Node& n : nodes_) {
    if (!n.ready || n.transport_address.empty()) return false;
  }
  return true;
}

bool Coordinator::AllReady() const {
  absl::MutexLock lock(&mu_);
  return AllReadyLocked();
}

bool Coordinator::WaitAllReady(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(this, &Coordinator::AllReadyLocked), timeout);
  return AllReadyLocked();
}

std::string Coordinator::AttentionAddress(int index) const {
  absl::MutexLock lock(&mu_);
  return nodes_[index].grpc_address;
}

int64_t Coordinator::AttentionCachePages(int index) const {
  absl::MutexLock lock(&mu_);
  return nodes_[index].cache_pages;
}

int64_t Coordinator::AttentionPageSize(int index) const {
  absl::MutexLock lock(&mu_);
  return nodes_[index].page_size;
}

std::vector<int64_t> Coordinator::ExpertTokens() const {
  absl::MutexLock lock(&mu_);
  const int64_t E = config_.n_routed_experts;
  std::vector<int64_t> out(E, 0);
  for (size_t i = 0; i < total_load_.size(); ++i) out[i % E] += total_load_[i];
  return out;
}

std::vector<int64_t> Coordinator::ExpertNodeTokens() const {
  const std::vector<int64_t> per_expert = ExpertTokens();
  absl::StatusOr<std::vector<int64_t>> per_node = router::LoadPerNode(placement_, per_expert);
  return per_node.ok() ? *per_node : std::vector<int64_t>(num_expert_, 0);
}

}  // namespace dmoe::scheduler
