// The scheduler's step loop: one thread that plans each step with the
// BatchScheduler, runs it on every attention node (RunStep RPCs in
// parallel), applies the sampled tokens, streams the events to the
// requests' Generate calls, and drives the expert-load balancer.
#ifndef DMOE_SCHEDULER_SERVING_LOOP_H_
#define DMOE_SCHEDULER_SERVING_LOOP_H_

#include <atomic>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "dmoe/v1/control.grpc.pb.h"
#include "router/load_balancer.h"
#include "scheduler/batch_scheduler.h"
#include "scheduler/coordinator.h"

namespace dmoe::scheduler {

// The events of one request, from the step loop to its Generate call.
// Thread-safe.
class RequestStream {
 public:
  explicit RequestStream(absl::Time arrival) : arrival_(arrival) {}
  void Push(RequestEvent event);
  // Waits up to `timeout` for the next event.
  bool Pop(RequestEvent* event, absl::Duration timeout);
  absl::Time arrival() const { return arrival_; }
  void MarkScheduled(absl::Time t);
  void MarkFirstToken(absl::Time t);
  absl::Time first_scheduled() const;
  absl::Time first_token() const;

 private:
  const absl::Time arrival_;
  mutable absl::Mutex mu_;
  std::deque<RequestEvent> events_ ABSL_GUARDED_BY(mu_);
  absl::Time first_scheduled_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Time first_token_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
};

struct ServingOptions {
  BatchScheduler::Options batching;  // pages_per_node is filled from the nodes' registrations
  router::BalancerOptions balancer;
  absl::Duration step_rpc_timeout = absl::Seconds(120);
};

// Thread-safe: Submit/Cancel/Stats from gRPC handlers, the loop on its thread.
class ServingLoop {
 public:
  // REQUIRES: coordinator.AllReady().
  static absl::StatusOr<std::unique_ptr<ServingLoop>> Start(const ModelConfig& config,
                                                            Coordinator& coordinator, ServingOptions options);
  ~ServingLoop();

  // Queues a request (its id must be unique); RESOURCE_EXHAUSTED when the
  // waiting queue is full or it can never fit.
  absl::StatusOr<std::shared_ptr<RequestStream>> Submit(Request request);
  void Cancel(RequestId id);
  // No request waiting or running.
  bool Idle() const;
  v1::GetClusterStatsResponse Stats() const;
  const router::BalancerOptions& balancer_options() const { return options_.balancer; }

 private:
  ServingLoop(const ModelConfig& config, Coordinator& coordinator, ServingOptions options);
  void Run();
  // Runs one planned step on the nodes; returns the sampled tokens.
  std::vector<SampledToken> RunOnNodes(const StepPlan& plan);
  // Feeds one step's routing counts [layer * E + e] to the balancer.
  void Balance(const std::vector<int64_t>& step_load);
  void Deliver(const std::vector<RequestEvent>& events);

  const ModelConfig config_;
  Coordinator& coordinator_;
  ServingOptions options_;
  std::vector<std::unique_ptr<v1::AttentionNode::Stub>> nodes_;
  std::unique_ptr<router::BiasBalancer> balancer_;
  std::unique_ptr<router::ExpertLoadTracker> window_;
  std::vector<float> serving_bias_flat_;  // [layer * E], the biases last computed
  int64_t bias_version_ = 0;
  std::vector<int64_t> node_bias_version_;  // last version each node received
  std::vector<int64_t> step_load_;          // [layer * E], this step's routing counts

  mutable absl::Mutex mu_;
  std::unique_ptr<BatchScheduler> batcher_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<RequestId, std::shared_ptr<RequestStream>> streams_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int64_t steps_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t routing_decisions_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t routing_changed_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t preemptions_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int64_t> pages_free_ ABSL_GUARDED_BY(mu_);
  double max_abs_bias_ ABSL_GUARDED_BY(mu_) = 0;
  // Step-phase totals (seconds), see GetClusterStatsResponse.
  double scheduler_s_ ABSL_GUARDED_BY(mu_) = 0, rpc_s_ ABSL_GUARDED_BY(mu_) = 0;
  double node_compute_s_ ABSL_GUARDED_BY(mu_) = 0, node_wait_s_ ABSL_GUARDED_BY(mu_) = 0;
  double node_other_s_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_SERVING_LOOP_H_
