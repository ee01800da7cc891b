// Prometheus metrics of every dmoe process: the /metrics endpoint
// (MetricsServer, below) and one class per process kind holding its
// families. Names follow Prometheus conventions and the vLLM/SGLang
// dashboards' vocabulary (dmoe_ prefix, base units, _total counters); the
// list with meanings is in docs/deploy.md.
//
// The families live in one process-wide registry, so the hooks in the
// serving code are single calls (metrics::Scheduler().StepFinished(..)) and
// cost nothing to thread through constructors. Values are recorded whether or
// not an endpoint is started; a process exposes them with MetricsServer.
// Every method is thread-safe.
#ifndef DMOE_CORE_METRICS_METRICS_H_
#define DMOE_CORE_METRICS_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "dmoe/v1/control.pb.h"
#include "router/expert_placement.h"
#include "transport/transport.h"

namespace dmoe::metrics {

// The HTTP endpoint (GET /metrics, text format 0.0.4) of this process's
// registry.
//
// Its own small HTTP/1.1 responder on one thread, not prometheus-cpp's
// civetweb exposer: civetweb starts its threads with a fixed 100 KiB stack,
// and glibc carves each thread's static TLS out of that stack. OpenBLAS
// (60 KiB of TLS) and the CUDA runtime leave too little of it, and civetweb's
// worker overflowed its stack on the first scrape in every node process.
class MetricsServer {
 public:
  // Listens on host:port; port 0 picks a free port. port -1 means off and
  // returns nullptr. INVALID_ARGUMENT outside [-1, 65535], UNAVAILABLE when
  // the address cannot be bound. Logs the address it serves.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& host, int64_t port);
  ~MetricsServer();

  int port() const { return port_; }

 private:
  MetricsServer(int listen_fd, int port);
  void Serve();
  void Answer(int connection) const;
  const int listen_fd_;
  const int port_;
  int stop_pipe_[2] = {-1, -1};  // a byte written to [1] stops Serve()
  std::thread thread_;
};

// dmoe-scheduler: requests, steps, the latent caches, expert load, bias.
class SchedulerMetrics {
 public:
  SchedulerMetrics();

  // A Generate call refused before it was queued (invalid, queue full,
  // draining), by gRPC-style code name, e.g. "resource_exhausted".
  void RequestRejected(std::string_view code);

  // One iteration of the step loop that ran tokens.
  void StepFinished(absl::Duration duration, int64_t sequences, int64_t tokens,
                    absl::Span<const int64_t> expert_tokens,  // [layer * E + e] routed this step
                    const router::ExpertPlacement& placement);
  // The balancer's new serving biases, [layer * E + e].
  void ServingBiasChanged(absl::Span<const float> bias, int64_t num_experts);
  // Running/waiting requests, caches, and the loop's cumulative counters
  // (ServingLoop::Stats()); counters advance by the difference to the last
  // call, so call it with snapshots of one loop.
  void ClusterStats(const v1::GetClusterStatsResponse& stats);
  // Where ClusterStats snapshots come from: called at every scrape (the
  // step loop may sleep for hours). nullptr stops; setting waits for a
  // scrape in progress, so the source may be destroyed once this returns.
  void SetClusterStatsSource(std::function<v1::GetClusterStatsResponse()> source);
  // Node membership as the scheduler sees it: ready, or marked down.
  void NodeUp(v1::NodeKind kind, int node_id, bool up);

 private:
  friend class RequestMetrics;
  struct Delta;  // last cumulative values seen by ClusterStats

  prometheus::Family<prometheus::Counter>& request_success_;
  prometheus::Family<prometheus::Counter>& request_rejected_;
  prometheus::Counter& prompt_tokens_;
  prometheus::Counter& generation_tokens_;
  prometheus::Histogram& ttft_;
  prometheus::Histogram& itl_;
  prometheus::Histogram& e2e_;
  prometheus::Histogram& queue_time_;
  prometheus::Histogram& request_prompt_tokens_;
  prometheus::Histogram& request_generation_tokens_;
  prometheus::Histogram& step_duration_;
  prometheus::Histogram& batch_sequences_;
  prometheus::Histogram& batch_tokens_;
  prometheus::Gauge& running_;
  prometheus::Gauge& waiting_;
  prometheus::Counter& steps_;
  prometheus::Counter& preemptions_;
  prometheus::Counter& routing_decisions_;
  prometheus::Counter& routing_changed_;
  prometheus::Family<prometheus::Counter>& phase_seconds_;
  prometheus::Family<prometheus::Gauge>& pages_total_;
  prometheus::Family<prometheus::Gauge>& pages_used_;
  prometheus::Family<prometheus::Gauge>& cache_usage_;
  prometheus::Family<prometheus::Counter>& expert_tokens_;
  prometheus::Family<prometheus::Counter>& expert_node_tokens_;
  prometheus::Gauge& expert_imbalance_;
  prometheus::Gauge& expert_node_imbalance_;
  prometheus::Family<prometheus::Gauge>& serving_bias_;
  prometheus::Gauge& serving_bias_max_abs_;
  prometheus::Family<prometheus::Gauge>& node_up_;

