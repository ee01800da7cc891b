// The second process of ucx_multiprocess_test:
// `ucx_transport_peer NODE_ID PARENT_PID DETECT_PEER_FAILURE`. Writes its UCX
// address to stdout, reads the test's from stdin, then serves the commands of
// ucx_peer_protocol.h until kStopTag. Dies with its parent (PR_SET_PDEATHSIG).
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "tests/transport/transport_test_util.h"
#include "tests/transport/ucx_peer_protocol.h"
#include "transport/ucx_transport.h"

namespace dmoe::transport::testing {
namespace {

int Fail(const std::string& what, const absl::Status& status) {
  std::cerr << "ucx_transport_peer: " << what << ": " << status << "\n";
  return 1;
}

int Serve(NodeId node_id, pid_t parent, bool detect_peer_failure) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) return 1;  // the parent died before prctl
  SetUcxTestEnv();
  UcxOptions options;
  options.node_id = node_id;
  options.detect_peer_failure = detect_peer_failure;
  auto transport = CreateUcxTransport(options);
  if (!transport.ok()) return Fail("create", transport.status());
  Transport& t = **transport;
  if (absl::Status s = WriteAddress(STDOUT_FILENO, node_id, t.address()); !s.ok()) {
    return Fail("write address", s);
  }
  auto test = ReadAddress(STDIN_FILENO, absl::Seconds(30));
  if (!test.ok()) return Fail("read address", test.status());
  if (absl::Status s = t.Connect(test->first, test->second); !s.ok()) return Fail("connect", s);

  while (true) {
    auto m = t.Receive(0, 0, absl::Seconds(60));
    if (!m.ok()) return Fail("receive", m.status());
    absl::Status s;
    switch (m->tag) {
      case kEchoTag:
        s = t.Send(m->from, kEchoTag, m->payload);
        break;
      case kBurstTag: {
        uint64_t count_size[2] = {0, 0};
        if (m->payload.size() != sizeof count_size) {
          return Fail("burst", absl::InvalidArgumentError("payload is not 16 bytes"));
        }
        std::memcpy(count_size, m->payload.data(), sizeof count_size);
        for (uint64_t i = 0; i < count_size[0] && s.ok(); ++i) {
          s = t.Send(m->from, kBurstReplyTag, MakePayload(node_id, i, count_size[1]));
        }
        break;
      }
      case kStopTag:
        return 0;
      default:
        return Fail("command", absl::InvalidArgumentError(absl::StrCat("tag ", m->tag)));
    }
    if (!s.ok()) return Fail("send", s);
  }
}

}  // namespace
}  // namespace dmoe::transport::testing

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: ucx_transport_peer NODE_ID PARENT_PID DETECT_PEER_FAILURE(0|1)\n";
    return 2;
  }
  return dmoe::transport::testing::Serve(std::atoi(argv[1]), std::atoi(argv[2]),
                                         std::atoi(argv[3]) != 0);
}
