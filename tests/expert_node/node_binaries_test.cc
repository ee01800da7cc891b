// dmoe-attention-node with two dmoe-expert-node processes, all real
// processes joined through a fake Coordinator in this test, which drives the
// attention node's AttentionNode service as the scheduler would: the golden
// prompts' greedy tokens come out exactly; a dead expert node is UNAVAILABLE
// and the attention node keeps answering; SIGTERM stops every node with 0.
#include <signal.h>
#include <sys/wait.h>

#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/core/model_test_util.h"
#include "tests/expert_node/node_test_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using ::dmoe::testing::FakeCoordinator;
using ::dmoe::testing::GoldenModelDir;
using ::dmoe::testing::NodeProcess;
using ::testing::HasSubstr;

constexpr absl::Duration kTimeout = absl::Seconds(30);

class NodeBinariesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Expert node i (node id 1 + i) hosts experts [8i, 8i + 8).
    std::vector<std::vector<int32_t>> shards(2);
    for (int32_t e = 0; e < 16; ++e) shards[e / 8].push_back(e);
    coordinator_ = std::make_unique<FakeCoordinator>(1, shards);
    auto address = coordinator_->Start();
    ASSERT_TRUE(address.ok()) << address.status();
    dir_ = testing::ScratchDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    const std::string model = GoldenModelDir().string();
    for (int i = 0; i < 2; ++i) {
      ASSERT_TRUE(experts_[i]
                      .Spawn("dmoe-expert-node", {"--model", model, "--scheduler", *address},
                             dir_ / absl::StrCat("expert-", i, ".log"))
                      .ok());
    }
    ASSERT_TRUE(attention_
                    .Spawn("dmoe-attention-node",
                           {"--model", model, "--scheduler", *address, "--host", "127.0.0.1", "--port", "0",
                            "--cache-pages", "32", "--page-size", "16", "--ping-pong-min-tokens", "8"},
                           dir_ / "attention.log")
                    .ok());
    ASSERT_TRUE(coordinator_->AwaitReady(3, kTimeout)) << Logs();
    const auto node = coordinator_->node(0);
    ASSERT_TRUE(node.has_value());
    const absl::Status serving = testing::AwaitServing(node->grpc_address(), kTimeout);
    ASSERT_TRUE(serving.ok()) << serving << "\n" << Logs();
    stub_ = v1::AttentionNode::NewStub(grpc::CreateChannel(node->grpc_address(), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    if (HasFailure()) std::cerr << Logs();
  }

  std::string Logs() const {
    return absl::StrCat("attention node log:\n", attention_.Log(), "expert node 0 log:\n", experts_[0].Log(),
                        "expert node 1 log:\n", experts_[1].Log());
  }

  grpc::Status RunStep(const v1::StepRequest& request, v1::StepResult* result) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kTimeout + absl::Seconds(10)));
    return stub_->RunStep(&context, request, result);
  }

  std::unique_ptr<FakeCoordinator> coordinator_;
  std::filesystem::path dir_;
  std::unique_ptr<v1::AttentionNode::Stub> stub_;
  NodeProcess experts_[2];
  NodeProcess attention_;  // declared last: killed first
};

v1::StepSequence Greedy(int64_t id, const std::vector<int32_t>& tokens) {
  v1::StepSequence s;
  s.set_sequence_id(id);
  s.mutable_tokens()->Add(tokens.begin(), tokens.end());
  s.set_sample(true);
  return s;
}

TEST_F(NodeBinariesTest, GreedyDecodeOverProcessesReproducesGolden) {
  const auto regs = coordinator_->registrations();
  for (const auto& r : regs) {
    if (r.kind() != v1::NODE_KIND_ATTENTION) continue;
    EXPECT_EQ(r.cache_pages(), 32);
    EXPECT_EQ(r.page_size(), 16);
  }
  const auto cases = testing::LoadGoldenCases(GoldenModelDir());
  std::vector<std::vector<int32_t>> generated(cases.size());
  for (int64_t step = 1; generated[0].size() < cases[0].greedy_ids.size(); ++step) {
    v1::StepRequest request;
    request.set_step_id(step);
    request.set_participating_attention_nodes(1);
    for (size_t i = 0; i < cases.size(); ++i) {
      *request.add_sequences() = Greedy(i, step == 1 ? cases[i].prompt_ids : std::vector{generated[i].back()});
    }
    v1::StepResult result;
    const grpc::Status s = RunStep(request, &result);
    ASSERT_TRUE(s.ok()) << "step " << step << ": " << s.error_message();
    ASSERT_EQ(result.tokens_size(), static_cast<int>(cases.size()));
    for (const auto& t : result.tokens()) generated[t.sequence_id()].push_back(t.token_id());
  }
  for (size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(generated[i], cases[i].greedy_ids) << "case " << i;

  grpc::ClientContext context;
  v1::FreeRequest free;
  for (int64_t i = 0; i < static_cast<int64_t>(cases.size()); ++i) free.add_sequence_ids(i);
  v1::CacheStatus status;
  ASSERT_TRUE(stub_->Free(&context, free, &status).ok());
  EXPECT_EQ(status.pages_free(), 32);
  EXPECT_EQ(status.pages_total(), 32);
}

TEST_F(NodeBinariesTest, DeadExpertNodeIsUnavailableAndTheAttentionNodeKeepsServing) {
  ASSERT_TRUE(experts_[1].Signal(SIGKILL));
  ASSERT_TRUE(experts_[1].WaitExit(kTimeout).has_value());
  v1::StepRequest request;
  request.set_step_id(1);
  *request.add_sequences() = Greedy(5, testing::LoadGoldenCases(GoldenModelDir())[3].prompt_ids);
  v1::StepResult result;
  const grpc::Status s = RunStep(request, &result);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("expert node"));

  grpc::ClientContext context;
  v1::CacheStatus status;
  ASSERT_TRUE(stub_->GetCacheStatus(&context, v1::GetCacheStatusRequest(), &status).ok());
  EXPECT_EQ(status.pages_free(), 32) << "the failed step gave its pages back";
  EXPECT_TRUE(status.sequence_ids().empty());
}

TEST_F(NodeBinariesTest, SigtermStopsEveryNodeWithExitZero) {
  for (NodeProcess* p : {&attention_, &experts_[0], &experts_[1]}) ASSERT_TRUE(p->Signal(SIGTERM));
  for (NodeProcess* p : {&attention_, &experts_[0], &experts_[1]}) {
    const std::optional<int> status = p->WaitExit(kTimeout);
    ASSERT_TRUE(status.has_value()) << "still running after SIGTERM";
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  }
  EXPECT_THAT(attention_.Log(), HasSubstr("stopping"));
}

}  // namespace
}  // namespace dmoe
