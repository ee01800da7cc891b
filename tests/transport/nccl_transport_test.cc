// The NCCL transport. Without GPUs only its setup is checked (unique ids, option and device
// errors); with two GPUs two ranks (one thread and one GPU each, as two nodes would be) exchange
// tagged messages and every byte is checked. The full Transport conformance suite runs on it
// too, where 3 GPUs are visible (transport_conformance_test.cc, kind "Nccl").
#include "transport/nccl_transport.h"

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "core/cuda/cuda_backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/transport/transport_test_util.h"

namespace dmoe::transport {
namespace {

using ::dmoe::transport::testing::CheckPayload;
using ::dmoe::transport::testing::MakePayload;
using ::testing::HasSubstr;

constexpr absl::Duration kTimeout = absl::Seconds(20);
constexpr uint64_t kAll = ~uint64_t{0};

int VisibleGpus() {
  absl::StatusOr<std::vector<cuda::CudaDeviceInfo>> devices = cuda::ListDevices();
  return devices.ok() ? static_cast<int>(devices->size()) : 0;
}

TEST(NcclUniqueIdTest, IsFreshAndOfNcclsSizeWithoutAGpu) {
  testing::SetNcclTestEnv();
  absl::StatusOr<std::string> a = NewNcclUniqueId();
  absl::StatusOr<std::string> b = NewNcclUniqueId();
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->size(), kNcclUniqueIdBytes);
  EXPECT_NE(*a, *b);
  EXPECT_NE(*a, std::string(kNcclUniqueIdBytes, '\0'));
}

TEST(NcclTransportSetupTest, SetsNvlsOffUnlessSet) {
  unsetenv("NCCL_NVLS_ENABLE");
  SetNcclDefaultEnv();
  ASSERT_NE(getenv("NCCL_NVLS_ENABLE"), nullptr);
  EXPECT_STREQ(getenv("NCCL_NVLS_ENABLE"), "0");
  setenv("NCCL_NVLS_ENABLE", "1", 1);
  SetNcclDefaultEnv();
  EXPECT_STREQ(getenv("NCCL_NVLS_ENABLE"), "1");
  setenv("NCCL_NVLS_ENABLE", "0", 1);
}

TEST(NcclTransportSetupTest, BadOptionsAreInvalidArgument) {
  const std::string id(kNcclUniqueIdBytes, 'x');
  auto code = [](const NcclOptions& o) { return CreateNcclTransport(o).status(); };
  absl::Status one = code({.node_id = 0, .num_nodes = 1, .unique_id = id});
  EXPECT_EQ(one.code(), absl::StatusCode::kInvalidArgument) << one;
  EXPECT_THAT(one.message(), HasSubstr("num_nodes = 1"));
  EXPECT_EQ(code({.node_id = 2, .num_nodes = 2, .unique_id = id}).code(), absl::StatusCode::kInvalidArgument);
  absl::Status short_id = code({.node_id = 0, .num_nodes = 2, .unique_id = "abc"});
  EXPECT_EQ(short_id.code(), absl::StatusCode::kInvalidArgument) << short_id;
  EXPECT_THAT(short_id.message(), HasSubstr("3 bytes, expected 128"));
  NcclOptions chunk{.node_id = 0, .num_nodes = 2, .unique_id = id};
  chunk.frame_limits.chunk_bytes = chunk.frame_limits.max_chunk_bytes + 1;
  EXPECT_EQ(code(chunk).code(), absl::StatusCode::kInvalidArgument);
}

// No GPU (this machine, CI) or no such GPU: UNAVAILABLE naming the CUDA error, before NCCL is
// touched (so it does not wait for the other rank).
TEST(NcclTransportSetupTest, AMissingGpuIsUnavailableAndNamesTheCudaError) {
  testing::SetNcclTestEnv();
  absl::StatusOr<std::string> id = NewNcclUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  const int device = VisibleGpus() == 0 ? 0 : 4096;
  absl::StatusOr<std::unique_ptr<FramedTransport>> t =
      CreateNcclTransport({.node_id = 0, .num_nodes = 2, .unique_id = *id, .cuda_device = device});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable) << t.status();
  EXPECT_THAT(t.status().message(), HasSubstr(absl::StrCat("GPU ", device, ": cudaSetDevice: cuda")));
}

// Two ranks on GPUs 0 and 1, joined concurrently; small chunks so that payloads span many.
class TwoGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const int gpus = VisibleGpus(); gpus < 2) {
      GTEST_SKIP() << "needs 2 GPUs (one per rank), " << gpus << " visible";
    }
    testing::SetNcclTestEnv();
    absl::StatusOr<std::string> id = NewNcclUniqueId();
    ASSERT_TRUE(id.ok()) << id.status();
    std::vector<absl::StatusOr<std::unique_ptr<FramedTransport>>> made(2);  // UNKNOWN until set
    std::vector<std::thread> threads;
    for (NodeId rank : {0, 1}) {
      threads.emplace_back([&, rank] {
        NcclOptions o{.node_id = rank, .num_nodes = 2, .unique_id = *id, .cuda_device = rank};
        o.frame_limits.chunk_bytes = o.frame_limits.max_chunk_bytes = 64 << 10;
        o.frame_limits.max_payload_bytes = 16 << 20;
        o.init_timeout = absl::Seconds(60);
        made[rank] = CreateNcclTransport(o);
      });
    }
    for (std::thread& t : threads) t.join();
    for (auto& m : made) {
      ASSERT_TRUE(m.ok()) << m.status();
      nodes_.push_back(std::move(*m));
    }
    for (NodeId rank : {0, 1}) {
      ASSERT_TRUE(nodes_[rank]->Connect(1 - rank, nodes_[1 - rank]->address()).ok());
    }
  }

  FramedTransport& node(int i) { return *nodes_[i]; }
  std::vector<std::unique_ptr<FramedTransport>> nodes_;
};

