#include "tests/transport/transport_test_util.h"

#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "tests/transport/fake_piece_channel.h"
#include "transport/framed_transport.h"
#include "transport/in_process_transport.h"
#include "transport/ucx_transport.h"
#if DMOE_HAVE_NCCL
#include <thread>

#include "core/cuda/cuda_backend.h"
#include "transport/nccl_transport.h"
#endif

namespace dmoe::transport::testing {
namespace {

uint8_t PayloadByte(NodeId sender, uint64_t seq, size_t i) {
  return static_cast<uint8_t>(sender * 131 + seq * 29 + i + (i >> 8) * 7);
}

absl::Status ConnectAll(const std::vector<std::unique_ptr<Transport>>& cluster) {
  for (const auto& from : cluster) {
    for (const auto& to : cluster) {
      if (from != to) DMOE_RETURN_IF_ERROR(from->Connect(to->node_id(), to->address()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

void SetUcxTestEnv() {
  // Read by ucp_config_read, so setting it before the first transport is early enough. Not so
  // UCX_WARN_UNUSED_ENV_VARS: libucs reads it when it is loaded, and setting it later makes UCX
  // warn about that very variable. The peer process gets it at exec (ucx_multiprocess_test).
  setenv("UCX_NET_DEVICES", "lo", /*overwrite=*/0);
}

std::vector<uint8_t> MakePayload(NodeId sender, uint64_t seq, size_t size) {
  std::vector<uint8_t> payload(size);
  for (size_t i = 0; i < size; ++i) payload[i] = PayloadByte(sender, seq, i);
  return payload;
}

std::string CheckPayload(const Message& message, NodeId sender, uint64_t seq, size_t size) {
  const std::string what = absl::StrCat("message ", seq, " from node ", sender);
  if (message.from != sender) {
    return absl::StrCat(what, ": arrived with from=", message.from);
  }
  if (message.payload.size() != size) {
    return absl::StrCat(what, ": ", message.payload.size(), " bytes, expected ", size);
  }
  for (size_t i = 0; i < size; ++i) {
    if (message.payload[i] != PayloadByte(sender, seq, i)) {
      return absl::StrCat(what, ": byte ", i, " is ", int{message.payload[i]}, ", expected ",
                          int{PayloadByte(sender, seq, i)});
    }
  }
  return "";
}

TransportKind InProcessKind() {
  return {"InProcess", [](int n) -> absl::StatusOr<std::vector<std::unique_ptr<Transport>>> {
            InProcessFabric fabric;  // endpoints keep the fabric's state alive
            std::vector<std::unique_ptr<Transport>> cluster;
            for (NodeId id = 0; id < n; ++id) cluster.push_back(fabric.CreateEndpoint(id));
            DMOE_RETURN_IF_ERROR(ConnectAll(cluster));
            return cluster;
          }};
}

TransportKind UcxKind(bool detect_peer_failure) {
  return {detect_peer_failure ? "UcxErrModePeer" : "UcxErrModeNone",
          [detect_peer_failure](int n) -> absl::StatusOr<std::vector<std::unique_ptr<Transport>>> {
            SetUcxTestEnv();
            std::vector<std::unique_ptr<Transport>> cluster;
            for (NodeId id = 0; id < n; ++id) {
              UcxOptions options;
              options.node_id = id;
              options.detect_peer_failure = detect_peer_failure;
              DMOE_ASSIGN_OR_RETURN(std::unique_ptr<Transport> t, CreateUcxTransport(options));
              cluster.push_back(std::move(t));
            }
            DMOE_RETURN_IF_ERROR(ConnectAll(cluster));
            return cluster;
          }};
}

TransportKind FramedFakeKind(uint32_t chunk_bytes) {
  return {"FramedFake", [chunk_bytes](int n) -> absl::StatusOr<std::vector<std::unique_ptr<Transport>>> {
            FakePieceFabric fabric(n);  // channels keep its state alive
            std::vector<std::unique_ptr<Transport>> cluster;
            for (NodeId id = 0; id < n; ++id) {
              FramedTransportOptions o{.node_id = id, .num_nodes = n, .address = absl::StrCat("fake:", id)};
              o.frame_limits.chunk_bytes = o.frame_limits.max_chunk_bytes = chunk_bytes;
              o.check_address = [](NodeId peer, const std::string& address) {
                return address == absl::StrCat("fake:", peer)
                           ? absl::OkStatus()
                           : absl::InvalidArgumentError(absl::StrCat("bad address ", address));
              };
              cluster.push_back(std::make_unique<FramedTransport>(std::move(o), fabric.Channel(id)));
            }
            DMOE_RETURN_IF_ERROR(ConnectAll(cluster));
            return cluster;
          }};
}

void SetNcclTestEnv() { setenv("NCCL_SOCKET_IFNAME", "lo", /*overwrite=*/0); }

#if DMOE_HAVE_NCCL
TransportKind NcclKind() {
  return {"Nccl", [](int n) -> absl::StatusOr<std::vector<std::unique_ptr<Transport>>> {
            absl::StatusOr<std::vector<cuda::CudaDeviceInfo>> devices = cuda::ListDevices();
            if (!devices.ok() || static_cast<int>(devices->size()) < n) {
              return absl::FailedPreconditionError(
                  absl::StrCat("the NCCL transport test needs ", n, " GPUs (one per node), found ",
                               devices.ok() ? absl::StrCat(devices->size())
                                            : absl::StrCat("none: ", devices.status().message())));
            }
            SetNcclTestEnv();
            DMOE_ASSIGN_OR_RETURN(const std::string unique_id, NewNcclUniqueId());
            // Every rank blocks in CreateNcclTransport until all have joined: one thread each.
            std::vector<absl::StatusOr<std::unique_ptr<FramedTransport>>> made(n);  // UNKNOWN until set
            std::vector<std::thread> threads;
            for (NodeId rank = 0; rank < n; ++rank) {
              threads.emplace_back([&, rank] {
                made[rank] = CreateNcclTransport(
                    NcclOptions{.node_id = rank, .num_nodes = n, .unique_id = unique_id, .cuda_device = rank});
              });
            }
            for (std::thread& t : threads) t.join();
            std::vector<std::unique_ptr<Transport>> cluster;
            for (auto& m : made) {
              if (!m.ok()) return m.status();
              cluster.push_back(std::move(*m));
            }
            DMOE_RETURN_IF_ERROR(ConnectAll(cluster));
            return cluster;
          }};
}
#endif

}  // namespace dmoe::transport::testing
