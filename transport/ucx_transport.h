// The data plane between processes over UCX (ucp tag API, host memory): TCP or shared memory
// between processes of one machine, TCP or RDMA across machines.
//
// Environment: UCX reads UCX_* variables; this library sets none. On one machine set
// UCX_NET_DEVICES=lo (otherwise UCX may also pick tcp over eth0) and UCX_WARN_UNUSED_ENV_VARS=n;
// `dmoe up` and the tests do. UCX_WARN_UNUSED_ENV_VARS only takes effect from the process's
// start (libucs reads it when loaded); UCX_NET_DEVICES may also be set before the first
// CreateUcxTransport call.
//
// Wire format: a message is one UCX tagged message whose 64-bit UCX tag is
// (sender NodeId << kTagBits) | tag, so Message.from costs no header and the payload travels
// as is. Hence node ids must be <= kMaxNodeId and tags <= kMaxTag (transport/transport.h).
//
// Receiving: a progress thread takes every arriving message off UCX with
// ucp_tag_probe_nb(remove=1) and receives it (ucp_tag_msg_recv_nbx) into a buffer of exactly its
// size, then hands it to Receive in per-sender order. No receive buffer is posted ahead: eager
// (small) messages wait in UCX's unexpected queue, already copied there on arrival, until the
// progress thread probes them a moment later; rendezvous (large) messages are pulled straight
// into the exact-size buffer. Because arrivals are drained whether or not anyone is in Receive,
// a Send never waits for the peer's Receive call, so two nodes can exchange large messages in
// both directions at once. When idle the progress thread sleeps on the worker's event fd
// (ucp_worker_arm + poll), waking at least every 100 ms for UCX's keepalive and send deadlines.
//
// Sending: Send posts ucp_tag_send_nbx from the calling thread (under the worker's mutex) and,
// unless UCX completes it at once, waits for the progress thread to complete it.
#ifndef DMOE_TRANSPORT_UCX_TRANSPORT_H_
#define DMOE_TRANSPORT_UCX_TRANSPORT_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/transport.h"

namespace dmoe::transport {

struct UcxOptions {
  // This process's id in the cluster: [0, kMaxNodeId].
  NodeId node_id = 0;

  // A Send that has not completed after this long (the peer stopped making progress) fails
  // with UNAVAILABLE and marks the peer unavailable; Connect again to retry.
  absl::Duration send_timeout = absl::Seconds(10);

  // How often UCX checks that connected peers are alive, for this transport only (its
  // UCX_KEEPALIVE_INTERVAL, whose own default is 20 s). Zero keeps UCX's setting. Used only
  // with detect_peer_failure.
  absl::Duration keepalive_interval = absl::Seconds(1);

  // UCX endpoints' error handling mode; every node of a cluster must use the same value.
  //   true (UCP_ERR_HANDLING_MODE_PEER): a dead peer's endpoint fails (on one machine within
  //     milliseconds, when the kernel resets its TCP connection; else within about
  //     keepalive_interval) and Sends to it, pending or new, report UNAVAILABLE. UCX 1.13's
  //     shared-memory transports do not support this mode, so on one machine UCX uses tcp
  //     over loopback. Measured here: round trip 4 KiB ~35-55 us, 1 MiB ~0.6-1.4 ms.
  //   false (UCP_ERR_HANDLING_MODE_NONE): UCX may use shared memory (sysv + cma) on one
  //     machine: round trip 4 KiB ~20-40 us, 1 MiB ~0.26 ms. A dead peer is noticed only when
  //     a Send to it does not complete within send_timeout (small Sends to it may still
  //     succeed, into its queue). Such a Send is then abandoned, not cancelled (UCX cannot
  //     cancel it in this mode): a peer that was only stalled could still read the buffer
  //     after Send returned. Use where peers die with the cluster (a local `dmoe up`).
  bool detect_peer_failure = true;
};

// Creates a UCX context, worker and progress thread. INVALID_ARGUMENT for a bad option,
// UNAVAILABLE when UCX cannot start (the UCX error is named).
absl::StatusOr<std::unique_ptr<Transport>> CreateUcxTransport(const UcxOptions& options);

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_UCX_TRANSPORT_H_
