#include "scheduler/serving_loop.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "core/metrics/metrics.h"
#include "proto/grpc_status.h"
#include "proto/message_limits.h"

namespace dmoe::scheduler {
namespace {

// Health checks and cache cleanups of a node after a failure or a restart.
constexpr absl::Duration kProbeTimeout = absl::Seconds(2);

// A channel to an attention node whose message limits fit its steps: at
// most max_batch_tokens tokens, and freeing every sequence of the node (at
// most one per page).
std::unique_ptr<v1::AttentionNode::Stub> NodeStub(const NodeSlot& slot, const ModelConfig& config,
                                                  int64_t max_batch_tokens) {
  const int limit = ControlMessageLimit(config.num_hidden_layers, config.n_routed_experts, max_batch_tokens,
                                        std::max(max_batch_tokens, slot.cache_pages));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(limit);
  args.SetMaxSendMessageSize(limit);
  return v1::AttentionNode::NewStub(
      grpc::CreateCustomChannel(slot.grpc_address, grpc::InsecureChannelCredentials(), args));
}

}  // namespace

void RequestStream::MarkScheduled(absl::Time t) {
  absl::MutexLock lock(&mu_);
  if (first_scheduled_ == absl::InfiniteFuture()) first_scheduled_ = t;
}

void RequestStream::MarkFirstToken(absl::Time t) {
  absl::MutexLock lock(&mu_);
  if (first_token_ == absl::InfiniteFuture()) first_token_ = t;
}

absl::Time RequestStream::first_scheduled() const {
  absl::MutexLock lock(&mu_);
  return first_scheduled_;
}

absl::Time RequestStream::first_token() const {
  absl::MutexLock lock(&mu_);
  return first_token_;
}

ServingLoop::ServingLoop(const ModelConfig& config, Coordinator& coordinator, ServingOptions options)
    : config_(config), coordinator_(coordinator), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<ServingLoop>> ServingLoop::Start(const ModelConfig& config,
                                                                Coordinator& coordinator,
                                                                ServingOptions options) {
  if (!coordinator.AllReady()) return absl::FailedPreconditionError("cluster not ready");
  auto loop = std::unique_ptr<ServingLoop>(new ServingLoop(config, coordinator, std::move(options)));
  BatchScheduler::Options& b = loop->options_.batching;
  b.pages_per_node.clear();
  const std::vector<NodeSlot> slots = coordinator.Slots();
  for (int i = 0; i < coordinator.num_attention_nodes(); ++i) {
    b.pages_per_node.push_back(slots[i].cache_pages);
    if (slots[i].page_size != b.page_size) {
      return absl::FailedPreconditionError(absl::StrCat(slots[i].name, " uses pages of ", slots[i].page_size,
                                                        " tokens, the scheduler ", b.page_size));
    }
    loop->nodes_.push_back(NodeStub(slots[i], config, b.max_batch_tokens));
    loop->node_slots_.push_back(slots[i]);
  }
  loop->node_bias_version_.assign(loop->nodes_.size(), 0);
  loop->pages_free_ = b.pages_per_node;
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<BatchScheduler> batcher, BatchScheduler::Create(b));
  {
    absl::MutexLock lock(&loop->mu_);
    loop->batcher_ = std::move(batcher);
  }
  if (config.has_moe()) {
    DMOE_ASSIGN_OR_RETURN(router::BiasBalancer balancer,
                          router::BiasBalancer::Create(config, loop->options_.balancer));
    loop->balancer_ = std::make_unique<router::BiasBalancer>(std::move(balancer));
    DMOE_ASSIGN_OR_RETURN(router::ExpertLoadTracker window, router::ExpertLoadTracker::Create(config));
    loop->window_ = std::make_unique<router::ExpertLoadTracker>(std::move(window));
  }
  // A restarted scheduler's request ids start again: whatever the nodes
  // cached for its predecessor must go before they are reused.
  for (int i = 0; i < coordinator.num_attention_nodes(); ++i) loop->FreeLeftovers(i);
  loop->step_requests_.resize(loop->nodes_.size());
  coordinator.SetListener([l = loop.get()] { l->Bump(); });
  loop->delivery_thread_ = std::thread([l = loop.get()] { l->RunDelivery(); });
  loop->thread_ = std::thread([l = loop.get()] { l->Run(); });
  metrics::Scheduler().SetClusterStatsSource([l = loop.get()] { return l->Stats(); });
  return loop;
}

