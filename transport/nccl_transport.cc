#include "transport/nccl_transport.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace dmoe::transport {
namespace {

// Ends every operation posted on `comm`. ncclCommRevoke (late NCCL 2.28) keeps the
// communicator for a later destroy; older NCCLs (the GPU image has one) only
// have ncclCommAbort, which also frees it: then `comm` is set to null, so the
// destructor does not free it again.
void EndOperations(ncclComm_t& comm) {
#ifdef NCCL_REVOKE_DEFAULT  // ncclCommRevoke came within 2.28 (2.28.9 has it)
  ncclCommRevoke(comm, NCCL_REVOKE_DEFAULT);
#else
  ncclCommAbort(comm);
  comm = nullptr;
#endif
}

}  // namespace

namespace {

static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "kNcclUniqueIdBytes must be sizeof(ncclUniqueId)");

constexpr char kLog[] = "transport";

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

// NCCL as a PieceChannel: comms_[s] is the communicator node s sends on (comms_[0] the world,
// the others split from it); this node receives from peer p on comms_[p], on p's thread.
class NcclChannel final : public PieceChannel {
 public:
  explicit NcclChannel(const NcclOptions& o) : options_(o), rank_(o.node_id), n_(o.num_nodes) {}

  ~NcclChannel() override {
    // FramedTransport called Shutdown (every communicator revoked) and joined its threads.
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    for (ncclComm_t c : comms_) {
      if (c == nullptr) continue;
      ncclResult_t state = ncclInProgress;
      while (ncclCommGetAsyncError(c, &state) == ncclSuccess && state == ncclInProgress && absl::Now() < deadline) {
        absl::SleepFor(absl::Milliseconds(1));
      }
      ncclCommAbort(c);
    }
    // Only now, with no kernel left, may memory be freed (cudaFree waits for the device).
    for (Staging& p : peers_) {
      if (p.recv_done != nullptr) cudaEventDestroy(p.recv_done);
      if (p.recv_stream != nullptr) cudaStreamDestroy(p.recv_stream);
      if (p.recv_dev != nullptr) cudaFree(p.recv_dev);
      if (p.send_dev != nullptr) cudaFree(p.send_dev);
      if (p.recv_host != nullptr) cudaFreeHost(p.recv_host);
      if (p.send_host != nullptr) cudaFreeHost(p.send_host);
    }
    if (start_event_ != nullptr) cudaEventDestroy(start_event_);
    if (done_event_ != nullptr) cudaEventDestroy(done_event_);
    if (own_stream_ && stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status Init() {
    DMOE_CUDA_OK(cudaSetDevice(options_.cuda_device), absl::StrCat(who(), ": cudaSetDevice"));
    if (options_.cuda_stream != nullptr) {
      stream_ = static_cast<cudaStream_t>(options_.cuda_stream);
    } else {
      DMOE_CUDA_OK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), who());
      own_stream_ = true;
    }
    DMOE_CUDA_OK(cudaEventCreate(&start_event_), who());
    DMOE_CUDA_OK(cudaEventCreate(&done_event_), who());
    const size_t send_bytes = std::max<size_t>(kFrameHeaderBytes, options_.frame_limits.chunk_bytes);
    const size_t recv_bytes = std::max<size_t>(kFrameHeaderBytes, options_.frame_limits.max_chunk_bytes);
    peers_.resize(n_);
    for (NodeId p = 0; p < n_; ++p) {
      if (p == rank_) continue;
      Staging& s = peers_[p];
      DMOE_CUDA_OK(cudaMalloc(&s.send_dev, send_bytes), who());
      DMOE_CUDA_OK(cudaMalloc(&s.recv_dev, recv_bytes), who());
      DMOE_CUDA_OK(cudaMallocHost(&s.send_host, send_bytes), who());
      DMOE_CUDA_OK(cudaMallocHost(&s.recv_host, recv_bytes), who());
      DMOE_CUDA_OK(cudaStreamCreateWithFlags(&s.recv_stream, cudaStreamNonBlocking), who());
      // The receiving threads sleep in cudaEventSynchronize instead of spinning a core each.
      DMOE_CUDA_OK(cudaEventCreateWithFlags(&s.recv_done, cudaEventBlockingSync | cudaEventDisableTiming), who());
    }

    ncclUniqueId id;
    std::memcpy(id.internal, options_.unique_id.data(), kNcclUniqueIdBytes);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // so that a rank that never joins times out instead of hanging
    config.maxCTAs = options_.max_ctas;
    config.commName = "dmoe";
    const absl::Time deadline = absl::Now() + options_.init_timeout;
    comms_.assign(n_, nullptr);
    // The call sets the handle that Settle polls: call first, then settle.
    ncclResult_t r = ncclCommInitRankConfig(&comms_[0], n_, id, rank_, &config);
    absl::Status s = Settle(comms_[0], r, deadline, absl::StrCat(who(), ": joining the ", n_, "-rank communicator"));
    for (NodeId sender = 1; sender < n_ && s.ok(); ++sender) {
      r = ncclCommSplit(comms_[0], 0, rank_, &comms_[sender], &config);
      s = Settle(comms_[sender], r, deadline, absl::StrCat(who(), ": splitting the communicator of sender ", sender));
    }
    if (s.code() == absl::StatusCode::kDeadlineExceeded) {
      return absl::DeadlineExceededError(absl::StrCat(s.message(), ": not every one of the ", n_,
                                                      " ranks joined within ",
                                                      absl::FormatDuration(options_.init_timeout)));
    }
    if (s.ok()) {
      DMOE_LOG(kInfo, kLog) << who() << ": joined " << n_ << " ranks (" << n_ << " communicators, chunk "
                            << options_.frame_limits.chunk_bytes << " bytes)";
    }
    return s;
  }

