// The cluster as users run it: real dmoe-scheduler, attention and expert
// node processes on 127.0.0.1, gRPC clients, UCX between the nodes.
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <algorithm>
#include <fstream>
#include <future>
#include <thread>

#include "gtest/gtest.h"
#include "tests/cluster/cluster_harness.h"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::Cluster;
using testing::ClusterOptions;
using testing::GenerateIds;

ClusterOptions Golden(int attention, int expert) {
  ClusterOptions o;
  o.model_dir = testing::GoldenModelDir().string();
  o.attention_nodes = attention;
  o.expert_nodes = expert;
  return o;
}

std::unique_ptr<Cluster> StartOrFail(const ClusterOptions& o) {
  auto c = Cluster::Start(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

TEST(Cluster, GreedyEqualsGoldenForEveryTopology) {
  const auto cases = testing::LoadGoldenCases(testing::GoldenModelDir());
  for (auto [attention, expert] : std::vector<std::pair<int, int>>{{2, 2}, {1, 1}, {1, 3}}) {
    auto cluster = StartOrFail(Golden(attention, expert));
    ASSERT_NE(cluster, nullptr);
    // All four prompts at once: they share steps (and nodes).
    std::vector<std::future<testing::Generated>> runs;
    for (const auto& gc : cases) {
      runs.push_back(std::async(std::launch::async, [&, ids = gc.prompt_ids] {
        return GenerateIds(cluster->client(), ids, 16);
      }));
    }
    for (size_t i = 0; i < cases.size(); ++i) {
      testing::Generated g = runs[i].get();
      ASSERT_TRUE(g.status.ok()) << g.status.error_message();
      EXPECT_EQ(g.ids, cases[i].greedy_ids) << attention << "+" << expert << " nodes, case " << i;
      EXPECT_EQ(g.last.finish_reason(), v1::FINISH_REASON_LENGTH);
      EXPECT_EQ(g.last.usage().completion_tokens(), 16);
      EXPECT_EQ(g.last.usage().prompt_tokens(), static_cast<int>(cases[i].prompt_ids.size()));
    }
  }
}

TEST(Cluster, ConcurrentRequestsEqualTheSameRequestsAlone) {
  auto cluster = StartOrFail(Golden(2, 2));
  ASSERT_NE(cluster, nullptr);
  struct Job {
    std::vector<int32_t> prompt;
    int max_tokens;
  };
  std::vector<Job> jobs;
  for (int i = 0; i < 32; ++i) {
    Job j;
    for (int t = 0; t < 3 + (i * 7) % 45; ++t) j.prompt.push_back((i * 131 + t * 17) % 510 + 2);
    j.max_tokens = 4 + (i * 5) % 20;
    jobs.push_back(j);
  }
  std::vector<std::vector<int32_t>> alone;
  for (const Job& j : jobs) {
    testing::Generated g = GenerateIds(cluster->client(), j.prompt, j.max_tokens);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    alone.push_back(g.ids);
  }
  std::vector<std::future<testing::Generated>> together;
  for (const Job& j : jobs) {
    together.push_back(std::async(std::launch::async, [&, j] { return GenerateIds(cluster->client(), j.prompt, j.max_tokens); }));
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    testing::Generated g = together[i].get();
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.ids, alone[i]) << "request " << i;
  }
}

TEST(Cluster, SampledGenerationIsReproducibleWithASeed) {
  auto cluster = StartOrFail(Golden(1, 2));
  ASSERT_NE(cluster, nullptr);
  const std::vector<int32_t> prompt = {0, 46, 461, 14};
  testing::Generated a = GenerateIds(cluster->client(), prompt, 20, 0.8f, 7);
  testing::Generated b = GenerateIds(cluster->client(), prompt, 20, 0.8f, 7);
  testing::Generated c = GenerateIds(cluster->client(), prompt, 20, 0.8f, 8);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_NE(a.ids, c.ids);
}

int64_t PagesInUse(Cluster& cluster) {
  auto stats = cluster.Stats();
  if (!stats.ok()) return -1;
  int64_t used = 0;
  for (int i = 0; i < stats->attention_pages_total_size(); ++i) {
    used += stats->attention_pages_total(i) - stats->attention_pages_free(i);
  }
  return used;
}

TEST(Cluster, ClientCancelFreesPagesWithinAStep) {
  ClusterOptions o = Golden(1, 1);
  auto cluster = StartOrFail(o);
  ASSERT_NE(cluster, nullptr);
  v1::GenerateRequest request;
  for (int i = 0; i < 70; ++i) request.mutable_token_ids()->add_ids(i + 2);
  request.set_max_tokens(150);
  request.set_ignore_eos(true);
  // On a loaded machine the 150 tokens may all be generated before the
  // client's cancel arrives (then nothing was cancelled): such an attempt
  // is repeated, at most 5 times.
  bool cancelled = false;
  for (int attempt = 0; attempt < 5 && !cancelled; ++attempt) {
    grpc::ClientContext ctx;
    auto reader = cluster->client().Generate(&ctx, request);
    v1::GenerateResponse r;
    ASSERT_TRUE(reader->Read(&r));
    const int64_t held = PagesInUse(*cluster);
    ctx.TryCancel();
    while (reader->Read(&r)) {
    }
    const grpc::Status st = reader->Finish();
    if (st.ok()) continue;  // it had finished: try again
    EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
    EXPECT_GT(held, 0) << "a running request holds pages";
    cancelled = true;
  }
  ASSERT_TRUE(cancelled) << "every attempt finished before its cancel";
  // Freed by the next step's plan: poll the stats RPC (bounded).
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (PagesInUse(*cluster) != 0 && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(PagesInUse(*cluster), 0);
  // And the cluster keeps serving.
  EXPECT_TRUE(GenerateIds(cluster->client(), {5, 6, 7}, 4).status.ok());
}

TEST(Cluster, FullQueueAnswersResourceExhausted) {
  ClusterOptions o = Golden(1, 1);
  o.cache_pages = 2;  // two 64-token pages: one request at a time
  o.scheduler_flags = {"--max-waiting", "2"};
  auto cluster = StartOrFail(o);
  ASSERT_NE(cluster, nullptr);
  std::vector<int32_t> prompt(60, 9);
  std::vector<std::future<testing::Generated>> runs;
  for (int i = 0; i < 12; ++i) {
    runs.push_back(std::async(std::launch::async, [&] { return GenerateIds(cluster->client(), prompt, 60); }));
  }
  int exhausted = 0, ok = 0;
  for (auto& f : runs) {
    testing::Generated g = f.get();
    if (g.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++exhausted;
      EXPECT_NE(g.status.error_message().find("queue is full"), std::string::npos) << g.status.error_message();
    } else {
      EXPECT_TRUE(g.status.ok()) << g.status.error_message();
      EXPECT_EQ(g.ids.size(), 60u);
      ++ok;
    }
  }
  std::printf("[cluster] full queue: %d accepted, %d RESOURCE_EXHAUSTED\n", ok, exhausted);
  EXPECT_GT(exhausted, 0);
  EXPECT_GT(ok, 0);
}

TEST(Cluster, SmallCacheForcesPreemptionAndEveryRequestCompletesCorrectly) {
  ClusterOptions o = Golden(1, 1);
  o.cache_pages = 3;  // 3 x 64 positions; each request starts in 1 page and grows into a 2nd
  auto cluster = StartOrFail(o);
  ASSERT_NE(cluster, nullptr);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 6; ++i) {
    std::vector<int32_t> p;
    for (int t = 0; t < 56 + i; ++t) p.push_back((i * 97 + t * 13) % 509 + 2);
    prompts.push_back(p);
  }
  std::vector<std::vector<int32_t>> alone;
  for (const auto& p : prompts) {
    testing::Generated g = GenerateIds(cluster->client(), p, 24);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    alone.push_back(g.ids);
  }
  std::vector<std::future<testing::Generated>> runs;
  for (const auto& p : prompts) {
    runs.push_back(std::async(std::launch::async, [&, p] { return GenerateIds(cluster->client(), p, 24); }));
  }
  for (size_t i = 0; i < runs.size(); ++i) {
    testing::Generated g = runs[i].get();
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.ids, alone[i]) << "request " << i;
  }
  auto stats = cluster->Stats();
  ASSERT_TRUE(stats.ok());
  std::printf("[cluster] small cache: %lld preemptions\n", static_cast<long long>(stats->preemptions()));
  EXPECT_GT(stats->preemptions(), 0);
}