void ServingLoop::Bump() {
  absl::MutexLock lock(&mu_);
  ++membership_version_;
}

ServingLoop::~ServingLoop() {
  metrics::Scheduler().SetClusterStatsSource(nullptr);
  coordinator_.SetListener(nullptr);
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  step_cq_.Shutdown();  // no call is in flight once the loop is gone
  void* tag = nullptr;
  bool ok = false;
  while (step_cq_.Next(&tag, &ok)) {
  }
  {
    absl::MutexLock lock(&mu_);
    stop_delivery_ = true;  // after the loop: it queues nothing more
  }
  if (delivery_thread_.joinable()) delivery_thread_.join();  // every queued event pushed
  {
    absl::MutexLock lock(&mu_);
    if (steps_ > 0) {
      const double ms = 1e3 / static_cast<double>(steps_);
      DMOE_LOG(kInfo, "scheduler") << "step phases over " << steps_ << " steps, per step: scheduler "
                                   << scheduler_s_ * ms << " ms, RunStep wall " << rpc_s_ * ms
                                   << " ms; attention nodes (summed): compute " << node_compute_s_ * ms
                                   << " ms, expert wait " << node_wait_s_ * ms << " ms, other " << node_other_s_ * ms
                                   << " ms";
    }
  }
  // Whatever is left ends with an error, never silently.
  absl::flat_hash_map<RequestId, std::shared_ptr<RequestStream>> left;
  {
    absl::MutexLock lock(&mu_);
    left.swap(streams_);
  }
  for (auto& [id, stream] : left) {
    RequestEvent e;
    e.id = id;
    e.finished = true;
    e.reason = FinishReason::kError;
    e.error_code = absl::StatusCode::kUnavailable;
    e.error = "the scheduler stopped";
    stream->Push(std::move(e));
  }
}

absl::Status ServingLoop::Submit(Request request, std::shared_ptr<RequestStream> stream) {
  absl::MutexLock lock(&mu_);
  if (!unavailable_.empty()) return absl::UnavailableError(absl::StrCat("cluster cannot serve: ", unavailable_));
  const RequestId id = request.id;
  DMOE_RETURN_IF_ERROR(batcher_->Submit(std::move(request)));
  streams_[id] = std::move(stream);
  ++work_version_;
  return absl::OkStatus();
}

void ServingLoop::Cancel(RequestId id) {
  absl::MutexLock lock(&mu_);
  batcher_->Cancel(id);
  ++work_version_;
}

bool ServingLoop::IdleLocked() const {
  return batcher_->num_waiting() == 0 && batcher_->num_running() == 0 && outgoing_.empty() && !pushing_;
}

bool ServingLoop::Idle() const {
  absl::MutexLock lock(&mu_);
  return IdleLocked();
}

bool ServingLoop::WaitIdle(absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithDeadline(absl::Condition(this, &ServingLoop::IdleLocked), deadline);
  return IdleLocked();
}

v1::GetClusterStatsResponse ServingLoop::Stats() const {
  v1::GetClusterStatsResponse r;
  for (int64_t v : coordinator_.ExpertNodeTokens()) r.add_expert_node_tokens(v);
  for (int64_t v : coordinator_.ExpertTokens()) r.add_expert_tokens(v);
  r.set_balance_mode(router::BalanceModeName(options_.balancer.mode));
  v1::GetClusterResponse cluster = coordinator_.GetCluster();
  for (v1::ClusterNode& n : *cluster.mutable_nodes()) {
    n.clear_transport_address();
    *r.add_nodes() = std::move(n);
  }
  absl::MutexLock lock(&mu_);
  r.set_steps(steps_);
  r.set_routing_decisions(routing_decisions_);
  r.set_routing_decisions_changed(routing_changed_);
  for (size_t i = 0; i < pages_free_.size(); ++i) {
    r.add_attention_pages_free(pages_free_[i]);
    r.add_attention_pages_total(options_.batching.pages_per_node[i]);
  }
  r.set_max_abs_serving_bias(max_abs_bias_);
  r.set_requests_waiting(batcher_->num_waiting());
  r.set_requests_running(batcher_->num_running());
  r.set_preemptions(preemptions_);
  r.set_scheduler_seconds(scheduler_s_);
  r.set_step_rpc_seconds(rpc_s_);
  r.set_node_compute_seconds(node_compute_s_);
  r.set_node_expert_wait_seconds(node_wait_s_);
  r.set_node_other_seconds(node_other_s_);
  return r;
}

