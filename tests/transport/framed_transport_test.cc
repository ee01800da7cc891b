// FramedTransport (the NCCL transport but for its NCCL calls) over a fake NCCL channel: what the
// conformance suite does not reach. A peer's corrupted frame fails that peer's stream; a peer that
// stops receiving makes Sends time out and stop for good (NCCL cannot cancel one operation);
// SendMany groups pieces for different peers into one channel group. The conformance suite runs
// on it too (kind "FramedFake").
#include "transport/framed_transport.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/transport/fake_piece_channel.h"
#include "tests/transport/transport_test_util.h"

namespace dmoe::transport {
namespace {

using ::dmoe::transport::testing::CheckPayload;
using ::dmoe::transport::testing::FakePieceFabric;
using ::dmoe::transport::testing::MakePayload;
using ::testing::HasSubstr;

constexpr absl::Duration kTimeout = absl::Seconds(10);
constexpr uint64_t kAll = ~uint64_t{0};

class FramedTransportTest : public ::testing::Test {
 protected:
  // `n` nodes, all connected, chunks of 100 bytes, the fake channel holding `capacity` pieces.
  void Make(int n, size_t capacity, absl::Duration send_timeout = kTimeout) {
    fabric_ = std::make_unique<FakePieceFabric>(n, capacity);
    for (NodeId id = 0; id < n; ++id) {
      FramedTransportOptions o{.node_id = id, .num_nodes = n, .send_timeout = send_timeout,
                               .address = absl::StrCat("fake:", id)};
      o.frame_limits.chunk_bytes = o.frame_limits.max_chunk_bytes = 100;
      nodes_.push_back(std::make_unique<FramedTransport>(std::move(o), fabric_->Channel(id)));
    }
    for (auto& from : nodes_) {
      for (auto& to : nodes_) {
        if (from != to) ASSERT_TRUE(from->Connect(to->node_id(), to->address()).ok());
      }
    }
  }
  FramedTransport& node(int i) { return *nodes_[i]; }

