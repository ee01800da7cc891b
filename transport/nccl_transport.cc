#include "transport/nccl_transport.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "core/log.h"
#include "transport/mailbox.h"

namespace dmoe::transport {
namespace {

static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "kNcclUniqueIdBytes must be sizeof(ncclUniqueId)");

constexpr char kLog[] = "transport";
constexpr size_t kMaxRecords = size_t{1} << 20;

absl::Status CudaError(cudaError_t err, const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

absl::Status NcclError(ncclResult_t r, const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": NCCL error ", static_cast<int>(r), " (", ncclGetErrorString(r),
                                             ")"));
}

#define DMOE_CUDA_OK(expr, what)                           \
  do {                                                     \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess) return CudaError(e_, what); \
  } while (0)

// With a nonblocking communicator a call may answer ncclInProgress: the operation is still
// being set up. Polls until it settled, up to `deadline` (DEADLINE_EXCEEDED after).
absl::Status Settle(ncclComm_t comm, ncclResult_t r, absl::Time deadline, const std::string& what) {
  int polls = 0;
  while (r == ncclInProgress) {
    if (absl::Now() >= deadline) return absl::DeadlineExceededError(absl::StrCat(what, ": still in progress"));
    if (++polls < 100) {
      std::this_thread::yield();
    } else {
      absl::SleepFor(absl::Milliseconds(1));  // communicator setup: milliseconds to seconds
    }
    if (ncclResult_t q = ncclCommGetAsyncError(comm, &r); q != ncclSuccess) return NcclError(q, what);
  }
  return r == ncclSuccess ? absl::OkStatus() : NcclError(r, what);
}

uint64_t Fingerprint(const std::string& bytes) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string NcclAddress(NodeId rank, int num_nodes, uint64_t fingerprint) {
  return absl::StrCat("nccl:", rank, ":", num_nodes, ":", absl::Hex(fingerprint, absl::kZeroPad16));
}

class NcclTransportImpl final : public NcclTransport {
 public:
  explicit NcclTransportImpl(const NcclOptions& o)
      : options_(o), rank_(o.node_id), n_(o.num_nodes), fingerprint_(Fingerprint(o.unique_id)), mailbox_(o.node_id) {}

