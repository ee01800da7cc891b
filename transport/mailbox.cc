#include "transport/mailbox.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace dmoe::transport {

absl::Status ValidateSendTag(NodeId peer, uint64_t tag) {
  if (tag > kMaxTag) {
    return absl::InvalidArgumentError(
        absl::StrCat("send to peer ", peer, ": tag 0x", absl::Hex(tag), " does not fit in ",
                     kTagBits, " bits (max 0x", absl::Hex(kMaxTag), ")"));
  }
  return absl::OkStatus();
}

void Mailbox::Push(Message message) {
  absl::MutexLock lock(&mu_);
  messages_.push_back(std::move(message));
  // Receivers wait for different tags, so wake them all; each rescans.
  arrived_.SignalAll();
}

absl::StatusOr<Message> Mailbox::Receive(uint64_t tag, uint64_t tag_mask,
                                         absl::Duration timeout) {
  const uint64_t mask = tag_mask & kMaxTag;
  const uint64_t want = tag & mask;
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  while (true) {
    for (auto it = messages_.begin(); it != messages_.end(); ++it) {
      if ((it->tag & mask) == want) {
        Message m = std::move(*it);
        messages_.erase(it);
        return m;
      }
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "node ", owner_, ": no message with tag 0x", absl::Hex(tag), " (mask 0x",
          absl::Hex(tag_mask), ") arrived within ", absl::FormatDuration(timeout)));
    }
    arrived_.WaitWithDeadline(&mu_, deadline);
  }
}

}  // namespace dmoe::transport
