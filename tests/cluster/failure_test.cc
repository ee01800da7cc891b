// Node failures on a real cluster (dmoe-scheduler, attention and expert
// nodes as child processes): a killed node's in-flight requests end
// UNAVAILABLE naming it, the others keep being served, health follows, and a
// restarted node or scheduler brings the cluster back with golden output.
#include <signal.h>
#include <sys/wait.h>

#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cluster/cluster_harness.h"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using ::testing::HasSubstr;
using testing::Cluster;
using testing::ClusterOptions;
using testing::Role;

// Long enough that a node can be killed while it runs (ignore_eos).
constexpr int kLongTokens = 240;

ClusterOptions Golden(int attention, int expert) {
  ClusterOptions o;
  o.model_dir = testing::GoldenModelDir().string();
  o.attention_nodes = attention;
  o.expert_nodes = expert;
  return o;
}

// A Generate call streamed on its own thread; first_token is notified once
// a token has arrived (or the call ended).
class StreamingCall {
 public:
  StreamingCall(v1::Generation::Stub& stub, std::vector<int32_t> prompt, int max_tokens) {
    thread_ = std::thread([this, &stub, prompt = std::move(prompt), max_tokens] {
      v1::GenerateRequest request;
      for (int32_t id : prompt) request.mutable_token_ids()->add_ids(id);
      request.set_max_tokens(max_tokens);
      request.set_ignore_eos(true);
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      auto reader = stub.Generate(&ctx, request);
      v1::GenerateResponse r;
      while (reader->Read(&r)) {
        tokens_ += r.token_ids_size();
        if (tokens_ > 0 && !first_token_.HasBeenNotified()) first_token_.Notify();
      }
      status_ = reader->Finish();
      if (!first_token_.HasBeenNotified()) first_token_.Notify();
    });
  }
  ~StreamingCall() { Join(); }
  bool AwaitFirstToken() { return first_token_.WaitForNotificationWithTimeout(absl::Seconds(30)); }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }
  // After Join.
  const grpc::Status& status() const { return status_; }
  int tokens() const { return tokens_; }

 private:
  absl::Notification first_token_;
  int tokens_ = 0;
  grpc::Status status_;
  std::thread thread_;
};

void ExpectGolden(Cluster& cluster) {
  for (const auto& gc : testing::LoadGoldenCases(testing::GoldenModelDir())) {
    const testing::Generated g =
        testing::GenerateIds(cluster.client(), gc.prompt_ids, static_cast<int>(gc.greedy_ids.size()));
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.ids, gc.greedy_ids);
  }
}

v1::ClusterNode NodeState(Cluster& cluster, int node_id) {
  absl::StatusOr<v1::GetClusterStatsResponse> stats = cluster.Stats();
  EXPECT_TRUE(stats.ok()) << stats.status();
  if (!stats.ok() || node_id >= stats->nodes_size()) return {};
  return stats->nodes(node_id);
}

// The slot (node id) of the node listening on `address`: nodes register
// in any order.
int SlotOf(Cluster& cluster, const std::string& address) {
  absl::StatusOr<v1::GetClusterStatsResponse> stats = cluster.Stats();
  for (int i = 0; stats.ok() && i < stats->nodes_size(); ++i) {
    if (stats->nodes(i).grpc_address() == address) return i;
  }
  ADD_FAILURE() << "no node at " << address;
  return 0;
}

std::string Log(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Follows the scheduler's membership (GetCluster long polls) until node
// `node_id` serves; false after `timeout`.
bool AwaitNodeServing(Cluster& cluster, int node_id, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  int64_t epoch = -1;
  while (absl::Now() < deadline) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(5))));
    v1::GetClusterRequest request;
    request.set_wait_past_epoch(epoch);
    v1::GetClusterResponse response;
    if (!cluster.coordinator().GetCluster(&ctx, request, &response).ok()) return false;
    if (node_id < response.nodes_size() && response.nodes(node_id).serving()) return true;
    epoch = response.epoch();
  }
  return false;
}