  ~NcclTransportImpl() override {
    stopping_.store(true);
    // Stop the resident receives (and any stuck send) on every communicator before freeing
    // anything: a free that synchronizes the device would wait for them forever.
    for (ncclComm_t c : comms_) {
      if (c != nullptr) ncclCommRevoke(c, NCCL_REVOKE_DEFAULT);
    }
    for (auto& p : peers_) {
      if (p->thread.joinable()) p->thread.join();
    }
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    for (ncclComm_t c : comms_) {
      if (c == nullptr) continue;
      ncclResult_t state = ncclInProgress;
      while (ncclCommGetAsyncError(c, &state) == ncclSuccess && state == ncclInProgress && absl::Now() < deadline) {
        absl::SleepFor(absl::Milliseconds(1));
      }
      ncclCommAbort(c);
    }
    for (auto& p : peers_) {
      if (p->recv_done != nullptr) cudaEventDestroy(p->recv_done);
      if (p->recv_stream != nullptr) cudaStreamDestroy(p->recv_stream);
      if (p->recv_dev != nullptr) cudaFree(p->recv_dev);
      if (p->send_dev != nullptr) cudaFree(p->send_dev);
      if (p->recv_host != nullptr) cudaFreeHost(p->recv_host);
      if (p->send_host != nullptr) cudaFreeHost(p->send_host);
    }
    if (start_event_ != nullptr) cudaEventDestroy(start_event_);
    if (round_event_ != nullptr) cudaEventDestroy(round_event_);
    if (own_stream_ && stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status Init() {
    const std::string who = absl::StrCat("NCCL transport of node ", rank_, " on GPU ", options_.cuda_device);
    DMOE_CUDA_OK(cudaSetDevice(options_.cuda_device), absl::StrCat(who, ": cudaSetDevice"));
    if (options_.cuda_stream != nullptr) {
      stream_ = static_cast<cudaStream_t>(options_.cuda_stream);
    } else {
      DMOE_CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), who);
      own_stream_ = true;
    }
    DMOE_CUDA_OK(cudaEventCreate(&start_event_), who);
    DMOE_CUDA_OK(cudaEventCreate(&round_event_), who);
    const size_t send_bytes = std::max<size_t>(kFrameHeaderBytes, options_.frame_limits.chunk_bytes);
    const size_t recv_bytes = std::max<size_t>(kFrameHeaderBytes, options_.frame_limits.max_chunk_bytes);
    for (NodeId p = 0; p < n_; ++p) {
      auto peer = std::make_unique<Peer>(options_.frame_limits);
      if (p != rank_) {
        DMOE_CUDA_OK(cudaMalloc(&peer->send_dev, send_bytes), who);
        DMOE_CUDA_OK(cudaMalloc(&peer->recv_dev, recv_bytes), who);
        DMOE_CUDA_OK(cudaMallocHost(&peer->send_host, send_bytes), who);
        DMOE_CUDA_OK(cudaMallocHost(&peer->recv_host, recv_bytes), who);
        DMOE_CUDA_OK(cudaStreamCreateWithFlags(&peer->recv_stream, cudaStreamNonBlocking), who);
        // The receive threads sleep in cudaEventSynchronize instead of spinning a core each.
        DMOE_CUDA_OK(cudaEventCreateWithFlags(&peer->recv_done, cudaEventBlockingSync | cudaEventDisableTiming), who);
      }
      peers_.push_back(std::move(peer));
    }

    ncclUniqueId id;
    std::memcpy(id.internal, options_.unique_id.data(), kNcclUniqueIdBytes);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // so that a rank that never joins times out instead of hanging
    config.maxCTAs = options_.max_ctas;
    config.commName = "dmoe";
    const absl::Time deadline = absl::Now() + options_.init_timeout;
    comms_.assign(n_, nullptr);
    absl::Status s = Settle(comms_[0], ncclCommInitRankConfig(&comms_[0], n_, id, rank_, &config), deadline,
                            absl::StrCat(who, ": joining the ", n_, "-rank communicator"));
    // comms_[0] is the world; node s > 0 sends on a copy of it (split with one color).
    for (NodeId sender = 1; sender < n_ && s.ok(); ++sender) {
      s = Settle(comms_[sender], ncclCommSplit(comms_[0], 0, rank_, &comms_[sender], &config), deadline,
                 absl::StrCat(who, ": splitting the communicator of sender ", sender));
    }
    if (!s.ok()) {
      if (s.code() == absl::StatusCode::kDeadlineExceeded) {
        s = absl::DeadlineExceededError(absl::StrCat(s.message(), ": not every one of the ", n_, " ranks joined within ",
                                                     absl::FormatDuration(options_.init_timeout)));
      }
      return s;
    }
    for (NodeId p = 0; p < n_; ++p) {
      if (p != rank_) peers_[p]->thread = std::thread([this, p] { ReceiveLoop(p); });
    }
    DMOE_LOG(kInfo, kLog) << who << ": joined " << n_ << " ranks (" << n_ << " communicators, chunk "
                          << options_.frame_limits.chunk_bytes << " bytes)";
    return absl::OkStatus();
  }

  NodeId node_id() const override { return rank_; }
  std::string address() const override { return NcclAddress(rank_, n_, fingerprint_); }

