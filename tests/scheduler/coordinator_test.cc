// The scheduler's membership rules (Coordinator): slots by kind, the same
// process keeps its slot, a restarted one takes its dead predecessor's, a
// live slot is never taken (ALREADY_EXISTS naming it), long polls follow the
// epoch, and a node serves only once its peers have connected to it.
#include "scheduler/coordinator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

#include "core/config.h"
#include "tests/scheduler/node_registration.h"
#include "tests/test_util.h"

namespace dmoe::scheduler {
namespace {

using ::testing::HasSubstr;

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = ModelConfig::Load(dmoe::testing::GoldenModelDir().string());
    ASSERT_TRUE(config.ok()) << config.status();
    absl::StatusOr<router::ExpertPlacement> placement = router::ExpertPlacement::Contiguous(config->n_routed_experts, 2);
    ASSERT_TRUE(placement.ok());
    coordinator_ = std::make_unique<Coordinator>(*config, 1, 2, *placement, CoordinatorOptions{.watch_health = false});
  }

  // Both registration phases and NodeReady of one node process.
  int32_t Join(v1::NodeKind kind, const std::string& address, uint64_t incarnation, const std::string& transport) {
    const int32_t id = testing::RegisterNode(*coordinator_, kind, address, incarnation, transport);
    if (id >= 0) testing::MarkNodeReady(*coordinator_, id, incarnation);
    return id;
  }

  std::unique_ptr<Coordinator> coordinator_;
};

TEST_F(CoordinatorTest, SlotsByKindAndALiveSlotIsNeverTaken) {
  EXPECT_EQ(Join(v1::NODE_KIND_EXPERT, "h:11", 11, "t11"), 1);
  EXPECT_EQ(Join(v1::NODE_KIND_ATTENTION, "h:10", 10, "t10"), 0);
  EXPECT_EQ(Join(v1::NODE_KIND_EXPERT, "h:12", 12, "t12"), 2);
  EXPECT_TRUE(coordinator_->AllReady());

  v1::RegisterNodeRequest extra;
  extra.set_kind(v1::NODE_KIND_EXPERT);
  extra.set_grpc_address("h:13");
  extra.set_incarnation(13);
  absl::StatusOr<v1::RegisterNodeResponse> full = coordinator_->RegisterNode(extra);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(full.status().message(), HasSubstr("expert node 1 (h:11), expert node 2 (h:12)"));

  extra.set_node_id(2);  // asking for a live node's slot
  EXPECT_EQ(coordinator_->RegisterNode(extra).status().code(), absl::StatusCode::kAlreadyExists);
  extra.clear_node_id();
  extra.set_grpc_address("h:12");  // a live node's address
  absl::StatusOr<v1::RegisterNodeResponse> same_address = coordinator_->RegisterNode(extra);
  EXPECT_EQ(same_address.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(same_address.status().message(), HasSubstr("expert node 2 (h:12) is registered and alive"));
  extra.set_node_id(0);  // an attention slot
  EXPECT_EQ(coordinator_->RegisterNode(extra).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CoordinatorTest, RestartedNodeTakesTheDownSlotAndServesOncePeersConnected) {
  Join(v1::NODE_KIND_ATTENTION, "h:10", 10, "t10");
  Join(v1::NODE_KIND_EXPERT, "h:11", 11, "t11");
  Join(v1::NODE_KIND_EXPERT, "h:12", 12, "t12");
  int notified = 0;
  coordinator_->SetListener([&notified] { ++notified; });

  coordinator_->MarkDown(2, 12, "connection lost");
  std::vector<NodeSlot> slots = coordinator_->Slots();
  EXPECT_EQ(slots[2].state, v1::NODE_STATE_DOWN);
  EXPECT_EQ(slots[2].down_reason, "connection lost");
  EXPECT_FALSE(slots[2].serving);
  EXPECT_GT(notified, 0);

  // The old process (same incarnation) is not the caller any more.
  v1::GetClusterRequest old_caller;
  old_caller.set_node_id(2);
  old_caller.set_incarnation(12);
  old_caller.set_wait_past_epoch(coordinator_->epoch());
  EXPECT_FALSE(coordinator_->GetCluster(old_caller, absl::InfiniteFuture()).caller_registered());

  // A new process on another port takes the down slot, with a new address.
  const int64_t before = coordinator_->epoch();
  EXPECT_EQ(Join(v1::NODE_KIND_EXPERT, "h:22", 22, "t22"), 2);
  EXPECT_GT(coordinator_->epoch(), before);
  slots = coordinator_->Slots();
  EXPECT_EQ(slots[2].state, v1::NODE_STATE_READY);
  EXPECT_FALSE(slots[2].serving);  // the attention node has not connected to t22 yet
  EXPECT_TRUE(slots[0].serving);

  // The attention node's next long poll says it has applied this epoch.
  v1::GetClusterRequest watch;
  watch.set_node_id(0);
  watch.set_incarnation(10);
  watch.set_wait_past_epoch(coordinator_->epoch());
  const v1::GetClusterResponse cluster = coordinator_->GetCluster(watch, absl::Now() + absl::Milliseconds(10));
  EXPECT_TRUE(cluster.caller_registered());
  EXPECT_EQ(cluster.nodes(2).transport_address(), "t22");
  EXPECT_TRUE(coordinator_->Slots()[2].serving);
}

TEST_F(CoordinatorTest, LongPollAnswersOnAChange) {
  Join(v1::NODE_KIND_ATTENTION, "h:10", 10, "t10");
  v1::GetClusterRequest watch;
  watch.set_wait_past_epoch(coordinator_->epoch());
  v1::GetClusterResponse answer;
  std::thread poller([&] { answer = coordinator_->GetCluster(watch, absl::Now() + absl::Seconds(60)); });
  Join(v1::NODE_KIND_EXPERT, "h:11", 11, "t11");
  poller.join();  // woken by the registration, long before its deadline
  EXPECT_GT(answer.epoch(), watch.wait_past_epoch());
  EXPECT_EQ(answer.nodes(1).grpc_address(), "h:11");

  coordinator_->Shutdown();  // ends long polls at once
  watch.set_wait_past_epoch(coordinator_->epoch());
  (void)coordinator_->GetCluster(watch, absl::InfiniteFuture());
}

TEST_F(CoordinatorTest, ShardMismatchAndMissingIncarnationAreRefused) {
  v1::RegisterNodeRequest r;
  r.set_kind(v1::NODE_KIND_EXPERT);
  r.set_grpc_address("h:11");
  EXPECT_EQ(coordinator_->RegisterNode(r).status().code(), absl::StatusCode::kInvalidArgument);
  r.set_incarnation(11);
  r.set_node_id(1);
  r.add_expert_shard(999);
  absl::StatusOr<v1::RegisterNodeResponse> mismatch = coordinator_->RegisterNode(r);
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(mismatch.status().message(), HasSubstr("it holds experts 999"));
  v1::NodeReadyRequest ready;
  ready.set_node_id(1);
  ready.set_incarnation(99);
  EXPECT_EQ(coordinator_->NodeReady(ready).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace dmoe::scheduler
