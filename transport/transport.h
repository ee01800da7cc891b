// The data plane between dmoe processes: tagged byte messages (hidden states attention node ->
// expert node, weighted partial sums back). Implementations: in-process
// (transport/in_process_transport.h), UCX (transport/ucx_transport.h) and NCCL
// (transport/nccl_transport.h: a FramedTransport, transport/framed_transport.h).
#ifndef DMOE_TRANSPORT_TRANSPORT_H_
#define DMOE_TRANSPORT_TRANSPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace dmoe::transport {

// A process of the cluster, as numbered by the scheduler. Range: [0, kMaxNodeId].
using NodeId = int32_t;
inline constexpr NodeId kMaxNodeId = 0xFFFF;

// Tags are 48 bits wide in every implementation (UCX carries the sender's NodeId in the top 16
// bits of its 64-bit tag). Send rejects a tag above kMaxTag with INVALID_ARGUMENT; Receive
// ignores tag and mask bits above kMaxTag.
inline constexpr int kTagBits = 48;
inline constexpr uint64_t kMaxTag = (uint64_t{1} << kTagBits) - 1;

struct Message {
  NodeId from = -1;  // the sender's node_id()
  uint64_t tag = 0;
  std::vector<uint8_t> payload;
};

// Moves tagged byte messages between the processes of a cluster. Delivery is reliable and
// ordered per (sender, receiver, tag) while both ends live; a receiver buffers every message that
// arrives until Receive takes it (no flow control: bound what you send by what the peer expects).
//
// Ownership: the caller owns the Transport; destroying it closes its connections. Send does not
// use the caller's buffer after it returns (one documented exception: a UCX Send that timed out
// with UcxOptions::detect_peer_failure off). Receive hands each payload over by value.
//
// Thread safety: Connect, Send and Receive may be called concurrently from any number of threads
// (e.g. one thread receiving while others send); each call blocks only its caller. Each message
// goes to exactly one Receive call. The destructor must not run concurrently with any other
// call.
class Transport {
 public:
  virtual ~Transport() = default;

  virtual NodeId node_id() const = 0;

  // Opaque bytes that peers pass to Connect (for UCX the ucp worker address). Exchanged through
  // the control plane (gRPC), not through the Transport itself.
  virtual std::string address() const = 0;

  // Makes `peer` reachable by Send. Idempotent for the same address; a different address
  // replaces the old connection (the peer restarted). INVALID_ARGUMENT on a malformed address.
  virtual absl::Status Connect(NodeId peer, const std::string& address) = 0;

  // Sends `payload` to `peer` with `tag` (<= kMaxTag); returns when `payload` may be reused
  // (the message is queued or delivered). UNAVAILABLE, naming the peer, when the peer is not
  // connected or its process died.
  virtual absl::Status Send(NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload) = 0;

  // Receives the next message, from any peer, whose tag matches:
  // (msg.tag & tag_mask) == (tag & tag_mask). tag_mask = 0 takes any message. DEADLINE_EXCEEDED,
  // naming the tag, when none arrives within `timeout`; never blocks longer.
  virtual absl::StatusOr<Message> Receive(uint64_t tag, uint64_t tag_mask,
                                          absl::Duration timeout) = 0;

  // Receive, for a reply expected from one of `senders`: also returns UNAVAILABLE, naming the
  // peer and why, as soon as one of them is known to be unavailable (its process died) and no
  // matching message is queued, instead of waiting out `timeout`.
  virtual absl::StatusOr<Message> ReceiveFrom(absl::Span<const NodeId> senders, uint64_t tag,
                                              uint64_t tag_mask, absl::Duration timeout) = 0;

  // OK unless `peer` is known to be unavailable (its process died; until it is connected
  // again): then UNAVAILABLE saying why.
  virtual absl::Status PeerStatus(NodeId peer) = 0;

  // Receive and ReceiveFrom calls waiting now, and every later one, return CANCELLED (a
  // receiving thread is being stopped). Queued messages stay queued.
  virtual void StopReceiving() = 0;
};

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_TRANSPORT_H_
