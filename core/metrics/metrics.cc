#include "core/metrics/metrics.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/text_serializer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <prometheus/collectable.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <cmath>
#include <exception>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "router/expert_load.h"

namespace dmoe::metrics {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using Buckets = prometheus::Histogram::BucketBoundaries;

// LLM serving spans milliseconds (a decode step on a GPU) to a minute (the
// first token of a long prompt behind a queue).
const Buckets& TtftBuckets() {
  static const Buckets b = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25, 0.5,
                            0.75,  1.0,   2.5,  5.0,  7.5,  10.0, 20.0, 30.0, 40.0, 60.0};
  return b;
}
const Buckets& ItlBuckets() {
  static const Buckets b = {0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04,
                            0.05,  0.075,  0.1,   0.15,   0.2,  0.3,   0.4,  0.5,   1.0,  2.5};
  return b;
}
const Buckets& RequestBuckets() {  // end-to-end and queue time
  static const Buckets b = {0.01, 0.025, 0.05, 0.1,  0.25, 0.5,  1.0,   2.5,   5.0,  10.0,
                            15.0, 20.0,  30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0};
  return b;
}
const Buckets& StepBuckets() {
  static const Buckets b = {0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0};
  return b;
}
const Buckets& LinkBuckets() {  // one transport send, one expert round trip
  static const Buckets b = {0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                            0.005,   0.01,     0.025,   0.05,   0.1,     0.25,   0.5,   1.0};
  return b;
}
// Powers of two: batch sizes and token counts.
Buckets PowersOfTwo(int n) {
  Buckets b;
  for (int i = 0; i < n; ++i) b.push_back(std::ldexp(1.0, i));
  return b;
}

// Window over which the imbalance gauges are computed: long enough that a
// batch of one does not read as total imbalance, short enough to follow the
// balancer.
constexpr int64_t kImbalanceWindowSteps = 32;

prometheus::Registry& Registry() {
  static prometheus::Registry* registry = new prometheus::Registry();
  return *registry;
}
std::shared_ptr<prometheus::Registry> SharedRegistry() {
  // The registry lives as long as the process.
  static std::shared_ptr<prometheus::Registry> shared(&Registry(), [](prometheus::Registry*) {});
  return shared;
}

// Runs the hooks that refresh values kept elsewhere, first in every scrape
// (MetricsServer::Answer collects it first); contributes no family.
class BeforeScrape : public prometheus::Collectable {
 public:
  static std::shared_ptr<BeforeScrape> Get() {
    static std::shared_ptr<BeforeScrape> instance = std::make_shared<BeforeScrape>();
    return instance;
  }
  void Add(std::function<void()> hook) {
    absl::MutexLock lock(&mu_);
    hooks_.push_back(std::move(hook));
  }
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<std::function<void()>> hooks;
    {
      // Not held while the hooks run: they take the serving code's locks,
      // and Add may run under those (the first metrics call constructs).
      absl::MutexLock lock(&mu_);
      hooks = hooks_;
    }
    for (const auto& hook : hooks) hook();
    return {};
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::function<void()>> hooks_ ABSL_GUARDED_BY(mu_);
};

prometheus::Family<prometheus::Counter>& CounterFamily(const std::string& name, const std::string& help) {
  return BuildCounter().Name(name).Help(help).Register(Registry());
}
prometheus::Family<prometheus::Gauge>& GaugeFamily(const std::string& name, const std::string& help) {
  return BuildGauge().Name(name).Help(help).Register(Registry());
}
prometheus::Family<prometheus::Histogram>& HistogramFamily(const std::string& name, const std::string& help) {
  return BuildHistogram().Name(name).Help(help).Register(Registry());
}
prometheus::Counter& Counter(const std::string& name, const std::string& help) {
  return CounterFamily(name, help).Add({});
}
prometheus::Gauge& Gauge(const std::string& name, const std::string& help) { return GaugeFamily(name, help).Add({}); }
prometheus::Histogram& Histogram(const std::string& name, const std::string& help, const Buckets& buckets) {
  return HistogramFamily(name, help).Add({}, buckets);
}

double Seconds(absl::Duration d) { return std::max(0.0, absl::ToDoubleSeconds(d)); }

