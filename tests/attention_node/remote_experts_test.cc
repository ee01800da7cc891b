// The cluster's step code in one process: the engine with RemoteExperts
// dispatching over the in-process transport to expert workers that each
// hold only their expert_shard reproduces the golden data, whatever the
// number of expert nodes and the micro-batch split.
#include <memory>

#include "attention_node/remote_experts.h"
#include "core/engine.h"
#include "core/generate.h"
#include "expert_node/expert_worker.h"
#include "gtest/gtest.h"
#include "router/expert_placement.h"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"
#include "transport/in_process_transport.h"

namespace dmoe {
namespace {

using testing::GoldenModelDir;

// An attention side plus `num_expert_nodes` expert workers on threads, each
// loading only its shard.
class ShardedCluster {
 public:
  explicit ShardedCluster(int num_expert_nodes) {
    auto config = ModelConfig::Load(GoldenModelDir());
    placement_ = std::make_unique<router::ExpertPlacement>(
        *router::ExpertPlacement::Contiguous(config->n_routed_experts, num_expert_nodes));
    attention_weights_ = *ModelWeights::Load(GoldenModelDir(), WeightSelection::NonExpertOnly());
    attention_ = fabric_.CreateEndpoint(0);
    std::vector<transport::NodeId> ids;
    for (int i = 0; i < num_expert_nodes; ++i) {
      const router::ExpertPlacement* p = placement_.get();
      WeightSelection shard{false, [p, i](int64_t, int64_t e) { return p->NodeOf(e) == i; }};
      shard_weights_.push_back(*ModelWeights::Load(GoldenModelDir(), shard));
      endpoints_.push_back(fabric_.CreateEndpoint(i + 1));
      ids.push_back(i + 1);
      EXPECT_TRUE(attention_->Connect(i + 1, endpoints_.back()->address()).ok());
      EXPECT_TRUE(endpoints_.back()->Connect(0, attention_->address()).ok());
      workers_.push_back(std::make_unique<expert::ExpertWorker>(*shard_weights_.back(), *endpoints_.back()));
    }
    for (auto& w : workers_) threads_.emplace_back([w = w.get()] { w->Run(); });
    remote_ = std::make_unique<attention::RemoteExperts>(*attention_, *placement_, ids, config->hidden_size);
  }
  ~ShardedCluster() {
    for (auto& w : workers_) w->Stop();
    for (auto& t : threads_) t.join();
  }
  std::shared_ptr<const ModelWeights> attention_weights() const { return attention_weights_; }
  attention::RemoteExperts& remote() { return *remote_; }
  const std::vector<std::shared_ptr<const ModelWeights>>& shard_weights() const { return shard_weights_; }

 private:
  transport::InProcessFabric fabric_;
  std::unique_ptr<router::ExpertPlacement> placement_;
  std::shared_ptr<const ModelWeights> attention_weights_;
  std::unique_ptr<transport::Transport> attention_;
  std::vector<std::shared_ptr<const ModelWeights>> shard_weights_;
  std::vector<std::unique_ptr<transport::Transport>> endpoints_;
  std::vector<std::unique_ptr<expert::ExpertWorker>> workers_;
  std::vector<std::thread> threads_;
  std::unique_ptr<attention::RemoteExperts> remote_;
};

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
  transport::InProcessFabric fabric;
  auto attention = fabric.CreateEndpoint(0);
  auto silent = fabric.CreateEndpoint(1);  // connected, never answers
  ASSERT_TRUE(attention->Connect(1, silent->address()).ok());
  auto weights = ModelWeights::Load(GoldenModelDir(), WeightSelection::NonExpertOnly());
  ASSERT_TRUE(weights.ok());
  attention::RemoteExperts remote(*attention, *router::ExpertPlacement::Contiguous(16, 1), {1}, 128,
                                  absl::Milliseconds(200));
  auto engine = Engine::Create(*weights);
  auto cache = LatentCache::Create((*engine)->CacheOptions(4, 16));
  auto out = (*engine)->Step({{1, {5, 6, 7}, false}}, **cache, remote);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(out.status().message().find("expert node(s) 0 did not answer layer 1"), std::string::npos)
      << out.status();
  EXPECT_EQ((*cache)->pages_free(), 4) << "a failed step gives its pages back";
}

}  // namespace
}  // namespace dmoe