  absl::StatusOr<double> SendGroup(absl::Span<const Piece> pieces, absl::Time deadline) override {
    if (!send_error_.ok()) return send_error_;
    DMOE_CUDA_OK(cudaSetDevice(options_.cuda_device), "cudaSetDevice");
    DMOE_CUDA_OK(cudaEventRecord(start_event_, stream_), "cudaEventRecord");
    // The previous group is complete (waited below), so the staging buffers are free.
    for (const Piece& piece : pieces) {
      Staging& s = peers_[piece.peer];
      std::memcpy(s.send_host, piece.bytes.data(), piece.bytes.size());
      DMOE_CUDA_OK(cudaMemcpyAsync(s.send_dev, s.send_host, piece.bytes.size(), cudaMemcpyHostToDevice, stream_),
                   "staging a send");
    }
    ncclComm_t comm = comms_[rank_];
    ncclResult_t r = ncclGroupStart();
    for (const Piece& piece : pieces) {
      if (r != ncclSuccess && r != ncclInProgress) break;
      r = ncclSend(peers_[piece.peer].send_dev, piece.bytes.size(), ncclUint8, piece.peer, comm, stream_);
    }
    const ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress) r = end;
    absl::Status s = Settle(comm, r, deadline, "ncclSend");
    if (s.ok()) s = WaitDone(comm, deadline);
    if (!s.ok()) {
      // NCCL cannot cancel one peer's operation: stop this node's sends altogether.
      send_error_ = s;
      EndOperations(comms_[rank_]);
      return s;
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, start_event_, done_event_);
    return ms / 1e3;
  }

  absl::Status Receive(NodeId peer, absl::Span<uint8_t> into) override {
    Staging& s = peers_[peer];
    if (!s.device_set) {
      DMOE_CUDA_OK(cudaSetDevice(options_.cuda_device), "cudaSetDevice");  // per thread
      s.device_set = true;
    }
    const std::string what = absl::StrCat("receive from node ", peer);
    if (stopping_.load()) return absl::CancelledError(what);
    const ncclResult_t r = ncclRecv(s.recv_dev, into.size(), ncclUint8, peer, comms_[peer], s.recv_stream);
    DMOE_RETURN_IF_ERROR(Settle(comms_[peer], r, absl::InfiniteFuture(), what));
    DMOE_CUDA_OK(cudaMemcpyAsync(s.recv_host, s.recv_dev, into.size(), cudaMemcpyDeviceToHost, s.recv_stream), what);
    DMOE_CUDA_OK(cudaEventRecord(s.recv_done, s.recv_stream), what);
    const cudaError_t e = cudaEventSynchronize(s.recv_done);  // sleeps until the peer sent
    if (stopping_.load()) return absl::CancelledError(what);
    DMOE_CUDA_OK(e, what);
    std::memcpy(into.data(), s.recv_host, into.size());
    return absl::OkStatus();
  }

  void Shutdown() override {
    stopping_.store(true);
    // Ends the resident receives (and a stuck send) on every communicator.
    for (ncclComm_t& c : comms_) {
      if (c != nullptr) EndOperations(c);
    }
  }

 private:
  struct Staging {
    void* send_dev = nullptr;
    void* send_host = nullptr;  // pinned
    void* recv_dev = nullptr;
    void* recv_host = nullptr;  // pinned
    cudaStream_t recv_stream = nullptr;
    cudaEvent_t recv_done = nullptr;
    bool device_set = false;  // by its receiving thread
  };

  std::string who() const { return absl::StrCat("NCCL transport of node ", rank_, " on GPU ", options_.cuda_device); }

  // Waits for the group just enqueued, polling (a blocking wait could not time out).
  absl::Status WaitDone(ncclComm_t comm, absl::Time deadline) {
    DMOE_CUDA_OK(cudaEventRecord(done_event_, stream_), "cudaEventRecord");
    for (int polls = 0;; ++polls) {
      const cudaError_t e = cudaEventQuery(done_event_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return CudaError(e, "waiting for NCCL sends");
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm, &async);
      if (async != ncclSuccess && async != ncclInProgress) return NcclError(async, "NCCL sends");
      if (absl::Now() >= deadline) return absl::DeadlineExceededError("NCCL sends not complete in time");
      // Small pieces finish in microseconds; back off for large ones.
      if (polls < 2000) {
        std::this_thread::yield();
      } else {
        absl::SleepFor(absl::Microseconds(50));
      }
    }
  }

  const NcclOptions options_;
  const NodeId rank_;
  const int n_;
  std::vector<ncclComm_t> comms_;
  std::vector<Staging> peers_;  // [rank]; peers_[rank_] unused
  cudaStream_t stream_ = nullptr;
  bool own_stream_ = false;
  cudaEvent_t start_event_ = nullptr;
  cudaEvent_t done_event_ = nullptr;
  absl::Status send_error_;  // SendGroup is called by one thread at a time
  std::atomic<bool> stopping_{false};
};

}  // namespace