TEST(Failure, KilledExpertNodeFailsInFlightRequestsNamingItAndServesAgainAfterRestart) {
  auto started = Cluster::Start(Golden(1, 2));
  ASSERT_TRUE(started.ok()) << started.status();
  Cluster& cluster = **started;
  absl::StatusOr<std::string> expert = cluster.NodeAddress(Role::kExpert, 1);
  ASSERT_TRUE(expert.ok());
  const int slot = SlotOf(cluster, *expert);

  StreamingCall call(cluster.client(), {1, 2, 3}, kLongTokens);
  ASSERT_TRUE(call.AwaitFirstToken());
  cluster.Kill(Role::kExpert, 1);
  call.Join();
  EXPECT_EQ(call.status().error_code(), grpc::StatusCode::UNAVAILABLE) << call.status().error_message();
  EXPECT_THAT(call.status().error_message(), HasSubstr(*expert));
  EXPECT_THAT(call.status().error_message(), HasSubstr("expert node"));
  EXPECT_LT(call.tokens(), kLongTokens);

  // Health follows, and new requests are refused naming the lost node.
  ASSERT_TRUE(cluster.AwaitHealth(false, 10000).ok());
  EXPECT_EQ(NodeState(cluster, slot).state(), v1::NODE_STATE_DOWN);
  const testing::Generated refused = testing::GenerateIds(cluster.client(), {1, 2, 3}, 4);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.status.error_message(), HasSubstr(absl::StrCat("expert node ", slot, " (", *expert, ") unavailable")));

  // The restarted node takes its slot back (same port, same id); the
  // attention node reconnects to it.
  ASSERT_TRUE(cluster.Restart(Role::kExpert, 1).ok());
  ASSERT_TRUE(cluster.AwaitHealth(true, 30000).ok());
  EXPECT_TRUE(NodeState(cluster, slot).serving());
  ExpectGolden(cluster);
  EXPECT_TRUE(cluster.AwaitPagesFree(absl::Seconds(10)));
}

TEST(Failure, KilledAttentionNodeFailsOnlyItsRequestsAndTheOtherNodeServes) {
  auto started = Cluster::Start(Golden(2, 1));
  ASSERT_TRUE(started.ok()) << started.status();
  Cluster& cluster = **started;
  absl::StatusOr<std::string> dead = cluster.NodeAddress(Role::kAttention, 1);
  ASSERT_TRUE(dead.ok());
  const int slot = SlotOf(cluster, *dead);

  // Four requests: placement alternates, so each node holds two.
  std::vector<std::unique_ptr<StreamingCall>> calls;
  for (int i = 0; i < 4; ++i) {
    calls.push_back(std::make_unique<StreamingCall>(cluster.client(), std::vector<int32_t>{1, 2, 3 + i}, kLongTokens));
  }
  for (auto& c : calls) ASSERT_TRUE(c->AwaitFirstToken());
  cluster.Kill(Role::kAttention, 1);
  int failed = 0, completed = 0;
  for (auto& c : calls) {
    c->Join();
    if (c->status().ok()) {
      EXPECT_EQ(c->tokens(), kLongTokens);
      ++completed;
    } else {
      EXPECT_EQ(c->status().error_code(), grpc::StatusCode::UNAVAILABLE) << c->status().error_message();
      EXPECT_THAT(c->status().error_message(), HasSubstr(absl::StrCat("attention node ", slot, " (", *dead, ")")));
      ++failed;
    }
  }
  EXPECT_EQ(failed, 2);
  EXPECT_EQ(completed, 2);

  // The cluster still serves (health stays SERVING), and every new request
  // goes to the live node, whose cache is emptier than nothing.
  ASSERT_TRUE(cluster.AwaitHealth(true, 1000).ok());
  EXPECT_EQ(NodeState(cluster, slot).state(), v1::NODE_STATE_DOWN);
  std::vector<std::unique_ptr<StreamingCall>> more;
  for (int i = 0; i < 6; ++i) {
    more.push_back(std::make_unique<StreamingCall>(cluster.client(), std::vector<int32_t>{4, 5, 6 + i}, 8));
  }
  for (auto& c : more) {
    c->Join();
    EXPECT_TRUE(c->status().ok()) << c->status().error_message();
    EXPECT_EQ(c->tokens(), 8);
  }
  ExpectGolden(cluster);

  // A restarted attention node serves again once the expert node reached it.
  ASSERT_TRUE(cluster.Restart(Role::kAttention, 1).ok());
  ASSERT_TRUE(AwaitNodeServing(cluster, slot, absl::Seconds(30)));
  std::vector<std::unique_ptr<StreamingCall>> both;
  for (int i = 0; i < 4; ++i) {
    both.push_back(std::make_unique<StreamingCall>(cluster.client(), std::vector<int32_t>{7, 8, 9 + i}, 16));
  }
  for (auto& c : both) {
    c->Join();
    EXPECT_TRUE(c->status().ok()) << c->status().error_message();
  }
  ExpectGolden(cluster);
}

