// ServingLoop against an in-process fake attention node (a gRPC server on
// 127.0.0.1:0): the events of a request reach its stream in order with the
// finished one last; streaming runs beside the steps (a stream whose Push
// blocks does not stop the next step from going out), WaitIdle waits for
// every push, and the loop's end pushes whatever was still queued.
#include "scheduler/serving_loop.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/config.h"
#include "tests/scheduler/node_registration.h"
#include "tests/test_util.h"

namespace dmoe::scheduler {
namespace {

constexpr absl::Duration kBound = absl::Seconds(30);  // every wait ends by then

// Samples token 100 + sample_index for every sequence that samples, and
// counts the steps it ran.
class FakeAttentionNode final : public v1::AttentionNode::Service {
 public:
  grpc::Status RunStep(grpc::ServerContext*, const v1::StepRequest* request, v1::StepResult* result) override {
    for (const v1::StepSequence& s : request->sequences()) {
      if (!s.sample()) continue;
      v1::SampledTokenResult* t = result->add_tokens();
      t->set_sequence_id(s.sequence_id());
      t->set_token_id(static_cast<int32_t>(100 + s.sample_index()));
    }
    result->set_step_id(request->step_id());
    result->set_pages_free(16);
    absl::MutexLock lock(&mu_);
    if (!request->sequences().empty()) ++steps_with_tokens_;
    return grpc::Status::OK;
  }
  grpc::Status Free(grpc::ServerContext*, const v1::FreeRequest*, v1::CacheStatus*) override {
    return grpc::Status::OK;
  }
  grpc::Status GetCacheStatus(grpc::ServerContext*, const v1::GetCacheStatusRequest*, v1::CacheStatus*) override {
    return grpc::Status::OK;
  }
  // Waits (bounded) until `n` steps with tokens ran; returns whether they did.
  bool AwaitStepsWithTokens(int n) {
    absl::MutexLock lock(&mu_);
    auto reached = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return steps_with_tokens_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kBound);
  }

 private:
  absl::Mutex mu_;
  int steps_with_tokens_ ABSL_GUARDED_BY(mu_) = 0;
};

// Records the events; with a gate, its first Push waits until Open().
class RecordingStream final : public RequestStream {
 public:
  explicit RecordingStream(bool gated = false) : RequestStream(absl::Now()), gated_(gated) {}
  void Push(RequestEvent event) override {
    if (gated_ && !entered_.HasBeenNotified()) {
      entered_.Notify();
      EXPECT_TRUE(open_.WaitForNotificationWithTimeout(kBound));
    }
    absl::MutexLock lock(&mu_);
    events_.push_back(std::move(event));
  }
  bool AwaitBlocked() { return entered_.WaitForNotificationWithTimeout(kBound); }
  void Open() {
    if (!open_.HasBeenNotified()) open_.Notify();
  }
  std::vector<RequestEvent> events() {
    absl::MutexLock lock(&mu_);
    return events_;
  }

 private:
  const bool gated_;
  absl::Notification entered_, open_;
  absl::Mutex mu_;
  std::vector<RequestEvent> events_ ABSL_GUARDED_BY(mu_);
};

class ServingLoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = ModelConfig::Load(dmoe::testing::GoldenModelDir().string());
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *config;
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&node_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    absl::StatusOr<router::ExpertPlacement> placement =
        router::ExpertPlacement::Contiguous(config_.n_routed_experts, 1);
    ASSERT_TRUE(placement.ok());
    coordinator_ =
        std::make_unique<Coordinator>(config_, 1, 1, *placement, CoordinatorOptions{.watch_health = false});
    const int32_t attention = Register(v1::NODE_KIND_ATTENTION, "127.0.0.1:" + std::to_string(port), 10);
    // Never called: the fake node runs the whole step.
    const int32_t expert = Register(v1::NODE_KIND_EXPERT, "127.0.0.1:1", 11);
    Ready(attention, 10);
    Ready(expert, 11);
    ASSERT_TRUE(coordinator_->AllReady());
    ServingOptions options;
    options.batching.page_size = 64;
    options.batching.context_length = config_.max_position_embeddings;
    options.on_serving_changed = [this](bool serving) {
      if (serving && !serving_.HasBeenNotified()) serving_.Notify();
    };
    absl::StatusOr<std::unique_ptr<ServingLoop>> loop = ServingLoop::Start(config_, *coordinator_, options);
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop);
    ASSERT_TRUE(serving_.WaitForNotificationWithTimeout(kBound));  // the loop took the membership in
  }

  void TearDown() override {
    loop_.reset();
    coordinator_.reset();
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
  }

  int32_t Register(v1::NodeKind kind, const std::string& address, uint64_t incarnation) {
    return testing::RegisterNode(*coordinator_, kind, address, incarnation, "t" + std::to_string(incarnation));
  }
  void Ready(int32_t id, uint64_t incarnation) { testing::MarkNodeReady(*coordinator_, id, incarnation); }

  static Request Req(RequestId id, int max_tokens) {
    Request r;
    r.id = id;
    r.prompt = {1, 2, 3};
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    return r;
  }

  ModelConfig config_;
  absl::Notification serving_;
  FakeAttentionNode node_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<ServingLoop> loop_;
};

