// The scheduler hands out the data plane's setup through registration: one transport kind per
// cluster, and for NCCL one ncclUniqueId (and the communicator size) to every node. The
// Coordinator directly, then the real dmoe-scheduler binary over gRPC.
#include <grpcpp/grpcpp.h>

#include <sys/wait.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "router/expert_placement.h"
#include "scheduler/coordinator.h"
#include "tests/expert_node/node_test_util.h"
#include "tests/test_util.h"
#if DMOE_HAVE_NCCL
#include "transport/nccl_transport.h"
#endif

namespace dmoe::scheduler {
namespace {

using ::testing::HasSubstr;

v1::RegisterNodeRequest Request(v1::NodeKind kind, const std::string& address, v1::TransportKind transport) {
  v1::RegisterNodeRequest r;
  r.set_kind(kind);
  r.set_grpc_address(address);
  r.set_cache_pages(16);
  r.set_page_size(64);
  r.set_transport_kind(transport);
  r.set_incarnation(std::hash<std::string>()(address) | 1);  // one process per address
  return r;
}

class CoordinatorTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = ModelConfig::Load(testing::GoldenModelDir());
    ASSERT_TRUE(config.ok()) << config.status();
    absl::StatusOr<router::ExpertPlacement> placement = router::ExpertPlacement::Contiguous(config->n_routed_experts, 1);
    ASSERT_TRUE(placement.ok()) << placement.status();
    coordinator_ = std::make_unique<Coordinator>(*config, 1, 1, *placement, CoordinatorOptions{.watch_health = false});
  }

  std::unique_ptr<Coordinator> coordinator_;
};

TEST_F(CoordinatorTransportTest, UcxNodesGetNoNcclId) {
  auto a = coordinator_->RegisterNode(Request(v1::NODE_KIND_ATTENTION, "a:1", v1::TRANSPORT_KIND_UNSPECIFIED));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->nccl_unique_id().empty());
  auto e = coordinator_->RegisterNode(Request(v1::NODE_KIND_EXPERT, "e:1", v1::TRANSPORT_KIND_UCX));
  ASSERT_TRUE(e.ok()) << e.status();  // unspecified is UCX
  EXPECT_TRUE(e->nccl_unique_id().empty());
}

TEST_F(CoordinatorTransportTest, EveryNcclNodeGetsTheSameIdMadeOnce) {
  int made = 0;
  coordinator_->SetNcclUniqueIdSource([&]() -> absl::StatusOr<std::string> {
    ++made;
    return std::string(128, static_cast<char>(made));
  });
  auto a = coordinator_->RegisterNode(Request(v1::NODE_KIND_ATTENTION, "a:1", v1::TRANSPORT_KIND_NCCL));
  ASSERT_TRUE(a.ok()) << a.status();
  auto again = coordinator_->RegisterNode(Request(v1::NODE_KIND_ATTENTION, "a:1", v1::TRANSPORT_KIND_NCCL));
  ASSERT_TRUE(again.ok()) << again.status();
  auto e = coordinator_->RegisterNode(Request(v1::NODE_KIND_EXPERT, "e:1", v1::TRANSPORT_KIND_NCCL));
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(made, 1);
  EXPECT_EQ(a->nccl_unique_id(), std::string(128, '\1'));
  EXPECT_EQ(again->nccl_unique_id(), a->nccl_unique_id());
  EXPECT_EQ(e->nccl_unique_id(), a->nccl_unique_id());
  EXPECT_EQ(a->num_nodes(), 2);
  EXPECT_EQ(e->num_nodes(), 2);
  EXPECT_EQ(a->node_id(), 0);
  EXPECT_EQ(e->node_id(), 1);
}

TEST_F(CoordinatorTransportTest, MixedTransportsAreRefused) {
  coordinator_->SetNcclUniqueIdSource([]() -> absl::StatusOr<std::string> { return std::string(128, 'x'); });
  ASSERT_TRUE(coordinator_->RegisterNode(Request(v1::NODE_KIND_ATTENTION, "a:1", v1::TRANSPORT_KIND_NCCL)).ok());
  auto e = coordinator_->RegisterNode(Request(v1::NODE_KIND_EXPERT, "e:1", v1::TRANSPORT_KIND_UCX));
  EXPECT_EQ(e.status().code(), absl::StatusCode::kFailedPrecondition) << e.status();
  EXPECT_THAT(e.status().message(), HasSubstr("TRANSPORT_KIND_UCX, but the cluster's nodes use TRANSPORT_KIND_NCCL"));
}

TEST_F(CoordinatorTransportTest, NcclWithoutASourceOrWithAFailingOneIsRefused) {
  auto none = coordinator_->RegisterNode(Request(v1::NODE_KIND_ATTENTION, "a:1", v1::TRANSPORT_KIND_NCCL));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition) << none.status();
  EXPECT_THAT(none.status().message(), HasSubstr("built without NCCL"));
  coordinator_->SetNcclUniqueIdSource([]() -> absl::StatusOr<std::string> {
    return absl::UnavailableError("ncclGetUniqueId: no socket");
  });
  auto failing = coordinator_->RegisterNode(Request(v1::NODE_KIND_ATTENTION, "a:1", v1::TRANSPORT_KIND_NCCL));
  EXPECT_EQ(failing.status().code(), absl::StatusCode::kUnavailable) << failing.status();
  EXPECT_THAT(failing.status().message(), HasSubstr("no socket"));
}

