// dmoe-expert-node as a real process against a fake Coordinator in this
// test: it registers in two phases, loads its shard, answers a dispatch sent
// over UCX from this process (attention node 0) with the partial sums
// LocalExperts computes here, reports the load, answers grpc.health.v1 and
// exits 0 on SIGTERM.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/mlp.h"
#include "core/model_weights.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/data_plane_tags.h"
#include "router/dispatch_wire.h"
#include "tests/expert_node/node_test_util.h"
#include "tests/test_util.h"
#include "tests/transport/transport_test_util.h"
#include "transport/ucx_transport.h"

namespace dmoe::expert {
namespace {

using ::dmoe::testing::FakeCoordinator;
using ::dmoe::testing::GoldenModelDir;
using ::dmoe::testing::NodeProcess;
using ::testing::HasSubstr;

constexpr int64_t kExperts = 16;
constexpr int64_t kHidden = 128;
constexpr int64_t kTopK = 4;
constexpr transport::NodeId kTestNode = 0;    // this process: the attention node
constexpr transport::NodeId kExpertNode = 1;  // the child: expert node 0
constexpr transport::NodeId kPhantom = 2;     // expert node 1: listed, never contacted
constexpr absl::Duration kTimeout = absl::Seconds(20);

std::vector<int32_t> Experts(int parity) {
  std::vector<int32_t> out;
  for (int32_t e = parity; e < kExperts; e += 2) out.push_back(e);
  return out;
}

class ExpertNodeProcessTest : public ::testing::Test {
 protected:
  // The child hosts the odd experts, the phantom node the even ones.
  void StartNode(std::vector<std::vector<int32_t>> shards = {Experts(1), Experts(0)}) {
    transport::testing::SetUcxTestEnv();
    auto t = transport::CreateUcxTransport({.node_id = kTestNode});
    ASSERT_TRUE(t.ok()) << t.status();
    transport_ = std::move(*t);
    coordinator_ = std::make_unique<FakeCoordinator>(1, std::move(shards));
    coordinator_->AddNode(kTestNode, v1::NODE_KIND_ATTENTION, transport_->address());
    coordinator_->AddNode(kPhantom, v1::NODE_KIND_EXPERT, "phantom: never connected");
    auto address = coordinator_->Start();
    ASSERT_TRUE(address.ok()) << address.status();
    dir_ = testing::ScratchDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_TRUE(node_
                    .Spawn("dmoe-expert-node",
                           {"--model", GoldenModelDir().string(), "--scheduler", *address, "--port", "0", "--port-file",
                            (dir_ / "port.json").string(), "--report-interval-ms", "50"},
                           dir_ / "expert-node.log")
                    .ok());
  }

  // Waits until the child is connected and serving.
  void AwaitServing() {
    ASSERT_TRUE(coordinator_->AwaitReady(1, kTimeout)) << node_.Log();
    const auto node = coordinator_->node(kExpertNode);
    ASSERT_TRUE(node.has_value());
    ASSERT_TRUE(transport_->Connect(kExpertNode, node->transport_address()).ok());
    const absl::Status serving = testing::AwaitServing(node->grpc_address(), kTimeout);
    ASSERT_TRUE(serving.ok()) << serving << "\n" << node_.Log();
  }

  void TearDown() override {
    if (HasFailure()) std::cerr << "expert node log:\n" << node_.Log();
  }