void SetNcclDefaultEnv() { setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0); }

absl::StatusOr<std::string> NewNcclUniqueId() {
  SetNcclDefaultEnv();
  ncclUniqueId id;
  if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) return NcclError(r, "ncclGetUniqueId");
  return std::string(id.internal, kNcclUniqueIdBytes);
}

absl::StatusOr<std::unique_ptr<FramedTransport>> CreateNcclTransport(const NcclOptions& options) {
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
  auto channel = std::make_unique<NcclChannel>(options);
  if (absl::Status s = channel->Init(); !s.ok()) return s;
  const uint64_t fingerprint = Fingerprint(options.unique_id);
  const NodeId rank = options.node_id;
  const int n = options.num_nodes;
  FramedTransportOptions framed;
  framed.node_id = rank;
  framed.num_nodes = n;
  framed.frame_limits = options.frame_limits;
  framed.send_timeout = options.send_timeout;
  framed.address = NcclAddress(rank, n, fingerprint);
  framed.check_address = [rank, n, fingerprint](NodeId peer, const std::string& address) -> absl::Status {
    const std::vector<std::string> parts = absl::StrSplit(address, ':');
    int their_rank = -1, their_n = -1;
    if (parts.size() != 4 || parts[0] != "nccl" || !absl::SimpleAtoi(parts[1], &their_rank) ||
        !absl::SimpleAtoi(parts[2], &their_n)) {
      return absl::InvalidArgumentError(
          absl::StrCat("connect to peer ", peer, ": '", address, "' is not an NCCL address (nccl:RANK:N:ID)"));
    }
    if (their_rank != peer) {
      return absl::InvalidArgumentError(absl::StrCat("connect to peer ", peer, ": address '", address,
                                                     "' names rank ", their_rank, " (this node is rank ", rank,
                                                     " of ", n, ")"));
    }
    if (their_n != n || address != NcclAddress(peer, n, fingerprint)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "connect to peer ", peer, ": it joined another NCCL communicator ('", address, "', this one is '",
          NcclAddress(peer, n, fingerprint), "'); NCCL ranks cannot rejoin: restart the cluster"));
    }
    return absl::OkStatus();
  };
  return std::make_unique<FramedTransport>(std::move(framed), std::move(channel));
}

}  // namespace dmoe::transport