void ServingLoop::QueueLocked(std::vector<RequestEvent> events) {
  if (events.empty()) return;
  const absl::Time now = absl::Now();
  for (RequestEvent& e : events) {
    auto it = streams_.find(e.id);
    if (it == streams_.end()) continue;
    if (e.finished) {
      outgoing_.push_back({std::move(it->second), std::move(e), now});
      streams_.erase(it);
    } else {
      outgoing_.push_back({it->second, std::move(e), now});
    }
  }
}

void ServingLoop::RunDelivery() {
  std::vector<Outgoing> batch;
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      pushing_ = false;
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !outgoing_.empty() || stop_delivery_; };
      mu_.Await(absl::Condition(&ready));
      if (outgoing_.empty()) return;  // stopped, and everything pushed
      batch.swap(outgoing_);
      pushing_ = true;
    }
    // Outside the lock: a stream may call back into Cancel.
    for (Outgoing& o : batch) {
      if (!o.event.new_tokens.empty()) o.stream->MarkFirstToken(o.at);
      o.stream->Push(std::move(o.event));
    }
    batch.clear();  // drops the streams' references outside the lock too
  }
}

std::vector<SampledToken> ServingLoop::RunOnNodes(const StepPlan& plan, const std::vector<bool>& up,
                                                  std::vector<BatchScheduler::NodeFailure>* failed) {
  // The RPCs are asynchronous on the loop's own completion queue, which
  // this thread drains: no thread per call, no hand-off back.
  struct Call {
    bool sent = false;
    grpc::ClientContext ctx;
    v1::StepResult result;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::StepResult>> reader;
  };
  std::vector<Call> calls(nodes_.size());
  int pending = 0;
  for (size_t n = 0; n < nodes_.size(); ++n) {
    const NodeStep& step = plan.nodes[n];
    const bool send_bias = node_bias_version_[n] != bias_version_;
    if (!up[n] || (step.empty() && !send_bias)) continue;
    v1::StepRequest& request = step_requests_[n];
    request.Clear();
    request.set_step_id(plan.step_id);
    request.set_participating_attention_nodes(static_cast<int32_t>(nodes_.size()));
    for (RequestId id : step.frees) request.add_free_sequences(id);
    for (const ScheduledSequence& s : step.sequences) {
      v1::StepSequence* q = request.add_sequences();
      q->set_sequence_id(s.id);
      q->mutable_tokens()->Add(s.tokens.begin(), s.tokens.end());
      q->set_sample(s.sample);
      q->set_temperature(s.sampling.temperature);
      q->set_top_p(s.sampling.top_p);
      q->set_top_k(s.sampling.top_k);
      q->set_min_p(s.sampling.min_p);
      q->set_seed(s.sampling.seed);
      q->set_sample_index(s.sample_index);
      q->set_top_logprobs(s.sampling.top_logprobs);
    }
    if (send_bias) {
      request.set_has_serving_bias(true);
      request.mutable_serving_bias()->Add(serving_bias_flat_.begin(), serving_bias_flat_.end());
      node_bias_version_[n] = bias_version_;
    }
    Call& call = calls[n];
    call.sent = true;
    call.ctx.set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(absl::ToInt64Milliseconds(options_.step_rpc_timeout)));
    call.reader = nodes_[n]->AsyncRunStep(&call.ctx, request, &step_cq_);
    call.reader->Finish(&call.result, &call.status, &call);
    ++pending;
  }
  // Every call ends (by its deadline at the latest) with its Finish tag.
  for (void* tag = nullptr; pending > 0; --pending) {
    bool ok = false;
    if (!step_cq_.Next(&tag, &ok)) break;  // not reached: shut down only after the loop
  }
  std::vector<SampledToken> sampled;
  int64_t decisions = 0, changed = 0;
  double compute = 0, wait = 0, other = 0;
  std::vector<std::pair<int, int64_t>> pages;
  for (size_t n = 0; n < calls.size(); ++n) {
    if (!calls[n].sent) continue;
    const grpc::Status& status = calls[n].status;
    const v1::StepResult& result = calls[n].result;
    if (!status.ok()) {
      // Its sequences get no token: ApplyResults ends them with this error
      // naming the node and the cause; other nodes' requests go on.
      const absl::Status st = FromGrpcStatus(status);
      const bool lost = st.code() == absl::StatusCode::kUnavailable ||
                        st.code() == absl::StatusCode::kDeadlineExceeded;
      // The node's own errors start with "step N:"; a transport error does not.
      const bool node_answered = absl::StartsWith(st.message(), "step ");
      std::string message =
          node_answered ? absl::StrCat(node_slots_[n].name, ": ", st.message())
                        : absl::StrCat(node_slots_[n].name, " unavailable: step ", plan.step_id, " failed: ",
                                       st.message());
      DMOE_LOG(kError, "scheduler") << message;
      failed->push_back({static_cast<int>(n), lost ? absl::StatusCode::kUnavailable : st.code(), message});
      if (lost && !node_answered) {
        ProbeNode(static_cast<int>(n), absl::StrCat("step ", plan.step_id, " failed: ", st.message()));
      }
      node_bias_version_[n] = -1;  // resend the bias next time
      continue;
    }
    for (const v1::SampledTokenResult& t : result.tokens()) {
      SampledToken s;
      s.id = t.sequence_id();
      s.token = t.token_id();
      s.logprob = t.logprob();
      for (int i = 0; i < t.top_token_ids_size() && i < t.top_logprobs_size(); ++i) {
        s.top.emplace_back(t.top_token_ids(i), t.top_logprobs(i));
      }
      sampled.push_back(std::move(s));
    }
    decisions += result.routing_decisions();
    changed += result.routing_decisions_changed();
    compute += result.times().attention_seconds();
    wait += result.times().expert_wait_seconds();
    other += result.times().other_seconds();
    for (int i = 0; i < result.expert_tokens_size() && i < static_cast<int>(step_load_.size()); ++i) {
      step_load_[i] += result.expert_tokens(i);
    }
    pages.emplace_back(static_cast<int>(n), result.pages_free());
  }
  absl::MutexLock lock(&mu_);
  routing_decisions_ += decisions;
  routing_changed_ += changed;
  node_compute_s_ += compute;
  node_wait_s_ += wait;
  node_other_s_ += other;
  for (auto [n, free] : pages) pages_free_[n] = free;
  return sampled;
}

