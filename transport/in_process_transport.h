// The single-process data plane: every node of a cluster run inside one process (`dmoe` in
// single-process mode, tests) gets an endpoint of one InProcessFabric.
#ifndef DMOE_TRANSPORT_IN_PROCESS_TRANSPORT_H_
#define DMOE_TRANSPORT_IN_PROCESS_TRANSPORT_H_

#include <memory>

#include "transport/transport.h"

namespace dmoe::transport {

struct InProcessFabricState;

// Creates Transport endpoints that reach each other through per-node mailboxes (a mutex and a
// condition variable each) in this process. Endpoints are connected to every live endpoint of
// their fabric from the start; Connect only checks the address (address() is "inproc:<id>").
// Send copies the payload into the peer's mailbox; a peer whose endpoint was destroyed is
// UNAVAILABLE, like a dead process (to Send, PeerStatus and ReceiveFrom), until an endpoint
// with its id is created again.
//
// Thread safety: CreateEndpoint may be called from any thread; endpoints are thread-safe as
// documented on Transport. The fabric and its endpoints may be destroyed in any order.
class InProcessFabric {
 public:
  InProcessFabric();
  ~InProcessFabric();
  InProcessFabric(const InProcessFabric&) = delete;
  InProcessFabric& operator=(const InProcessFabric&) = delete;

  // REQUIRES: 0 <= node_id <= kMaxNodeId and no live endpoint of this fabric has node_id
  // (a programming error: it aborts with a message).
  std::unique_ptr<Transport> CreateEndpoint(NodeId node_id);

 private:
  std::shared_ptr<InProcessFabricState> state_;
};

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_IN_PROCESS_TRANSPORT_H_
