// What every Transport must do, run against each implementation (in-process, UCX, the NCCL
// transport's FramedTransport over a fake NCCL channel, and NCCL itself where it is built and 3
// GPUs are visible; the nodes live in this one process). Multi-process UCX:
// ucx_multiprocess_test.cc.
#include <time.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/transport/transport_test_util.h"
#include "transport/transport.h"

namespace dmoe::transport {
namespace {

using ::dmoe::transport::testing::CheckPayload;
using ::dmoe::transport::testing::MakePayload;
using ::dmoe::transport::testing::TransportKind;
using ::testing::HasSubstr;

// Long enough never to fire on a slow machine, short enough that a bug fails instead of hangs.
constexpr absl::Duration kTimeout = absl::Seconds(10);
constexpr uint64_t kAll = ~uint64_t{0};

class TransportConformanceTest : public ::testing::TestWithParam<TransportKind> {
 protected:
  void SetUp() override {
    auto cluster = GetParam().create_cluster(3);
    // Only the NCCL kind says this: fewer GPUs than nodes.
    if (cluster.status().code() == absl::StatusCode::kFailedPrecondition) GTEST_SKIP() << cluster.status();
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    nodes_ = std::move(cluster).value();
  }

  Transport& node(int i) { return *nodes_[i]; }

