// absl::Status <-> grpc::Status, in one place. The codes are numerically
// equal; the message is kept.
#ifndef DMOE_PROTO_GRPC_STATUS_H_
#define DMOE_PROTO_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace dmoe {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace dmoe

#endif  // DMOE_PROTO_GRPC_STATUS_H_
