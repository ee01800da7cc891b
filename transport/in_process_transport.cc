#include "transport/in_process_transport.h"

#include <cstdlib>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/log.h"
#include "transport/mailbox.h"

namespace dmoe::transport {

struct InProcessFabricState {
  absl::Mutex mu;
  absl::flat_hash_map<NodeId, std::shared_ptr<Mailbox>> mailboxes ABSL_GUARDED_BY(mu);
};

namespace {

std::string InProcessAddress(NodeId node) { return absl::StrCat("inproc:", node); }

class InProcessTransport : public Transport {
 public:
  InProcessTransport(std::shared_ptr<InProcessFabricState> fabric, NodeId node_id,
                     std::shared_ptr<Mailbox> mailbox)
      : fabric_(std::move(fabric)), node_id_(node_id), mailbox_(std::move(mailbox)) {}

  ~InProcessTransport() override {
    absl::MutexLock lock(&fabric_->mu);
    fabric_->mailboxes.erase(node_id_);
    // Like a dead process: peers waiting for this node learn it (ReceiveFrom).
    for (auto& [id, mailbox] : fabric_->mailboxes) mailbox->MarkPeerFailed(node_id_, "its endpoint was destroyed");
  }

  NodeId node_id() const override { return node_id_; }
  std::string address() const override { return InProcessAddress(node_id_); }

  absl::Status Connect(NodeId peer, const std::string& address) override {
    if (address != InProcessAddress(peer)) {
      return absl::InvalidArgumentError(absl::StrCat("connect to peer ", peer, ": address '",
                                                     address, "' is not '",
                                                     InProcessAddress(peer), "'"));
    }
    return absl::OkStatus();
  }

  absl::Status Send(NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload) override {
    if (absl::Status s = ValidateSendTag(peer, tag); !s.ok()) return s;
    std::shared_ptr<Mailbox> target;
    {
      absl::MutexLock lock(&fabric_->mu);
      auto it = fabric_->mailboxes.find(peer);
      if (it != fabric_->mailboxes.end()) target = it->second;
    }
    if (target == nullptr) {
      return absl::UnavailableError(
          absl::StrCat("send to peer ", peer, ": it has no live endpoint in this in-process fabric"));
    }
    target->Push(Message{node_id_, tag, std::vector<uint8_t>(payload.begin(), payload.end())});
    return absl::OkStatus();
  }

  absl::StatusOr<Message> Receive(uint64_t tag, uint64_t tag_mask,
                                  absl::Duration timeout) override {
    return mailbox_->Receive(tag, tag_mask, timeout);
  }

  absl::StatusOr<Message> ReceiveFrom(absl::Span<const NodeId> senders, uint64_t tag, uint64_t tag_mask,
                                      absl::Duration timeout) override {
    return mailbox_->ReceiveFrom(senders, tag, tag_mask, timeout);
  }

  void StopReceiving() override { mailbox_->Stop(); }

  absl::Status PeerStatus(NodeId peer) override {
    absl::MutexLock lock(&fabric_->mu);
    if (fabric_->mailboxes.contains(peer)) return absl::OkStatus();
    return absl::UnavailableError(absl::StrCat("peer ", peer, " unavailable (its endpoint was destroyed)"));
  }

 private:
  const std::shared_ptr<InProcessFabricState> fabric_;
  const NodeId node_id_;
  const std::shared_ptr<Mailbox> mailbox_;
};

}  // namespace

InProcessFabric::InProcessFabric() : state_(std::make_shared<InProcessFabricState>()) {}
InProcessFabric::~InProcessFabric() = default;

std::unique_ptr<Transport> InProcessFabric::CreateEndpoint(NodeId node_id) {
  auto mailbox = std::make_shared<Mailbox>(node_id);
  {
    absl::MutexLock lock(&state_->mu);
    if (node_id < 0 || node_id > kMaxNodeId || !state_->mailboxes.emplace(node_id, mailbox).second) {
      DMOE_LOG(kError, "transport") << "InProcessFabric::CreateEndpoint(" << node_id
                                    << "): node id out of range or already has a live endpoint";
      std::abort();
    }
    for (auto& [id, other] : state_->mailboxes) other->ClearPeerFailure(node_id);  // a restarted node
  }
  return std::make_unique<InProcessTransport>(state_, node_id, std::move(mailbox));
}

}  // namespace dmoe::transport