  std::unique_ptr<transport::Transport> transport_;
  std::unique_ptr<FakeCoordinator> coordinator_;
  std::filesystem::path dir_;
  NodeProcess node_;  // declared last: killed first
};

TEST_F(ExpertNodeProcessTest, RegistersInTwoPhasesAndServesHealth) {
  StartNode();
  AwaitServing();
  const auto regs = coordinator_->registrations();
  ASSERT_EQ(regs.size(), 2u);
  EXPECT_EQ(regs[0].kind(), v1::NODE_KIND_EXPERT);
  EXPECT_TRUE(regs[0].transport_address().empty()) << "phase 1 has no transport address";
  EXPECT_FALSE(regs[1].transport_address().empty()) << "phase 2 carries it";
  EXPECT_EQ(regs[0].grpc_address(), regs[1].grpc_address());
  const auto port = testing::ReadPortFile(dir_ / "port.json");
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_EQ(regs[0].grpc_address(), absl::StrCat("127.0.0.1:", *port));
  EXPECT_GT(coordinator_->ready_weight_bytes().at(kExpertNode), 0);
  const std::string log = node_.Log();
  EXPECT_THAT(log, HasSubstr("registered with"));
  EXPECT_THAT(log, HasSubstr("loaded 8 experts x 3 layers"));
  EXPECT_THAT(log, HasSubstr("connected to 1 attention nodes"));
}

TEST_F(ExpertNodeProcessTest, DispatchGetsTheShardsPartialSumsAndLoadIsReported) {
  StartNode();
  AwaitServing();
  auto full = ModelWeights::Load(GoldenModelDir());
  ASSERT_TRUE(full.ok()) << full.status();
  LocalExperts reference(**full);

  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<int64_t> expected_load(4 * kExperts, 0);
  int64_t dispatches = 0;
  for (const auto& [layer, micro_batch, n] : {std::tuple<int64_t, int, int64_t>{1, 0, 5}, {3, 1, 9}}) {
    SCOPED_TRACE(::testing::Message() << "layer " << layer);
    // Tokens routed to the child's (odd) experts; slots for others are -1,
    // as DispatchPlan sends them.
    std::vector<float> x(n * kHidden), w(n * kTopK);
    std::vector<int32_t> idx(n * kTopK);
    for (float& v : x) v = normal(rng);
    for (int64_t i = 0; i < n * kTopK; ++i) {
      idx[i] = (i % 3 == 2) ? -1 : static_cast<int32_t>(1 + 2 * ((i * 5 + layer) % 8));
      w[i] = 0.1f + 0.05f * static_cast<float>(i % 7);
      if (idx[i] >= 0) ++expected_load[layer * kExperts + idx[i]];
    }
    auto payload = router::EncodeDispatch(layer, 77, kHidden, kTopK, x, idx, w);
    ASSERT_TRUE(payload.ok()) << payload.status();
    const uint64_t tag = router::DispatchTag(77, layer, micro_batch);
    ASSERT_TRUE(transport_->Send(kExpertNode, tag, *payload).ok());
    auto reply = transport_->Receive(router::ReplyTag(tag), router::kAllTagBits, kTimeout);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->from, kExpertNode);
    auto sums = router::DecodePartialSums(reply->payload);
    ASSERT_TRUE(sums.ok()) << sums.status();
    EXPECT_EQ(sums->layer, layer);
    EXPECT_EQ(sums->num_tokens, n);
    std::vector<float> want(n * kHidden);
    ASSERT_TRUE(reference.Compute(layer, x.data(), n, kTopK, idx.data(), w.data(), want.data()).ok());
    float max_ref = 0, max_diff = 0;
    for (int64_t i = 0; i < n * kHidden; ++i) {
      max_ref = std::max(max_ref, std::abs(want[i]));
      max_diff = std::max(max_diff, std::abs(want[i] - sums->partial_sums[i]));
    }
    EXPECT_GT(max_ref, 0.0f);
    EXPECT_LE(max_diff, 1e-5f * max_ref);
    ++dispatches;
  }
  const bool reported = coordinator_->AwaitLoad(
      kExpertNode,
      [&](const std::vector<int64_t>& tokens, int64_t steps) { return tokens == expected_load && steps == dispatches; },
      kTimeout);
  EXPECT_TRUE(reported) << "load reports never summed to the dispatched tokens";
}

TEST_F(ExpertNodeProcessTest, SigtermStopsItWithExitZero) {
  StartNode();
  AwaitServing();
  ASSERT_TRUE(node_.Signal(SIGTERM));
  const std::optional<int> status = node_.WaitExit(kTimeout);
  ASSERT_TRUE(status.has_value()) << "still running after SIGTERM";
  EXPECT_TRUE(WIFEXITED(*status)) << "status " << *status;
  EXPECT_EQ(WEXITSTATUS(*status), 0);
  EXPECT_THAT(node_.Log(), HasSubstr("stopping"));
}

TEST_F(ExpertNodeProcessTest, BadShardIsAnErrorNamingIt) {
  StartNode({{3, 3}, Experts(0)});
  const std::optional<int> status = node_.WaitExit(kTimeout);
  ASSERT_TRUE(status.has_value()) << "a node with a bad shard kept running";
  EXPECT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 1);
  EXPECT_THAT(node_.Log(), HasSubstr("expert_shard lists expert 3 twice"));
}

}  // namespace
}  // namespace dmoe::expert