void ServingLoop::ProbeNode(int n, const std::string& why) {
  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(node_slots_[n].grpc_address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + kProbeTimeout));
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status st = health->Check(&ctx, request, &response);
  if (st.ok() && response.status() == grpc::health::v1::HealthCheckResponse::SERVING) return;
  coordinator_.MarkDown(n, node_slots_[n].incarnation,
                        absl::StrCat(why, "; its health check: ",
                                     st.ok() ? "NOT_SERVING" : FromGrpcStatus(st).ToString()));
}

void ServingLoop::FreeLeftovers(int n) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + kProbeTimeout));
  v1::CacheStatus cache;
  if (!nodes_[n]->GetCacheStatus(&ctx, v1::GetCacheStatusRequest(), &cache).ok() || cache.sequence_ids_size() == 0) {
    return;
  }
  DMOE_LOG(kInfo, "scheduler") << node_slots_[n].name << " holds " << cache.sequence_ids_size()
                               << " sequences this scheduler did not place: freeing them";
  grpc::ClientContext free_ctx;
  free_ctx.set_deadline(absl::ToChronoTime(absl::Now() + kProbeTimeout));
  v1::FreeRequest free;
  *free.mutable_sequence_ids() = cache.sequence_ids();
  (void)nodes_[n]->Free(&free_ctx, free, &cache);
}

