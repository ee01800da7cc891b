// The data plane a node binary creates once registration gave it its node id: UCX (host
// memory, any machine) or NCCL (GPU to GPU, where built). One function for both node binaries.
#ifndef DMOE_TRANSPORT_NODE_TRANSPORT_H_
#define DMOE_TRANSPORT_NODE_TRANSPORT_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "transport/transport.h"

namespace dmoe::transport {

enum class TransportChoice { kUcx, kNccl };

// "ucx" or "nccl" (the --transport flag); INVALID_ARGUMENT otherwise.
absl::StatusOr<TransportChoice> ParseTransportChoice(std::string_view name);

// Whether this build has the NCCL transport (DMOE_CUDA=ON and NCCL found).
bool NcclTransportBuilt();

struct NodeTransportOptions {
  TransportChoice choice = TransportChoice::kUcx;
  NodeId node_id = 0;
  // NCCL: the communicator's size and unique id (from RegisterNodeResponse) and this node's GPU.
  int num_nodes = 0;
  std::string nccl_unique_id;
  int gpu = 0;
};

// FAILED_PRECONDITION for NCCL in a build without it; otherwise what CreateUcxTransport or
// CreateNcclTransport answer.
absl::StatusOr<std::unique_ptr<Transport>> CreateNodeTransport(const NodeTransportOptions& options);

// For a framed (NCCL) transport: logs (one line, under `component`) the GPU time of its sends per MoE
// layer (tags as router/data_plane_tags.h lays them out), median over the steps since the last
// call. Nothing for other transports.
void LogSendTimesPerLayer(Transport& transport, const char* component);

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_NODE_TRANSPORT_H_
