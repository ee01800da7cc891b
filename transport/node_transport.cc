#include "transport/node_transport.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include <algorithm>
#include <map>
#include <vector>

#include "core/log.h"
#include "router/data_plane_tags.h"
#include "transport/framed_transport.h"
#include "transport/ucx_transport.h"
#if DMOE_HAVE_NCCL
#include "transport/nccl_transport.h"
#endif

namespace dmoe::transport {

absl::StatusOr<TransportChoice> ParseTransportChoice(std::string_view name) {
  if (name == "ucx") return TransportChoice::kUcx;
  if (name == "nccl") return TransportChoice::kNccl;
  return absl::InvalidArgumentError(absl::StrCat("--transport '", std::string(name), "' must be ucx or nccl"));
}

bool NcclTransportBuilt() { return DMOE_HAVE_NCCL != 0; }

absl::StatusOr<std::unique_ptr<Transport>> CreateNodeTransport(const NodeTransportOptions& options) {
  if (options.choice == TransportChoice::kUcx) return CreateUcxTransport(UcxOptions{.node_id = options.node_id});
#if DMOE_HAVE_NCCL
  NcclOptions nccl{.node_id = options.node_id,
                   .num_nodes = options.num_nodes,
                   .unique_id = options.nccl_unique_id,
                   .cuda_device = options.gpu};
  absl::StatusOr<std::unique_ptr<FramedTransport>> t = CreateNcclTransport(nccl);
  if (!t.ok()) return t.status();
  return std::unique_ptr<Transport>(std::move(*t));
#else
  return absl::FailedPreconditionError(
      "--transport nccl: this build has no NCCL transport (configure with -DDMOE_CUDA=ON where NCCL is installed)");
#endif
}

void LogSendTimesPerLayer(Transport& transport, const char* component) {
  auto* framed = dynamic_cast<FramedTransport*>(&transport);
  if (framed == nullptr) return;
  std::map<int64_t, std::vector<double>> per_layer;  // layer -> GPU seconds of each send
  uint64_t bytes = 0;
  size_t sends = 0;
  for (const SendRecord& r : framed->TakeSendRecords()) {
    per_layer[router::TagLayer(r.tag)].push_back(r.device_seconds);
    bytes += r.bytes;
    ++sends;
  }
  if (sends == 0) return;
  std::string line;
  for (auto& [layer, t] : per_layer) {
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    absl::StrAppend(&line, line.empty() ? "" : ", ", "L", layer, " ", static_cast<int64_t>(t[t.size() / 2] * 1e6));
  }
  DMOE_LOG(kInfo, component) << "NCCL send GPU time per MoE layer (median us over " << sends << " sends, " << bytes
                             << " bytes): " << line;
}

}  // namespace dmoe::transport