TEST(Failure, WithTwoReplicasKillingAnExpertNodeLosesNoRequest) {
  ClusterOptions o = Golden(1, 2);
  o.scheduler_flags = {"--expert-replicas", "2"};  // both expert nodes hold every expert
  auto started = Cluster::Start(o);
  ASSERT_TRUE(started.ok()) << started.status();
  Cluster& cluster = **started;
  ExpectGolden(cluster);

  std::vector<std::unique_ptr<StreamingCall>> calls;
  for (int i = 0; i < 4; ++i) {
    calls.push_back(std::make_unique<StreamingCall>(cluster.client(), std::vector<int32_t>{1, 2, 3 + i}, kLongTokens));
  }
  for (auto& c : calls) ASSERT_TRUE(c->AwaitFirstToken());
  cluster.Kill(Role::kExpert, 1);
  for (auto& c : calls) {
    c->Join();
    EXPECT_TRUE(c->status().ok()) << c->status().error_message();
    EXPECT_EQ(c->tokens(), kLongTokens);
  }
  // Still serving on the other replica, with the same output.
  ASSERT_TRUE(cluster.AwaitHealth(true, 1000).ok());
  ExpectGolden(cluster);
  // The restarted replica is used again (the dispatches rotate over both).
  ASSERT_TRUE(cluster.Restart(Role::kExpert, 1).ok());
  absl::StatusOr<std::string> restarted = cluster.NodeAddress(Role::kExpert, 1);
  ASSERT_TRUE(restarted.ok());
  ASSERT_TRUE(AwaitNodeServing(cluster, SlotOf(cluster, *restarted), absl::Seconds(30)));
  ExpectGolden(cluster);
}

TEST(Failure, RestartedSchedulerGetsTheRunningNodesBack) {
  auto started = Cluster::Start(Golden(1, 1));
  ASSERT_TRUE(started.ok()) << started.status();
  Cluster& cluster = **started;
  ExpectGolden(cluster);
  const pid_t attention = cluster.pid(Role::kAttention), expert = cluster.pid(Role::kExpert);
  cluster.Kill(Role::kScheduler);
  ASSERT_TRUE(cluster.Restart(Role::kScheduler).ok());
  // The nodes notice, wait for it and register again: no node restarts.
  const absl::Status back = cluster.AwaitHealth(true, 30000);
  ASSERT_TRUE(back.ok()) << back;
  EXPECT_EQ(cluster.pid(Role::kAttention), attention);
  EXPECT_EQ(cluster.pid(Role::kExpert), expert);
  EXPECT_EQ(kill(attention, 0), 0);
  EXPECT_EQ(kill(expert, 0), 0);
  ExpectGolden(cluster);
}

TEST(Failure, ASecondNodeCannotTakeALiveNodesPortOrSlot) {
  auto started = Cluster::Start(Golden(1, 1));
  ASSERT_TRUE(started.ok()) << started.status();
  Cluster& cluster = **started;
  absl::StatusOr<std::string> expert = cluster.NodeAddress(Role::kExpert);
  ASSERT_TRUE(expert.ok());
  const int port = std::stoi(expert->substr(expert->rfind(':') + 1));

  // Same port: the bind fails (no SO_REUSEPORT).
  absl::StatusOr<pid_t> same_port = cluster.StartExtra(Role::kExpert, 0, port, "same_port");
  ASSERT_TRUE(same_port.ok());
  const int status = cluster.WaitExit(*same_port, 30000);
  ASSERT_NE(status, -1) << "the second node on port " << port << " kept running";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1);
  EXPECT_THAT(Log(cluster.dir() + "/same_port.log"), HasSubstr(absl::StrCat("cannot listen on ", *expert)));
  // Another port: the scheduler refuses the registration, naming the live node.
  absl::StatusOr<pid_t> other_port = cluster.StartExtra(Role::kExpert, 0, 0, "other_port");
  ASSERT_TRUE(other_port.ok());
  const int status2 = cluster.WaitExit(*other_port, 30000);
  ASSERT_NE(status2, -1) << "the second expert node kept running";
  EXPECT_TRUE(WIFEXITED(status2) && WEXITSTATUS(status2) == 1);
  const std::string refused = Log(cluster.dir() + "/other_port.log");
  EXPECT_THAT(refused, HasSubstr("ALREADY_EXISTS"));
  EXPECT_THAT(refused, HasSubstr(absl::StrCat("expert node 1 (", *expert, ")")));
  // The live node was not disturbed.
  EXPECT_EQ(NodeState(cluster, SlotOf(cluster, *expert)).state(), v1::NODE_STATE_READY);
  ExpectGolden(cluster);
}

}  // namespace
}  // namespace dmoe
