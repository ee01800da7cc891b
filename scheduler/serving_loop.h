// The scheduler's step loop: one thread that plans each step with the
// BatchScheduler, runs it on every attention node (RunStep RPCs in
// parallel), applies the sampled tokens and drives the expert-load
// balancer; a second thread streams the events to the requests' Generate
// calls, so that writing them overlaps the next step.
#ifndef DMOE_SCHEDULER_SERVING_LOOP_H_
#define DMOE_SCHEDULER_SERVING_LOOP_H_

#include <grpcpp/completion_queue.h>

#include <atomic>
#include <deque>
#include <functional>
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

// Where the events of one request go (its Generate call), with the times
// its usage reports. Push is called from the loop's delivery thread, one
// call at a time, in event order, never after the finished event; the loop
// does not wait for it. Thread-safe.
class RequestStream {
 public:
  explicit RequestStream(absl::Time arrival) : arrival_(arrival) {}
  virtual ~RequestStream() = default;
  virtual void Push(RequestEvent event) = 0;
  absl::Time arrival() const { return arrival_; }
  void MarkScheduled(absl::Time t);
  void MarkFirstToken(absl::Time t);
  absl::Time first_scheduled() const;
  absl::Time first_token() const;

 private:
  const absl::Time arrival_;
  mutable absl::Mutex mu_;
  absl::Time first_scheduled_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Time first_token_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
};

struct ServingOptions {
  BatchScheduler::Options batching;  // pages_per_node is filled from the nodes' registrations
  router::BalancerOptions balancer;
  absl::Duration step_rpc_timeout = absl::Seconds(120);
  // Called from the loop's thread when the cluster starts or stops being
  // able to serve (every expert node and at least one attention node
  // serving); the scheduler's grpc.health.v1 follows it.
  std::function<void(bool serving)> on_serving_changed;
};

// Membership: the loop follows the Coordinator (its listener). An attention
// node that stops serving (down, or restarted and not yet reached by every
// expert node) has its requests ended UNAVAILABLE naming it and the cause,
// and gets no new ones until it serves again (with an empty cache). While
// an expert node does not serve, or no attention node does, the cluster
// cannot serve: every request ends UNAVAILABLE naming the node, Submit
// refuses new ones, and on_serving_changed(false) is called.
//
// Thread-safe: Submit/Cancel/Stats from gRPC handlers, the loop on its thread.
class ServingLoop {
 public:
  // REQUIRES: coordinator.AllReady(). The coordinator must outlive the loop.
  static absl::StatusOr<std::unique_ptr<ServingLoop>> Start(const ModelConfig& config,
                                                            Coordinator& coordinator, ServingOptions options);
  ~ServingLoop();

  // Queues a request (its id must be unique) whose events go to `stream`;
  // RESOURCE_EXHAUSTED when the waiting queue is full or it can never fit;
  // UNAVAILABLE naming the lost node while the cluster cannot serve.
  absl::Status Submit(Request request, std::shared_ptr<RequestStream> stream);
  void Cancel(RequestId id);
  // No request waiting or running, and every event pushed to its stream.
  bool Idle() const;
  // Waits until Idle() or the deadline; returns Idle().
  bool WaitIdle(absl::Time deadline) const;
  v1::GetClusterStatsResponse Stats() const;
  const router::BalancerOptions& balancer_options() const { return options_.balancer; }

 private:
  ServingLoop(const ModelConfig& config, Coordinator& coordinator, ServingOptions options);
  void Run();
  // Applies the coordinator's membership to the batcher (loop thread).
  void SyncMembership();
  // Runs one planned step on the nodes that are up; returns the sampled
  // tokens and the nodes whose step failed.
  std::vector<SampledToken> RunOnNodes(const StepPlan& plan, const std::vector<bool>& up,
                                       std::vector<BatchScheduler::NodeFailure>* failed);
  // After a failed step: whether node n still answers its health check;
  // marks it down in the coordinator if not.
  void ProbeNode(int n, const std::string& why);
  // Frees every sequence attention node n caches (none of them ours).
  void FreeLeftovers(int n);
  // Feeds one step's routing counts [layer * E + e] to the balancer.
  void Balance(const std::vector<int64_t>& step_load);
  // Queues the events for their streams, in the critical section that made
  // them (so Idle() never sees a finished request whose event is not
  // queued). Loop thread; before each plan it waits until the delivery
  // thread has taken the last step's events, which bounds how far streaming
  // lags behind the steps.
  void QueueLocked(std::vector<RequestEvent> events) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The delivery thread: pushes the queued events in order until
  // stop_delivery_ and nothing is left.
  void RunDelivery();
  bool IdleLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Bump();  // the coordinator's listener

  const ModelConfig config_;
  Coordinator& coordinator_;
  ServingOptions options_;
  // Loop thread only: attention node i's stub, and the slot it was made for.
  std::vector<std::unique_ptr<v1::AttentionNode::Stub>> nodes_;
  std::vector<NodeSlot> node_slots_;
  std::unique_ptr<router::BiasBalancer> balancer_;
  std::unique_ptr<router::ExpertLoadTracker> window_;
  std::vector<float> serving_bias_flat_;  // [layer * E], the biases last computed
  int64_t bias_version_ = 0;
  std::vector<int64_t> node_bias_version_;  // last version each node received
  std::vector<int64_t> step_load_;          // [layer * E], this step's routing counts
  std::vector<v1::StepRequest> step_requests_;  // per node, reused every step (its capacity kept)
  grpc::CompletionQueue step_cq_;               // the RunStep calls'; the loop thread drains it

  mutable absl::Mutex mu_;
  std::unique_ptr<BatchScheduler> batcher_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<RequestId, std::shared_ptr<RequestStream>> streams_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Bumped by the coordinator's listener; the loop syncs when it moved.
  int64_t membership_version_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t synced_version_ ABSL_GUARDED_BY(mu_) = 0;
  // Bumped by Submit and Cancel: after a step with nothing to run, the loop
  // waits for it (or the next deadline) instead of planning again.
  int64_t work_version_ ABSL_GUARDED_BY(mu_) = 0;
  // Why the cluster cannot serve; empty while it can.
  std::string unavailable_ ABSL_GUARDED_BY(mu_) = "starting";
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
  // Events for the delivery thread, in order, with the time the loop had
  // them (MarkFirstToken).
  struct Outgoing {
    std::shared_ptr<RequestStream> stream;
    RequestEvent event;
    absl::Time at;
  };
  std::vector<Outgoing> outgoing_ ABSL_GUARDED_BY(mu_);
  bool pushing_ ABSL_GUARDED_BY(mu_) = false;  // the delivery thread holds a batch
  bool stop_delivery_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
  std::thread delivery_thread_;
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_SERVING_LOOP_H_
