#include "tests/transport/ucx_peer_protocol.h"

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/status_macros.h"

namespace dmoe::transport::testing {
namespace {

absl::Status WriteAll(int fd, const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::UnavailableError(absl::StrCat("pipe write: ", std::strerror(errno)));
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status ReadAll(int fd, void* data, size_t size, absl::Time deadline) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    pollfd pfd{fd, POLLIN, 0};
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0) return absl::DeadlineExceededError("pipe read: timed out");
    if (poll(&pfd, 1, static_cast<int>(ms)) == 0) continue;  // re-check the deadline
    const ssize_t n = read(fd, p, size);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) return absl::UnavailableError(absl::StrCat("pipe read: ", std::strerror(errno)));
    if (n == 0) return absl::UnavailableError("pipe read: the other side closed it");
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteAddress(int fd, NodeId node, const std::string& address) {
  const int32_t id = node;
  const uint32_t length = static_cast<uint32_t>(address.size());
  DMOE_RETURN_IF_ERROR(WriteAll(fd, &id, sizeof id));
  DMOE_RETURN_IF_ERROR(WriteAll(fd, &length, sizeof length));
  return WriteAll(fd, address.data(), address.size());
}

absl::StatusOr<std::pair<NodeId, std::string>> ReadAddress(int fd, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  int32_t id = 0;
  uint32_t length = 0;
  DMOE_RETURN_IF_ERROR(ReadAll(fd, &id, sizeof id, deadline));
  DMOE_RETURN_IF_ERROR(ReadAll(fd, &length, sizeof length, deadline));
  if (length > (1u << 20)) {
    return absl::InvalidArgumentError(absl::StrCat("address of ", length, " bytes"));
  }
  std::string address(length, '\0');
  DMOE_RETURN_IF_ERROR(ReadAll(fd, address.data(), length, deadline));
  return std::make_pair(NodeId{id}, std::move(address));
}

}  // namespace dmoe::transport::testing
