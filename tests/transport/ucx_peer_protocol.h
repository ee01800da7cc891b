// How ucx_multiprocess_test drives its second process (ucx_transport_peer): addresses go over
// the peer's stdin/stdout pipes (standing in for the control plane), commands over UCX.
#ifndef DMOE_TESTS_TRANSPORT_UCX_PEER_PROTOCOL_H_
#define DMOE_TESTS_TRANSPORT_UCX_PEER_PROTOCOL_H_

#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/transport.h"

namespace dmoe::transport::testing {

// The peer sends the payload back with the same tag.
inline constexpr uint64_t kEchoTag = 1;
// Payload: two uint64 (count, size). The peer sends `count` messages with kBurstReplyTag,
// message i being MakePayload(peer id, i, size).
inline constexpr uint64_t kBurstTag = 2;
inline constexpr uint64_t kBurstReplyTag = 3;
// The peer destroys its transport and exits 0.
inline constexpr uint64_t kStopTag = 9;

// One record on a pipe: int32 node id, uint32 length, the address bytes.
absl::Status WriteAddress(int fd, NodeId node, const std::string& address);
// UNAVAILABLE when the pipe closes, DEADLINE_EXCEEDED after `timeout`.
absl::StatusOr<std::pair<NodeId, std::string>> ReadAddress(int fd, absl::Duration timeout);

}  // namespace dmoe::transport::testing

#endif  // DMOE_TESTS_TRANSPORT_UCX_PEER_PROTOCOL_H_
