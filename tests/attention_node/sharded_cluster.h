// The cluster's data plane in one test process: an attention endpoint
// (transport node 0) and `num_expert_nodes` ExpertWorker threads (nodes
// 1..M) over an in-process transport, each worker loading only its shard of
// tests/golden/tiny-v3, reached through RemoteExperts.
#ifndef DMOE_TESTS_ATTENTION_NODE_SHARDED_CLUSTER_H_
#define DMOE_TESTS_ATTENTION_NODE_SHARDED_CLUSTER_H_

#include <memory>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "attention_node/remote_experts.h"
#include "core/config.h"
#include "core/model_weights.h"
#include "expert_node/expert_worker.h"
#include "gtest/gtest.h"
#include "router/expert_placement.h"
#include "tests/test_util.h"
#include "transport/in_process_transport.h"

namespace dmoe::testing {

// Stops and joins the workers on destruction.
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
  ShardedCluster(const ShardedCluster&) = delete;
  ShardedCluster& operator=(const ShardedCluster&) = delete;

  std::shared_ptr<const ModelWeights> attention_weights() const { return attention_weights_; }
  attention::RemoteExperts& remote() { return *remote_; }
  const std::vector<std::shared_ptr<const ModelWeights>>& shard_weights() const { return shard_weights_; }
  // [expert node index]
  expert::ExpertWorker& worker(int i) { return *workers_[i]; }
  int num_expert_nodes() const { return static_cast<int>(workers_.size()); }

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

// An attention endpoint (transport node 0) whose only expert node (node 1,
// hosting every expert) is connected but never answers, so RemoteExperts
// over it fails with UNAVAILABLE after `reply_timeout`.
class SilentExpertNode {
 public:
  SilentExpertNode(int64_t n_routed_experts, int64_t hidden_size, absl::Duration reply_timeout)
      : attention_(fabric_.CreateEndpoint(0)), silent_(fabric_.CreateEndpoint(1)) {
    EXPECT_TRUE(attention_->Connect(1, silent_->address()).ok());
    remote_ = std::make_unique<attention::RemoteExperts>(*attention_,
                                                         *router::ExpertPlacement::Contiguous(n_routed_experts, 1),
                                                         std::vector<transport::NodeId>{1}, hidden_size, reply_timeout);
  }
  attention::RemoteExperts& remote() { return *remote_; }

 private:
  transport::InProcessFabric fabric_;
  std::unique_ptr<transport::Transport> attention_;
  std::unique_ptr<transport::Transport> silent_;
  std::unique_ptr<attention::RemoteExperts> remote_;
};

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_ATTENTION_NODE_SHARDED_CLUSTER_H_
