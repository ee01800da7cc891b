// The cluster's step code in one process: the engine with RemoteExperts
// dispatching over the in-process transport to expert workers that each
// hold only their expert_shard reproduces the golden data, whatever the
// number of expert nodes and the micro-batch split.
#include <memory>

#include "attention_node/remote_experts.h"
#include "core/engine.h"
#include "core/generate.h"
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
  EXPECT_NE(out.status().message().find("expert node 0 (transport node 1) did not answer layer 1"), std::string::npos)
      << out.status();
  EXPECT_EQ((*cache)->pages_free(), 4) << "a failed step gives its pages back";
}

}  // namespace
}  // namespace dmoe
