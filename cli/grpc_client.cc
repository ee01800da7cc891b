#include "cli/grpc_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <cstdint>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "proto/grpc_status.h"

namespace dmoe::cli {

absl::Status ValidateServerAddress(absl::string_view flag, const std::string& address) {
  const size_t colon = address.rfind(':');
  int64_t port = 0;
  if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 1 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " = '", address, "' is not HOST:PORT with a port in 1..65535"));
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::Channel> DialScheduler(const std::string& address,
                                             std::shared_ptr<grpc::ChannelCredentials> credentials,
                                             const std::string& tls_server_name) {
  grpc::ChannelArguments args;
  // gRPC's minimum connect timeout per attempt (GRPC_ARG_MIN_RECONNECT_BACKOFF_MS
  // sets it): an unreachable host fails after this instead of 20 s.
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, static_cast<int>(absl::ToInt64Milliseconds(kConnectTimeout)));
  if (!tls_server_name.empty()) args.SetSslTargetNameOverride(tls_server_name);
  return grpc::CreateCustomChannel(address, std::move(credentials), args);
}

absl::Status RpcError(absl::string_view what, const std::string& address, const grpc::Status& status) {
  const absl::Status s = FromGrpcStatus(status);
  return absl::Status(s.code(),
                      absl::StrCat(what, " on ", address, ": ", absl::StatusCodeToString(s.code()), ": ", s.message()));
}

}  // namespace dmoe::cli
