// TLS for dmoe's gRPC endpoints, from PEM files: one place that reads the
// files and builds server and channel credentials, used by dmoe-scheduler's
// client API (--tls-cert/--tls-key/--tls-client-ca) and the CLI's clients
// (--tls-ca/--tls-cert/--tls-key).
#ifndef DMOE_PROTO_GRPC_CREDENTIALS_H_
#define DMOE_PROTO_GRPC_CREDENTIALS_H_

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace dmoe {

// Paths of PEM files; empty means not given.
struct TlsFiles {
  std::string cert;  // certificate chain presented to the peer
  std::string key;   // its private key
  std::string ca;    // CA certificates the peer's certificate must chain to
};

// Insecure without `cert`. With cert and key: TLS; with `ca` as well, every
// client must present a certificate signed by it. INVALID_ARGUMENT when only
// one of cert and key is given or a file holds no PEM block, NOT_FOUND when
// a file cannot be read (messages name the flag: --tls-cert, --tls-key,
// --tls-client-ca).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& files);

// Insecure when nothing is given. Otherwise TLS: the server's certificate
// must chain to `ca` (the system's roots when empty); cert and key, when
// given, are the client's own certificate. Errors as above (--tls-ca,
// --tls-cert, --tls-key).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& files);

}  // namespace dmoe

#endif  // DMOE_PROTO_GRPC_CREDENTIALS_H_
