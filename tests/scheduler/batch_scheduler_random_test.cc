// Random submits, cancels, deadlines, failed nodes and unapplied plans
// against a simple model of what must hold (LevelDB db_test ModelDB style):
//   - Submit accepts exactly what the model says fits;
//   - the pages the scheduler counts per node equal a real LatentCache's
//     after every step, are never negative, and equal the sum over the
//     placed requests of ceil(length / page_size);
//   - no step exceeds the token budget of a node or the prefill chunk;
//   - every accepted request finishes exactly once and is then forgotten;
//     nothing is lost;
//   - what a request streamed is exactly what it generates alone (stops,
//     length), or a prefix of it (cancelled, deadline, error), preemptions
//     and recomputes notwithstanding.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <vector>

#include "scheduler/batch_scheduler.h"
#include "tests/scheduler/fake_cluster.h"

namespace dmoe::scheduler {
namespace {

struct ModelRequest {
  Request request;
  std::vector<int32_t> solo;  // what it generates alone
  std::vector<int32_t> streamed;
  bool finished = false;
  FinishReason reason = FinishReason::kStop;
};

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

class RandomRun {
 public:
  explicit RandomRun(uint32_t seed) : rng_(seed) {
    options_.pages_per_node.resize(1 + rng_() % 3);
    for (int64_t& pages : options_.pages_per_node) pages = 2 + rng_() % 11;
    options_.page_size = 1 + rng_() % 5;
    options_.max_batch_tokens = 1 + rng_() % 16;
    options_.max_prefill_chunk = rng_() % 7;
    options_.context_length = 16 + rng_() % 25;
    options_.max_waiting_requests = 3 + rng_() % 18;
    auto created = BatchScheduler::Create(options_);
    EXPECT_TRUE(created.ok()) << created.status();
    scheduler_ = *std::move(created);
    cluster_ = std::make_unique<testing::FakeCluster>(options_);
  }

  void Run() {
    constexpr int kArrivalSteps = 150;
    for (step_ = 0; step_ < kArrivalSteps; ++step_) {
      if (rng_() % 10 < 4) SubmitRandom();
      if (rng_() % 10 < 2) SubmitRandom();
      if (rng_() % 10 == 0) CancelRandom();
      Step();
      if (::testing::Test::HasFailure()) return;
    }
    // Drain: no new work; everything must finish and be forgotten.
    for (int i = 0; i < 3000 && !Done(); ++i, ++step_) {
      if (rng_() % 50 == 0) CancelRandom();
      Step();
      if (::testing::Test::HasFailure()) return;
    }
    ASSERT_TRUE(Done()) << "requests still live after draining";
    for (int n = 0; n < scheduler_->num_nodes(); ++n) {
      EXPECT_EQ(scheduler_->pages_free(n), options_.pages_per_node[n]);
    }
    for (const auto& [id, m] : model_) {
      EXPECT_TRUE(m.finished) << "request " << id << " lost";
      if (m.reason == FinishReason::kStop || m.reason == FinishReason::kLength) {
        EXPECT_EQ(m.streamed, m.solo) << "request " << id;
      } else {
        ASSERT_LE(m.streamed.size(), m.solo.size()) << "request " << id;
        EXPECT_TRUE(std::equal(m.streamed.begin(), m.streamed.end(), m.solo.begin())) << "request " << id;
      }
    }
  }

  int64_t preemptions() const { return preemptions_; }
  int64_t accepted() const { return static_cast<int64_t>(model_.size()); }

 private:
  absl::Time Now() const { return testing::Scenario::Time0() + absl::Seconds(step_); }

  bool Done() const {
    for (const auto& [id, m] : model_) {
      if (!m.finished || scheduler_->GetRequest(id).has_value()) return false;
    }
    return true;
  }

  void SubmitRandom() {
    Request r;
    r.id = next_id_++;
    const int prompt = 1 + static_cast<int>(rng_() % 14);
    for (int i = 0; i < prompt; ++i) r.prompt.push_back(static_cast<int32_t>(2 + rng_() % 400));
    r.max_tokens = 1 + static_cast<int32_t>(rng_() % 12);
    if (rng_() % 8 == 0) r.deadline = Now() + absl::Seconds(static_cast<int64_t>(rng_() % 30));
    // Stop on a token it will generate, sometimes.
    const std::vector<int32_t> plain = testing::SoloTokens(r, options_.context_length);
    if (rng_() % 4 == 0) r.stop_token_ids = {plain[rng_() % plain.size()]};
    if (rng_() % 4 == 0) {
      r.eos_token_ids = {plain[rng_() % plain.size()]};
      r.ignore_eos = rng_() % 3 == 0;
    }
    const int64_t most_pages =
        *std::max_element(options_.pages_per_node.begin(), options_.pages_per_node.end());
    const bool fits = prompt + r.max_tokens <= options_.context_length &&
                      CeilDiv(prompt + r.max_tokens - 1, options_.page_size) <= most_pages &&
                      scheduler_->num_waiting() < options_.max_waiting_requests;
    const absl::Status status = scheduler_->Submit(r);
    if (!fits) {
      EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << status;
      return;
    }
    ASSERT_TRUE(status.ok()) << status;
    ModelRequest m;
    m.solo = testing::SoloTokens(r, options_.context_length);
    m.request = std::move(r);
    model_.emplace(m.request.id, std::move(m));
  }