  absl::Status Connect(NodeId peer, const std::string& address) override {
    const std::vector<std::string> parts = absl::StrSplit(address, ':');
    int rank = -1, num = -1;
    if (parts.size() != 4 || parts[0] != "nccl" || !absl::SimpleAtoi(parts[1], &rank) ||
        !absl::SimpleAtoi(parts[2], &num)) {
      return absl::InvalidArgumentError(
          absl::StrCat("connect to peer ", peer, ": '", address, "' is not an NCCL address (nccl:RANK:N:ID)"));
    }
    if (rank != peer || peer < 0 || peer >= n_ || peer == rank_) {
      return absl::InvalidArgumentError(absl::StrCat("connect to peer ", peer, ": address '", address, "' names rank ",
                                                     rank, " (this node is rank ", rank_, " of ", n_, ")"));
    }
    if (num != n_ || address != NcclAddress(peer, n_, fingerprint_)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "connect to peer ", peer, ": it joined another NCCL communicator ('", address, "', this one is '",
          NcclAddress(peer, n_, fingerprint_), "'); NCCL ranks cannot rejoin: restart the cluster"));
    }
    absl::MutexLock lock(&state_mu_);
    peers_[peer]->connected = true;
    return absl::OkStatus();
  }

  absl::Status Send(NodeId peer, uint64_t tag, absl::Span<const uint8_t> payload) override {
    const OutgoingMessage m{peer, tag, payload};
    return SendMany({&m, 1});
  }

  absl::StatusOr<Message> Receive(uint64_t tag, uint64_t tag_mask, absl::Duration timeout) override {
    return mailbox_.Receive(tag, tag_mask, timeout);
  }

  absl::Status SendMany(absl::Span<const OutgoingMessage> messages) override {
    const absl::Time start = absl::Now();
    // Check everything before numbering any frame: a frame numbered but not sent would show up
    // at the peer as a lost one.
    for (const OutgoingMessage& m : messages) {
      if (absl::Status s = ValidateSendTag(m.peer, m.tag); !s.ok()) return s;
      if (m.peer < 0 || m.peer >= n_ || m.peer == rank_) {
        return absl::UnavailableError(absl::StrCat("send to peer ", m.peer, ": not another rank of this ", n_,
                                                   "-rank NCCL cluster (this node is rank ", rank_, ")"));
      }
      if (absl::Status s = PeerStatus(m.peer); !s.ok()) return s;
      if (m.payload.size() > options_.frame_limits.max_payload_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat("send to peer ", m.peer, ": payload of ", m.payload.size(),
                                                         " bytes exceeds the limit of ",
                                                         options_.frame_limits.max_payload_bytes));
      }
    }
    absl::MutexLock lock(&send_mu_);
    if (!send_error_.ok()) return send_error_;
    const absl::Time deadline = start + options_.send_timeout;
    DMOE_CUDA_OK(cudaSetDevice(options_.cuda_device), "cudaSetDevice");
    // Per peer, its pieces in order: header, chunks, next header, ...
    std::vector<EncodedFrame> frames;
    frames.reserve(messages.size());  // pieces point into frames[i].header_bytes
    std::vector<std::deque<absl::Span<const uint8_t>>> pieces(n_);
    uint64_t bytes = 0;
    for (const OutgoingMessage& m : messages) {
      absl::StatusOr<EncodedFrame> f = peers_[m.peer]->encoder.Encode(m.peer, m.tag, m.payload);
      if (!f.ok()) return f.status();  // checked above; cannot happen
      frames.push_back(std::move(*f));
      pieces[m.peer].push_back(absl::MakeConstSpan(frames.back().header_bytes));
      pieces[m.peer].insert(pieces[m.peer].end(), frames.back().chunks.begin(), frames.back().chunks.end());
      bytes += m.payload.size();
    }
    DMOE_CUDA_OK(cudaEventRecord(start_event_, stream_), "cudaEventRecord");
    ncclComm_t comm = comms_[rank_];
    while (true) {
      std::vector<std::pair<NodeId, size_t>> round;  // (peer, bytes) sent this round
      for (NodeId p = 0; p < n_; ++p) {
        if (pieces[p].empty()) continue;
        const absl::Span<const uint8_t> piece = pieces[p].front();
        pieces[p].pop_front();
        // The previous round is complete (waited below), so the staging buffers are free.
        std::memcpy(peers_[p]->send_host, piece.data(), piece.size());
        DMOE_CUDA_OK(cudaMemcpyAsync(peers_[p]->send_dev, peers_[p]->send_host, piece.size(), cudaMemcpyHostToDevice,
                                     stream_),
                     "staging a send");
        round.emplace_back(p, piece.size());
      }
      if (round.empty()) break;
      ncclGroupStart();
      ncclResult_t r = ncclSuccess;
      for (const auto& [p, size] : round) {
        r = ncclSend(peers_[p]->send_dev, size, ncclUint8, p, comm, stream_);
        if (r != ncclSuccess && r != ncclInProgress) break;
      }
      const ncclResult_t end = ncclGroupEnd();
      if (r == ncclSuccess || r == ncclInProgress) r = end;
      absl::Status s = Settle(comm, r, deadline, absl::StrCat("send to peer ", round.front().first));
      if (s.ok()) s = WaitRound(comm, deadline);
      if (!s.ok()) return FailSends(round.front().first, s);
    }
    float gpu_ms = 0;
    cudaEventElapsedTime(&gpu_ms, start_event_, round_event_);
    absl::MutexLock records(&records_mu_);
    if (records_.size() < kMaxRecords && !messages.empty()) {
      records_.push_back({messages.front().tag, static_cast<int>(messages.size()), bytes, gpu_ms / 1e3,
                          absl::ToDoubleSeconds(absl::Now() - start)});
    }
    return absl::OkStatus();
  }

  std::vector<NcclSendRecord> TakeSendRecords() override {
    absl::MutexLock lock(&records_mu_);
    return std::exchange(records_, {});
  }

 private:
  struct Peer {
    explicit Peer(const FrameLimits& limits) : encoder(limits) {}
    // Send side (under send_mu_).
    FrameEncoder encoder;
    void* send_dev = nullptr;
    void* send_host = nullptr;  // pinned
    // Receive side (its thread's).
    std::thread thread;
    cudaStream_t recv_stream = nullptr;
    cudaEvent_t recv_done = nullptr;
    void* recv_dev = nullptr;
    void* recv_host = nullptr;  // pinned
    // Under state_mu_.
    bool connected = false;
    absl::Status error;
  };

  absl::Status PeerStatus(NodeId peer) {
    absl::MutexLock lock(&state_mu_);
    if (!peers_[peer]->connected) {
      return absl::UnavailableError(absl::StrCat("send to peer ", peer, ": not connected"));
    }
    return peers_[peer]->error;
  }

  // Waits for the round just enqueued, polling (a blocking wait could not time out).
  absl::Status WaitRound(ncclComm_t comm, absl::Time deadline) {
    DMOE_CUDA_OK(cudaEventRecord(round_event_, stream_), "cudaEventRecord");
    for (int polls = 0;; ++polls) {
      const cudaError_t e = cudaEventQuery(round_event_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return CudaError(e, "waiting for NCCL sends");
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm, &async);
      if (async != ncclSuccess && async != ncclInProgress) return NcclError(async, "NCCL sends");
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat("not complete within ", absl::FormatDuration(options_.send_timeout)));
      }
      // Small messages finish in microseconds; back off for large ones.
      if (polls < 2000) {
        std::this_thread::yield();
      } else {
        absl::SleepFor(absl::Microseconds(50));
      }
    }
  }

  // A send that failed or hung: NCCL cannot cancel one peer's operation, so this node's send
  // communicator is revoked and stays failed.
  absl::Status FailSends(NodeId peer, const absl::Status& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(send_mu_) {
    send_error_ = absl::UnavailableError(
        absl::StrCat("send to peer ", peer, " failed (", why.message(), "); node ", rank_,
                     "'s NCCL sends are revoked: restart the cluster"));
    ncclCommRevoke(comms_[rank_], NCCL_REVOKE_DEFAULT);
    DMOE_LOG(kError, kLog) << send_error_.message();
    return send_error_;
  }

  void FailPeer(NodeId peer, const absl::Status& why) {
    DMOE_LOG(kError, kLog) << "node " << rank_ << ": receiving from node " << peer << " stopped: " << why;
    absl::MutexLock lock(&state_mu_);
    peers_[peer]->error = absl::UnavailableError(absl::StrCat("peer ", peer, ": its stream failed: ", why.message()));
  }

  // One thread per peer: keeps a receive posted on the peer's communicator, of exactly the size
  // the frame decoder expects next, and hands finished messages to the mailbox.
  void ReceiveLoop(NodeId peer) {
    Peer& p = *peers_[peer];
    FrameDecoder decoder(peer, options_.frame_limits);
    if (cudaError_t e = cudaSetDevice(options_.cuda_device); e != cudaSuccess) {
      return FailPeer(peer, CudaError(e, "cudaSetDevice"));
    }
    const std::string what = absl::StrCat("receive from node ", peer);
    while (!stopping_.load()) {
      const absl::Span<uint8_t> into = decoder.receive_buffer();
      const ncclResult_t r = ncclRecv(p.recv_dev, into.size(), ncclUint8, peer, comms_[peer], p.recv_stream);
      if (absl::Status s = Settle(comms_[peer], r, absl::InfiniteFuture(), what); !s.ok()) {
        if (!stopping_.load()) FailPeer(peer, s);
        return;
      }
      cudaError_t e = cudaMemcpyAsync(p.recv_host, p.recv_dev, into.size(), cudaMemcpyDeviceToHost, p.recv_stream);
      if (e == cudaSuccess) e = cudaEventRecord(p.recv_done, p.recv_stream);
      if (e == cudaSuccess) e = cudaEventSynchronize(p.recv_done);  // sleeps until the peer sent
      if (stopping_.load()) return;
      if (e != cudaSuccess) return FailPeer(peer, CudaError(e, what));
      std::memcpy(into.data(), p.recv_host, into.size());
      absl::StatusOr<std::optional<Message>> m = decoder.Commit(into.size());
      if (!m.ok()) return FailPeer(peer, m.status());
      if (m->has_value()) mailbox_.Push(std::move(**m));
    }
  }

  const NcclOptions options_;
  const NodeId rank_;
  const int n_;
  const uint64_t fingerprint_;
  Mailbox mailbox_;
  std::atomic<bool> stopping_{false};
  // comms_[s]: the communicator node s sends on; the others only receive on it (one thread each).
  std::vector<ncclComm_t> comms_;
  std::vector<std::unique_ptr<Peer>> peers_;  // [rank]; peers_[rank_] unused but for its encoder
  cudaStream_t stream_ = nullptr;
  bool own_stream_ = false;
  cudaEvent_t start_event_ = nullptr;
  cudaEvent_t round_event_ = nullptr;
  absl::Mutex send_mu_;
  absl::Status send_error_ ABSL_GUARDED_BY(send_mu_);
  absl::Mutex state_mu_;
  absl::Mutex records_mu_;
  std::vector<NcclSendRecord> records_ ABSL_GUARDED_BY(records_mu_);
};

}  // namespace

