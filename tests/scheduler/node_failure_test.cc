// BatchScheduler under node failures: a lost attention node's requests end
// with its error and nothing is placed there until it is back (even though
// its freed pages would make it look emptiest); a step whose node failed
// ends that node's requests with the node's status; FailAll ends everyone.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "scheduler/batch_scheduler.h"
#include "tests/scheduler/fake_cluster.h"

namespace dmoe::scheduler {
namespace {

using ::testing::HasSubstr;

BatchScheduler::Options TwoNodes() {
  BatchScheduler::Options o;
  o.pages_per_node = {8, 8};
  o.page_size = 4;
  o.max_batch_tokens = 16;
  o.context_length = 64;
  return o;
}

Request Req(RequestId id, int prompt_len, int max_tokens) {
  Request r;
  r.id = id;
  for (int i = 0; i < prompt_len; ++i) r.prompt.push_back(10 + i);
  r.max_tokens = max_tokens;
  return r;
}

// Runs plans on the fake cluster until no request is left; returns the
// finished events by id.
std::map<RequestId, RequestEvent> RunToEnd(BatchScheduler& s, testing::FakeCluster& cluster, absl::Time now) {
  std::map<RequestId, RequestEvent> finished;
  for (int step = 0; step < 200 && (s.num_waiting() > 0 || s.num_running() > 0 || s.num_to_free() > 0); ++step) {
    StepPlan plan = s.PlanStep(now);
    for (const RequestEvent& e : plan.events) {
      if (e.finished) finished[e.id] = e;
    }
    for (const RequestEvent& e : s.ApplyResults(plan, cluster.Run(plan))) {
      if (e.finished) finished[e.id] = e;
    }
  }
  return finished;
}

TEST(BatchSchedulerNodeFailure, DownNodeGetsNoRequestsAndItsRequestsEndUnavailable) {
  auto s = BatchScheduler::Create(TwoNodes());
  ASSERT_TRUE(s.ok());
  testing::FakeCluster cluster(TwoNodes());
  const absl::Time now = absl::FromUnixSeconds(1000);
  ASSERT_TRUE((*s)->Submit(Req(1, 6, 8)).ok());
  ASSERT_TRUE((*s)->Submit(Req(2, 6, 8)).ok());
  StepPlan plan = (*s)->PlanStep(now);
  (void)(*s)->ApplyResults(plan, cluster.Run(plan));
  ASSERT_EQ((*s)->GetRequest(1)->node, 0);
  ASSERT_EQ((*s)->GetRequest(2)->node, 1);

  std::vector<RequestEvent> lost =
      (*s)->NodeDown(1, absl::StatusCode::kUnavailable, "attention node 1 (127.0.0.1:9) unavailable: gone");
  ASSERT_EQ(lost.size(), 1u);
  EXPECT_EQ(lost[0].id, 2);
  EXPECT_TRUE(lost[0].finished);
  EXPECT_EQ(lost[0].reason, FinishReason::kError);
  EXPECT_EQ(lost[0].error_code, absl::StatusCode::kUnavailable);
  EXPECT_THAT(lost[0].error, HasSubstr("attention node 1 (127.0.0.1:9) unavailable"));
  EXPECT_FALSE((*s)->node_up(1));
  EXPECT_EQ((*s)->pages_free(1), 8);  // all free, yet not a placement target

  for (RequestId id = 3; id <= 6; ++id) ASSERT_TRUE((*s)->Submit(Req(id, 3, 2)).ok());
  plan = (*s)->PlanStep(now);
  EXPECT_TRUE(plan.nodes[1].empty());  // no frees to the dead node either
  for (RequestId id = 3; id <= 6; ++id) {
    if ((*s)->GetRequest(id).has_value() && (*s)->GetRequest(id)->node >= 0) EXPECT_EQ((*s)->GetRequest(id)->node, 0);
  }
  (void)(*s)->ApplyResults(plan, cluster.Run(plan));

  // Back with an empty cache: placements use it again.
  (*s)->NodeUp(1, 8);
  ASSERT_TRUE((*s)->Submit(Req(7, 3, 2)).ok());
  ASSERT_TRUE((*s)->Submit(Req(8, 3, 2)).ok());
  bool placed_on_1 = false;
  for (int step = 0; step < 50 && ((*s)->num_waiting() > 0 || (*s)->num_running() > 0); ++step) {
    plan = (*s)->PlanStep(now);
    for (RequestId id : {7, 8}) {
      if (auto v = (*s)->GetRequest(id); v.has_value() && v->node == 1) placed_on_1 = true;
    }
    (void)(*s)->ApplyResults(plan, cluster.Run(plan));
  }
  EXPECT_TRUE(placed_on_1);
}

TEST(BatchSchedulerNodeFailure, FailedStepEndsThatNodesRequestsWithItsStatus) {
  auto s = BatchScheduler::Create(TwoNodes());
  ASSERT_TRUE(s.ok());
  testing::FakeCluster cluster(TwoNodes());
  const absl::Time now = absl::FromUnixSeconds(1000);
  ASSERT_TRUE((*s)->Submit(Req(1, 6, 8)).ok());
  ASSERT_TRUE((*s)->Submit(Req(2, 6, 8)).ok());
  StepPlan plan = (*s)->PlanStep(now);
  const std::vector<RequestEvent> events = (*s)->ApplyResults(
      plan, cluster.Run(plan, /*drop_node=*/1),
      {{1, absl::StatusCode::kUnavailable, "attention node 1 (a:1): step 0: expert node 3 (b:2) unavailable"}});
  ASSERT_EQ(events.size(), 2u);
  for (const RequestEvent& e : events) {
    if (e.id == 2) {
      EXPECT_TRUE(e.finished);
      EXPECT_EQ(e.error_code, absl::StatusCode::kUnavailable);
      EXPECT_THAT(e.error, HasSubstr("expert node 3 (b:2) unavailable"));
    } else {
      EXPECT_FALSE(e.finished);
    }
  }
  const std::map<RequestId, RequestEvent> finished = RunToEnd(**s, cluster, now);
  EXPECT_EQ(finished.at(1).reason, FinishReason::kLength);
  EXPECT_EQ(cluster.pages_free(0), 8);
  EXPECT_EQ(cluster.pages_free(1), 8);  // the failed request's pages were freed next step
}

TEST(BatchSchedulerNodeFailure, FailAllEndsWaitingAndRunningAndFreesTheirPages) {
  auto s = BatchScheduler::Create(TwoNodes());
  ASSERT_TRUE(s.ok());
  testing::FakeCluster cluster(TwoNodes());
  const absl::Time now = absl::FromUnixSeconds(1000);
  for (RequestId id = 1; id <= 6; ++id) ASSERT_TRUE((*s)->Submit(Req(id, 12, 8)).ok());
  StepPlan plan = (*s)->PlanStep(now);
  (void)(*s)->ApplyResults(plan, cluster.Run(plan));
  ASSERT_GT((*s)->num_waiting(), 0);
  ASSERT_GT((*s)->num_running(), 0);
  const std::vector<RequestEvent> events =
      (*s)->FailAll(absl::StatusCode::kUnavailable, "expert node 2 (c:3) unavailable: gone");
  EXPECT_EQ(events.size(), 6u);
  for (const RequestEvent& e : events) {
    EXPECT_TRUE(e.finished);
    EXPECT_EQ(e.error_code, absl::StatusCode::kUnavailable);
  }
  EXPECT_EQ((*s)->num_waiting(), 0);
  EXPECT_EQ((*s)->num_running(), 0);
  EXPECT_TRUE(RunToEnd(**s, cluster, now).empty());  // only the frees are left
  EXPECT_EQ(cluster.pages_free(0), 8);
  EXPECT_EQ(cluster.pages_free(1), 8);
  EXPECT_EQ((*s)->NextDeadline(), absl::InfiniteFuture());
}

}  // namespace
}  // namespace dmoe::scheduler
