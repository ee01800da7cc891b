#include "transport/node_transport.h"

#include <utility>

#include "absl/strings/str_cat.h"
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
  absl::StatusOr<std::unique_ptr<NcclTransport>> t = CreateNcclTransport(nccl);
  if (!t.ok()) return t.status();
  return std::unique_ptr<Transport>(std::move(*t));
#else
  return absl::FailedPreconditionError(
      "--transport nccl: this build has no NCCL transport (configure with -DDMOE_CUDA=ON where NCCL is installed)");
#endif
}

}  // namespace dmoe::transport
