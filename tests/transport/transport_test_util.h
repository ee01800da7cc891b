// Helpers shared by the transport tests and the UCX peer process: clusters of connected
// transports of each kind, DeepEP-style payloads (every byte derived from sender and sequence
// number), and the UCX environment for one machine.
#ifndef DMOE_TESTS_TRANSPORT_TRANSPORT_TEST_UTIL_H_
#define DMOE_TESTS_TRANSPORT_TRANSPORT_TEST_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "transport/transport.h"

namespace dmoe::transport::testing {

// UCX_NET_DEVICES=lo unless already set (call before creating a UCX transport).
void SetUcxTestEnv();

// `size` bytes that only message `seq` of `sender` has (like DeepEP's x = ones * rank, plus the
// sequence number and the byte's position so that shifted or swapped data shows).
std::vector<uint8_t> MakePayload(NodeId sender, uint64_t seq, size_t size);
// "" when `message` is from `sender` with MakePayload(sender, seq, size); else what differs.
std::string CheckPayload(const Message& message, NodeId sender, uint64_t seq, size_t size);

// One kind of transport: makes `n` transports with node ids 0..n-1, each connected to all.
struct TransportKind {
  std::string name;
  std::function<absl::StatusOr<std::vector<std::unique_ptr<Transport>>>(int n)> create_cluster;
};
TransportKind InProcessKind();
// UcxOptions::detect_peer_failure on ("UcxErrModePeer": tcp on one host with UCX 1.13) or off
// ("UcxErrModeNone": shared memory).
TransportKind UcxKind(bool detect_peer_failure);

// FramedTransports (the NCCL transport without NCCL) over a FakePieceFabric
// (tests/transport/fake_piece_channel.h); `chunk_bytes` small so that payloads span many chunks.
TransportKind FramedFakeKind(uint32_t chunk_bytes = 1000);

// NCCL_SOCKET_IFNAME=lo unless already set (NCCL's bootstrap stays on loopback).
void SetNcclTestEnv();
#if DMOE_HAVE_NCCL
// One GPU per node (node i on GPU i), all ranks joined concurrently on threads of this process;
// FAILED_PRECONDITION, naming what is missing, with fewer than n GPUs (the tests skip then).
TransportKind NcclKind();
#endif

}  // namespace dmoe::transport::testing

#endif  // DMOE_TESTS_TRANSPORT_TRANSPORT_TEST_UTIL_H_
