// BatchScheduler scenarios, one table row per iteration (STYLE.md 7): what
// each step schedules ("id@node:tokens", '*' = samples), frees, the pages
// left per node, which requests finished and how many wait. The FakeCluster
// runs every plan against real LatentCaches and checks positions and pages.
#include "scheduler/batch_scheduler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "tests/scheduler/fake_cluster.h"

namespace dmoe::scheduler {
namespace {

using ::testing::ElementsAre;
using testing::ExpectedStep;
using testing::FormatFrees;
using ::testing::HasSubstr;
using testing::Scenario;

BatchScheduler::Options Opts(std::vector<int64_t> pages, int64_t page_size, int64_t budget, int64_t chunk = 0,
                             int64_t context = 64) {
  BatchScheduler::Options o;
  o.pages_per_node = std::move(pages);
  o.page_size = page_size;
  o.max_batch_tokens = budget;
  o.max_prefill_chunk = chunk;
  o.context_length = context;
  return o;
}

Request Req(RequestId id, int prompt_len, int max_tokens) {
  Request r;
  r.id = id;
  for (int i = 0; i < prompt_len; ++i) r.prompt.push_back(static_cast<int32_t>(10 + (id * 7 + i) % 90));
  r.max_tokens = max_tokens;
  return r;
}

// Budget of 8 tokens per step: request 1's 10-token prompt takes two
// chunks; 2 fills what is left of step 1; 3 arrives while 1 and 2 decode
// and gets the 6 tokens their two decodes leave, then finishes its prefill
// next to 1's last decode.
TEST(BatchSchedulerScenarioTest, BudgetLimitedChunkedPrefillMixesWithDecodes) {
  Scenario s(Opts({100}, /*page_size=*/4, /*budget=*/8));
  s.SubmitAt(0, Req(1, 10, 3));
  s.SubmitAt(0, Req(2, 5, 2));
  s.SubmitAt(2, Req(3, 13, 2));
  s.Run({
      // step  scheduled                frees   pages  finished    waiting
      {0, "1@0:8", "", {98}, "", 1},
      {1, "1@0:2* 2@0:5*", "", {95}, "", 0},
      {2, "1@0:1* 2@0:1* 3@0:6", "", {93}, "2:length", 0},
      {3, "1@0:1* 3@0:7*", "2@0", {93}, "1:length", 0},
      {4, "3@0:1*", "1@0", {96}, "3:length", 0},
      {5, "", "3@0", {100}, "", 0},
  });
  EXPECT_EQ(s.tokens(1), testing::SoloTokens(Req(1, 10, 3), 64));
  EXPECT_EQ(s.tokens(2), testing::SoloTokens(Req(2, 5, 2), 64));
  EXPECT_EQ(s.tokens(3), testing::SoloTokens(Req(3, 13, 2), 64));
}

// max_prefill_chunk 4 caps each request's share; decodes go first, then
// prefills in arrival order.
TEST(BatchSchedulerScenarioTest, PrefillChunkLimitSplitsPromptsAcrossSteps) {
  Scenario s(Opts({100}, /*page_size=*/4, /*budget=*/8, /*chunk=*/4));
  s.SubmitAt(0, Req(1, 10, 2));
  s.SubmitAt(0, Req(2, 6, 2));
  s.Run({
      {0, "1@0:4 2@0:4", "", {98}, "", 0},
      {1, "1@0:4 2@0:2*", "", {96}, "", 0},
      {2, "2@0:1* 1@0:2*", "", {95}, "2:length", 0},
      {3, "1@0:1*", "2@0", {97}, "1:length", 0},
      {4, "", "1@0", {100}, "", 0},
  });
  // Only the last chunk samples, with sample_index counting earlier samples.
  EXPECT_THAT(s.sample_indices(1), ElementsAre(0, 1));
  EXPECT_THAT(s.sample_indices(2), ElementsAre(0, 1));
}

// Nodes of 8, 12 and 10 pages: each admission goes to the node with the
// most free pages at that moment (ties: lowest index) and stays there.
TEST(BatchSchedulerScenarioTest, PlacesOnNodeWithMostFreePages) {
  Scenario s(Opts({8, 12, 10}, /*page_size=*/4, /*budget=*/64));
  s.SubmitAt(0, Req(1, 8, 3));   // node 1 (12)          -> {8, 10, 10}
  s.SubmitAt(0, Req(2, 8, 3));   // nodes 1, 2 tie at 10 -> {8, 8, 10}
  s.SubmitAt(0, Req(3, 4, 3));   // node 2 (10)          -> {8, 8, 9}
  s.SubmitAt(0, Req(4, 12, 2));  // node 2 (9)           -> {8, 8, 6}
  s.SubmitAt(0, Req(5, 4, 3));   // nodes 0, 1 tie at 8  -> {7, 8, 6}
  s.SubmitAt(2, Req(6, 4, 2));   // node 2 once 4 is freed
  s.Run({
      {0, "5@0:4* 1@1:8* 2@1:8* 3@2:4* 4@2:12*", "", {7, 8, 6}, "", 0},
      {1, "5@0:1* 1@1:1* 2@1:1* 3@2:1* 4@2:1*", "", {6, 6, 4}, "4:length", 0},
      {2, "5@0:1* 1@1:1* 2@1:1* 3@2:1* 6@2:4*", "4@2", {6, 6, 7}, "5:length 1:length 2:length 3:length", 0},
      {3, "6@2:1*", "5@0 1@1 2@1 3@2", {8, 12, 8}, "6:length", 0},
      {4, "", "6@2", {8, 12, 10}, "", 0},
  });
}

// 5 pages: request 1 holds 3 (then 4); 2 needs 3 for its prompt + 1 token
// and waits until 1 is freed; 3 would fit but does not overtake 2 (FCFS).
TEST(BatchSchedulerScenarioTest, AdmissionWaitsForPages) {
  Scenario s(Opts({5}, /*page_size=*/4, /*budget=*/64));
  s.SubmitAt(0, Req(1, 12, 3));
  s.SubmitAt(0, Req(2, 8, 2));
  s.SubmitAt(0, Req(3, 1, 2));
  s.Run({
      {0, "1@0:12*", "", {2}, "", 2},
      {1, "1@0:1*", "", {1}, "", 2},
      {2, "1@0:1*", "", {1}, "1:length", 2},
      {3, "2@0:8* 3@0:1*", "1@0", {2}, "", 0},
      {4, "2@0:1* 3@0:1*", "", {1}, "2:length 3:length", 0},
      {5, "", "2@0 3@0", {5}, "", 0},
  });
  auto view = s.scheduler().GetRequest(1);
  EXPECT_FALSE(view.has_value()) << "forgotten once freed";
}

// 6 pages of 4 tokens, three requests of 4 + 8 tokens. At step 5 request 1
// needs a fifth token's page: the newest request (3) is preempted, not 2.
// 3 is recomputed from prompt + its 5 generated tokens once 1 and 2 are
// freed, sampling on from sample_index 5; every request produces exactly
// the tokens it produces alone.
TEST(BatchSchedulerScenarioTest, PreemptsNewestAndRecomputesIt) {
  Scenario s(Opts({6}, /*page_size=*/4, /*budget=*/64));
  for (RequestId id : {1, 2, 3}) s.SubmitAt(0, Req(id, 4, 8));
  s.Run({
      {0, "1@0:4* 2@0:4* 3@0:4*", "", {3}, "", 0},
      {1, "1@0:1* 2@0:1* 3@0:1*", "", {0}, "", 0},
      {4, "1@0:1* 2@0:1* 3@0:1*", "", {0}, "", 0},
      {5, "1@0:1* 2@0:1*", "3@0", {0}, "", 1},
      {6, "1@0:1* 2@0:1*", "", {0}, "", 1},
      {7, "1@0:1* 2@0:1*", "", {0}, "1:length 2:length", 1},
      {8, "3@0:9*", "1@0 2@0", {3}, "", 0},
      {10, "3@0:1*", "", {3}, "3:length", 0},
      {11, "", "3@0", {6}, "", 0},
  });
  EXPECT_THAT(s.plans()[5].preempted, ElementsAre(3));
  EXPECT_EQ(s.finished().at(3).reason, FinishReason::kLength);
  // The recompute feeds the original prompt and the 5 tokens generated so far.
  const ScheduledSequence& recompute = s.plans()[8].nodes[0].sequences[0];
  std::vector<int32_t> expected_feed = Req(3, 4, 8).prompt;
  expected_feed.insert(expected_feed.end(), s.tokens(3).begin(), s.tokens(3).begin() + 5);
  EXPECT_EQ(recompute.position, 0);
  EXPECT_EQ(recompute.tokens, expected_feed);
  EXPECT_EQ(recompute.sample_index, 5);
  EXPECT_THAT(s.sample_indices(3), ElementsAre(0, 1, 2, 3, 4, 5, 6, 7));
  for (RequestId id : {1, 2, 3}) {
    EXPECT_EQ(s.tokens(id), testing::SoloTokens(Req(id, 4, 8), 64)) << "request " << id;
  }
}

// One node of 3 pages of 2 tokens: request 1 decodes without a new page,
// then 2 (the newest) needs one and none is free, so 2 preempts itself and
// is recomputed once 1 is freed.
TEST(BatchSchedulerScenarioTest, PreemptsTheDecodingRequestWhenItIsNewest) {
  Scenario s(Opts({3}, /*page_size=*/2, /*budget=*/64));
  s.SubmitAt(0, Req(1, 2, 3));  // 2 pages for 2 + 1 tokens; 4 tokens at most
  s.SubmitAt(0, Req(2, 1, 4));  // 1 page for 1 + 1 tokens; 4 tokens at most
  s.Run({
      {0, "1@0:2* 2@0:1*", "", {1}, "", 0},
      {1, "1@0:1* 2@0:1*", "", {0}, "", 0},
      {2, "1@0:1*", "2@0", {1}, "1:length", 1},
      {3, "2@0:3*", "1@0", {1}, "", 0},
      {4, "2@0:1*", "", {1}, "2:length", 0},
      {5, "", "2@0", {3}, "", 0},
  });
  EXPECT_THAT(s.plans()[2].preempted, ElementsAre(2));
  EXPECT_THAT(s.sample_indices(2), ElementsAre(0, 1, 2, 3));
  EXPECT_EQ(s.tokens(1), testing::SoloTokens(Req(1, 2, 3), 64));
  EXPECT_EQ(s.tokens(2), testing::SoloTokens(Req(2, 1, 4), 64));
}

// Two prefilling requests admitted side by side run out of pages mid-prompt:
// the older one preempts the newer instead of both waiting forever.
TEST(BatchSchedulerScenarioTest, StuckPrefillPreemptsNewerPrefill) {
  Scenario s(Opts({4}, /*page_size=*/4, /*budget=*/8, /*chunk=*/4));
  s.SubmitAt(0, Req(1, 11, 2));  // 3 pages for 11 + 1 tokens
  s.SubmitAt(0, Req(2, 11, 2));
  s.Run({
      {0, "1@0:4 2@0:4", "", {2}, "", 0},
      {1, "1@0:4 2@0:4", "", {0}, "", 0},
      {2, "1@0:3*", "2@0", {1}, "", 1},
      {3, "1@0:1*", "", {1}, "1:length", 1},
      {4, "2@0:4", "1@0", {3}, "", 0},
  });
  s.RunToCompletion();
  EXPECT_EQ(s.tokens(2), testing::SoloTokens(Req(2, 11, 2), 64));
}

// Cancel: a waiting and a running request are reaped by the next plan (the
// running one's pages listed in its frees); a token sampled after Cancel()
// is dropped.
TEST(BatchSchedulerScenarioTest, CancelFreesPagesNextStep) {
  Scenario s(Opts({10}, /*page_size=*/4, /*budget=*/12));
  s.SubmitAt(0, Req(1, 8, 10));
  s.SubmitAt(0, Req(2, 4, 10));
  s.SubmitAt(0, Req(3, 4, 10));  // no budget left in step 0
  s.Before(1, [&] {
    s.scheduler().Cancel(1);
    s.scheduler().Cancel(3);
    s.scheduler().Cancel(42);  // unknown: no-op
  });
  s.AfterPlan(2, [&] { s.scheduler().Cancel(2); });
  s.Run({
      {0, "1@0:8* 2@0:4*", "", {7}, "", 1},
      {1, "2@0:1*", "1@0", {8}, "3:cancelled 1:cancelled", 0},
      {2, "2@0:1*", "", {8}, "", 0},
      {3, "", "2@0", {10}, "2:cancelled", 0},
  });
  EXPECT_EQ(s.tokens(2).size(), 2u) << "the token sampled after Cancel is dropped";
  EXPECT_TRUE(s.tokens(3).empty());
  EXPECT_EQ(s.finished().at(1).error, "");
  EXPECT_EQ(s.scheduler().num_running(), 0);
}

// Deadlines: expired means now > deadline; a waiting and a running request
// expire, a request whose deadline equals the step time still runs.
TEST(BatchSchedulerScenarioTest, DeadlineExpiryCancels) {
  Scenario s(Opts({10}, /*page_size=*/4, /*budget=*/4));
  Request a = Req(1, 4, 10);
  a.deadline = Scenario::Time0() + absl::Seconds(2);  // runs at step 2, gone at 3
  Request b = Req(2, 4, 10);
  b.deadline = Scenario::Time0() + absl::Milliseconds(500);  // waits (budget), gone at 1
  Request c = Req(3, 3, 10);                                 // no deadline
  s.SubmitAt(0, a);
  s.SubmitAt(0, b);
  s.SubmitAt(1, c);
  s.Run({
      {0, "1@0:4*", "", {9}, "", 1},
      {1, "1@0:1* 3@0:3*", "", {7}, "2:cancelled", 0},
      {2, "1@0:1* 3@0:1*", "", {7}, "", 0},
      {3, "3@0:1*", "1@0", {8}, "1:cancelled", 0},
  });
  EXPECT_EQ(s.finished().at(1).error, "deadline exceeded");
  EXPECT_EQ(s.finished().at(2).error, "deadline exceeded");
  EXPECT_EQ(s.tokens(1).size(), 3u);
}

// A plan whose results never come back: the next PlanStep finishes its
// sampling requests with kError (the server gets told, nothing hangs).
TEST(BatchSchedulerScenarioTest, UnappliedPlanFailsItsRequests) {
  auto sched = BatchScheduler::Create(Opts({10}, 4, 64));
  ASSERT_TRUE(sched.ok());
  BatchScheduler& b = **sched;
  ASSERT_TRUE(b.Submit(Req(1, 4, 5)).ok());
  ASSERT_TRUE(b.Submit(Req(2, 4, 5)).ok());
  const StepPlan first = b.PlanStep(Scenario::Time0());
  // Results only for 1: 2's node "failed".
  auto events = b.ApplyResults(first, {SampledToken{1, 7, -1.0f, {}}});
  ASSERT_EQ(events.size(), 2u);
  EXPECT_FALSE(events[0].finished);
  EXPECT_TRUE(events[1].finished);
  EXPECT_EQ(events[1].reason, FinishReason::kError);
  EXPECT_THAT(events[1].error, HasSubstr("no token for request 2 in step 0"));
  // Applying the same plan again is ignored.
  EXPECT_TRUE(b.ApplyResults(first, {SampledToken{1, 7, -1.0f, {}}}).empty());
  const StepPlan second = b.PlanStep(Scenario::Time0());
  EXPECT_EQ(FormatFrees(second), "2@0");
  // Never applied: the third plan fails 1 and frees it at once.
  const StepPlan third = b.PlanStep(Scenario::Time0());
  ASSERT_EQ(third.events.size(), 1u);
  EXPECT_EQ(third.events[0].id, 1);
  EXPECT_TRUE(third.events[0].finished);
  EXPECT_EQ(third.events[0].reason, FinishReason::kError);
  EXPECT_THAT(third.events[0].error, HasSubstr("results of step 1 were never applied"));
  EXPECT_EQ(FormatFrees(third), "1@0");
  EXPECT_EQ(b.pages_free(0), 10);
}

TEST(BatchSchedulerTest, FullQueueIsResourceExhausted) {
  BatchScheduler::Options o = Opts({10}, 4, 64);
  o.max_waiting_requests = 2;
  auto sched = BatchScheduler::Create(o);
  ASSERT_TRUE(sched.ok());
  BatchScheduler& b = **sched;
  ASSERT_TRUE(b.Submit(Req(1, 4, 2)).ok());
  ASSERT_TRUE(b.Submit(Req(2, 4, 2)).ok());
  const absl::Status full = b.Submit(Req(3, 4, 2));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(full.message(), "waiting queue is full (2 requests)");
  EXPECT_EQ(b.num_waiting(), 2);
  // Admission makes room.
  b.ApplyResults(b.PlanStep(Scenario::Time0()), {});
  EXPECT_EQ(b.num_waiting(), 0);
  EXPECT_TRUE(b.Submit(Req(3, 4, 2)).ok());
}

TEST(BatchSchedulerTest, SubmitRejectsWhatCanNeverFit) {
  auto sched = BatchScheduler::Create(Opts({3, 5}, /*page_size=*/4, 64, 0, /*context=*/32));
  ASSERT_TRUE(sched.ok());
  BatchScheduler& b = **sched;
  absl::Status s = b.Submit(Req(1, 30, 3));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "request 1: prompt of 30 tokens + max_tokens 3 = 33 exceeds the context length 32");
  // 18 + 4 - 1 = 21 tokens: 6 pages of 4; the largest node has 5.
  s = b.Submit(Req(2, 18, 4));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "request 2: prompt of 18 tokens + max_tokens 4 needs up to 6 latent cache pages of 4 tokens, "
            "but the largest attention node has 5 pages");
  EXPECT_TRUE(b.Submit(Req(3, 17, 4)).ok()) << "20 tokens: 5 pages";
  EXPECT_EQ(b.Submit(Req(4, 28, 4)).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(b.Submit(Req(3, 4, 2)).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(b.Submit(Req(5, 0, 2)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b.Submit(Req(6, 4, 0)).code(), absl::StatusCode::kInvalidArgument);
  Request with_stop = Req(7, 4, 2);
  with_stop.stop = {"\n"};
  s = b.Submit(with_stop);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("stop strings need a tokenizer"));
}

TEST(BatchSchedulerTest, CreateRejectsBadOptions) {
  struct Case {
    BatchScheduler::Options options;
    const char* message;
  };
  auto with = [](auto edit) {
    BatchScheduler::Options o = Opts({10}, 4, 64);
    edit(o);
    return o;
  };
  const Case cases[] = {
      {with([](auto& o) { o.max_batch_tokens = 0; }), "max_batch_tokens must be positive, got 0"},
      {with([](auto& o) { o.max_waiting_requests = -1; }), "max_waiting_requests must be positive, got -1"},
      {with([](auto& o) { o.page_size = 0; }), "page_size must be positive, got 0"},
      {with([](auto& o) { o.context_length = 0; }), "context_length must be positive, got 0"},
      {with([](auto& o) { o.max_prefill_chunk = -2; }), "max_prefill_chunk must be >= 0"},
      {with([](auto& o) { o.pages_per_node = {}; }), "pages_per_node is empty"},
      {with([](auto& o) {
         o.pages_per_node = {4, 0};
       }),
       "pages_per_node[1] must be positive, got 0"},
  };
  for (const Case& c : cases) {
    auto created = BatchScheduler::Create(c.options);
    ASSERT_FALSE(created.ok()) << c.message;
    EXPECT_EQ(created.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(created.status().message(), HasSubstr(c.message));
  }
}

TEST(BatchSchedulerTest, RequestViewFollowsTheLifecycle) {
  Scenario s(Opts({10}, 4, /*budget=*/4));
  s.SubmitAt(0, Req(1, 6, 2));
  s.Before(0, [&] {
    auto v = s.scheduler().GetRequest(1);
    ASSERT_TRUE(v.has_value());
    EXPECT_EQ(v->state, RequestState::kWaiting);
    EXPECT_EQ(v->node, -1);
  });
  s.Step();  // 4 of 6 prompt tokens
  auto v = s.scheduler().GetRequest(1);
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(v->state, RequestState::kPrefill);
  EXPECT_EQ(v->node, 0);
  EXPECT_EQ(v->length, 4);
  EXPECT_EQ(v->prompt_tokens, 6);
  s.Step();  // last 2, samples
  v = s.scheduler().GetRequest(1);
  EXPECT_EQ(v->state, RequestState::kDecode);
  EXPECT_EQ(v->length, 6);
  EXPECT_EQ(v->generated_tokens, 1);
  EXPECT_EQ(s.scheduler().num_running(), 1);
  s.Step();  // second token: max_tokens
  v = s.scheduler().GetRequest(1);
  EXPECT_EQ(v->state, RequestState::kFinished);
  EXPECT_EQ(v->length, 7);
  EXPECT_EQ(s.scheduler().num_running(), 0);
  EXPECT_EQ(s.scheduler().pages_free(0), 8);
  s.Step();  // freed and forgotten
  EXPECT_FALSE(s.scheduler().GetRequest(1).has_value());
  EXPECT_EQ(s.scheduler().pages_free(0), 10);
}

}  // namespace
}  // namespace dmoe::scheduler
