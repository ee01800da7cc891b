// A Transport over a channel that moves byte pieces the way NCCL point-to-point does (per sender
// and receiver in order; the receiver must ask for exactly the size the sender sent). It frames
// every message (transport/message_frame.h), keeps one receiving thread per peer that asks the
// channel for the next piece of the size its FrameDecoder expects, and hands finished messages
// to the mailbox. Pure C++: the NCCL channel lives in nccl_transport.cc (CUDA builds), a fake one
// in the tests, so everything but the NCCL calls is tested without a GPU.
#ifndef DMOE_TRANSPORT_FRAMED_TRANSPORT_H_
#define DMOE_TRANSPORT_FRAMED_TRANSPORT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transport/mailbox.h"
#include "transport/message_frame.h"
#include "transport/transport.h"

namespace dmoe::transport {

// What NCCL's send/recv provide. Threading, as FramedTransport uses it: SendGroup from one
// thread at a time; Receive(peer) from one thread per peer, concurrently with everything else.
class PieceChannel {
 public:
  struct Piece {
    NodeId peer = -1;
    absl::Span<const uint8_t> bytes;
  };
  virtual ~PieceChannel() = default;

  // Sends one piece to each of several distinct peers together (one NCCL group) and returns
  // once the pieces' memory may be reused, with the device time spent (0 where there is none).
  // DEADLINE_EXCEEDED when not done by `deadline`; after any error the channel may refuse
  // every later SendGroup.
  virtual absl::StatusOr<double> SendGroup(absl::Span<const Piece> pieces, absl::Time deadline) = 0;

  // The next piece from `peer`, of exactly into.size() bytes (the sender's size), written to
  // `into`; blocks until it arrives. CANCELLED once Shutdown was called.
  virtual absl::Status Receive(NodeId peer, absl::Span<uint8_t> into) = 0;

  // Ends every pending and later Receive with CANCELLED (and any stuck send). Called once,
  // before the receiving threads are joined and the channel destroyed.
  virtual void Shutdown() = 0;
};

// One Send or SendMany call, timed: for the per-layer transfer times of the benchmarks.
struct SendRecord {
  uint64_t tag = 0;         // the first message's tag
  int messages = 0;
  uint64_t bytes = 0;       // payload bytes of all messages
  double device_seconds = 0;  // what the channel reported (NCCL: CUDA events around copies and sends)
  double wall_seconds = 0;    // the call, as its caller waited
};

struct OutgoingMessage {
  NodeId peer = -1;
  uint64_t tag = 0;
  absl::Span<const uint8_t> payload;
};

struct FramedTransportOptions {
  NodeId node_id = 0;
  int num_nodes = 0;  // ranks 0..num_nodes-1; this node receives from all the others
  FrameLimits frame_limits;
  absl::Duration send_timeout = absl::Seconds(10);
  std::string address;  // what address() answers
  // Connect's check of a peer's address (INVALID_ARGUMENT / FAILED_PRECONDITION to refuse).
  std::function<absl::Status(NodeId peer, const std::string& address)> check_address;
};

// Thread safety as documented on Transport.
class FramedTransport final : public Transport {
 public:
  // Starts one receiving thread per other rank. REQUIRES: valid options (CreateNcclTransport
  // checks them), a channel of num_nodes ranks with this node as node_id.
  FramedTransport(FramedTransportOptions options, std::unique_ptr<PieceChannel> channel);
  ~FramedTransport() override;  // Shutdown, join, then the channel is destroyed

  NodeId node_id() const override { return options_.node_id; }
  std::string address() const override { return options_.address; }
  absl::Status Connect(NodeId peer, const std::string& address) override;
  absl::Status Send(NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload) override;
  absl::StatusOr<Message> Receive(uint64_t tag, uint64_t tag_mask, absl::Duration timeout) override;
  // A peer is unavailable here once its stream failed or a Send to it timed out (for good:
  // NCCL ranks cannot rejoin).
  absl::StatusOr<Message> ReceiveFrom(absl::Span<const NodeId> senders, uint64_t tag, uint64_t tag_mask,
                                      absl::Duration timeout) override;
  // UNAVAILABLE for a peer whose stream failed or a Send to which timed out (the mailbox's record).
  absl::Status PeerStatus(NodeId peer) override;
  void StopReceiving() override;

  // Sends every message, the pieces to different peers grouped per round (one SendGroup each:
  // one ncclGroupStart/End); messages to one peer go in order. Nothing is sent unless every
  // message passes the checks (tag, peer, size), so a refused call leaves no gap in the
  // streams. UNAVAILABLE, naming the peer, for a peer that is not connected or whose stream
  // failed, and for every call after a send failed (the channel's sends cannot be trusted).
  absl::Status SendMany(absl::Span<const OutgoingMessage> messages);

  // The records of the calls since the last TakeSendRecords (at most the last 1 << 20).
  std::vector<SendRecord> TakeSendRecords();

 private:
  struct Peer;
  absl::Status SendableTo(NodeId peer);  // connected and its stream intact
  void FailPeer(NodeId peer, const absl::Status& why);
  void ReceiveLoop(NodeId peer);

  const FramedTransportOptions options_;
  Mailbox mailbox_;
  std::unique_ptr<PieceChannel> channel_;
  std::vector<std::unique_ptr<Peer>> peers_;  // [rank]
  std::atomic<bool> stopping_{false};
  absl::Mutex send_mu_;
  absl::Status send_error_ ABSL_GUARDED_BY(send_mu_);
  absl::Mutex state_mu_;  // Peer::connected, Peer::error
  absl::Mutex records_mu_;
  std::vector<SendRecord> records_ ABSL_GUARDED_BY(records_mu_);
};

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_FRAMED_TRANSPORT_H_
