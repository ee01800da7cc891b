// NCCL's point-to-point semantics in host memory, so that FramedTransport (everything of the
// NCCL transport but the NCCL calls) is tested without a GPU: per (sender, receiver) a FIFO of
// pieces; a receive of another size than the sender's is INTERNAL (NCCL would hang or corrupt);
// a sender waits while `capacity` of its pieces to that receiver are unreceived (NCCL's buffers
// are finite), so a receiver that stops receiving stalls its senders.
#ifndef DMOE_TESTS_TRANSPORT_FAKE_PIECE_CHANNEL_H_
#define DMOE_TESTS_TRANSPORT_FAKE_PIECE_CHANNEL_H_

#include <cstddef>
#include <memory>

#include "transport/framed_transport.h"

namespace dmoe::transport::testing {

struct FakeFabricState;

// Thread-safe. Channels keep the fabric's state alive.
class FakePieceFabric {
 public:
  explicit FakePieceFabric(int num_nodes, size_t capacity = 8);
  std::unique_ptr<PieceChannel> Channel(NodeId rank);

  // The next piece from `from` to `to` arrives with byte `offset` flipped.
  void CorruptNext(NodeId from, NodeId to, size_t offset);
  // `rank`'s Receives wait (as a hung process's would) until ResumeReceiving.
  void StopReceiving(NodeId rank);
  void ResumeReceiving(NodeId rank);
  // The most pieces any one SendGroup carried so far.
  size_t largest_group() const;

 private:
  std::shared_ptr<FakeFabricState> state_;
};

}  // namespace dmoe::transport::testing

#endif  // DMOE_TESTS_TRANSPORT_FAKE_PIECE_CHANNEL_H_