// Counter <- cumulative value: advances by the increase (a restarted loop
// starting from 0 is taken as a fresh start).
void Advance(prometheus::Counter& c, double now, double* last) {
  if (now > *last) c.Increment(now - *last);
  *last = now;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& host, int64_t port) {
  if (port == -1) return std::unique_ptr<MetricsServer>();
  if (port < -1 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-port ", port, " outside [-1, 65535] (-1 = off)"));
  }
  const std::string address = absl::StrCat(host, ":", port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &found); rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics endpoint: cannot resolve ", address, ": ", gai_strerror(rc)));
  }
  std::string why = "no address";
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));  // restarts within TIME_WAIT
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 64) != 0) {
      why = std::strerror(errno);
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("metrics endpoint: cannot listen on ", address, ": ", why));
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const int bound_port = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                             : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  auto server = std::unique_ptr<MetricsServer>(new MetricsServer(fd, bound_port));
  if (pipe2(server->stop_pipe_, O_CLOEXEC) != 0) {
    return absl::UnavailableError(absl::StrCat("metrics endpoint: pipe: ", std::strerror(errno)));
  }
  server->thread_ = std::thread([s = server.get()] { s->Serve(); });
  DMOE_LOG(kInfo, "metrics") << "serving http://" << host << ":" << bound_port << "/metrics";
  return server;
}

MetricsServer::MetricsServer(int listen_fd, int port) : listen_fd_(listen_fd), port_(port) {}

MetricsServer::~MetricsServer() {
  if (thread_.joinable()) {
    const char stop = 1;
    (void)!write(stop_pipe_[1], &stop, 1);
    thread_.join();
  }
  for (int fd : stop_pipe_) {
    if (fd >= 0) close(fd);
  }
  close(listen_fd_);
}

// One connection at a time: scrapes are rare, small and must not compete
// with serving for threads.
void MetricsServer::Serve() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_pipe_[0], POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      DMOE_LOG(kError, "metrics") << "poll: " << std::strerror(errno);
      return;
    }
    if (fds[1].revents != 0) return;
    const int connection = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (connection < 0) continue;
    Answer(connection);
    close(connection);
  }
}

