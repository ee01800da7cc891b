#include "transport/framed_transport.h"

#include <deque>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/log.h"

namespace dmoe::transport {
namespace {

constexpr char kLog[] = "transport";
constexpr size_t kMaxRecords = size_t{1} << 20;

}  // namespace

struct FramedTransport::Peer {
  explicit Peer(const FrameLimits& limits) : encoder(limits) {}
  FrameEncoder encoder;  // under send_mu_
  std::thread thread;
  bool connected = false;  // under state_mu_
  absl::Status error;      // under state_mu_
};

FramedTransport::FramedTransport(FramedTransportOptions options, std::unique_ptr<PieceChannel> channel)
    : options_(std::move(options)), mailbox_(options_.node_id), channel_(std::move(channel)) {
  for (NodeId p = 0; p < options_.num_nodes; ++p) peers_.push_back(std::make_unique<Peer>(options_.frame_limits));
  for (NodeId p = 0; p < options_.num_nodes; ++p) {
    if (p != options_.node_id) peers_[p]->thread = std::thread([this, p] { ReceiveLoop(p); });
  }
}

FramedTransport::~FramedTransport() {
  stopping_.store(true);
  channel_->Shutdown();
  for (auto& p : peers_) {
    if (p->thread.joinable()) p->thread.join();
  }
}

absl::Status FramedTransport::Connect(NodeId peer, const std::string& address) {
  if (peer < 0 || peer >= options_.num_nodes || peer == options_.node_id) {
    return absl::InvalidArgumentError(absl::StrCat("connect to peer ", peer, ": not another rank of this ",
                                                   options_.num_nodes, "-rank cluster (this node is rank ",
                                                   options_.node_id, ")"));
  }
  if (options_.check_address) {
    if (absl::Status s = options_.check_address(peer, address); !s.ok()) return s;
  }
  absl::MutexLock lock(&state_mu_);
  peers_[peer]->connected = true;
  return absl::OkStatus();
}

absl::Status FramedTransport::Send(NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload) {
  const OutgoingMessage m{peer, tag, payload};
  return SendMany({&m, 1});
}

absl::StatusOr<Message> FramedTransport::Receive(uint64_t tag, uint64_t tag_mask, absl::Duration timeout) {
  return mailbox_.Receive(tag, tag_mask, timeout);
}

absl::StatusOr<Message> FramedTransport::ReceiveFrom(absl::Span<const NodeId> senders, uint64_t tag,
                                                     uint64_t tag_mask, absl::Duration timeout) {
  return mailbox_.ReceiveFrom(senders, tag, tag_mask, timeout);
}

void FramedTransport::StopReceiving() { mailbox_.Stop(); }

absl::Status FramedTransport::PeerStatus(NodeId peer) { return mailbox_.PeerStatus(peer); }

absl::Status FramedTransport::SendableTo(NodeId peer) {
  absl::MutexLock lock(&state_mu_);
  if (!peers_[peer]->connected) return absl::UnavailableError(absl::StrCat("send to peer ", peer, ": not connected"));
  return peers_[peer]->error;
}

absl::Status FramedTransport::SendMany(absl::Span<const OutgoingMessage> messages) {
  const absl::Time start = absl::Now();
  const NodeId self = options_.node_id;
  for (const OutgoingMessage& m : messages) {
    if (absl::Status s = ValidateSendTag(m.peer, m.tag); !s.ok()) return s;
    if (m.peer < 0 || m.peer >= options_.num_nodes || m.peer == self) {
      return absl::UnavailableError(absl::StrCat("send to peer ", m.peer, ": not another rank of this ",
                                                 options_.num_nodes, "-rank cluster (this node is rank ", self, ")"));
    }
    if (absl::Status s = SendableTo(m.peer); !s.ok()) return s;
    if (m.payload.size() > options_.frame_limits.max_payload_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat("send to peer ", m.peer, ": payload of ", m.payload.size(),
                                                       " bytes exceeds the limit of ",
                                                       options_.frame_limits.max_payload_bytes));
    }
  }
  absl::MutexLock lock(&send_mu_);
  if (!send_error_.ok()) return send_error_;
  std::vector<EncodedFrame> frames;
  frames.reserve(messages.size());  // pieces point into frames[i].header_bytes
  std::vector<std::deque<absl::Span<const uint8_t>>> pieces(options_.num_nodes);  // per peer, in order
  uint64_t bytes = 0;
  for (const OutgoingMessage& m : messages) {
    absl::StatusOr<EncodedFrame> f = peers_[m.peer]->encoder.Encode(m.peer, m.tag, m.payload);
    if (!f.ok()) return f.status();  // checked above
    frames.push_back(*std::move(f));
    pieces[m.peer].push_back(absl::MakeConstSpan(frames.back().header_bytes));
    pieces[m.peer].insert(pieces[m.peer].end(), frames.back().chunks.begin(), frames.back().chunks.end());
    bytes += m.payload.size();
  }
  const absl::Time deadline = start + options_.send_timeout;
  double device_seconds = 0;
  while (true) {
    std::vector<PieceChannel::Piece> round;  // the next piece of every peer with pieces left
    for (NodeId p = 0; p < options_.num_nodes; ++p) {
      if (pieces[p].empty()) continue;
      round.push_back({p, pieces[p].front()});
      pieces[p].pop_front();
    }
    if (round.empty()) break;
    absl::StatusOr<double> sent = channel_->SendGroup(round, deadline);
    if (!sent.ok()) {
      // The peer may have part of a frame: nothing after it could be trusted.
      send_error_ = absl::UnavailableError(absl::StrCat("send to peer ", round.front().peer, " failed (",
                                                        sent.status().message(), "); node ", self,
                                                        "'s sends are stopped: restart the cluster"));
      DMOE_LOG(kError, kLog) << send_error_.message();
      for (const PieceChannel::Piece& p : round) mailbox_.MarkPeerFailed(p.peer, std::string(sent.status().message()));
      return send_error_;
    }
    device_seconds += *sent;
  }
  absl::MutexLock records(&records_mu_);
  if (records_.size() < kMaxRecords && !messages.empty()) {
    records_.push_back({messages.front().tag, static_cast<int>(messages.size()), bytes, device_seconds,
                        absl::ToDoubleSeconds(absl::Now() - start)});
  }
  return absl::OkStatus();
}

std::vector<SendRecord> FramedTransport::TakeSendRecords() {
  absl::MutexLock lock(&records_mu_);
  return std::exchange(records_, {});
}

void FramedTransport::FailPeer(NodeId peer, const absl::Status& why) {
  DMOE_LOG(kError, kLog) << "node " << options_.node_id << ": receiving from node " << peer << " stopped: " << why;
  mailbox_.MarkPeerFailed(peer, absl::StrCat("its stream failed: ", why.message()));
  absl::MutexLock lock(&state_mu_);
  peers_[peer]->error = absl::UnavailableError(absl::StrCat("peer ", peer, ": its stream failed: ", why.message()));
}

void FramedTransport::ReceiveLoop(NodeId peer) {
  FrameDecoder decoder(peer, options_.frame_limits);
  while (!stopping_.load()) {
    const absl::Span<uint8_t> into = decoder.receive_buffer();
    if (absl::Status s = channel_->Receive(peer, into); !s.ok()) {
      if (!stopping_.load()) FailPeer(peer, s);
      return;
    }
    absl::StatusOr<std::optional<Message>> m = decoder.Commit(into.size());
    if (!m.ok()) return FailPeer(peer, m.status());
    if (m->has_value()) mailbox_.Push(std::move(**m));
  }
}

}  // namespace dmoe::transport