void ServingLoop::SyncMembership() {
  const std::vector<NodeSlot> slots = coordinator_.Slots();
  const int N = coordinator_.num_attention_nodes();
  std::string cannot_serve;
  bool any_attention = false;
  for (int i = 0; i < N; ++i) {
    const NodeSlot& slot = slots[i];
    any_attention = any_attention || slot.serving;
    bool was_up;
    {
      absl::MutexLock lock(&mu_);
      was_up = batcher_->node_up(i);
      if (was_up && (!slot.serving || slot.incarnation != node_slots_[i].incarnation)) {
        const std::string why = slot.state == v1::NODE_STATE_DOWN ? slot.down_reason
                                : slot.incarnation != node_slots_[i].incarnation ? "it restarted"
                                                                                  : "it is not serving";
        std::vector<RequestEvent> lost = batcher_->NodeDown(
            i, absl::StatusCode::kUnavailable, absl::StrCat(node_slots_[i].name, " unavailable: ", why));
        const size_t num_lost = lost.size();
        QueueLocked(std::move(lost));
        pages_free_[i] = 0;
        was_up = false;
        DMOE_LOG(kWarning, "scheduler") << node_slots_[i].name << " is out of service (" << why << "); "
                                        << num_lost << " requests on it ended";
      }
    }
    if (!was_up && slot.serving) {
      if (slot.grpc_address != node_slots_[i].grpc_address || slot.cache_pages != node_slots_[i].cache_pages) {
        nodes_[i] = NodeStub(slot, config_, options_.batching.max_batch_tokens);
      }
      node_slots_[i] = slot;
      FreeLeftovers(i);  // a process that was only cut off may still hold sequences
      node_bias_version_[i] = -1;
      absl::MutexLock lock(&mu_);
      batcher_->NodeUp(i, slot.cache_pages);
      pages_free_[i] = slot.cache_pages;
      DMOE_LOG(kInfo, "scheduler") << slot.name << " serves again";
    }
  }
  // Every expert shard needs one serving replica (one node without replicas).
  const int groups = coordinator_.num_expert_groups();
  std::vector<bool> group_serves(groups, false);
  for (size_t i = N; i < slots.size(); ++i) {
    if (slots[i].serving) group_serves[coordinator_.GroupOf(static_cast<int>(i))] = true;
  }
  for (size_t i = N; i < slots.size() && cannot_serve.empty(); ++i) {
    if (slots[i].serving || group_serves[coordinator_.GroupOf(static_cast<int>(i))]) continue;
    cannot_serve = absl::StrCat(slots[i].name, " unavailable: ",
                                slots[i].state == v1::NODE_STATE_DOWN ? slots[i].down_reason
                                                                      : "it is joining (not connected yet)");
  }
  if (cannot_serve.empty() && !any_attention) cannot_serve = "no attention node is serving";
  bool changed = false;
  {
    absl::MutexLock lock(&mu_);
    if (!cannot_serve.empty() && unavailable_.empty()) {
      std::vector<RequestEvent> lost = batcher_->FailAll(absl::StatusCode::kUnavailable, cannot_serve);
      DMOE_LOG(kWarning, "scheduler") << "cannot serve: " << cannot_serve << "; " << lost.size()
                                      << " requests ended";
      QueueLocked(std::move(lost));
    }
    changed = cannot_serve.empty() != unavailable_.empty();
    unavailable_ = cannot_serve;
  }
  if (changed) {
    DMOE_LOG(kInfo, "scheduler") << (cannot_serve.empty() ? "serving again" : "not serving");
    if (options_.on_serving_changed) options_.on_serving_changed(cannot_serve.empty());
  }
}