void MetricsServer::Answer(int connection) const {
  // A slow or silent client cannot hold the endpoint for long.
  const timeval timeout{2, 0};
  setsockopt(connection, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(connection, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  std::string request;
  char buffer[4096];
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < 16384) {
    const ssize_t n = recv(connection, buffer, sizeof(buffer), 0);
    if (n <= 0) return;
    request.append(buffer, static_cast<size_t>(n));
  }
  const std::string_view line = std::string_view(request).substr(0, request.find("\r\n"));
  std::string status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8", body;
  const bool get = line.rfind("GET ", 0) == 0, head = line.rfind("HEAD ", 0) == 0;
  const std::string_view target = line.substr(line.find(' ') + 1, line.rfind(' ') - line.find(' ') - 1);
  const std::string_view path = target.substr(0, target.find('?'));
  if (!get && !head) {
    status = "405 Method Not Allowed";
    type = "text/plain";
    body = "only GET /metrics\n";
  } else if (path != "/metrics") {
    status = "404 Not Found";
    type = "text/plain";
    body = "only GET /metrics\n";
  } else {
    std::vector<prometheus::MetricFamily> families = BeforeScrape::Get()->Collect();
    std::vector<prometheus::MetricFamily> registered = SharedRegistry()->Collect();
    families.insert(families.end(), std::make_move_iterator(registered.begin()),
                    std::make_move_iterator(registered.end()));
    body = prometheus::TextSerializer().Serialize(families);
  }
  std::string response = absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", type,
                                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n");
  if (!head) response += body;
  for (size_t sent = 0; sent < response.size();) {
    const ssize_t n = send(connection, response.data() + sent, response.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;
    sent += static_cast<size_t>(n);
  }
}

// ---------------------------------------------------------------- scheduler

struct SchedulerMetrics::Delta {
  double steps = 0, preemptions = 0, decisions = 0, changed = 0;
  std::vector<double> phases = std::vector<double>(5, 0.0);
  std::vector<double> expert_node_tokens;
};

namespace {
constexpr const char* kPhases[] = {"scheduler", "step_rpc", "node_attention", "node_expert_wait", "node_other"};
constexpr const char* kFinishReasons[] = {"stop", "length", "cancelled", "error"};
}  // namespace

SchedulerMetrics::SchedulerMetrics()
    : request_success_(CounterFamily("dmoe_request_success_total",
                                     "Requests finished, by finish_reason (stop, length, cancelled, error).")),
      request_rejected_(
          CounterFamily("dmoe_request_rejected_total", "Generate calls refused before queueing, by gRPC status code.")),
      prompt_tokens_(Counter("dmoe_prompt_tokens_total", "Prompt tokens of admitted requests.")),
      generation_tokens_(Counter("dmoe_generation_tokens_total", "Tokens generated and streamed.")),
      ttft_(Histogram("dmoe_time_to_first_token_seconds", "From arrival to the first generated token.", TtftBuckets())),
      itl_(Histogram("dmoe_inter_token_latency_seconds", "Between consecutive tokens of one request.", ItlBuckets())),
      e2e_(Histogram("dmoe_e2e_request_latency_seconds", "From arrival to the last event of a request.",
                     RequestBuckets())),
      queue_time_(
          Histogram("dmoe_request_queue_time_seconds", "From arrival to the first scheduled step.", RequestBuckets())),
      request_prompt_tokens_(
          Histogram("dmoe_request_prompt_tokens", "Prompt length of finished requests.", PowersOfTwo(18))),
      request_generation_tokens_(
          Histogram("dmoe_request_generation_tokens", "Generated tokens of finished requests.", PowersOfTwo(18))),
      step_duration_(Histogram("dmoe_step_duration_seconds",
                               "One scheduler iteration over all attention nodes: plan, RunStep, apply.",
                               StepBuckets())),
      batch_sequences_(
          Histogram("dmoe_batch_size_sequences", "Sequences in one step (decode and prefill).", PowersOfTwo(12))),
      batch_tokens_(Histogram("dmoe_batch_size_tokens", "Tokens in one step.", PowersOfTwo(16))),
      running_(Gauge("dmoe_num_requests_running", "Requests holding a latent cache (prefill or decode).")),
      waiting_(Gauge("dmoe_num_requests_waiting", "Requests queued for admission.")),
      steps_(Counter("dmoe_steps_total", "Steps run.")),
      preemptions_(Counter("dmoe_num_preemptions_total", "Requests whose latent cache was dropped for recompute.")),
      routing_decisions_(Counter("dmoe_routing_decisions_total", "Routed (token, expert) decisions made.")),
      routing_changed_(
          Counter("dmoe_routing_decisions_changed_total", "Routing decisions that the serving bias changed.")),
      phase_seconds_(CounterFamily("dmoe_step_phase_seconds_total",
                                   "Time spent per step phase: scheduler, step_rpc (wall), and summed over "
                                   "attention nodes node_attention, node_expert_wait, node_other.")),
      pages_total_(GaugeFamily("dmoe_latent_cache_pages_total", "Latent-cache pages of an attention node.")),
      pages_used_(GaugeFamily("dmoe_latent_cache_pages_used", "Latent-cache pages in use on an attention node.")),
      cache_usage_(GaugeFamily("dmoe_latent_cache_usage_ratio", "Used / total latent-cache pages (0..1).")),
      expert_tokens_(
          CounterFamily("dmoe_expert_tokens_total", "Tokens routed to each routed expert, by layer and expert.")),
      expert_node_tokens_(CounterFamily("dmoe_expert_node_tokens_total",
                                        "(token, expert) pairs computed per expert node (its load reports).")),
      expert_imbalance_(Gauge("dmoe_expert_imbalance_ratio",
                              "max/mean tokens per routed expert (all layers) over the last 32 steps; 1 = even.")),
      expert_node_imbalance_(Gauge("dmoe_expert_node_imbalance_ratio",
                                   "max/mean expert work per expert node over the last 32 steps; 1 = even.")),
      serving_bias_(GaugeFamily("dmoe_serving_bias", "Serving bias added to a routed expert's gate score.")),
      serving_bias_max_abs_(Gauge("dmoe_serving_bias_max_abs", "Largest absolute serving bias.")),
      node_up_(GaugeFamily("dmoe_node_up", "1 while a node is ready, 0 once the scheduler marked it down.")),
      last_(std::make_unique<Delta>()) {
  for (const char* reason : kFinishReasons) request_success_.Add({{"finish_reason", reason}});
  // The usual refusals exist at 0, so rates and alerts see them from the start.
  for (const char* code : {"invalid_argument", "resource_exhausted", "unavailable"}) {
    request_rejected_.Add({{"code", code}});
  }
  for (const char* phase : kPhases) phase_seconds_.Add({{"phase", phase}});
  expert_imbalance_.Set(1);
  expert_node_imbalance_.Set(1);
  BeforeScrape::Get()->Add([this] {
    absl::MutexLock lock(&source_mu_);
    if (source_) ClusterStats(source_());
  });
}

void SchedulerMetrics::SetClusterStatsSource(std::function<v1::GetClusterStatsResponse()> source) {
  absl::MutexLock lock(&source_mu_);
  source_ = std::move(source);
}

SchedulerMetrics& Scheduler() {
  static SchedulerMetrics* m = new SchedulerMetrics();
  return *m;
}

void SchedulerMetrics::RequestRejected(std::string_view code) {
  request_rejected_.Add({{"code", absl::AsciiStrToLower(std::string(code))}}).Increment();
}

void SchedulerMetrics::StepFinished(absl::Duration duration, int64_t sequences, int64_t tokens,
                                    absl::Span<const int64_t> expert_tokens, const router::ExpertPlacement& placement) {
  step_duration_.Observe(Seconds(duration));
  batch_sequences_.Observe(static_cast<double>(sequences));
  batch_tokens_.Observe(static_cast<double>(tokens));
  const int64_t E = placement.num_experts();
  if (E == 0 || expert_tokens.empty() || expert_tokens.size() % E != 0) return;
  absl::MutexLock lock(&mu_);
  if (expert_token_counters_.size() != expert_tokens.size()) {
    expert_token_counters_.assign(expert_tokens.size(), nullptr);
    window_.assign(E, 0);
    window_steps_ = 0;
  }
  for (size_t i = 0; i < expert_tokens.size(); ++i) {
    if (expert_tokens[i] == 0) continue;
    if (expert_token_counters_[i] == nullptr) {
      expert_token_counters_[i] =
          &expert_tokens_.Add({{"layer", std::to_string(i / E)}, {"expert", std::to_string(i % E)}});
    }
    expert_token_counters_[i]->Increment(static_cast<double>(expert_tokens[i]));
    window_[i % E] += expert_tokens[i];
  }
  if (++window_steps_ < kImbalanceWindowSteps) return;
  expert_imbalance_.Set(router::MaxOverMean(window_));
  if (absl::StatusOr<std::vector<int64_t>> per_node = router::LoadPerNode(placement, window_); per_node.ok()) {
    expert_node_imbalance_.Set(router::MaxOverMean(*per_node));
  }
  std::fill(window_.begin(), window_.end(), 0);
  window_steps_ = 0;
}

void SchedulerMetrics::ServingBiasChanged(absl::Span<const float> bias, int64_t num_experts) {
  if (num_experts <= 0) return;
  double max_abs = 0;
  for (size_t i = 0; i < bias.size(); ++i) {
    // Dense layers carry no bias; only write the MoE layers' entries once set.
    if (bias[i] == 0.0f &&
        !serving_bias_.Has({{"layer", std::to_string(i / num_experts)}, {"expert", std::to_string(i % num_experts)}})) {
      continue;
    }
    serving_bias_.Add({{"layer", std::to_string(i / num_experts)}, {"expert", std::to_string(i % num_experts)}})
        .Set(bias[i]);
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(bias[i])));
  }
  serving_bias_max_abs_.Set(max_abs);
}

