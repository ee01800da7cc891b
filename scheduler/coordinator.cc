#include "scheduler/coordinator.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/log.h"
#include "core/metrics/metrics.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "proto/grpc_status.h"

namespace dmoe::scheduler {
namespace {

const char* KindName(v1::NodeKind kind) { return kind == v1::NODE_KIND_ATTENTION ? "attention" : "expert"; }

bool Alive(v1::NodeState state) { return state == v1::NODE_STATE_JOINING || state == v1::NODE_STATE_READY; }

}  // namespace

// One node process's health watch.
struct Coordinator::Watch {
  int id = -1;
  uint64_t incarnation = 0;
  std::string address;
  grpc::ClientContext context;
  std::atomic<bool> done{false};
  std::thread thread;
};

Coordinator::Coordinator(const ModelConfig& config, int num_attention_nodes, int num_expert_nodes,
                         router::ExpertPlacement placement, CoordinatorOptions options)
    : config_(config),
      num_attention_(num_attention_nodes),
      num_expert_(num_expert_nodes),
      placement_(std::move(placement)),
      options_(options) {
  absl::MutexLock lock(&mu_);
  nodes_.resize(num_attention_ + num_expert_);
  for (int i = 0; i < num_attention_ + num_expert_; ++i) {
    nodes_[i].kind = i < num_attention_ ? v1::NODE_KIND_ATTENTION : v1::NODE_KIND_EXPERT;
  }
  total_load_.assign(config_.num_hidden_layers * config_.n_routed_experts, 0);
  node_load_.assign(num_expert_, 0);
}

Coordinator::~Coordinator() {
  Shutdown();
  std::vector<std::unique_ptr<Watch>> watches;
  {
    absl::MutexLock lock(&mu_);
    watches.swap(watches_);
  }
  for (auto& w : watches) {
    if (w->thread.joinable()) w->thread.join();
  }
}

void Coordinator::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
  for (auto& w : watches_) w->context.TryCancel();
}

void Coordinator::StopWaitingForReady() {
  absl::MutexLock lock(&mu_);
  stop_waiting_ = true;
}

void Coordinator::SetListener(std::function<void()> listener) {
  absl::MutexLock lock(&listener_mu_);
  listener_ = std::move(listener);
}

void Coordinator::Notify() {
  absl::MutexLock lock(&listener_mu_);
  if (listener_) listener_();
}

std::string Coordinator::NameLocked(int id) const {
  const Node& n = nodes_[id];
  return absl::StrCat(KindName(n.kind), " node ", id, " (", n.grpc_address.empty() ? "not registered" : n.grpc_address,
                      ")");
}