void ServingLoop::Balance(const std::vector<int64_t>& step_load) {
  if (balancer_ == nullptr || options_.balancer.mode == router::BalanceMode::kOff) return;
  const int64_t E = config_.n_routed_experts;
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    if (config_.is_moe_layer(l)) (void)window_->Add(l, absl::MakeConstSpan(step_load.data() + l * E, E));
  }
  window_->EndStep();
  if (window_->num_steps() < options_.balancer.window_steps) return;
  absl::StatusOr<std::vector<std::vector<float>>> biases = balancer_->Update(*window_);
  window_->Reset();
  if (!biases.ok()) {
    DMOE_LOG(kWarning, "scheduler") << "balancer: " << biases.status();
    return;
  }
  serving_bias_flat_.assign(config_.num_hidden_layers * E, 0.0f);
  double max_abs = 0;
  for (size_t l = 0; l < biases->size(); ++l) {
    for (size_t e = 0; e < (*biases)[l].size(); ++e) {
      serving_bias_flat_[l * E + e] = (*biases)[l][e];
      max_abs = std::max(max_abs, std::fabs(static_cast<double>((*biases)[l][e])));
    }
  }
  ++bias_version_;
  metrics::Scheduler().ServingBiasChanged(serving_bias_flat_, E);
  absl::MutexLock lock(&mu_);
  max_abs_bias_ = max_abs;
}

void ServingLoop::Run() {
  int64_t idle_at = -1;  // work_version_ when the last plan had nothing to run
  for (;;) {
    StepPlan plan;
    std::vector<bool> up;
    absl::Time t0;
    {
      absl::MutexLock lock(&mu_);
      auto wake = [this, &idle_at]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        if (stop_ || membership_version_ != synced_version_) return true;
        const bool work = batcher_->num_waiting() > 0 || batcher_->num_running() > 0 || batcher_->num_to_free() > 0;
        return work && work_version_ != idle_at;
      };
      // A waiting request's deadline is the one thing that changes without
      // an event.
      mu_.AwaitWithDeadline(absl::Condition(&wake),
                            work_version_ == idle_at ? batcher_->NextDeadline() : absl::InfiniteFuture());
      if (stop_) return;
      if (membership_version_ != synced_version_) {
        synced_version_ = membership_version_;
        mu_.Unlock();
        SyncMembership();
        mu_.Lock();
        idle_at = -1;
        continue;
      }
      // Streaming lags at most one step: the delivery thread has taken what
      // the last step queued (it may still be pushing it).
      auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return outgoing_.empty(); };
      mu_.Await(absl::Condition(&room));
      t0 = absl::Now();
      plan = batcher_->PlanStep(t0);
      QueueLocked(std::move(plan.events));
      preemptions_ += static_cast<int64_t>(plan.preempted.size());
      for (int n = 0; n < batcher_->num_nodes(); ++n) up.push_back(batcher_->node_up(n));
      const absl::Time now = absl::Now();
      for (const NodeStep& node : plan.nodes) {
        for (const ScheduledSequence& s : node.sequences) {
          auto it = streams_.find(s.id);
          if (it != streams_.end()) it->second->MarkScheduled(now);
        }
      }
    }
    bool any = false;
    for (const NodeStep& node : plan.nodes) any = any || !node.empty();
    if (!any) {
      absl::MutexLock lock(&mu_);
      (void)batcher_->ApplyResults(plan, {});
      idle_at = work_version_;
      continue;
    }
    idle_at = -1;
    step_load_.assign(config_.num_hidden_layers * config_.n_routed_experts, 0);
    const absl::Time t1 = absl::Now();
    std::vector<BatchScheduler::NodeFailure> failed;
    std::vector<SampledToken> sampled = RunOnNodes(plan, up, &failed);
    const absl::Time t2 = absl::Now();
    {
      absl::MutexLock lock(&mu_);
      QueueLocked(batcher_->ApplyResults(plan, sampled, failed));
      ++steps_;
    }
    Balance(step_load_);
    metrics::Scheduler().StepFinished(absl::Now() - t0, plan.num_sequences(), plan.num_tokens(), step_load_,
                                      coordinator_.placement());
    absl::MutexLock lock(&mu_);
    rpc_s_ += absl::ToDoubleSeconds(t2 - t1);
    scheduler_s_ += absl::ToDoubleSeconds((t1 - t0) + (absl::Now() - t2));
  }
}

}  // namespace dmoe::scheduler
