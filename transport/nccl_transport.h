// The data plane between GPU processes over NCCL (GPU to GPU: NVLink or PCIe on one host,
// InfiniBand/RoCE across hosts), behind the same tagged-message Transport as UCX. Plain C++:
// NCCL and CUDA stay in nccl_transport.cc (target dmoe_transport_nccl, built only with
// DMOE_CUDA=ON and NCCL found). UCX remains the CPU and fault-tolerant path.
//
// Communicators: every node of the cluster is a rank (rank = NodeId; attention nodes 0..N-1,
// expert nodes N..N+M-1), joined through one ncclUniqueId that the scheduler hands out at
// registration (RegisterNodeResponse.nccl_unique_id). NCCL point-to-point operations have no
// tags and need the receiver to post a receive of exactly the sender's size, in order, and the
// operations of one communicator run one after another on the GPU. So each node s sends only on
// its own communicator comms[s] (split from the world communicator; all ranks are in all of
// them), and every other node keeps one receive posted on comms[s] on a thread of its own. A
// receive waiting on one communicator never holds up a send on another, and a Send never waits
// for the peer's Receive call (the peer's thread drains arrivals into its mailbox).
//
// The transport is a FramedTransport (transport/framed_transport.h: framing, receiving threads,
// grouped rounds, mailbox; tested without a GPU over a fake channel) over an NCCL channel:
// framing (transport/message_frame.h) is a 64-byte header (tag, sequence, payload and chunk
// sizes, checksum), then the payload in chunks of FrameLimits::chunk_bytes through device
// staging buffers. A corrupt or out-of-sequence header fails that peer's stream (DATA_LOSS in the
// log, UNAVAILABLE for Sends to that peer).
//
// Sending: host payloads are copied into per-peer device staging buffers (cudaMemcpyAsync) and
// sent with ncclSend, one piece per peer per round inside ncclGroupStart/End, on the CUDA stream
// given in NcclOptions (a compute stream) or the transport's own. Send returns once the NCCL
// operations completed (polling a CUDA event against send_timeout).
//
// Costs and rules of the design:
//   - each node keeps one NCCL receive kernel resident per peer, spinning on the GPU while idle
//     (a few CTAs each; NcclOptions::max_ctas bounds them). The host threads sleep
//     (cudaEventBlockingSync).
//   - because those kernels never finish while the transport lives, nothing else in the process
//     may wait for the whole device: no cudaDeviceSynchronize, no cudaFree while this transport
//     lives (it may synchronize the device: use cudaFreeAsync or free after destroying the
//     transport). The transport's streams are non-blocking, so legacy-stream work is fine.
//   - a Send that does not complete within send_timeout (the peer died or stopped receiving)
//     revokes the communicator: NCCL cannot cancel one peer's operation, so every later Send of
//     this node fails with UNAVAILABLE and the cluster must be restarted.
//
// Environment: NCCL_NVLS_ENABLE=0 is set unless already set (NVLink SHARP multicast: point-to-
// point does not use it, and the lent multi-GPU machines are to run with it off). For a cluster on one host set
// NCCL_SOCKET_IFNAME=lo before the scheduler starts (`dmoe up` does): NCCL's bootstrap otherwise
// binds the first external interface.
#ifndef DMOE_TRANSPORT_NCCL_TRANSPORT_H_
#define DMOE_TRANSPORT_NCCL_TRANSPORT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "transport/framed_transport.h"
#include "transport/message_frame.h"
#include "transport/transport.h"

namespace dmoe::transport {

// sizeof(ncclUniqueId).
inline constexpr size_t kNcclUniqueIdBytes = 128;

// Sets NCCL_NVLS_ENABLE=0 unless the variable is set. CreateNcclTransport and NewNcclUniqueId
// call it; call it yourself before anything else in the process initializes NCCL.
void SetNcclDefaultEnv();

// A fresh ncclUniqueId (kNcclUniqueIdBytes bytes). Needs no GPU (measured with NCCL 2.28: it
// only opens the bootstrap socket, on the interface NCCL_SOCKET_IFNAME names); the calling
// process hosts NCCL's bootstrap root until every rank has joined. UNAVAILABLE with NCCL's error.
absl::StatusOr<std::string> NewNcclUniqueId();

struct NcclOptions {
  NodeId node_id = 0;  // this node's rank: [0, num_nodes)
  int num_nodes = 0;   // ranks in the communicator: every node of the cluster (>= 2)
  std::string unique_id;  // NewNcclUniqueId()'s bytes, the same on every node
  int cuda_device = 0;    // the GPU this node's buffers and kernels live on
  // cudaStream_t (opaque here) that sends are enqueued on, e.g. the node's compute stream; it
  // must not be the legacy default stream. Null: the transport creates its own.
  void* cuda_stream = nullptr;
  FrameLimits frame_limits;
  // NCCL's maxCTAs per communicator (its config), bounding the SMs each resident receive holds.
  int max_ctas = 4;
  // Communicator setup waits this long for every rank to join (all ranks create their
  // transport at about the same time, right after registering).
  absl::Duration init_timeout = absl::Minutes(2);
  absl::Duration send_timeout = absl::Seconds(10);
};

// Joins the communicators (all ranks must call it with the same unique_id and num_nodes) and
// starts the receive threads. INVALID_ARGUMENT for bad options; UNAVAILABLE when CUDA or NCCL
// cannot start (no driver, no such device: the CUDA error is named); DEADLINE_EXCEEDED when not
// every rank joined within init_timeout.
absl::StatusOr<std::unique_ptr<FramedTransport>> CreateNcclTransport(const NcclOptions& options);

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_NCCL_TRANSPORT_H_