void SchedulerMetrics::ClusterStats(const v1::GetClusterStatsResponse& s) {
  running_.Set(static_cast<double>(s.requests_running()));
  waiting_.Set(static_cast<double>(s.requests_waiting()));
  for (int i = 0; i < s.attention_pages_total_size() && i < s.attention_pages_free_size(); ++i) {
    const prometheus::Labels node = {{"attention_node", std::to_string(i)}};
    const double total = static_cast<double>(s.attention_pages_total(i));
    const double used = total - static_cast<double>(s.attention_pages_free(i));
    pages_total_.Add(node).Set(total);
    pages_used_.Add(node).Set(used);
    cache_usage_.Add(node).Set(total > 0 ? used / total : 0.0);
  }
  absl::MutexLock lock(&mu_);
  Delta& d = *last_;
  Advance(steps_, static_cast<double>(s.steps()), &d.steps);
  Advance(preemptions_, static_cast<double>(s.preemptions()), &d.preemptions);
  Advance(routing_decisions_, static_cast<double>(s.routing_decisions()), &d.decisions);
  Advance(routing_changed_, static_cast<double>(s.routing_decisions_changed()), &d.changed);
  const double phases[] = {s.scheduler_seconds(), s.step_rpc_seconds(), s.node_compute_seconds(),
                           s.node_expert_wait_seconds(), s.node_other_seconds()};
  for (int p = 0; p < 5; ++p) Advance(phase_seconds_.Add({{"phase", kPhases[p]}}), phases[p], &d.phases[p]);
  d.expert_node_tokens.resize(std::max<size_t>(d.expert_node_tokens.size(), s.expert_node_tokens_size()), 0.0);
  for (int i = 0; i < s.expert_node_tokens_size(); ++i) {
    Advance(expert_node_tokens_.Add({{"expert_node", std::to_string(i)}}), static_cast<double>(s.expert_node_tokens(i)),
            &d.expert_node_tokens[i]);
  }
}

