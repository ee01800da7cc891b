#include "transport/mailbox.h"

#include <algorithm>
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
}

void Mailbox::MarkPeerFailed(NodeId peer, const std::string& why) {
  absl::MutexLock lock(&mu_);
  failed_[peer] = why;
}

void Mailbox::ClearPeerFailure(NodeId peer) {
  absl::MutexLock lock(&mu_);
  failed_.erase(peer);
}

absl::Status Mailbox::PeerStatus(NodeId peer) {
  absl::MutexLock lock(&mu_);
  auto it = failed_.find(peer);
  if (it == failed_.end()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat("peer ", peer, " unavailable (", it->second, ")"));
}

void Mailbox::Stop() {
  absl::MutexLock lock(&mu_);
  stopped_ = true;
}

absl::StatusOr<Message> Mailbox::Receive(uint64_t tag, uint64_t tag_mask, absl::Duration timeout) {
  return ReceiveFrom({}, tag, tag_mask, timeout);
}

absl::StatusOr<Message> Mailbox::ReceiveFrom(absl::Span<const NodeId> senders, uint64_t tag, uint64_t tag_mask,
                                             absl::Duration timeout) {
  const uint64_t mask = tag_mask & kMaxTag;
  const uint64_t want = tag & mask;
  auto match = [&](const Message& m) { return (m.tag & mask) == want; };
  auto failed_sender = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> const std::pair<const NodeId, std::string>* {
    for (NodeId s : senders) {
      auto it = failed_.find(s);
      if (it != failed_.end()) return &*it;
    }
    return nullptr;
  };
  // Wakes on a matching message, a failed sender or Stop (absl::Mutex
  // re-evaluates the condition whenever the lock is released).
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopped_ || std::any_of(messages_.begin(), messages_.end(), match) || failed_sender() != nullptr;
  };
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  for (auto it = messages_.begin(); it != messages_.end(); ++it) {
    if (match(*it)) {
      Message m = std::move(*it);
      messages_.erase(it);
      return m;
    }
  }
  if (stopped_) return absl::CancelledError(absl::StrCat("node ", owner_, ": receiving stopped"));
  if (const auto* failed = failed_sender()) {
    return absl::UnavailableError(absl::StrCat("peer ", failed->first, " unavailable (", failed->second, ")"));
  }
  return absl::DeadlineExceededError(absl::StrCat("node ", owner_, ": no message with tag 0x", absl::Hex(tag),
                                                  " (mask 0x", absl::Hex(tag_mask), ") arrived within ",
                                                  absl::FormatDuration(timeout)));
}

}  // namespace dmoe::transport