  void CancelRandom() {
    if (next_id_ == 0) return;
    scheduler_->Cancel(static_cast<RequestId>(rng_() % (next_id_ + 2)));  // may be unknown
  }

  void Step() {
    StepPlan plan = scheduler_->PlanStep(Now());
    CheckPlan(plan);
    const int drop_node = rng_() % 40 == 0 ? static_cast<int>(rng_() % options_.pages_per_node.size()) : -1;
    const std::vector<SampledToken> sampled = cluster_->Run(plan, drop_node);
    std::vector<RequestEvent> events = plan.events;
    if (rng_() % 60 != 0) {  // otherwise the results "never come back"
      std::vector<RequestEvent> applied = scheduler_->ApplyResults(plan, sampled);
      events.insert(events.end(), applied.begin(), applied.end());
    }
    preemptions_ += static_cast<int64_t>(plan.preempted.size());
    for (const RequestEvent& e : events) Record(e);
    CheckState();
  }

  void CheckPlan(const StepPlan& plan) {
    ASSERT_EQ(plan.nodes.size(), options_.pages_per_node.size());
    const int64_t chunk_limit =
        options_.max_prefill_chunk == 0 ? options_.max_batch_tokens : options_.max_prefill_chunk;
    for (const NodeStep& node : plan.nodes) {
      EXPECT_LE(node.num_tokens(), options_.max_batch_tokens) << "step " << step_;
      for (const ScheduledSequence& s : node.sequences) {
        EXPECT_LE(static_cast<int64_t>(s.tokens.size()), std::max<int64_t>(1, chunk_limit));
        ASSERT_TRUE(model_.contains(s.id));
        EXPECT_FALSE(model_.at(s.id).finished) << "finished request " << s.id << " scheduled";
        EXPECT_EQ(s.sample_index, static_cast<int64_t>(model_.at(s.id).streamed.size()));
      }
    }
  }

  void Record(const RequestEvent& e) {
    ASSERT_TRUE(model_.contains(e.id)) << "event for unknown request " << e.id;
    ModelRequest& m = model_.at(e.id);
    EXPECT_FALSE(m.finished) << "event for request " << e.id << " after it finished";
    EXPECT_LE(e.new_tokens.size(), 1u);
    m.streamed.insert(m.streamed.end(), e.new_tokens.begin(), e.new_tokens.end());
    if (e.finished) {
      m.finished = true;
      m.reason = e.reason;
    }
  }

  void CheckState() {
    std::vector<int64_t> used(options_.pages_per_node.size(), 0);
    std::vector<int64_t> placed(options_.pages_per_node.size(), 0);
    int64_t waiting = 0, running = 0;
    for (const auto& [id, m] : model_) {
      const std::optional<RequestView> v = scheduler_->GetRequest(id);
      if (!v.has_value()) {
        EXPECT_TRUE(m.finished) << "request " << id << " forgotten before it finished";
        continue;
      }
      EXPECT_EQ(v->generated_tokens, static_cast<int64_t>(m.streamed.size())) << "request " << id;
      switch (v->state) {
        case RequestState::kWaiting:
          ++waiting;
          EXPECT_EQ(v->node, -1);
          EXPECT_EQ(v->length, 0);
          break;
        case RequestState::kPrefill:
        case RequestState::kDecode:
          ++running;
          ++placed[v->node];
          [[fallthrough]];
        case RequestState::kFinished:
          // A finished request keeps its pages until the next plan frees it.
          EXPECT_TRUE(v->state != RequestState::kFinished || m.finished) << "request " << id;
          ASSERT_GE(v->node, 0);
          used[v->node] += CeilDiv(v->length, options_.page_size);
          EXPECT_LE(v->length, v->prompt_tokens + m.request.max_tokens - 1);
          break;
      }
    }
    EXPECT_EQ(scheduler_->num_waiting(), waiting);
    EXPECT_EQ(scheduler_->num_running(), running);
    for (int n = 0; n < scheduler_->num_nodes(); ++n) {
      EXPECT_GE(scheduler_->pages_free(n), 0) << "node " << n;
      EXPECT_EQ(scheduler_->pages_free(n), cluster_->pages_free(n)) << "node " << n << ", step " << step_;
      EXPECT_EQ(options_.pages_per_node[n] - scheduler_->pages_free(n), used[n]) << "node " << n;
      EXPECT_LE(placed[n], options_.max_batch_tokens) << "node " << n;
    }
  }

  std::mt19937 rng_;
  BatchScheduler::Options options_;
  std::unique_ptr<BatchScheduler> scheduler_;
  std::unique_ptr<testing::FakeCluster> cluster_;
  std::map<RequestId, ModelRequest> model_;
  RequestId next_id_ = 0;
  int step_ = 0;
  int64_t preemptions_ = 0;
};

TEST(BatchSchedulerRandomTest, RandomOperationsKeepInvariants) {
  int64_t preemptions = 0, accepted = 0;
  for (uint32_t seed = 1; seed <= 200; ++seed) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    RandomRun run(seed);
    run.Run();
    preemptions += run.preemptions();
    accepted += run.accepted();
    if (HasFailure()) return;
  }
  // The runs really exercise preemption and recompute.
  EXPECT_GT(preemptions, 100);
  EXPECT_GT(accepted, 5000);
}

}  // namespace
}  // namespace dmoe::scheduler