TEST(Cluster, SigtermDrainsInFlightRequests) {
  auto cluster = StartOrFail(Golden(1, 1));
  ASSERT_NE(cluster, nullptr);
  v1::GenerateRequest request;
  for (int i = 0; i < 8; ++i) request.mutable_token_ids()->add_ids(i + 3);
  request.set_max_tokens(120);
  request.set_ignore_eos(true);
  grpc::ClientContext ctx;
  auto reader = cluster->client().Generate(&ctx, request);
  v1::GenerateResponse r;
  ASSERT_TRUE(reader->Read(&r));
  kill(cluster->scheduler_pid(), SIGTERM);
  int tokens = r.token_ids_size();
  while (reader->Read(&r)) tokens += r.token_ids_size();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 120) << "the in-flight request finishes";
  EXPECT_EQ(r.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(cluster->WaitScheduler(15000), 0);
}

// Bad requests are refused with a message naming the problem, while a
// stream that is already running keeps going.
TEST(Cluster, BadInputIsRefusedAndOthersKeepBeingServed) {
  auto cluster = StartOrFail(Golden(1, 1));
  ASSERT_NE(cluster, nullptr);
  auto background = std::async(std::launch::async, [&] { return GenerateIds(cluster->client(), {4, 5, 6, 7}, 100); });
  struct Case {
    std::string name;
    std::function<void(v1::GenerateRequest&)> edit;
    grpc::StatusCode code;
    std::string needle;
  };
  const std::vector<Case> bad = {
      {"empty prompt", [](v1::GenerateRequest& r) { r.mutable_token_ids()->clear_ids(); }, grpc::INVALID_ARGUMENT,
       "prompt is empty"},
      {"token outside vocab", [](v1::GenerateRequest& r) { r.mutable_token_ids()->add_ids(512); },
       grpc::INVALID_ARGUMENT, "token id 512"},
      {"max_tokens 0", [](v1::GenerateRequest& r) { r.set_max_tokens(0); }, grpc::INVALID_ARGUMENT, "max_tokens"},
      {"max_tokens beyond context", [](v1::GenerateRequest& r) { r.set_max_tokens(300); }, grpc::INVALID_ARGUMENT,
       "exceeds the context"},
      {"negative temperature", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_temperature(-0.5f); },
       grpc::INVALID_ARGUMENT, "temperature"},
      {"top_p above 1", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(1.5f); }, grpc::INVALID_ARGUMENT,
       "top_p"},
      {"negative top_p", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(-0.1f); },
       grpc::INVALID_ARGUMENT, "top_p"},
      {"top_p 0", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(0.0f); }, grpc::INVALID_ARGUMENT,
       "top_p"},
      {"prompt longer than context",
       [](v1::GenerateRequest& r) {
         for (int i = 0; i < 300; ++i) r.mutable_token_ids()->add_ids(3);
       },
       grpc::RESOURCE_EXHAUSTED, "does not fit the context"},
      {"invalid UTF-8", [](v1::GenerateRequest& r) { r.set_text("ok \xff\xfe"); }, grpc::INVALID_ARGUMENT, "UTF-8"},
      {"unknown model", [](v1::GenerateRequest& r) { r.set_model("gpt-9"); }, grpc::INVALID_ARGUMENT,
       "unknown model 'gpt-9'"},
  };
  for (const Case& c : bad) {
    v1::GenerateRequest request;
    request.mutable_token_ids()->add_ids(5);
    request.set_max_tokens(4);
    c.edit(request);
    grpc::ClientContext ctx;
    auto reader = cluster->client().Generate(&ctx, request);
    v1::GenerateResponse r;
    EXPECT_FALSE(reader->Read(&r)) << c.name;
    grpc::Status st = reader->Finish();
    EXPECT_EQ(st.error_code(), c.code) << c.name << ": " << st.error_message();
    EXPECT_NE(st.error_message().find(c.needle), std::string::npos) << c.name << ": " << st.error_message();
  }
  testing::Generated g = background.get();
  EXPECT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.ids.size(), 100u);
}