void SetNcclDefaultEnv() { setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0); }

absl::StatusOr<std::string> NewNcclUniqueId() {
  SetNcclDefaultEnv();
  ncclUniqueId id;
  if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) return NcclError(r, "ncclGetUniqueId");
  return std::string(id.internal, kNcclUniqueIdBytes);
}

absl::StatusOr<std::unique_ptr<NcclTransport>> CreateNcclTransport(const NcclOptions& options) {
  SetNcclDefaultEnv();
  if (options.num_nodes < 2 || options.num_nodes > kMaxNodeId + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL transport: num_nodes = ", options.num_nodes, " must be in 2..", kMaxNodeId + 1));
  }
  if (options.node_id < 0 || options.node_id >= options.num_nodes) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL transport: node_id = ", options.node_id, " outside [0, ",
                                                   options.num_nodes, ")"));
  }
  if (options.unique_id.size() != kNcclUniqueIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL transport: unique id of ", options.unique_id.size(),
                                                   " bytes, expected ", kNcclUniqueIdBytes));
  }
  const FrameLimits& l = options.frame_limits;
  if (l.chunk_bytes == 0 || l.max_chunk_bytes < l.chunk_bytes || options.cuda_device < 0 || options.max_ctas < 1) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL transport: need 0 < chunk_bytes (", l.chunk_bytes,
                                                   ") <= max_chunk_bytes (", l.max_chunk_bytes, "), cuda_device (",
                                                   options.cuda_device, ") >= 0 and max_ctas (", options.max_ctas,
                                                   ") >= 1"));
  }
  auto t = std::make_unique<NcclTransportImpl>(options);
  if (absl::Status s = t->Init(); !s.ok()) return s;
  return std::unique_ptr<NcclTransport>(std::move(t));
}

}  // namespace dmoe::transport
