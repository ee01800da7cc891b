// The same messages through the in-process transport and through UCX arrive with identical
// bytes (and both equal what was sent): UCX is checked against the simple implementation.
#include <cstdint>
#include <map>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "tests/transport/transport_test_util.h"
#include "transport/transport.h"

namespace dmoe::transport {
namespace {

using ::dmoe::transport::testing::TransportKind;

struct Planned {
  NodeId from;
  NodeId to;
  uint64_t tag;
  std::vector<uint8_t> payload;
};

// A fixed pseudo-random schedule over 3 nodes: random bytes, sizes from 0 to 8 MiB.
std::vector<Planned> Schedule() {
  std::mt19937_64 rng(20261124);
  const std::vector<size_t> sizes = {0, 1, 7, 4096, 4097, 65536, 1 << 20, 8 << 20};
  std::vector<Planned> plan;
  for (int k = 0; k < 60; ++k) {
    Planned p;
    p.from = static_cast<NodeId>(rng() % 3);
    p.to = static_cast<NodeId>((p.from + 1 + rng() % 2) % 3);
    p.tag = rng() % 4;
    // Every size class once (eager, rendezvous), then small ones.
    const size_t size = k < static_cast<int>(sizes.size()) ? sizes[k] : rng() % 2048;
    p.payload.resize(size);
    for (auto& b : p.payload) b = static_cast<uint8_t>(rng());
    plan.push_back(std::move(p));
  }
  return plan;
}

// (to, from, tag) -> payloads in arrival order. Order across senders is not specified, order
// within one (sender, receiver, tag) stream is.
using Received = std::map<std::tuple<NodeId, NodeId, uint64_t>, std::vector<std::vector<uint8_t>>>;

Received RunThrough(const TransportKind& kind, const std::vector<Planned>& plan) {
  Received received;
  auto cluster = kind.create_cluster(3);
  EXPECT_TRUE(cluster.ok()) << cluster.status();
  if (!cluster.ok()) return received;
  std::map<NodeId, int> expected_count;
  for (const Planned& p : plan) {
    absl::Status s = (*cluster)[p.from]->Send(p.to, p.tag, p.payload);
    EXPECT_TRUE(s.ok()) << kind.name << ": " << s;
    ++expected_count[p.to];
  }
  for (const auto& [to, count] : expected_count) {
    for (int n = 0; n < count; ++n) {
      auto m = (*cluster)[to]->Receive(0, 0, absl::Seconds(10));
      EXPECT_TRUE(m.ok()) << kind.name << ": " << m.status();
      if (!m.ok()) return received;
      received[{to, m->from, m->tag}].push_back(std::move(m->payload));
    }
  }
  return received;
}

TEST(TransportByteIdentityTest, InProcessAndUcxDeliverIdenticalBytes) {
  const std::vector<Planned> plan = Schedule();
  Received sent;
  for (const Planned& p : plan) sent[{p.to, p.from, p.tag}].push_back(p.payload);

  const Received in_process = RunThrough(testing::InProcessKind(), plan);
  ASSERT_EQ(in_process.size(), sent.size());
  for (const auto& [stream, payloads] : sent) {
    ASSERT_EQ(in_process.at(stream).size(), payloads.size());
    for (size_t i = 0; i < payloads.size(); ++i) {
      EXPECT_TRUE(in_process.at(stream)[i] == payloads[i]) << "in-process message " << i;
    }
  }
  for (const bool detect_peer_failure : {true, false}) {
    const TransportKind kind = testing::UcxKind(detect_peer_failure);
    const Received ucx = RunThrough(kind, plan);
    ASSERT_EQ(ucx.size(), in_process.size()) << kind.name;
    // Whole-map comparisons would print megabytes on failure; compare message by message.
    for (const auto& [stream, payloads] : in_process) {
      const auto& [to, from, tag] = stream;
      SCOPED_TRACE(::testing::Message() << kind.name << " stream " << from << " -> " << to
                                        << " tag " << tag);
      ASSERT_EQ(ucx.at(stream).size(), payloads.size());
      for (size_t i = 0; i < payloads.size(); ++i) {
        EXPECT_TRUE(ucx.at(stream)[i] == payloads[i]) << "message " << i;
      }
    }
  }
}

}  // namespace
}  // namespace dmoe::transport