  std::vector<std::unique_ptr<Transport>> nodes_;
};

TEST_P(TransportConformanceTest, PingPong) {
  for (uint64_t round = 0; round < 50; ++round) {
    ASSERT_TRUE(node(0).Send(1, 1, MakePayload(0, round, 64)).ok());
    auto ping = node(1).Receive(1, kAll, kTimeout);
    ASSERT_TRUE(ping.ok()) << ping.status();
    ASSERT_EQ(CheckPayload(*ping, 0, round, 64), "");
    ASSERT_EQ(ping->tag, 1u);
    ASSERT_TRUE(node(1).Send(0, 2, MakePayload(1, round, 64)).ok());
    auto pong = node(0).Receive(2, kAll, kTimeout);
    ASSERT_TRUE(pong.ok()) << pong.status();
    ASSERT_EQ(CheckPayload(*pong, 1, round, 64), "");
  }
}

// Two senders, two tags each, interleaved; the receiver takes everything with mask 0 and must
// see each (sender, tag) stream in order.
TEST_P(TransportConformanceTest, ManyMessagesArriveInOrderPerSenderAndTag) {
  constexpr int kPerStream = 200;
  constexpr std::array<uint64_t, 2> kTags = {0x11, 0x22};
  auto send_all = [&](int sender) {
    for (int i = 0; i < kPerStream; ++i) {
      for (int t = 0; t < 2; ++t) {
        const uint64_t seq = i * 2 + t;  // unique per sender; order checked per tag below
        ASSERT_TRUE(node(sender).Send(0, kTags[t], MakePayload(sender, seq, 100 + i)).ok());
      }
    }
  };
  std::thread s1(send_all, 1);
  std::thread s2(send_all, 2);
  std::map<std::pair<NodeId, uint64_t>, int> next;  // (sender, tag) -> next i
  auto receive_all = [&] {
    for (int n = 0; n < 2 * 2 * kPerStream; ++n) {
      auto m = node(0).Receive(0, 0, kTimeout);
      ASSERT_TRUE(m.ok()) << m.status();
      const int t = m->tag == kTags[0] ? 0 : 1;
      ASSERT_EQ(m->tag, kTags[t]);
      int& i = next[{m->from, m->tag}];
      ASSERT_EQ(CheckPayload(*m, m->from, i * 2 + t, 100 + i), "") << "tag " << m->tag;
      ++i;
    }
  };
  receive_all();  // returns early on failure; the senders still finish
  s1.join();
  s2.join();
  for (const auto& [stream, count] : next) EXPECT_EQ(count, kPerStream);
  EXPECT_EQ(next.size(), 4u);
}

// Every size class, content checked. Both nodes send everything before either receives: a Send
// must not wait for the peer's Receive call (8 MiB takes UCX's rendezvous path).
TEST_P(TransportConformanceTest, SizesArriveIntactBothWaysBeforeAnyReceive) {
  const std::vector<size_t> sizes = {0, 1, 4096, 1 << 20, 8 << 20};
  auto send_all = [&](int from, int to) {
    for (size_t k = 0; k < sizes.size(); ++k) {
      absl::Status s = node(from).Send(to, 7, MakePayload(from, k, sizes[k]));
      ASSERT_TRUE(s.ok()) << s;
    }
  };
  std::thread a(send_all, 0, 1);
  std::thread b(send_all, 1, 0);
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

TEST_P(TransportConformanceTest, TagMasksSelectMessages) {
  // Interleaved streams A (0xA000 | i) and B (0xB000 | i).
  constexpr uint64_t kA = 0xA000, kB = 0xB000, kKindMask = 0xF000;
  for (uint64_t i = 0; i < 10; ++i) {
    ASSERT_TRUE(node(1).Send(0, kA | i, MakePayload(1, i, 16)).ok());
    ASSERT_TRUE(node(1).Send(0, kB | i, MakePayload(1, 100 + i, 16)).ok());
  }
  // An exact tag out of order, then all of B by mask, then what is left of A.
  auto a5 = node(0).Receive(kA | 5, kAll, kTimeout);
  ASSERT_TRUE(a5.ok()) << a5.status();
  EXPECT_EQ(a5->tag, kA | 5);
  EXPECT_EQ(CheckPayload(*a5, 1, 5, 16), "");
  for (uint64_t i = 0; i < 10; ++i) {
    auto b = node(0).Receive(kB | 0xFFF, kKindMask, kTimeout);  // low bits ignored by the mask
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(b->tag, kB | i);
    EXPECT_EQ(CheckPayload(*b, 1, 100 + i, 16), "");
  }
  for (uint64_t i = 0; i < 10; ++i) {
    if (i == 5) continue;
    auto a = node(0).Receive(kA, kKindMask, kTimeout);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(a->tag, kA | i);
  }
  EXPECT_EQ(node(0).Receive(0, 0, absl::Milliseconds(20)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST_P(TransportConformanceTest, ReceiveTimesOutWithDeadlineExceeded) {
  ASSERT_TRUE(node(1).Send(0, 8, MakePayload(1, 0, 8)).ok());  // pending, does not match
  const absl::Time start = absl::Now();
  auto m = node(0).Receive(7, kAll, absl::Milliseconds(50));
  const absl::Duration waited = absl::Now() - start;
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(m.status().message(), HasSubstr("tag 0x7"));
  EXPECT_GE(waited, absl::Milliseconds(50));
  EXPECT_LT(waited, absl::Seconds(2));
  auto eight = node(0).Receive(8, kAll, kTimeout);  // still there
  ASSERT_TRUE(eight.ok()) << eight.status();
  EXPECT_EQ(CheckPayload(*eight, 1, 0, 8), "");
}

TEST_P(TransportConformanceTest, SendToUnconnectedPeerNamesIt) {
  const std::vector<uint8_t> payload = MakePayload(0, 0, 32);
  absl::Status s = node(0).Send(99, 1, payload);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(s.message(), HasSubstr("peer 99"));
}

TEST_P(TransportConformanceTest, TagWiderThanTagBitsIsRejected) {
  absl::Status s = node(0).Send(1, kMaxTag + 1, MakePayload(0, 0, 4));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(node(0).Send(1, kMaxTag, MakePayload(0, 0, 4)).ok());
  auto m = node(1).Receive(kMaxTag, kAll, kTimeout);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->tag, kMaxTag);
  EXPECT_EQ(m->from, 0);
}

// Four threads send on node 0 (one tag each) while node 1 receives on one thread and acks each
// message, and a fifth thread on node 0 receives the acks concurrently with the sends.
TEST_P(TransportConformanceTest, ConcurrentSendersAndReceivers) {
  constexpr int kThreads = 4, kPerThread = 200;
  constexpr uint64_t kAckBase = 100;
  std::vector<std::thread> senders;
  for (int t = 0; t < kThreads; ++t) {
    senders.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t seq = t * kPerThread + i;
        absl::Status s = node(0).Send(1, t, MakePayload(0, seq, 64 + 61 * i));
        ASSERT_TRUE(s.ok()) << s;
      }
    });
  }
  std::thread receiver([&] {
    std::array<int, kThreads> next{};
    for (int n = 0; n < kThreads * kPerThread; ++n) {
      auto m = node(1).Receive(0, 0, kTimeout);
      ASSERT_TRUE(m.ok()) << m.status();
      ASSERT_LT(m->tag, uint64_t{kThreads});
      const int t = static_cast<int>(m->tag);
      const int i = next[t]++;
      ASSERT_EQ(CheckPayload(*m, 0, t * kPerThread + i, 64 + 61 * i), "");
      const uint8_t ack = static_cast<uint8_t>(i);
      ASSERT_TRUE(node(1).Send(0, kAckBase + t, {&ack, 1}).ok());
    }
  });
  std::array<int, kThreads> acks{};
  auto receive_acks = [&] {
    for (int n = 0; n < kThreads * kPerThread; ++n) {
      auto m = node(0).Receive(kAckBase, ~uint64_t{0x3}, kTimeout);  // acks for any thread
      ASSERT_TRUE(m.ok()) << m.status();
      const int t = static_cast<int>(m->tag - kAckBase);
      ASSERT_EQ(m->payload, std::vector<uint8_t>{static_cast<uint8_t>(acks[t]++)});
    }
  };
  receive_acks();  // returns early on failure; the other threads still finish
  for (auto& s : senders) s.join();
  receiver.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(acks[t], kPerThread);
}

// After traffic stops, an idle transport sleeps: a polling loop would cost a core per node.
TEST_P(TransportConformanceTest, IdleTransportsDoNotBurnCpu) {
  ASSERT_TRUE(node(0).Send(1, 1, MakePayload(0, 0, 64)).ok());
  ASSERT_TRUE(node(1).Receive(1, kAll, kTimeout).ok());
  auto cpu_now = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return absl::DurationFromTimespec(ts);
  };
  const absl::Duration cpu_before = cpu_now();
  const absl::Duration idle = absl::Milliseconds(500);
  absl::SleepFor(idle);  // measuring idleness, not waiting for an event
  const absl::Duration used = cpu_now() - cpu_before;
  // Three nodes, each with its threads: a busy loop would use at least `idle` per node.
  EXPECT_LT(used, idle / 10) << "CPU used by 3 idle nodes in " << idle;
}

// StopReceiving ends a Receive that would wait forever, and every later one, with CANCELLED.
TEST_P(TransportConformanceTest, StopReceivingCancelsWaitingAndLaterReceives) {
  absl::StatusOr<Message> waiting;
  std::thread receiver([&] { waiting = nodes_[1]->Receive(0, 0, absl::InfiniteDuration()); });
  nodes_[1]->StopReceiving();
  receiver.join();
  EXPECT_EQ(waiting.status().code(), absl::StatusCode::kCancelled) << waiting.status();
  EXPECT_EQ(nodes_[1]->Receive(0, 0, absl::InfiniteDuration()).status().code(), absl::StatusCode::kCancelled);
  const NodeId senders[] = {0};
  EXPECT_EQ(nodes_[1]->ReceiveFrom(senders, 0, 0, absl::InfiniteDuration()).status().code(),
            absl::StatusCode::kCancelled);
}

// ReceiveFrom takes a matching message like Receive, whoever sent it.
TEST_P(TransportConformanceTest, ReceiveFromTakesMatchingMessages) {
  ASSERT_TRUE(nodes_[0]->Send(2, 7, MakePayload(0, 1, 100)).ok());
  const NodeId senders[] = {0, 1};
  auto m = nodes_[2]->ReceiveFrom(senders, 7, kAll, kTimeout);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(CheckPayload(*m, 0, 1, 100), "");
  EXPECT_EQ(nodes_[2]->ReceiveFrom(senders, 7, kAll, absl::Milliseconds(10)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

INSTANTIATE_TEST_SUITE_P(AllTransports, TransportConformanceTest,
                         ::testing::Values(testing::InProcessKind(), testing::UcxKind(true),
                                           testing::UcxKind(false), testing::FramedFakeKind()
#if DMOE_HAVE_NCCL
                                               ,
                                           testing::NcclKind()
#endif
                                               ),
                         [](const ::testing::TestParamInfo<TransportKind>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace dmoe::transport
