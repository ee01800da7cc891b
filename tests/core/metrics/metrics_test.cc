// The /metrics endpoints: the exposer itself, then a real cluster (scheduler,
// attention node, two expert nodes) scraped over HTTP before and after
// requests.
#include "core/metrics/metrics.h"

#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <functional>

#include "absl/strings/str_cat.h"
#include "core/config.h"
#include "gtest/gtest.h"
#include "tests/cluster/cluster_harness.h"
#include "tests/core/metrics/scrape.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::Scrape;
using testing::ScrapeMetrics;

TEST(MetricsServer, OffOrInvalidPorts) {
  absl::StatusOr<std::unique_ptr<metrics::MetricsServer>> off = metrics::MetricsServer::Start("127.0.0.1", -1);
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_EQ(*off, nullptr);
  for (int64_t port : {-2, 65536}) {
    EXPECT_EQ(metrics::MetricsServer::Start("127.0.0.1", port).status().code(), absl::StatusCode::kInvalidArgument)
        << port;
  }
}

TEST(MetricsServer, ServesTheRegistryAndRefusesATakenPort) {
  absl::StatusOr<std::unique_ptr<metrics::MetricsServer>> server = metrics::MetricsServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  metrics::Scheduler();  // the families exist once the process kind is used

  absl::StatusOr<Scrape> before = ScrapeMetrics((*server)->port());
  ASSERT_TRUE(before.ok()) << before.status();
  for (const char* reason : {"stop", "length", "cancelled", "error"}) {
    EXPECT_TRUE(before->series.contains(absl::StrCat("dmoe_request_success_total{finish_reason=\"", reason, "\"}")))
        << reason;
  }
  const absl::Time arrival = absl::Now();
  metrics::RequestMetrics request(7);
  request.Admitted();
  request.Tokens(1, arrival + absl::Milliseconds(30));
  request.Tokens(1, arrival + absl::Milliseconds(50));
  request.Finished("stop", arrival, arrival + absl::Milliseconds(10), arrival + absl::Milliseconds(30),
                   arrival + absl::Milliseconds(60));

  absl::StatusOr<Scrape> after = ScrapeMetrics((*server)->port());
  ASSERT_TRUE(after.ok()) << after.status();
  auto grew = [&](const std::string& series) { return after->series.at(series) - before->series.at(series); };
  EXPECT_EQ(grew("dmoe_request_success_total{finish_reason=\"stop\"}"), 1);
  EXPECT_EQ(grew("dmoe_prompt_tokens_total"), 7);
  EXPECT_EQ(grew("dmoe_generation_tokens_total"), 2);
  EXPECT_EQ(grew("dmoe_time_to_first_token_seconds_count"), 1);
  EXPECT_EQ(grew("dmoe_inter_token_latency_seconds_count"), 1);  // two tokens, one gap
  // 20 ms between the tokens: in the (0.015, 0.02] bucket and above.
  EXPECT_EQ(grew("dmoe_inter_token_latency_seconds_bucket{le=\"0.015\"}"), 0);
  EXPECT_EQ(grew("dmoe_inter_token_latency_seconds_bucket{le=\"0.025\"}"), 1);
  EXPECT_EQ(grew("dmoe_e2e_request_latency_seconds_count"), 1);
  EXPECT_EQ(grew("dmoe_request_queue_time_seconds_count"), 1);

  absl::StatusOr<std::unique_ptr<metrics::MetricsServer>> again =
      metrics::MetricsServer::Start("127.0.0.1", (*server)->port());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable) << again.status();
}

// Polls `scrape` until `done` holds (bounded): the step loop records a
// step's metrics after it streamed the step's tokens.
Scrape ScrapeUntil(int port, const std::function<bool(const Scrape&)>& done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  Scrape last;
  for (;;) {
    absl::StatusOr<Scrape> s = ScrapeMetrics(port);
    EXPECT_TRUE(s.ok()) << s.status();
    if (s.ok()) last = std::move(*s);
    if ((s.ok() && done(last)) || absl::Now() > deadline) return last;
    absl::SleepFor(absl::Milliseconds(50));
  }
}