void SchedulerMetrics::NodeUp(v1::NodeKind kind, int node_id, bool up) {
  const char* k = kind == v1::NODE_KIND_ATTENTION ? "attention" : kind == v1::NODE_KIND_EXPERT ? "expert" : "unknown";
  node_up_.Add({{"kind", k}, {"node_id", std::to_string(node_id)}}).Set(up ? 1 : 0);
}

void RequestMetrics::Admitted() const { Scheduler().prompt_tokens_.Increment(static_cast<double>(prompt_tokens_)); }

void RequestMetrics::Tokens(int64_t tokens, absl::Time now) {
  if (tokens <= 0) return;
  SchedulerMetrics& m = Scheduler();
  m.generation_tokens_.Increment(static_cast<double>(tokens));
  if (last_token_ != absl::InfinitePast()) {
    // Several tokens in one event share the interval.
    const double each = Seconds(now - last_token_) / static_cast<double>(tokens);
    for (int64_t i = 0; i < tokens; ++i) m.itl_.Observe(each);
  }
  last_token_ = now;
  generation_tokens_ += tokens;
}

void RequestMetrics::Finished(std::string_view finish_reason, absl::Time arrival, absl::Time first_scheduled,
                              absl::Time first_token, absl::Time now) {
  SchedulerMetrics& m = Scheduler();
  m.request_success_.Add({{"finish_reason", std::string(finish_reason)}}).Increment();
  m.e2e_.Observe(Seconds(now - arrival));
  if (first_scheduled != absl::InfiniteFuture()) m.queue_time_.Observe(Seconds(first_scheduled - arrival));
  if (first_token != absl::InfiniteFuture()) m.ttft_.Observe(Seconds(first_token - arrival));
  m.request_prompt_tokens_.Observe(static_cast<double>(prompt_tokens_));
  m.request_generation_tokens_.Observe(static_cast<double>(generation_tokens_));
}

// ------------------------------------------------------------------- nodes

AttentionNodeMetrics::AttentionNodeMetrics()
    : phase_(HistogramFamily("dmoe_attention_step_phase_seconds",
                             "One RunStep on this attention node by phase: attention (own compute), "
                             "expert_wait (for the expert nodes' replies), other (decode, sampling, cache).")),
      step_tokens_(Histogram("dmoe_attention_step_tokens", "Tokens in one RunStep on this node.", PowersOfTwo(16))),
      round_trip_(HistogramFamily("dmoe_expert_dispatch_round_trip_seconds",
                                  "From a MoE layer's dispatch to an expert node until its partial sums "
                                  "arrive, by expert_node index.")) {
  for (const char* phase : {"attention", "expert_wait", "other"}) phase_.Add({{"phase", phase}}, StepBuckets());
}

AttentionNodeMetrics& AttentionNode() {
  static AttentionNodeMetrics* m = new AttentionNodeMetrics();
  return *m;
}

void AttentionNodeMetrics::StepFinished(const v1::StepPhaseTimes& times, const v1::StepRequest& request) {
  int64_t tokens = 0;
  for (const v1::StepSequence& s : request.sequences()) tokens += s.tokens_size();
  phase_.Add({{"phase", "attention"}}, StepBuckets()).Observe(std::max(0.0, times.attention_seconds()));
  phase_.Add({{"phase", "expert_wait"}}, StepBuckets()).Observe(std::max(0.0, times.expert_wait_seconds()));
  phase_.Add({{"phase", "other"}}, StepBuckets()).Observe(std::max(0.0, times.other_seconds()));
  step_tokens_.Observe(static_cast<double>(tokens));
}

void AttentionNodeMetrics::ExpertReply(int expert_node, absl::Duration round_trip) {
  round_trip_.Add({{"expert_node", std::to_string(expert_node)}}, LinkBuckets()).Observe(Seconds(round_trip));
}

