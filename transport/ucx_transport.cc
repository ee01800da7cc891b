#include "transport/ucx_transport.h"

#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/log.h"
#include "transport/mailbox.h"

namespace dmoe::transport {
namespace {

// Longest sleep of the idle progress thread: UCX's keepalive and the send deadlines only
// advance when the worker is progressed.
constexpr absl::Duration kMaxSleep = absl::Milliseconds(100);
// After the last event, the progress thread keeps polling this long before it sleeps: a reply
// often follows within it, and waking from the event fd costs tens of microseconds.
constexpr absl::Duration kSpinAfterActivity = absl::Microseconds(200);
// How long the destructor waits for endpoints to close; also how long a send past its
// deadline may take to be cancelled before the caller is answered anyway.
constexpr absl::Duration kCloseTimeout = absl::Seconds(1);

uint64_t UcxTag(NodeId sender, uint64_t tag) {
  return (static_cast<uint64_t>(sender) << kTagBits) | tag;
}

std::string UcsText(ucs_status_t status) { return ucs_status_string(status); }

absl::Status UcxError(const std::string& what, ucs_status_t status) {
  return absl::UnavailableError(absl::StrCat(what, ": ", UcsText(status)));
}

class UcxTransport;

// A connected peer (guarded by UcxTransport::worker_mu_). Heap-allocated and kept until the
// transport dies, because UCX's error callback holds its address.
struct Peer {
  UcxTransport* owner = nullptr;
  NodeId id = -1;
  std::string address;
  ucp_ep_h ep = nullptr;  // null once closed
  std::string failure;    // why the peer is unavailable; empty while it is fine
};

// One Send call. The caller holds it until `done`; the transport holds it while UCX holds the
// request (possibly longer than the caller, if the send was abandoned).
struct SendOp {
  NodeId peer = -1;
  uint64_t tag = 0;
  absl::Span<const uint8_t> payload;
  absl::Time deadline;
  Peer* target = nullptr;
  bool abandoned = false;  // the caller was answered while UCX still holds the request
  absl::Status status;
  absl::Notification done;
};

// A message being received into its exact-size buffer.
struct Arrival {
  UcxTransport* owner = nullptr;
  Message message;
  bool done = false;
  ucs_status_t status = UCS_OK;
};

// Threading: the ucp worker (UCS_THREAD_MODE_SERIALIZED) and everything guarded by worker_mu_
// are used under worker_mu_ only. Send posts from the calling thread: an eager send that
// completes at once returns without any thread hand-off; otherwise the caller waits for the
// progress thread to complete it. The progress thread progresses the worker, drains arrivals
// into mailbox_ and sleeps on the worker's event fd when idle. UCX callbacks run inside ucp
// calls, hence with worker_mu_ held. Receive only touches the thread-safe mailbox_.
class UcxTransport : public Transport {
 public:
  explicit UcxTransport(const UcxOptions& options)
      : options_(options), mailbox_(options.node_id) {}

  ~UcxTransport() override {
    if (progress_thread_.joinable()) {
      {
        absl::MutexLock lock(&worker_mu_);
        stop_ = true;
      }
      Wake();
      progress_thread_.join();
      CloseAll();
    }
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
    if (wake_fd_ >= 0) close(wake_fd_);
  }

  absl::Status Init();

  NodeId node_id() const override { return options_.node_id; }
  std::string address() const override { return address_; }

  absl::Status Connect(NodeId peer, const std::string& address) override {
    if (peer < 0 || peer > kMaxNodeId) {
      return absl::InvalidArgumentError(
          absl::StrCat("connect to peer ", peer, ": node id is outside [0, ", kMaxNodeId, "]"));
    }
    if (address.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("connect to peer ", peer, ": empty address"));
    }
    absl::MutexLock lock(&worker_mu_);
    return ConnectLocked(peer, address);
  }

  absl::Status Send(NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload) override {
    if (absl::Status s = ValidateSendTag(peer, tag); !s.ok()) return s;
    auto op = std::make_shared<SendOp>();
    op->peer = peer;
    op->tag = tag;
    op->payload = payload;
    op->deadline = absl::Now() + options_.send_timeout;
    bool pending;
    {
      absl::MutexLock lock(&worker_mu_);
      pending = StartSend(op);
    }
    if (pending) {
      Wake();  // the progress thread may be asleep; it answers by the deadline (ExpireSends)
      op->done.WaitForNotification();
    }
    return op->status;
  }