absl::StatusOr<v1::RegisterNodeResponse> Coordinator::RegisterNode(const v1::RegisterNodeRequest& request) {
  const v1::NodeKind kind = request.kind();
  if (kind != v1::NODE_KIND_ATTENTION && kind != v1::NODE_KIND_EXPERT) {
    return absl::InvalidArgumentError("RegisterNode: kind must be attention or expert");
  }
  if (request.grpc_address().empty()) return absl::InvalidArgumentError("RegisterNode: grpc_address is empty");
  if (request.incarnation() == 0) return absl::InvalidArgumentError("RegisterNode: incarnation is not set");
  if (kind == v1::NODE_KIND_ATTENTION && (request.cache_pages() <= 0 || request.page_size() <= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("RegisterNode: attention node needs cache_pages > 0 and page_size > 0, got ",
                     request.cache_pages(), " and ", request.page_size()));
  }
  v1::RegisterNodeResponse response;
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status s = AcceptTransportLocked(request, response); !s.ok()) return s;
    const int begin = kind == v1::NODE_KIND_ATTENTION ? 0 : num_attention_;
    const int end = kind == v1::NODE_KIND_ATTENTION ? num_attention_ : num_attention_ + num_expert_;
    const std::string from = absl::StrCat("refused ", request.grpc_address(), ": ");
    int id = -1;
    if (request.has_node_id()) {
      id = request.node_id();
      if (id < begin || id >= end) {
        return absl::FailedPreconditionError(
            absl::StrCat(from, "node id ", id, " is not a ", KindName(kind), " node slot ([", begin, ", ", end, "))"));
      }
      if (nodes_[id].incarnation != request.incarnation() && Alive(nodes_[id].state)) {
        return absl::AlreadyExistsError(absl::StrCat(from, NameLocked(id), " is registered and alive"));
      }
    } else {
      for (int i = begin; i < end && id < 0; ++i) {
        if (nodes_[i].incarnation == request.incarnation()) id = i;
      }
      for (int i = begin; i < end && id < 0; ++i) {
        if (nodes_[i].grpc_address != request.grpc_address()) continue;
        if (Alive(nodes_[i].state)) {
          return absl::AlreadyExistsError(absl::StrCat(from, NameLocked(i), " is registered and alive"));
        }
        id = i;
      }
      for (int i = begin; i < end && id < 0; ++i) {
        if (nodes_[i].state == v1::NODE_STATE_EMPTY) id = i;
      }
      for (int i = begin; i < end && id < 0; ++i) {
        if (nodes_[i].state == v1::NODE_STATE_DOWN) id = i;
      }
      if (id < 0) {
        std::vector<std::string> names;
        for (int i = begin; i < end; ++i) names.push_back(NameLocked(i));
        return absl::AlreadyExistsError(absl::StrCat(from, "all ", end - begin, " ", KindName(kind),
                                                     " nodes are registered and alive: ", absl::StrJoin(names, ", ")));
      }
    }
    Node& n = nodes_[id];
    if (kind == v1::NODE_KIND_EXPERT && request.expert_shard_size() > 0) {
      const absl::Span<const int32_t> want = placement_.ExpertsOf(GroupOf(id));
      if (!std::equal(want.begin(), want.end(), request.expert_shard().begin(), request.expert_shard().end())) {
        return absl::FailedPreconditionError(absl::StrCat(from, "it holds experts ",
                                                          absl::StrJoin(request.expert_shard(), ","), ", ",
                                                          NameLocked(id), " hosts ", absl::StrJoin(want, ",")));
      }
    }
    const bool new_process = n.incarnation != request.incarnation();
    if (new_process || n.state == v1::NODE_STATE_DOWN) {
      if (new_process) n.transport_address.clear();  // the old process's is dead
      n.incarnation = request.incarnation();
      n.grpc_address = request.grpc_address();
      n.state = v1::NODE_STATE_JOINING;
      n.down_reason.clear();
      n.applied_epoch = -1;
      ++epoch_;
      DMOE_LOG(kInfo, "scheduler") << "registered " << NameLocked(id);
      StartWatchLocked(id);
    }
    if (!request.transport_address().empty() && request.transport_address() != n.transport_address) {
      n.transport_address = request.transport_address();
      n.published_epoch = ++epoch_;
    }
    if (kind == v1::NODE_KIND_ATTENTION) {
      n.cache_pages = request.cache_pages();
      n.page_size = request.page_size();
    }
    response.set_node_id(id);
    if (kind == v1::NODE_KIND_EXPERT) {
      const int index = id - num_attention_;
      response.set_expert_node_index(index);
      for (int32_t e : placement_.ExpertsOf(GroupOf(id))) response.add_expert_shard(e);
    }
  }
  Notify();
  return response;
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
    return absl::FailedPreconditionError(absl::StrCat("refused ", request.grpc_address(), ": transport ",
                                                      v1::TransportKind_Name(kind), ", but the cluster's nodes use ",
                                                      v1::TransportKind_Name(*transport_kind_)));
  }
  if (kind == v1::TRANSPORT_KIND_NCCL) {
    if (nccl_unique_id_.empty()) {
      if (!nccl_unique_id_source_) {
        return absl::FailedPreconditionError(absl::StrCat(
            "refused ", request.grpc_address(),
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

absl::Status Coordinator::NodeReady(const v1::NodeReadyRequest& request) {
  {
    absl::MutexLock lock(&mu_);
    const int id = request.node_id();
    if (id < 0 || id >= static_cast<int>(nodes_.size()) || nodes_[id].incarnation != request.incarnation() ||
        !Alive(nodes_[id].state)) {
      return absl::FailedPreconditionError(
          absl::StrCat("NodeReady: node ", id, " is not registered by this process (register again)"));
    }
    Node& n = nodes_[id];
    n.state = v1::NODE_STATE_READY;
    metrics::Scheduler().NodeUp(n.kind, id, true);
    n.applied_epoch = std::max(n.applied_epoch, request.cluster_epoch());
    ++epoch_;
    DMOE_LOG(kInfo, "scheduler") << NameLocked(id) << " ready (" << request.weight_bytes() / (1 << 20)
                                 << " MiB of weights)";
  }
  Notify();
  return absl::OkStatus();
}

void Coordinator::MarkDown(int id, uint64_t incarnation, const std::string& reason) {
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_ || id < 0 || id >= static_cast<int>(nodes_.size())) return;
    Node& n = nodes_[id];
    if ((incarnation != 0 && n.incarnation != incarnation) || !Alive(n.state)) return;
    n.state = v1::NODE_STATE_DOWN;
    metrics::Scheduler().NodeUp(n.kind, id, false);
    n.down_reason = reason;
    ++epoch_;
    DMOE_LOG(kWarning, "scheduler") << NameLocked(id) << " is down: " << reason;
    for (auto& w : watches_) {
      if (w->id == id && w->incarnation == n.incarnation) w->context.TryCancel();
    }
  }
  Notify();
}

void Coordinator::StartWatchLocked(int id) {
  if (!options_.watch_health || shutdown_) return;
  // Reap the watches of processes that are gone.
  for (auto it = watches_.begin(); it != watches_.end();) {
    if ((*it)->done.load()) {
      (*it)->thread.join();
      it = watches_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& w : watches_) {
    if (w->id == id) w->context.TryCancel();  // an older process of the slot
  }
  auto watch = std::make_unique<Watch>();
  watch->id = id;
  watch->incarnation = nodes_[id].incarnation;
  watch->address = nodes_[id].grpc_address;
  Watch* w = watch.get();
  watches_.push_back(std::move(watch));
  w->thread = std::thread([this, w] { RunWatch(w); });
}

void Coordinator::RunWatch(Watch* watch) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(absl::ToInt64Milliseconds(options_.keepalive)));
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, static_cast<int>(absl::ToInt64Milliseconds(options_.keepalive)));
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateCustomChannel(watch->address, grpc::InsecureChannelCredentials(), args));
  grpc::health::v1::HealthCheckRequest request;  // service "": the whole node
  std::unique_ptr<grpc::ClientReader<grpc::health::v1::HealthCheckResponse>> reader =
      stub->Watch(&watch->context, request);
  grpc::health::v1::HealthCheckResponse response;
  bool seen_serving = false;
  std::string reason;
  while (reader->Read(&response)) {
    if (response.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      seen_serving = true;
    } else if (seen_serving) {
      reason = "it reported NOT_SERVING (stopping)";
      watch->context.TryCancel();
      break;
    }
  }
  const grpc::Status status = reader->Finish();
  if (reason.empty()) reason = absl::StrCat("connection lost (health watch: ", FromGrpcStatus(status).ToString(), ")");
  MarkDown(watch->id, watch->incarnation, reason);  // a no-op after Shutdown or a newer process
  watch->done.store(true);
}