  std::unique_ptr<FakePieceFabric> fabric_;
  std::vector<std::unique_ptr<FramedTransport>> nodes_;
};

TEST_F(FramedTransportTest, ACorruptedFrameFailsThatPeersStreamOnly) {
  Make(3, 8);
  ASSERT_TRUE(node(1).Send(0, 1, MakePayload(1, 0, 250)).ok());
  auto first = node(0).Receive(1, kAll, kTimeout);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(CheckPayload(*first, 1, 0, 250), "");
  fabric_->CorruptNext(1, 0, 8);  // the next header from node 1 to node 0: its tag
  ASSERT_TRUE(node(1).Send(0, 1, MakePayload(1, 1, 250)).ok());
  // Node 0 drops node 1's stream: Sends to node 1 say why, and nothing from it arrives. Until
  // node 0's receiving thread has seen the bad header, Sends still go through: each round trip
  // gives it time (bounded by the deadline).
  absl::Status s;
  for (const absl::Time end = absl::Now() + kTimeout; s.ok() && absl::Now() < end;) {
    s = node(0).Send(1, 2, MakePayload(0, 0, 10));
    if (s.ok()) ASSERT_TRUE(node(1).Receive(2, kAll, kTimeout).ok());
  }
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(s.message(), HasSubstr("peer 1: its stream failed: stream from node 1: frame header: checksum"));
  EXPECT_EQ(node(0).Receive(1, kAll, absl::Milliseconds(50)).status().code(), absl::StatusCode::kDeadlineExceeded);
  // A reply awaited from node 1 fails at once, naming it, instead of waiting out the timeout.
  const NodeId one = 1;
  auto reply = node(0).ReceiveFrom({&one, 1}, 1, kAll, kTimeout);
  EXPECT_EQ(reply.status().code(), absl::StatusCode::kUnavailable) << reply.status();
  EXPECT_THAT(reply.status().message(), HasSubstr("its stream failed"));
  EXPECT_EQ(node(0).PeerStatus(1).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(node(0).PeerStatus(2).ok());
  // Node 2's stream to node 0 is untouched.
  ASSERT_TRUE(node(2).Send(0, 3, MakePayload(2, 0, 333)).ok());
  auto other = node(0).Receive(3, kAll, kTimeout);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(CheckPayload(*other, 2, 0, 333), "");
}

TEST_F(FramedTransportTest, APeerThatStopsReceivingTimesSendsOutAndStopsThem) {
  Make(2, 2, absl::Milliseconds(200));
  fabric_->StopReceiving(1);
  const std::vector<uint8_t> payload = MakePayload(0, 0, 1000);  // 11 pieces: more than the channel holds
  absl::Status s = node(0).Send(1, 1, payload);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(s.message(), HasSubstr("send to peer 1 failed (peer 1 is not receiving)"));
  fabric_->ResumeReceiving(1);
  // Part of a frame may be out: every later Send is refused, quickly, without touching the channel.
  absl::Status again = node(0).Send(1, 1, MakePayload(0, 1, 10));
  EXPECT_EQ(again.code(), absl::StatusCode::kUnavailable) << again;
  EXPECT_THAT(again.message(), HasSubstr("sends are stopped: restart the cluster"));
  // The other direction still works.
  ASSERT_TRUE(node(1).Send(0, 5, MakePayload(1, 0, 150)).ok());
  auto m = node(0).Receive(5, kAll, kTimeout);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(CheckPayload(*m, 1, 0, 150), "");
}

// One SendMany to two peers: each round carries a piece for each of them (one NCCL group); every
// message arrives whole and in order; one record covers the call.
TEST_F(FramedTransportTest, StopReceivingCancelsWaitingReceives) {
  Make(2, 8);
  node(0).StopReceiving();
  EXPECT_EQ(node(0).Receive(1, kAll, kTimeout).status().code(), absl::StatusCode::kCancelled);
  ASSERT_TRUE(node(0).Send(1, 1, MakePayload(0, 0, 10)).ok());  // sending goes on
  EXPECT_TRUE(node(1).Receive(1, kAll, kTimeout).ok());
}

TEST_F(FramedTransportTest, SendManyGroupsPiecesForDifferentPeers) {
  Make(3, 64);
  std::vector<std::vector<uint8_t>> payloads;
  for (uint64_t i = 0; i < 4; ++i) payloads.push_back(MakePayload(0, i, 120 + 70 * i));
  std::vector<OutgoingMessage> out;
  for (uint64_t i = 0; i < 4; ++i) out.push_back({static_cast<NodeId>(1 + i % 2), 0x40 + i, payloads[i]});
  ASSERT_TRUE(node(0).SendMany(out).ok());
  EXPECT_EQ(fabric_->largest_group(), 2u);
  for (uint64_t i = 0; i < 4; ++i) {
    auto m = nodes_[1 + i % 2]->Receive(0x40 + i, kAll, kTimeout);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(CheckPayload(*m, 0, i, 120 + 70 * i), "");
  }
  const std::vector<SendRecord> records = node(0).TakeSendRecords();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].messages, 4);
  EXPECT_EQ(records[0].bytes, 120u + 190 + 260 + 330);
  EXPECT_EQ(records[0].tag, 0x40u);
}

// A refused message refuses the whole call before any frame is numbered: the streams go on.
TEST_F(FramedTransportTest, ARefusedSendManySendsNothing) {
  Make(2, 8);
  const std::vector<uint8_t> ok = MakePayload(0, 0, 10);
  const std::vector<OutgoingMessage> bad = {{1, 1, ok}, {1, kMaxTag + 1, ok}};
  EXPECT_EQ(node(0).SendMany(bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(node(0).Connect(0, "fake:0").code(), absl::StatusCode::kInvalidArgument);  // itself
  EXPECT_EQ(node(1).Receive(1, kAll, absl::Milliseconds(50)).status().code(), absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(node(0).Send(1, 1, ok).ok());
  auto m = node(1).Receive(1, kAll, kTimeout);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(CheckPayload(*m, 0, 0, 10), "");
}

}  // namespace
}  // namespace dmoe::transport