std::vector<int32_t> Tokens(const std::vector<RequestEvent>& events) {
  std::vector<int32_t> tokens;
  for (const RequestEvent& e : events) tokens.insert(tokens.end(), e.new_tokens.begin(), e.new_tokens.end());
  return tokens;
}

TEST_F(ServingLoopTest, EventsArriveInOrderAndWaitIdleWaitsForThem) {
  auto a = std::make_shared<RecordingStream>();
  auto b = std::make_shared<RecordingStream>();
  ASSERT_TRUE(loop_->Submit(Req(1, 5), a).ok());
  ASSERT_TRUE(loop_->Submit(Req(2, 3), b).ok());
  ASSERT_TRUE(loop_->WaitIdle(absl::Now() + kBound));
  for (const auto& [stream, n] : {std::pair{a, 5}, std::pair{b, 3}}) {
    const std::vector<RequestEvent> events = stream->events();
    ASSERT_EQ(events.size(), static_cast<size_t>(n));  // one token per step, all pushed before WaitIdle returned
    std::vector<int32_t> expected;
    for (int i = 0; i < n; ++i) expected.push_back(100 + i);
    EXPECT_EQ(Tokens(events), expected);
    for (int i = 0; i + 1 < n; ++i) EXPECT_FALSE(events[i].finished);
    EXPECT_TRUE(events.back().finished);
    EXPECT_EQ(events.back().reason, FinishReason::kLength);
  }
}

TEST_F(ServingLoopTest, ABlockedStreamDoesNotHoldBackTheNextStep) {
  auto slow = std::make_shared<RecordingStream>(/*gated=*/true);
  ASSERT_TRUE(loop_->Submit(Req(1, 8), slow).ok());
  ASSERT_TRUE(slow->AwaitBlocked());  // the delivery thread is inside Push of step 0's token
  // The loop runs on: step 1 reaches the node while that Push waits.
  EXPECT_TRUE(node_.AwaitStepsWithTokens(2));
  EXPECT_FALSE(loop_->Idle());  // an event is still being pushed
  slow->Open();
  ASSERT_TRUE(loop_->WaitIdle(absl::Now() + kBound));
  const std::vector<RequestEvent> events = slow->events();
  ASSERT_EQ(events.size(), 8u);
  EXPECT_EQ(Tokens(events), (std::vector<int32_t>{100, 101, 102, 103, 104, 105, 106, 107}));
  EXPECT_TRUE(events.back().finished);
}

TEST_F(ServingLoopTest, StoppingPushesWhatWasQueuedThenEndsTheRest) {
  auto slow = std::make_shared<RecordingStream>(/*gated=*/true);
  ASSERT_TRUE(loop_->Submit(Req(1, 200), slow).ok());
  ASSERT_TRUE(slow->AwaitBlocked());
  // Stopping while a Push is blocked: the loop thread ends, the queued
  // events are pushed once the stream lets go, then the request ends.
  std::thread stopper([this] { loop_.reset(); });
  slow->Open();
  stopper.join();
  const std::vector<RequestEvent> events = slow->events();
  ASSERT_FALSE(events.empty());
  const std::vector<int32_t> tokens = Tokens(events);
  for (size_t i = 0; i < tokens.size(); ++i) EXPECT_EQ(tokens[i], static_cast<int32_t>(100 + i));
  EXPECT_TRUE(events.back().finished);
  if (events.back().reason == FinishReason::kLength) {
    EXPECT_EQ(tokens.size(), 200u);  // it was done before the loop saw the stop
  } else {
    EXPECT_EQ(events.back().reason, FinishReason::kError);
    EXPECT_EQ(events.back().error, "the scheduler stopped");
  }
  for (size_t i = 0; i + 1 < events.size(); ++i) EXPECT_FALSE(events[i].finished);
}

}  // namespace
}  // namespace dmoe::scheduler