// Many copies of the same prompts route to the same few experts; the bias
// balancer evens the load across expert nodes at a cost in routing fidelity.
TEST(Cluster, BiasBalancingEvensExpertNodeLoad) {
  double ratio[2] = {0, 0};
  double changed = 0;
  for (int mode = 0; mode < 2; ++mode) {
    ClusterOptions o = Golden(1, 4);
    o.scheduler_flags = {"--balance", mode == 0 ? "off" : "bias", "--balance-window-steps", "2"};
    if (mode == 1) {
      const auto config = testing::ScratchDir("balance_config") / "cluster.json";
      std::ofstream(config) << R"({"balance": {"gamma": 0.02, "max_bias": 0.3}})";
      o.scheduler_flags.push_back("--config");
      o.scheduler_flags.push_back(config.string());
    }
    auto cluster = StartOrFail(o);
    ASSERT_NE(cluster, nullptr);
    std::vector<std::future<testing::Generated>> runs;
    for (int i = 0; i < 16; ++i) {
      runs.push_back(std::async(std::launch::async, [&] { return GenerateIds(cluster->client(), {0, 327, 46}, 64); }));
    }
    for (auto& f : runs) ASSERT_TRUE(f.get().status.ok());
    // Load reports arrive every 200 ms: wait until every routed token is counted.
    const int64_t expected = 16 * (3 + 63) * 3 * 4;  // tokens x MoE layers x top-k
    absl::StatusOr<v1::GetClusterStatsResponse> stats;
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    do {
      stats = cluster->Stats();
      ASSERT_TRUE(stats.ok());
      int64_t total = 0;
      for (int64_t v : stats->expert_node_tokens()) total += v;
      if (total >= expected) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    } while (std::chrono::steady_clock::now() < end);
    int64_t total = 0, max = 0;
    for (int64_t v : stats->expert_node_tokens()) {
      total += v;
      max = std::max(max, v);
    }
    ASSERT_GT(total, 0);
    ratio[mode] = static_cast<double>(max) * stats->expert_node_tokens_size() / total;
    if (mode == 1) changed = static_cast<double>(stats->routing_decisions_changed()) /
                             std::max<int64_t>(1, stats->routing_decisions());
    std::printf("[cluster] balance %s: expert-node tokens", mode == 0 ? "off " : "bias");
    for (int64_t v : stats->expert_node_tokens()) std::printf(" %lld", static_cast<long long>(v));
    std::printf(", max/mean %.3f, routing decisions changed %lld of %lld\n", ratio[mode],
                static_cast<long long>(stats->routing_decisions_changed()),
                static_cast<long long>(stats->routing_decisions()));
  }
  EXPECT_LT(ratio[1], ratio[0]);
  EXPECT_GT(changed, 0.0);
}

}  // namespace
}  // namespace dmoe