  absl::StatusOr<Message> Receive(uint64_t tag, uint64_t tag_mask,
                                  absl::Duration timeout) override {
    return mailbox_.Receive(tag, tag_mask, timeout);
  }

  absl::StatusOr<Message> ReceiveFrom(absl::Span<const NodeId> senders, uint64_t tag, uint64_t tag_mask,
                                      absl::Duration timeout) override {
    return mailbox_.ReceiveFrom(senders, tag, tag_mask, timeout);
  }

  void StopReceiving() override { mailbox_.Stop(); }
  absl::Status PeerStatus(NodeId peer) override { return mailbox_.PeerStatus(peer); }

 private:
  void Wake() {
    const uint64_t one = 1;
    // Cannot fail short of EBADF: the counter saturating would need 2^64 writes.
    (void)!write(wake_fd_, &one, sizeof one);
  }

  void ProgressLoop();
  absl::Status ConnectLocked(NodeId peer, const std::string& address)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  // Posts the send. false: it finished (op->status is set); true: UCX holds it.
  bool StartSend(const std::shared_ptr<SendOp>& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  void SetSendStatus(SendOp* op, ucs_status_t status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  void ExpireSends(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  // Whether any message arrived.
  bool ReceiveArrivals() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  void DeliverInOrder(NodeId sender) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  void FailPeer(Peer* peer, const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  void ClosePeer(Peer* peer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  void CloseFailedPeers() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  void ReapCloseRequests() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);
  void CloseAll();
  int SleepMillis(absl::Time now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mu_);

  // UCX callbacks: called inside ucp calls made with worker_mu_ held.
  static void OnSendDone(void* request, ucs_status_t status, void* user_data);
  static void OnReceived(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                         void* user_data);
  static void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status);

  const UcxOptions options_;
  Mailbox mailbox_;
  ucp_context_h context_ = nullptr;
  std::string address_;
  int wake_fd_ = -1;  // eventfd: wakes the progress thread (new pending send, stop)

  absl::Mutex worker_mu_;
  ucp_worker_h worker_ ABSL_PT_GUARDED_BY(worker_mu_) = nullptr;
  int worker_fd_ = -1;  // owned by the worker; polled without the lock
  bool stop_ ABSL_GUARDED_BY(worker_mu_) = false;
  absl::flat_hash_map<NodeId, std::unique_ptr<Peer>> peers_ ABSL_GUARDED_BY(worker_mu_);
  // Replaced by a later Connect; kept for the error callback's sake.
  std::vector<std::unique_ptr<Peer>> retired_peers_ ABSL_GUARDED_BY(worker_mu_);
  std::vector<Peer*> to_close_ ABSL_GUARDED_BY(worker_mu_);  // failed, endpoint still open
  std::vector<std::shared_ptr<SendOp>> pending_sends_ ABSL_GUARDED_BY(worker_mu_);
  // Per sender, in arrival order: messages are delivered in this order even when a large
  // (rendezvous) one completes after a small one that arrived behind it.
  absl::flat_hash_map<NodeId, std::deque<std::unique_ptr<Arrival>>> arrivals_
      ABSL_GUARDED_BY(worker_mu_);
  std::vector<void*> close_requests_ ABSL_GUARDED_BY(worker_mu_);
  std::thread progress_thread_;
};

absl::Status UcxTransport::Init() {
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) return UcxError("ucp_config_read", s);
  if (options_.keepalive_interval > absl::ZeroDuration()) {
    const std::string value =
        absl::StrCat(absl::ToInt64Microseconds(options_.keepalive_interval), "us");
    s = ucp_config_modify(config, "KEEPALIVE_INTERVAL", value.c_str());
    if (s != UCS_OK) {
      ucp_config_release(config);
      return UcxError(absl::StrCat("setting UCX KEEPALIVE_INTERVAL=", value), s);
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
  s = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  if (s != UCS_OK) return UcxError("ucp_init", s);

  absl::MutexLock lock(&worker_mu_);
  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SERIALIZED;  // serialized by worker_mu_
  s = ucp_worker_create(context_, &worker_params, &worker_);
  if (s != UCS_OK) return UcxError("ucp_worker_create", s);

  ucp_address_t* address = nullptr;
  size_t address_length = 0;
  s = ucp_worker_get_address(worker_, &address, &address_length);
  if (s != UCS_OK) return UcxError("ucp_worker_get_address", s);
  address_.assign(reinterpret_cast<const char*>(address), address_length);
  ucp_worker_release_address(worker_, address);

  s = ucp_worker_get_efd(worker_, &worker_fd_);
  if (s != UCS_OK) return UcxError("ucp_worker_get_efd", s);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("eventfd: ", std::strerror(errno)));
  }
  progress_thread_ = std::thread([this] { ProgressLoop(); });
  DMOE_LOG(kInfo, "transport") << "node " << options_.node_id << ": UCX worker ready (address "
                               << address_.size() << " bytes, peer failure detection "
                               << (options_.detect_peer_failure ? "on" : "off") << ")";
  return absl::OkStatus();
}

void UcxTransport::ProgressLoop() {
  pollfd fds[2] = {{worker_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  absl::Time last_activity = absl::Now();
  while (true) {
    int sleep_ms;
    {
      absl::MutexLock lock(&worker_mu_);
      if (stop_) return;
      bool active = false;
      while (ucp_worker_progress(worker_) != 0) active = true;
      active |= ReceiveArrivals();
      const absl::Time now = absl::Now();
      ExpireSends(now);
      CloseFailedPeers();
      ReapCloseRequests();
      if (active) last_activity = now;
      if (now - last_activity < kSpinAfterActivity) {
        sleep_ms = -1;  // keep polling, after letting other threads run
      } else {
        // Sleep until UCX or Wake() signals. BUSY: events arrived since the progress above.
        const ucs_status_t s = ucp_worker_arm(worker_);
        if (s == UCS_ERR_BUSY) continue;
        if (s != UCS_OK && fds[0].fd >= 0) {
          DMOE_LOG(kWarning, "transport") << "node " << options_.node_id
                                          << ": ucp_worker_arm: " << UcsText(s)
                                          << "; polling every " << kMaxSleep << " instead";
          fds[0].fd = -1;  // poll the wake fd only, its timeout serving as a backoff
        }
        sleep_ms = SleepMillis(now);
      }
    }
    if (sleep_ms < 0) {
      sched_yield();
      continue;
    }
    if (poll(fds, 2, sleep_ms) > 0) {
      if ((fds[1].revents & POLLIN) != 0) {
        uint64_t count;
        (void)!read(wake_fd_, &count, sizeof count);
      }
      last_activity = absl::Now();  // whatever woke us is likely followed by more
    }
  }
}

int UcxTransport::SleepMillis(absl::Time now) const {
  absl::Duration sleep = kMaxSleep;
  for (const auto& op : pending_sends_) {
    if (op->abandoned) continue;
    // Next event: its deadline, then (once failed) the end of its grace period.
    const absl::Time next = now < op->deadline ? op->deadline : op->deadline + kCloseTimeout;
    sleep = std::min(sleep, next - now);
  }
  return static_cast<int>(std::max<int64_t>(
      0, absl::ToInt64Milliseconds(sleep + absl::Microseconds(999))));  // round up
}

absl::Status UcxTransport::ConnectLocked(NodeId peer_id, const std::string& address) {
  auto it = peers_.find(peer_id);
  if (it != peers_.end()) {
    Peer* old = it->second.get();
    if (old->address == address && old->failure.empty()) return absl::OkStatus();
    // The peer restarted (or failed): sends still pending on the old endpoint fail.
    FailPeer(old, "replaced by a new connection");
    retired_peers_.push_back(std::move(it->second));
    peers_.erase(it);
  }
  auto peer = std::make_unique<Peer>();
  peer->owner = this;
  peer->id = peer_id;
  peer->address = address;
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(peer->address.data());
  params.err_mode =
      options_.detect_peer_failure ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  params.err_handler.cb = &UcxTransport::OnEndpointError;
  params.err_handler.arg = peer.get();
  const ucs_status_t s = ucp_ep_create(worker_, &params, &peer->ep);
  if (s != UCS_OK) {
    return UcxError(absl::StrCat("connect to peer ", peer_id, ": ucp_ep_create"), s);
  }
  peers_[peer_id] = std::move(peer);
  mailbox_.ClearPeerFailure(peer_id);
  return absl::OkStatus();
}

bool UcxTransport::StartSend(const std::shared_ptr<SendOp>& op) {
  auto it = peers_.find(op->peer);
  if (it == peers_.end()) {
    op->status = absl::UnavailableError(
        absl::StrCat("send to peer ", op->peer, ": not connected (Connect it first)"));
    return false;
  }
  Peer* peer = it->second.get();
  if (!peer->failure.empty()) {
    op->status = absl::UnavailableError(
        absl::StrCat("send to peer ", op->peer, ": peer unavailable (", peer->failure, ")"));
    return false;
  }
  op->target = peer;
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.send = &UcxTransport::OnSendDone;
  param.user_data = op.get();
  static const uint8_t kEmpty = 0;
  const void* buffer = op->payload.empty() ? &kEmpty : op->payload.data();
  const ucs_status_ptr_t request = ucp_tag_send_nbx(
      peer->ep, buffer, op->payload.size(), UcxTag(options_.node_id, op->tag), &param);
  if (request == nullptr || UCS_PTR_IS_ERR(request)) {
    SetSendStatus(op.get(), UCS_PTR_STATUS(request));
    return false;
  }
  pending_sends_.push_back(op);
  return true;
}

void UcxTransport::OnSendDone(void* request, ucs_status_t status, void* user_data)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {  // runs inside ucp calls made under worker_mu_
  auto* op = static_cast<SendOp*>(user_data);
  UcxTransport* self = op->target->owner;
  ucp_request_free(request);
  auto& pending = self->pending_sends_;
  auto it = std::find_if(pending.begin(), pending.end(),
                         [op](const std::shared_ptr<SendOp>& p) { return p.get() == op; });
  if (it == pending.end()) return;  // cannot happen: every posted op is in pending_sends_
  const std::shared_ptr<SendOp> keep = std::move(*it);  // alive until the end of this call
  pending.erase(it);
  if (op->abandoned) return;
  self->SetSendStatus(op, status);
  op->done.Notify();
}

void UcxTransport::SetSendStatus(SendOp* op, ucs_status_t status) {
  if (status == UCS_OK) {
    op->status = absl::OkStatus();
    return;
  }
  const std::string why = op->target != nullptr && !op->target->failure.empty()
                              ? op->target->failure
                              : UcsText(status);
  op->status = absl::UnavailableError(absl::StrCat("send to peer ", op->peer, " (tag 0x",
                                                   absl::Hex(op->tag), ", ", op->payload.size(),
                                                   " bytes) failed: ", why));
}

void UcxTransport::ExpireSends(absl::Time now) {
  for (const auto& op : pending_sends_) {
    if (op->abandoned || now < op->deadline) continue;
    FailPeer(op->target,
             absl::StrCat("a send of ", op->payload.size(), " bytes did not complete within ",
                          absl::FormatDuration(options_.send_timeout)));
    // With peer failure detection, closing the endpoint cancels the send (OnSendDone). Without
    // it UCX 1.13 has no way to cancel a send, so answer the caller and leave the request to
    // UCX (a dead peer never reads the caller's buffer again).
    if (!options_.detect_peer_failure || now >= op->deadline + kCloseTimeout) {
      op->abandoned = true;
      SetSendStatus(op.get(), UCS_ERR_TIMED_OUT);
      op->done.Notify();
    }
  }
}

bool UcxTransport::ReceiveArrivals() {
  bool any = false;
  ucp_tag_recv_info_t info;
  while (ucp_tag_message_h handle = ucp_tag_probe_nb(worker_, 0, 0, /*remove=*/1, &info)) {
    auto arrival = std::make_unique<Arrival>();
    arrival->owner = this;
    arrival->message.from = static_cast<NodeId>(info.sender_tag >> kTagBits);
    arrival->message.tag = info.sender_tag & kMaxTag;
    arrival->message.payload.resize(info.length);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.recv = &UcxTransport::OnReceived;
    param.user_data = arrival.get();
    const ucs_status_ptr_t request = ucp_tag_msg_recv_nbx(
        worker_, arrival->message.payload.data(), info.length, handle, &param);
    if (request == nullptr || UCS_PTR_IS_ERR(request)) {
      arrival->done = true;
      arrival->status = UCS_PTR_STATUS(request);
    }
    const NodeId from = arrival->message.from;
    arrivals_[from].push_back(std::move(arrival));
    DeliverInOrder(from);
    any = true;
  }
  return any;
}

void UcxTransport::OnReceived(void* request, ucs_status_t status,
                              const ucp_tag_recv_info_t* /*info*/, void* user_data)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {  // runs inside ucp calls made under worker_mu_
  auto* arrival = static_cast<Arrival*>(user_data);
  arrival->done = true;
  arrival->status = status;
  ucp_request_free(request);
  arrival->owner->DeliverInOrder(arrival->message.from);  // may free `arrival`
}

void UcxTransport::DeliverInOrder(NodeId sender) {
  auto& queue = arrivals_[sender];
  while (!queue.empty() && queue.front()->done) {
    std::unique_ptr<Arrival> arrival = std::move(queue.front());
    queue.pop_front();
    if (arrival->status == UCS_OK) {
      mailbox_.Push(std::move(arrival->message));
    } else if (!stop_) {
      DMOE_LOG(kWarning, "transport")
          << "node " << options_.node_id << ": dropped a message from peer " << sender
          << " (tag 0x" << std::hex << arrival->message.tag << std::dec << ", "
          << arrival->message.payload.size() << " bytes): " << UcsText(arrival->status);
    }
  }
}

void UcxTransport::OnEndpointError(void* arg, ucp_ep_h /*ep*/, ucs_status_t status)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {  // runs inside ucp calls made under worker_mu_
  auto* peer = static_cast<Peer*>(arg);
  peer->owner->FailPeer(peer, absl::StrCat("endpoint error: ", UcsText(status)));
}

void UcxTransport::FailPeer(Peer* peer, const std::string& why) {
  if (!peer->failure.empty()) return;
  peer->failure = why;
  mailbox_.MarkPeerFailed(peer->id, why);
  DMOE_LOG(kWarning, "transport") << "node " << options_.node_id << ": peer " << peer->id
                                  << " is unavailable: " << why;
  to_close_.push_back(peer);
}

void UcxTransport::ClosePeer(Peer* peer) {
  if (peer->ep == nullptr) return;
  const bool failed = !peer->failure.empty();
  // A failed endpoint is closed with force, which cancels its requests. Without peer failure
  // detection force is undefined behaviour and a flush never ends: leave it to
  // ucp_worker_destroy.
  if (failed && !options_.detect_peer_failure) return;
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = failed ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucp_ep_h ep = peer->ep;
  peer->ep = nullptr;
  const ucs_status_ptr_t request = ucp_ep_close_nbx(ep, &param);
  if (UCS_PTR_IS_PTR(request)) close_requests_.push_back(request);
}

void UcxTransport::CloseFailedPeers() {
  std::vector<Peer*> peers;
  peers.swap(to_close_);
  for (Peer* peer : peers) ClosePeer(peer);
}

void UcxTransport::ReapCloseRequests() {
  auto done = [](void* request) {
    if (ucp_request_check_status(request) == UCS_INPROGRESS) return false;
    ucp_request_free(request);
    return true;
  };
  close_requests_.erase(std::remove_if(close_requests_.begin(), close_requests_.end(), done),
                        close_requests_.end());
}

void UcxTransport::CloseAll() {
  absl::MutexLock lock(&worker_mu_);
  for (auto& [id, peer] : peers_) ClosePeer(peer.get());
  CloseFailedPeers();
  const absl::Time deadline = absl::Now() + kCloseTimeout;
  while (!close_requests_.empty() && absl::Now() < deadline) {
    while (ucp_worker_progress(worker_) != 0) {
    }
    ReapCloseRequests();
    if (!close_requests_.empty() && ucp_worker_arm(worker_) == UCS_OK) {
      pollfd fd{worker_fd_, POLLIN, 0};
      poll(&fd, 1, 1);
    }
  }
  if (!close_requests_.empty()) {
    DMOE_LOG(kWarning, "transport") << "node " << options_.node_id << ": "
                                    << close_requests_.size()
                                    << " endpoint(s) did not close within " << kCloseTimeout;
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Transport>> CreateUcxTransport(const UcxOptions& options) {
  if (options.node_id < 0 || options.node_id > kMaxNodeId) {
    return absl::InvalidArgumentError(absl::StrCat(
        "UcxOptions.node_id ", options.node_id, " is outside [0, ", kMaxNodeId, "]"));
  }
  if (options.send_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("UcxOptions.send_timeout must be positive, got ",
                     absl::FormatDuration(options.send_timeout)));
  }
  if (options.keepalive_interval < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("UcxOptions.keepalive_interval must not be negative, got ",
                     absl::FormatDuration(options.keepalive_interval)));
  }
  auto transport = std::make_unique<UcxTransport>(options);
  if (absl::Status s = transport->Init(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("node ", options.node_id, ": UCX transport: ",
                                               std::string(s.message())));
  }
  return transport;
}

}  // namespace dmoe::transport