bool Coordinator::ServingLocked(int id) const {
  const Node& n = nodes_[id];
  if (n.state != v1::NODE_STATE_READY) return false;
  for (const Node& peer : nodes_) {
    if (peer.kind == n.kind || peer.state != v1::NODE_STATE_READY) continue;
    if (peer.applied_epoch < n.published_epoch) return false;
  }
  return true;
}

v1::GetClusterResponse Coordinator::SnapshotLocked() const {
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
    c->set_state(n.state);
    c->set_down_reason(n.down_reason);
    c->set_serving(ServingLocked(i));
    if (n.kind == v1::NODE_KIND_EXPERT) {
      for (int32_t e : placement_.ExpertsOf(GroupOf(i))) c->add_expert_shard(e);
    }
  }
  for (int32_t node : placement_.expert_to_node()) response.add_expert_to_node(node + num_attention_);
  response.set_complete(complete);
  response.set_epoch(epoch_);
  return response;
}

v1::GetClusterResponse Coordinator::GetCluster(const v1::GetClusterRequest& request, absl::Time deadline) {
  const int id = request.has_node_id() ? request.node_id() : -1;
  auto is_caller = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return id >= 0 && id < static_cast<int>(nodes_.size()) && request.incarnation() != 0 &&
           nodes_[id].incarnation == request.incarnation() && Alive(nodes_[id].state);
  };
  bool applied = false;
  {
    absl::MutexLock lock(&mu_);
    if (is_caller() && request.has_wait_past_epoch() && request.wait_past_epoch() > nodes_[id].applied_epoch) {
      nodes_[id].applied_epoch = request.wait_past_epoch();  // it has connected to that epoch's peers
      applied = true;
    }
  }
  if (applied) Notify();  // a peer may be serving now
  absl::MutexLock lock(&mu_);
  // A node the scheduler does not know (any more) is answered at once.
  if (request.has_wait_past_epoch() && (id < 0 || is_caller())) {
    const int64_t past = request.wait_past_epoch();
    auto moved = [this, past]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return shutdown_ || epoch_ > past; };
    mu_.AwaitWithDeadline(absl::Condition(&moved), deadline);
  }
  v1::GetClusterResponse response = SnapshotLocked();
  response.set_caller_registered(is_caller());
  return response;
}