  absl::Mutex source_mu_;
  std::function<v1::GetClusterStatsResponse()> source_ ABSL_GUARDED_BY(source_mu_);
  absl::Mutex mu_;
  std::unique_ptr<Delta> last_ ABSL_GUARDED_BY(mu_);
  std::vector<prometheus::Counter*> expert_token_counters_ ABSL_GUARDED_BY(mu_);  // [layer * E + e]
  std::vector<int64_t> window_ ABSL_GUARDED_BY(mu_);                              // per expert, all layers
  int64_t window_steps_ ABSL_GUARDED_BY(mu_) = 0;
};
SchedulerMetrics& Scheduler();

// One Generate call from admission to its last event.
class RequestMetrics {
 public:
  explicit RequestMetrics(int64_t prompt_tokens) : prompt_tokens_(prompt_tokens) {}
  // Counts the prompt tokens once the request is queued. Touches no member,
  // so it may run concurrently with Tokens/Finished.
  void Admitted() const;
  // An event with `tokens` new tokens at `now`: generation tokens and the
  // inter-token latency since the previous token.
  void Tokens(int64_t tokens, absl::Time now = absl::Now());
  // The last event: finish reason ("stop", "length", "cancelled", "error")
  // and the latencies from arrival. first_scheduled/first_token are
  // InfiniteFuture when that never happened.
  void Finished(std::string_view finish_reason, absl::Time arrival, absl::Time first_scheduled, absl::Time first_token,
                absl::Time now = absl::Now());

 private:
  const int64_t prompt_tokens_;
  int64_t generation_tokens_ = 0;
  absl::Time last_token_ = absl::InfinitePast();
};

// dmoe-attention-node: step phases and the expert nodes' reply times.
class AttentionNodeMetrics {
 public:
  AttentionNodeMetrics();
  // One RunStep: its phase times and the tokens it ran.
  void StepFinished(const v1::StepPhaseTimes& times, const v1::StepRequest& request);
  // A MoE layer's partial sums from expert node `expert_node` (its index),
  // `round_trip` after the dispatch went out.
  void ExpertReply(int expert_node, absl::Duration round_trip);

 private:
  prometheus::Family<prometheus::Histogram>& phase_;
  prometheus::Histogram& step_tokens_;
  prometheus::Family<prometheus::Histogram>& round_trip_;
};
AttentionNodeMetrics& AttentionNode();

// dmoe-expert-node: expert computations.
class ExpertNodeMetrics {
 public:
  ExpertNodeMetrics();
  // One layer's experts over `tokens` tokens gathered from `dispatches`
  // messages.
  void LayerServed(int64_t tokens, int64_t dispatches, absl::Duration compute);

 private:
  prometheus::Histogram& compute_;
  prometheus::Counter& tokens_;
  prometheus::Counter& dispatches_;
};
ExpertNodeMetrics& ExpertNode();

// The data plane, per peer node id: both node kinds.
class TransportMetrics {
 public:
  TransportMetrics();
  void Sent(transport::NodeId peer, size_t bytes, absl::Duration duration, bool ok);
  void Received(transport::NodeId peer, size_t bytes);

 private:
  prometheus::Family<prometheus::Counter>& sent_bytes_;
  prometheus::Family<prometheus::Counter>& sent_messages_;
  prometheus::Family<prometheus::Counter>& send_failures_;
  prometheus::Family<prometheus::Histogram>& send_seconds_;
  prometheus::Family<prometheus::Counter>& received_bytes_;
  prometheus::Family<prometheus::Counter>& received_messages_;
};
TransportMetrics& Transport();

// Wraps a transport so that every Send and Receive is counted in Transport().
absl::StatusOr<std::unique_ptr<transport::Transport>> Metered(
    absl::StatusOr<std::unique_ptr<transport::Transport>> inner);

}  // namespace dmoe::metrics

#endif  // DMOE_CORE_METRICS_METRICS_H_