// The real dmoe-scheduler for a 1 + 1 cluster of tiny-v3, on free ports; stopped on destruction.
class SchedulerBinaryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::ScratchDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    const std::filesystem::path port_file = dir_ / "scheduler.json";
    std::filesystem::remove(port_file);
    setenv("NCCL_SOCKET_IFNAME", "lo", 0);  // the scheduler hosts NCCL's bootstrap root
    ASSERT_TRUE(scheduler_
                    .Spawn((testing::BinDir() / "dmoe-scheduler").string(),
                           {"--model", testing::GoldenModelDir().string(), "--host", "127.0.0.1", "--port", "0",
                            "--control-port", "0", "--attention-nodes", "1", "--expert-nodes", "1", "--port-file",
                            port_file.string()},
                           dir_ / "scheduler.log")
                    .ok());
    for (const absl::Time end = absl::Now() + absl::Seconds(30); control_port_ < 0 && absl::Now() < end;) {
      std::ifstream in(port_file);
      nlohmann::json j = in ? nlohmann::json::parse(in, nullptr, false) : nlohmann::json();
      if (j.is_object() && j.contains("control_port")) {
        control_port_ = j["control_port"].get<int>();
      } else {
        ASSERT_FALSE(scheduler_.WaitExit(absl::Milliseconds(20)).has_value()) << scheduler_.Log();
      }
    }
    ASSERT_GT(control_port_, 0) << scheduler_.Log();
  }

  void TearDown() override {
    if (!scheduler_.running()) return;
    scheduler_.Signal(SIGTERM);
    EXPECT_TRUE(scheduler_.WaitExit(absl::Seconds(20)).has_value()) << scheduler_.Log();
  }

  std::string control_address() const { return absl::StrCat("127.0.0.1:", control_port_); }

  std::filesystem::path dir_;
  testing::NodeProcess scheduler_;
  int control_port_ = -1;
};

// What a node registering with TRANSPORT_KIND_NCCL gets over gRPC. Built with NCCL the scheduler
// makes a real ncclUniqueId (no GPU needed); without, it refuses clearly.
TEST_F(SchedulerBinaryTest, HandsOutTheNcclUniqueIdThroughRegistration) {
  auto stub = v1::Coordinator::NewStub(grpc::CreateChannel(control_address(), grpc::InsecureChannelCredentials()));
  auto register_node = [&](v1::NodeKind kind, const std::string& address, v1::RegisterNodeResponse* reply) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    return stub->RegisterNode(&context, Request(kind, address, v1::TRANSPORT_KIND_NCCL), reply);
  };
  v1::RegisterNodeResponse a, e;
  const grpc::Status sa = register_node(v1::NODE_KIND_ATTENTION, "127.0.0.1:1", &a);
#if DMOE_HAVE_NCCL
  ASSERT_TRUE(sa.ok()) << sa.error_message() << "\n" << scheduler_.Log();
  const grpc::Status se = register_node(v1::NODE_KIND_EXPERT, "127.0.0.1:2", &e);
  ASSERT_TRUE(se.ok()) << se.error_message();
  EXPECT_EQ(a.nccl_unique_id().size(), transport::kNcclUniqueIdBytes);
  EXPECT_NE(a.nccl_unique_id(), std::string(transport::kNcclUniqueIdBytes, '\0'));
  EXPECT_EQ(e.nccl_unique_id(), a.nccl_unique_id());
  EXPECT_EQ(a.num_nodes(), 2);
#else
  EXPECT_EQ(sa.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << sa.error_message();
  EXPECT_THAT(sa.error_message(), HasSubstr("built without NCCL"));
#endif
}

// A node asked for NCCL where it has no GPU (CUDA_VISIBLE_DEVICES empty hides them on any
// machine) registers, then exits 1 naming the CUDA error instead of waiting for its peers.
TEST_F(SchedulerBinaryTest, AnNcclNodeWithoutAGpuExitsNamingWhatIsMissing) {
  setenv("CUDA_VISIBLE_DEVICES", "", 1);  // inherited by the node only: the scheduler runs already
  testing::NodeProcess node;
  const absl::Status spawned = node.Spawn((testing::BinDir() / "dmoe-expert-node").string(),
                                          {"--model", testing::GoldenModelDir().string(), "--scheduler",
                                           control_address(), "--transport", "nccl", "--gpu", "0"},
                                          dir_ / "expert.log");
  unsetenv("CUDA_VISIBLE_DEVICES");
  ASSERT_TRUE(spawned.ok()) << spawned;
  const std::optional<int> status = node.WaitExit(absl::Seconds(60));
  ASSERT_TRUE(status.has_value()) << node.Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << *status << "\n" << node.Log();
#if DMOE_HAVE_NCCL
  EXPECT_THAT(node.Log(), HasSubstr("NCCL transport of node 1 on GPU 0: cudaSetDevice: cuda")) << node.Log();
#else
  EXPECT_THAT(node.Log(), HasSubstr("built without NCCL")) << node.Log();
#endif
}

}  // namespace
}  // namespace dmoe::scheduler