ExpertNodeMetrics::ExpertNodeMetrics()
    : compute_(Histogram("dmoe_expert_layer_compute_seconds",
                         "One MoE layer's routed experts over the tokens of the dispatches gathered together.",
                         StepBuckets())),
      tokens_(Counter("dmoe_expert_served_tokens_total", "Tokens whose routed experts this node computed.")),
      dispatches_(Counter("dmoe_expert_dispatches_total", "Dispatch messages this node answered.")) {}

ExpertNodeMetrics& ExpertNode() {
  static ExpertNodeMetrics* m = new ExpertNodeMetrics();
  return *m;
}

void ExpertNodeMetrics::LayerServed(int64_t tokens, int64_t dispatches, absl::Duration compute) {
  compute_.Observe(Seconds(compute));
  tokens_.Increment(static_cast<double>(tokens));
  dispatches_.Increment(static_cast<double>(dispatches));
}

TransportMetrics::TransportMetrics()
    : sent_bytes_(CounterFamily("dmoe_transport_sent_bytes_total", "Payload bytes sent, by peer node id.")),
      sent_messages_(CounterFamily("dmoe_transport_sent_messages_total", "Messages sent, by peer node id.")),
      send_failures_(CounterFamily("dmoe_transport_send_failures_total", "Sends that failed, by peer node id.")),
      send_seconds_(HistogramFamily("dmoe_transport_send_seconds",
                                    "Until a send completed (queued at or delivered to the peer), by peer.")),
      received_bytes_(CounterFamily("dmoe_transport_received_bytes_total", "Payload bytes received, by peer node id.")),
      received_messages_(
          CounterFamily("dmoe_transport_received_messages_total", "Messages received, by peer node id.")) {}

TransportMetrics& Transport() {
  static TransportMetrics* m = new TransportMetrics();
  return *m;
}

void TransportMetrics::Sent(transport::NodeId peer, size_t bytes, absl::Duration duration, bool ok) {
  const prometheus::Labels labels = {{"peer", std::to_string(peer)}};
  prometheus::Counter& failures = send_failures_.Add(labels);  // at 0 until a send fails
  if (!ok) {
    failures.Increment();
    return;
  }
  sent_bytes_.Add(labels).Increment(static_cast<double>(bytes));
  sent_messages_.Add(labels).Increment();
  send_seconds_.Add(labels, LinkBuckets()).Observe(Seconds(duration));
}

void TransportMetrics::Received(transport::NodeId peer, size_t bytes) {
  const prometheus::Labels labels = {{"peer", std::to_string(peer)}};
  received_bytes_.Add(labels).Increment(static_cast<double>(bytes));
  received_messages_.Add(labels).Increment();
}

namespace {

class MeteredTransport : public transport::Transport {
 public:
  explicit MeteredTransport(std::unique_ptr<transport::Transport> inner) : inner_(std::move(inner)) {}

  transport::NodeId node_id() const override { return inner_->node_id(); }
  std::string address() const override { return inner_->address(); }
  absl::Status Connect(transport::NodeId peer, const std::string& address) override {
    return inner_->Connect(peer, address);
  }
  absl::Status Send(transport::NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload) override {
    const absl::Time start = absl::Now();
    absl::Status st = inner_->Send(peer, tag, payload);
    metrics::Transport().Sent(peer, payload.size(), absl::Now() - start, st.ok());
    return st;
  }
  absl::StatusOr<transport::Message> Receive(uint64_t tag, uint64_t tag_mask, absl::Duration timeout) override {
    absl::StatusOr<transport::Message> m = inner_->Receive(tag, tag_mask, timeout);
    if (m.ok()) metrics::Transport().Received(m->from, m->payload.size());
    return m;
  }
  absl::StatusOr<transport::Message> ReceiveFrom(absl::Span<const transport::NodeId> senders, uint64_t tag,
                                                 uint64_t tag_mask, absl::Duration timeout) override {
    absl::StatusOr<transport::Message> m = inner_->ReceiveFrom(senders, tag, tag_mask, timeout);
    if (m.ok()) metrics::Transport().Received(m->from, m->payload.size());
    return m;
  }
  absl::Status PeerStatus(transport::NodeId peer) override { return inner_->PeerStatus(peer); }
  void StopReceiving() override { inner_->StopReceiving(); }

 private:
  std::unique_ptr<transport::Transport> inner_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<transport::Transport>> Metered(
    absl::StatusOr<std::unique_ptr<transport::Transport>> inner) {
  if (!inner.ok()) return inner.status();
  return std::unique_ptr<transport::Transport>(std::make_unique<MeteredTransport>(std::move(*inner)));
}

}  // namespace dmoe::metrics