TEST(MetricsCluster, EveryProcessExposesSeriesThatMoveWithRequests) {
  testing::ClusterOptions o;
  o.model_dir = testing::GoldenModelDir().string();
  o.attention_nodes = 1;
  o.expert_nodes = 2;
  o.metrics = true;
  absl::StatusOr<std::unique_ptr<testing::Cluster>> started = testing::Cluster::Start(o);
  ASSERT_TRUE(started.ok()) << started.status();
  testing::Cluster& cluster = **started;
  ASSERT_EQ(cluster.metrics_ports().size(), 4u);
  const int scheduler = cluster.metrics_ports()[0], attention = cluster.metrics_ports()[1];
  const std::vector<int> experts = {cluster.metrics_ports()[2], cluster.metrics_ports()[3]};
  absl::StatusOr<ModelConfig> config = ModelConfig::Load(o.model_dir);
  ASSERT_TRUE(config.ok()) << config.status();
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < config->num_hidden_layers; ++l) moe_layers += config->is_moe_layer(l) ? 1 : 0;

  // Before any request: the families are there (the per-node ones once the
  // step loop has run its first iteration).
  const Scrape s0 = ScrapeUntil(scheduler, [](const Scrape& s) { return s.Has("dmoe_latent_cache_pages_total"); });
  for (const char* name :
       {"dmoe_num_requests_running", "dmoe_num_requests_waiting", "dmoe_request_success_total",
        "dmoe_prompt_tokens_total", "dmoe_generation_tokens_total", "dmoe_time_to_first_token_seconds_bucket",
        "dmoe_inter_token_latency_seconds_bucket", "dmoe_e2e_request_latency_seconds_bucket",
        "dmoe_request_queue_time_seconds_bucket", "dmoe_step_phase_seconds_total", "dmoe_latent_cache_pages_total",
        "dmoe_latent_cache_pages_used", "dmoe_latent_cache_usage_ratio", "dmoe_num_preemptions_total",
        "dmoe_expert_node_imbalance_ratio", "dmoe_expert_imbalance_ratio", "dmoe_node_up", "dmoe_steps_total"}) {
    EXPECT_TRUE(s0.Has(name)) << name;
  }
  EXPECT_EQ(s0.Sum("dmoe_latent_cache_pages_total"), o.cache_pages);
  // Every node reported ready: one attention and two expert nodes up.
  EXPECT_EQ(s0.Sum("dmoe_node_up", {"kind=\"attention\""}), 1);
  EXPECT_EQ(s0.Sum("dmoe_node_up", {"kind=\"expert\""}), 2);

  const int kRequests = 4, kMaxTokens = 6;
  const std::vector<int32_t> prompt = {1, 2, 3, 4, 5};
  for (int i = 0; i < kRequests; ++i) {
    testing::Generated g = testing::GenerateIds(cluster.client(), prompt, kMaxTokens);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    ASSERT_EQ(g.ids.size(), static_cast<size_t>(kMaxTokens));
  }
  {  // One refused request (max_tokens 0).
    v1::GenerateRequest bad;
    bad.mutable_token_ids()->add_ids(1);
    bad.set_max_tokens(0);
    const auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(30);
    EXPECT_EQ(testing::GenerateRequest(cluster.client(), bad, deadline).status.error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }

  // Tokens run per request: the prompt, then each generated token but the last.
  const double tokens_run = kRequests * (static_cast<double>(prompt.size()) + kMaxTokens - 1);
  const double routed = tokens_run * static_cast<double>(config->num_experts_per_tok * moe_layers);
  // The loop's own counters (steps, pages) are sampled at the start of its
  // next iteration, and a last step frees the finished requests' pages: wait
  // until both views agree.
  const Scrape s1 = ScrapeUntil(scheduler, [&](const Scrape& s) {
    return s.Sum("dmoe_expert_tokens_total") >= routed && s.Sum("dmoe_num_requests_running") == 0 &&
           s.Sum("dmoe_expert_node_tokens_total") >= routed && s.Sum("dmoe_latent_cache_pages_used") == 0 &&
           s.Sum("dmoe_steps_total") == s.Sum("dmoe_step_duration_seconds_count");
  });
  EXPECT_EQ(s1.Sum("dmoe_request_success_total", {"finish_reason=\"length\""}), kRequests);
  EXPECT_EQ(s1.Sum("dmoe_request_success_total"), kRequests);
  EXPECT_EQ(s1.Sum("dmoe_request_rejected_total", {"code=\"invalid_argument\""}), 1);
  EXPECT_EQ(s1.Sum("dmoe_prompt_tokens_total"), kRequests * static_cast<double>(prompt.size()));
  EXPECT_EQ(s1.Sum("dmoe_generation_tokens_total"), kRequests * kMaxTokens);
  EXPECT_EQ(s1.Sum("dmoe_time_to_first_token_seconds_count"), kRequests);
  EXPECT_EQ(s1.Sum("dmoe_inter_token_latency_seconds_count"), kRequests * (kMaxTokens - 1));
  EXPECT_EQ(s1.Sum("dmoe_e2e_request_latency_seconds_count"), kRequests);
  EXPECT_EQ(s1.Sum("dmoe_request_queue_time_seconds_count"), kRequests);
  EXPECT_EQ(s1.Sum("dmoe_request_generation_tokens_sum"), kRequests * kMaxTokens);
  EXPECT_GT(s1.Sum("dmoe_time_to_first_token_seconds_sum"), 0);
  EXPECT_EQ(s1.Sum("dmoe_batch_size_tokens_sum"), tokens_run);
  EXPECT_GE(s1.Sum("dmoe_steps_total"), kRequests * kMaxTokens);
  EXPECT_EQ(s1.Sum("dmoe_step_duration_seconds_count"), s1.Sum("dmoe_steps_total"));
  EXPECT_GT(s1.Sum("dmoe_step_phase_seconds_total", {"phase=\"node_attention\""}), 0);
  EXPECT_GT(s1.Sum("dmoe_step_phase_seconds_total", {"phase=\"node_expert_wait\""}), 0);
  // Every (token, expert) decision is counted once per (layer, expert), and
  // the expert nodes' load reports add up to the same work.
  EXPECT_EQ(s1.Sum("dmoe_expert_tokens_total"), routed);
  EXPECT_EQ(s1.Sum("dmoe_expert_node_tokens_total"), routed);
  EXPECT_EQ(s1.Sum("dmoe_routing_decisions_total"), routed);
  EXPECT_EQ(s1.Sum("dmoe_num_requests_waiting"), 0);
  EXPECT_EQ(s1.Sum("dmoe_latent_cache_pages_used"), 0);  // all freed
  EXPECT_GE(s1.Sum("dmoe_expert_node_imbalance_ratio"), 1.0);

  // The attention node: one RunStep per step, replies from both expert nodes.
  const Scrape a =
      ScrapeUntil(attention, [&](const Scrape& s) { return s.Sum("dmoe_attention_step_tokens_sum") >= tokens_run; });
  EXPECT_EQ(a.Sum("dmoe_attention_step_tokens_sum"), tokens_run);
  EXPECT_GT(a.Sum("dmoe_attention_step_phase_seconds_count", {"phase=\"expert_wait\""}), 0);
  EXPECT_GT(a.Sum("dmoe_expert_dispatch_round_trip_seconds_count", {"expert_node=\"0\""}), 0);
  EXPECT_GT(a.Sum("dmoe_expert_dispatch_round_trip_seconds_count", {"expert_node=\"1\""}), 0);
  // The data plane: what one side sent, the other received, byte for byte.
  double expert_received = 0, expert_sent = 0, served = 0;
  for (int port : experts) {
    absl::StatusOr<Scrape> e = ScrapeMetrics(port);
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_GT(e->Sum("dmoe_expert_served_tokens_total"), 0) << port;
    EXPECT_GT(e->Sum("dmoe_expert_layer_compute_seconds_count"), 0) << port;
    expert_received += e->Sum("dmoe_transport_received_bytes_total");
    expert_sent += e->Sum("dmoe_transport_sent_bytes_total");
    served += e->Sum("dmoe_expert_dispatches_total");
  }
  EXPECT_GT(a.Sum("dmoe_transport_sent_bytes_total"), 0);
  EXPECT_EQ(a.Sum("dmoe_transport_sent_bytes_total"), expert_received);
  EXPECT_EQ(a.Sum("dmoe_transport_received_bytes_total"), expert_sent);
  EXPECT_EQ(a.Sum("dmoe_transport_sent_messages_total"), served);
  EXPECT_EQ(a.Sum("dmoe_transport_send_failures_total"), 0);

  // A node that dies is down in the scheduler's view (its health watch breaks).
  ASSERT_EQ(cluster.pids().size(), 4u);
  ASSERT_EQ(kill(cluster.pids()[3], SIGKILL), 0);
  const Scrape down =
      ScrapeUntil(scheduler, [](const Scrape& s) { return s.Sum("dmoe_node_up", {"kind=\"expert\""}) == 1; });
  EXPECT_EQ(down.Sum("dmoe_node_up", {"kind=\"expert\""}), 1);
  EXPECT_EQ(down.Sum("dmoe_node_up", {"kind=\"attention\""}), 1);
}

TEST(MetricsCli, UpRejectsABadMetricsPort) {
  const std::string command = absl::StrCat(testing::BinDir().string(), "/dmoe up --model ",
                                           testing::GoldenModelDir().string(), " --metrics-port -5 2>&1");
  FILE* p = popen(command.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[512];
  while (fgets(buf, sizeof buf, p) != nullptr) out += buf;
  const int status = pclose(p);
  EXPECT_NE(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("--metrics-port"), std::string::npos) << out;
}

}  // namespace
}  // namespace dmoe