absl::Status Coordinator::ReportExpertLoad(const v1::ExpertLoadReport& report) {
  absl::MutexLock lock(&mu_);
  if (report.tokens_size() != 0 && report.tokens_size() != static_cast<int>(total_load_.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("ReportExpertLoad: ", report.tokens_size(),
                     " counts, expected layers x experts = ", total_load_.size()));
  }
  const int index = report.node_id() - num_attention_;
  for (int i = 0; i < report.tokens_size(); ++i) {
    total_load_[i] += report.tokens(i);
    if (index >= 0 && index < num_expert_) node_load_[index] += report.tokens(i);
  }
  return absl::OkStatus();
}

std::vector<NodeSlot> Coordinator::Slots() const {
  absl::MutexLock lock(&mu_);
  std::vector<NodeSlot> out;
  for (int i = 0; i < static_cast<int>(nodes_.size()); ++i) {
    const Node& n = nodes_[i];
    NodeSlot s;
    s.id = i;
    s.kind = n.kind;
    s.state = n.state;
    s.grpc_address = n.grpc_address;
    s.incarnation = n.incarnation;
    s.cache_pages = n.cache_pages;
    s.page_size = n.page_size;
    s.serving = ServingLocked(i);
    s.down_reason = n.down_reason;
    s.name = NameLocked(i);
    out.push_back(std::move(s));
  }
  return out;
}

int64_t Coordinator::epoch() const {
  absl::MutexLock lock(&mu_);
  return epoch_;
}

bool Coordinator::AllReadyLocked() const {
  for (const Node& n : nodes_) {
    if (n.state != v1::NODE_STATE_READY || n.transport_address.empty()) return false;
  }
  return true;
}

bool Coordinator::AllReady() const {
  absl::MutexLock lock(&mu_);
  return AllReadyLocked();
}

bool Coordinator::WaitAllReady(absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return shutdown_ || stop_waiting_ || AllReadyLocked(); };
  mu_.AwaitWithDeadline(absl::Condition(&done), deadline);
  return AllReadyLocked();
}

std::vector<int64_t> Coordinator::ExpertTokens() const {
  absl::MutexLock lock(&mu_);
  const int64_t E = config_.n_routed_experts;
  std::vector<int64_t> out(E, 0);
  for (size_t i = 0; i < total_load_.size(); ++i) out[i % E] += total_load_[i];
  return out;
}

std::vector<int64_t> Coordinator::ExpertNodeTokens() const {
  absl::MutexLock lock(&mu_);
  return node_load_;  // each node reports only the experts it served
}

}  // namespace dmoe::scheduler
