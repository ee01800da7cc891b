// Talking to a dmoe scheduler's client port from the CLI: one way to dial,
// one way to report a failed call.
#ifndef DMOE_CLI_GRPC_CLIENT_H_
#define DMOE_CLI_GRPC_CLIENT_H_

#include <grpcpp/channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/status.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace dmoe::cli {

// How long a call waits for a connection before failing with UNAVAILABLE
// (gRPC's own default is 20 s per attempt).
inline constexpr absl::Duration kConnectTimeout = absl::Seconds(5);

// OK for "HOST:PORT" with a port in 1..65535; INVALID_ARGUMENT naming
// `flag` and the value otherwise.
absl::Status ValidateServerAddress(absl::string_view flag, const std::string& address);

// A channel to `address` whose connection attempts give up after
// kConnectTimeout. Calls made on it fail fast (UNAVAILABLE) while the
// server cannot be reached; none waits for it to come up. `credentials`:
// insecure by default, else TLS (MakeChannelCredentials); `tls_server_name`,
// when set, is the name the server's certificate must carry instead of the
// host of `address`.
std::shared_ptr<grpc::Channel> DialScheduler(
    const std::string& address,
    std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials(),
    const std::string& tls_server_name = "");

// A failed call as one line: "<what> on <address>: <CODE>: <message>",
// keeping the code (FromGrpcStatus).
absl::Status RpcError(absl::string_view what, const std::string& address, const grpc::Status& status);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_GRPC_CLIENT_H_
