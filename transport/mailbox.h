// The receive side that every Transport shares: arrived messages wait here until a Receive call
// takes the first one whose tag matches. Internal to dmoe_transport.
#ifndef DMOE_TRANSPORT_MAILBOX_H_
#define DMOE_TRANSPORT_MAILBOX_H_

#include <cstdint>
#include <deque>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transport/transport.h"

namespace dmoe::transport {

// INVALID_ARGUMENT when `tag` does not fit in kTagBits (checked by every Send).
absl::Status ValidateSendTag(NodeId peer, uint64_t tag);

// Thread-safe: Push and Receive may be called from any threads. Messages are kept in arrival
// order, so order per (sender, tag) is the order of Push calls.
class Mailbox {
 public:
  explicit Mailbox(NodeId owner) : owner_(owner) {}

  void Push(Message message);

  // The first message with (msg.tag & tag_mask) == (tag & tag_mask) (bits above kMaxTag
  // ignored), waiting up to `timeout`; DEADLINE_EXCEEDED otherwise.
  absl::StatusOr<Message> Receive(uint64_t tag, uint64_t tag_mask, absl::Duration timeout);
  // Receive, but UNAVAILABLE once one of `senders` is marked failed (Transport::ReceiveFrom).
  absl::StatusOr<Message> ReceiveFrom(absl::Span<const NodeId> senders, uint64_t tag, uint64_t tag_mask,
                                      absl::Duration timeout);

  // `peer` is unavailable (why), until ClearPeerFailure (it was connected again).
  void MarkPeerFailed(NodeId peer, const std::string& why);
  void ClearPeerFailure(NodeId peer);
  // UNAVAILABLE with the reason while `peer` is marked failed.
  absl::Status PeerStatus(NodeId peer);
  // Every waiting and later Receive returns CANCELLED.
  void Stop();

 private:
  const NodeId owner_;
  absl::Mutex mu_;
  std::deque<Message> messages_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<NodeId, std::string> failed_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_MAILBOX_H_