TEST_F(TwoGpuTest, PingPongOfTaggedMessagesIsByteIdentical) {
  const std::vector<size_t> sizes = {0, 1, 64, 4096, (64 << 10) - 1, 64 << 10, (64 << 10) + 1, 1 << 20, 3 << 20};
  uint64_t round = 0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    for (size_t size : sizes) {
      const uint64_t ping_tag = 0x1000 | round, pong_tag = 0x2000 | round;
      ASSERT_TRUE(node(0).Send(1, ping_tag, MakePayload(0, round, size)).ok());
      auto ping = node(1).Receive(ping_tag, kAll, kTimeout);
      ASSERT_TRUE(ping.ok()) << ping.status();
      ASSERT_EQ(CheckPayload(*ping, 0, round, size), "");
      ASSERT_TRUE(node(1).Send(0, pong_tag, MakePayload(1, round, size)).ok());
      auto pong = node(0).Receive(pong_tag, kAll, kTimeout);
      ASSERT_TRUE(pong.ok()) << pong.status();
      ASSERT_EQ(CheckPayload(*pong, 1, round, size), "");
      ++round;
    }
  }
  const std::vector<SendRecord> records = node(0).TakeSendRecords();
  ASSERT_EQ(records.size(), 3 * sizes.size());
  EXPECT_EQ(records.back().bytes, sizes.back());
  EXPECT_GT(records.back().device_seconds, 0);
  EXPECT_TRUE(node(0).TakeSendRecords().empty());
}

// Both ranks send everything, several chunks each, before either receives: a Send must not
// wait for the peer's Receive call.
TEST_F(TwoGpuTest, BothWaysBeforeAnyReceive) {
  const std::vector<size_t> sizes = {0, 100, 1 << 20, 8 << 20};
  auto send_all = [&](int from) {
    for (size_t k = 0; k < sizes.size(); ++k) {
      absl::Status s = node(from).Send(1 - from, 7, MakePayload(from, k, sizes[k]));
      ASSERT_TRUE(s.ok()) << s;
    }
  };
  std::thread a(send_all, 0);
  std::thread b(send_all, 1);
  a.join();
  b.join();
  for (int me = 0; me < 2; ++me) {
    for (size_t k = 0; k < sizes.size(); ++k) {
      auto m = node(me).Receive(7, kAll, kTimeout);
      ASSERT_TRUE(m.ok()) << m.status();
      EXPECT_EQ(CheckPayload(*m, 1 - me, k, sizes[k]), "");
    }
  }
}

// One SendMany of several multi-chunk messages to one peer: they arrive whole, in order, and
// tag masks pick them as in the MoE data plane (one tag per step/layer/micro-batch).
TEST_F(TwoGpuTest, SendManyKeepsOrderAndTagsSelect) {
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<OutgoingMessage> out;
  for (uint64_t i = 0; i < 6; ++i) payloads.push_back(MakePayload(0, i, (i + 1) * 50'000));
  for (uint64_t i = 0; i < 6; ++i) out.push_back({1, (i % 2 ? 0xB000 : 0xA000) | i, payloads[i]});
  ASSERT_TRUE(node(0).SendMany(out).ok());
  for (uint64_t i : {1, 3, 5}) {
    auto m = node(1).Receive(0xB000, 0xF000, kTimeout);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->tag, 0xB000 | i);
    EXPECT_EQ(CheckPayload(*m, 0, i, (i + 1) * 50'000), "");
  }
  for (uint64_t i : {0, 2, 4}) {
    auto m = node(1).Receive(0xA000 | i, kAll, kTimeout);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(CheckPayload(*m, 0, i, (i + 1) * 50'000), "");
  }
}

TEST_F(TwoGpuTest, BadSendsAreRefusedAndTheStreamGoesOn) {
  absl::Status wide = node(0).Send(1, kMaxTag + 1, MakePayload(0, 0, 4));
  EXPECT_EQ(wide.code(), absl::StatusCode::kInvalidArgument) << wide;
  absl::Status self = node(0).Send(0, 1, MakePayload(0, 0, 4));
  EXPECT_EQ(self.code(), absl::StatusCode::kUnavailable) << self;
  absl::Status far = node(0).Send(5, 1, MakePayload(0, 0, 4));
  EXPECT_EQ(far.code(), absl::StatusCode::kUnavailable) << far;
  EXPECT_THAT(far.message(), HasSubstr("peer 5"));
  const std::vector<uint8_t> big((16 << 20) + 1);
  EXPECT_EQ(node(0).Send(1, 1, big).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(node(0).Connect(1, "nccl:1:2:0000000000000000").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(node(0).Connect(1, "ucx:whatever").code(), absl::StatusCode::kInvalidArgument);
  // None of that cost a frame: the next message arrives (sequence numbers intact).
  ASSERT_TRUE(node(0).Send(1, kMaxTag, MakePayload(0, 9, 10)).ok());
  auto m = node(1).Receive(kMaxTag, kAll, kTimeout);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(CheckPayload(*m, 0, 9, 10), "");
}

}  // namespace
}  // namespace dmoe::transport
