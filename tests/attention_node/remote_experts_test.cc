// The cluster's step code in one process: the engine with RemoteExperts
// dispatching over the in-process transport to expert workers that each
// hold only their expert_shard reproduces the golden data, whatever the
// number of expert nodes and the micro-batch split.
#include <memory>
#include <thread>
#include <vector>

#include "attention_node/remote_experts.h"
#include "core/engine.h"
#include "core/generate.h"
#include "expert_node/expert_worker.h"
#include "transport/in_process_transport.h"
#include "gtest/gtest.h"
#include "router/expert_placement.h"
#include "tests/attention_node/sharded_cluster.h"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::GoldenModelDir;
using testing::ShardedCluster;

TEST(RemoteExperts, ShardedExpertNodesReproduceGolden) {
  const auto cases = testing::LoadGoldenCases(GoldenModelDir());
  for (int nodes : {1, 2, 3}) {
    for (int64_t ping_pong : {0, 1}) {
      ShardedCluster cluster(nodes);
      EXPECT_EQ(cluster.attention_weights()->routed_experts_loaded, 0);
      int64_t loaded = 0;
      for (const auto& w : cluster.shard_weights()) {
        loaded += w->routed_experts_loaded;
        EXPECT_TRUE(w->embed_tokens.empty()) << "expert nodes load only routed experts";
      }
      EXPECT_EQ(loaded, 16 * 3);  // 16 experts x 3 MoE layers, each on exactly one node
      auto engine = Engine::Create(cluster.attention_weights(), EngineOptions{MlaForm::kAuto, ping_pong});
      ASSERT_TRUE(engine.ok());
      auto cache = LatentCache::Create((*engine)->CacheOptions(32, 16));
      // Prefill all four prompts in one step, then decode them together.
      std::vector<StepSequence> batch;
      for (size_t i = 0; i < cases.size(); ++i) batch.push_back({static_cast<SequenceId>(i), cases[i].prompt_ids, true});
      cluster.remote().BeginStep(1);
      auto out = (*engine)->Step(batch, **cache, cluster.remote());
      ASSERT_TRUE(out.ok()) << out.status();
      std::vector<std::vector<int32_t>> generated(cases.size());
      for (size_t i = 0; i < cases.size(); ++i) {
        EXPECT_LE(testing::MaxRelativeError((*out)[i].logits, cases[i].logits, 512), 1e-4)
            << nodes << " expert nodes, ping_pong " << ping_pong;
        const auto& l = (*out)[i].logits;
        generated[i].push_back(static_cast<int32_t>(std::max_element(l.end() - 512, l.end()) - (l.end() - 512)));
      }
      for (int step = 1; step < 16; ++step) {
        std::vector<StepSequence> decode;
        for (size_t i = 0; i < cases.size(); ++i) decode.push_back({static_cast<SequenceId>(i), {generated[i].back()}, false});
        cluster.remote().BeginStep(step + 1);
        auto next = (*engine)->Step(decode, **cache, cluster.remote());
        ASSERT_TRUE(next.ok()) << next.status();
        for (size_t i = 0; i < cases.size(); ++i) {
          const auto& l = (*next)[i].logits;
          generated[i].push_back(static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin()));
        }
      }
      for (size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(generated[i], cases[i].greedy_ids) << nodes << " nodes";
    }
  }
}

TEST(RemoteExperts, DeadExpertNodeIsAnErrorNamingIt) {
  testing::SilentExpertNode silent(16, 128, absl::Milliseconds(200));
  auto weights = ModelWeights::Load(GoldenModelDir(), WeightSelection::NonExpertOnly());
  ASSERT_TRUE(weights.ok());
  auto engine = Engine::Create(*weights);
  auto cache = LatentCache::Create((*engine)->CacheOptions(4, 16));
  auto out = (*engine)->Step({{1, {5, 6, 7}, false}}, **cache, silent.remote());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(out.status().message().find("transport node 1 did not answer layer 1"), std::string::npos)
      << out.status();
  EXPECT_EQ((*cache)->pages_free(), 4) << "a failed step gives its pages back";
}

// Two replicas of the one expert shard: the dispatch goes to replica A
// (never answering), A dies while the layer waits, and the same dispatch is
// answered by replica B; the next layer, starting at dead A, goes to B at
// the send. The sums are those of the experts computed locally.
TEST(RemoteExperts, ADeadReplicasDispatchGoesToTheOtherReplica) {
  auto weights = ModelWeights::Load(GoldenModelDir(), WeightSelection::All());
  ASSERT_TRUE(weights.ok()) << weights.status();
  const ModelConfig& c = (*weights)->config;
  int64_t layer = 0;
  while (!c.is_moe_layer(layer)) ++layer;
  transport::InProcessFabric fabric;
  std::unique_ptr<transport::Transport> attention = fabric.CreateEndpoint(0);
  std::unique_ptr<transport::Transport> replica_a = fabric.CreateEndpoint(1);  // no worker: never answers
  std::unique_ptr<transport::Transport> replica_b = fabric.CreateEndpoint(2);
  expert::ExpertWorker worker(**weights, *replica_b);
  std::thread worker_thread([&worker] { worker.Run(); });
  auto placement = router::ExpertPlacement::Contiguous(c.n_routed_experts, 1);
  ASSERT_TRUE(placement.ok());
  attention::RemoteExperts remote(*attention, *placement, std::vector<std::vector<transport::NodeId>>{{1, 2}},
                                  c.hidden_size, absl::Seconds(30));

  const int64_t n = 3, k = c.num_experts_per_tok, D = c.hidden_size;
  std::vector<float> x(n * D);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 97) - 0.3f;
  std::vector<int32_t> idx(n * k);
  std::vector<float> w(n * k, 1.0f / static_cast<float>(k));
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>((i * 5) % c.n_routed_experts);
  std::vector<float> want(n * D);
  LocalExperts local(**weights);
  ASSERT_TRUE(local.Compute(layer, x.data(), n, k, idx.data(), w.data(), want.data()).ok());

  // (step + layer) % 2 == 0: the rotation starts at replica A.
  remote.BeginStep(static_cast<uint64_t>(layer % 2));
  ASSERT_TRUE(remote.BeginRoutedExperts(layer, 0, x.data(), n, k, idx.data(), w.data()).ok());
  replica_a.reset();
  std::vector<float> out(n * D);
  const absl::Status finished = remote.FinishRoutedExperts(layer, 0, out.data());
  ASSERT_TRUE(finished.ok()) << finished;
  EXPECT_EQ(out, want);

  remote.BeginStep(static_cast<uint64_t>(layer % 2) + 2);
  ASSERT_TRUE(remote.BeginRoutedExperts(layer, 1, x.data(), n, k, idx.data(), w.data()).ok());
  std::fill(out.begin(), out.end(), 0.0f);
  ASSERT_TRUE(remote.FinishRoutedExperts(layer, 1, out.data()).ok());
  EXPECT_EQ(out, want);

  worker.Stop();
  worker_thread.join();
}

}  // namespace
}  // namespace dmoe
