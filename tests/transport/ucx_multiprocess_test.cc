// UCX between two processes: this test (node 0) and ucx_transport_peer (node 1), addresses
// exchanged over pipes as the control plane would. Also: a peer killed with SIGKILL becomes
// UNAVAILABLE in bounded time, and the surviving side neither hangs nor crashes.
#include <signal.h>
#include <spawn.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tests/transport/transport_test_util.h"
#include "tests/transport/ucx_peer_protocol.h"
#include "transport/ucx_transport.h"

extern char** environ;

namespace dmoe::transport {
namespace {

using ::dmoe::transport::testing::CheckPayload;
using ::dmoe::transport::testing::kBurstReplyTag;
using ::dmoe::transport::testing::kBurstTag;
using ::dmoe::transport::testing::kEchoTag;
using ::dmoe::transport::testing::kStopTag;
using ::dmoe::transport::testing::MakePayload;
using ::testing::HasSubstr;

constexpr NodeId kTestNode = 0;
constexpr NodeId kPeerNode = 1;
constexpr uint64_t kAll = ~uint64_t{0};
constexpr absl::Duration kTimeout = absl::Seconds(10);
// Without peer failure detection a dead peer is noticed through this timeout only.
constexpr absl::Duration kSendTimeout = absl::Seconds(2);

std::string PeerFailureMode(bool detect_peer_failure) {
  return detect_peer_failure ? "ErrModePeer" : "ErrModeNone";
}

// ucx_transport_peer running as a child; killed and reaped at destruction if still running.
class PeerProcess {
 public:
  ~PeerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      int status;
      waitpid(pid_, &status, 0);
    }
    for (int fd : {to_peer_, from_peer_, pidfd_}) {
      if (fd >= 0) close(fd);
    }
  }

  absl::Status Spawn(NodeId node, bool detect_peer_failure) {
    int in[2], out[2];  // in: test -> peer stdin, out: peer stdout -> test
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) {
      return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in[0], STDIN_FILENO);
    posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    const std::string path = (dmoe::testing::BinDir() / "ucx_transport_peer").string();
    const std::string node_arg = std::to_string(node);
    const std::string parent_arg = std::to_string(getpid());
    const std::string mode_arg = detect_peer_failure ? "1" : "0";
    char* argv[] = {const_cast<char*>(path.c_str()), const_cast<char*>(node_arg.c_str()),
                    const_cast<char*>(parent_arg.c_str()), const_cast<char*>(mode_arg.c_str()),
                    nullptr};
    // UCX_WARN_UNUSED_ENV_VARS only works from the start of a process: give it to the peer.
    std::string quiet = "UCX_WARN_UNUSED_ENV_VARS=n";
    std::vector<char*> env = {quiet.data()};
    for (char** e = environ; *e != nullptr; ++e) env.push_back(*e);
    env.push_back(nullptr);
    const int rc = posix_spawn(&pid_, path.c_str(), &actions, nullptr, argv, env.data());
    posix_spawn_file_actions_destroy(&actions);
    close(in[0]);
    close(out[1]);
    to_peer_ = in[1];
    from_peer_ = out[0];
    if (rc != 0) {
      pid_ = -1;
      return absl::InternalError(absl::StrCat("posix_spawn ", path, ": ", std::strerror(rc)));
    }
    // glibc 2.36 declares pidfd_open without extern "C"; call the system call directly.
    pidfd_ = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
    if (pidfd_ < 0) return absl::InternalError(absl::StrCat("pidfd_open: ", std::strerror(errno)));
    return absl::OkStatus();
  }

  int to_peer() const { return to_peer_; }
  int from_peer() const { return from_peer_; }

  void Kill() {
    ASSERT_EQ(kill(pid_, SIGKILL), 0);
    EXPECT_TRUE(WaitExit(kTimeout).has_value());
  }

  // The wait status once the peer exits within `timeout` (reaped), else nullopt.
  std::optional<int> WaitExit(absl::Duration timeout) {
    pollfd pfd{pidfd_, POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) != 1) {
      return std::nullopt;
    }
    int status = 0;
    if (waitpid(pid_, &status, 0) != pid_) return std::nullopt;
    pid_ = -1;
    return status;
  }

 private:
  pid_t pid_ = -1;
  int pidfd_ = -1;
  int to_peer_ = -1;
  int from_peer_ = -1;
};

// Parameter: UcxOptions::detect_peer_failure, in both processes.
class UcxMultiProcessTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    testing::SetUcxTestEnv();
    UcxOptions options;
    options.node_id = kTestNode;
    options.detect_peer_failure = GetParam();
    options.send_timeout = kSendTimeout;
    auto transport = CreateUcxTransport(options);
    ASSERT_TRUE(transport.ok()) << transport.status();
    transport_ = std::move(transport).value();
    absl::Status spawned = peer_.Spawn(kPeerNode, GetParam());
    ASSERT_TRUE(spawned.ok()) << spawned;
    ASSERT_TRUE(testing::WriteAddress(peer_.to_peer(), kTestNode, transport_->address()).ok());
    auto peer_address = testing::ReadAddress(peer_.from_peer(), kTimeout);
    ASSERT_TRUE(peer_address.ok()) << peer_address.status();
    ASSERT_EQ(peer_address->first, kPeerNode);
    ASSERT_TRUE(transport_->Connect(kPeerNode, peer_address->second).ok());
  }

  // Sends `payload` to the peer and returns its echo.
  absl::StatusOr<Message> Echo(const std::vector<uint8_t>& payload) {
    if (absl::Status s = transport_->Send(kPeerNode, kEchoTag, payload); !s.ok()) return s;
    return transport_->Receive(kEchoTag, kAll, kTimeout);
  }

  std::unique_ptr<Transport> transport_;
  PeerProcess peer_;  // declared last: killed before transport_ closes
};

TEST_P(UcxMultiProcessTest, EchoesEverySizeIntact) {
  const std::vector<size_t> sizes = {0, 1, 4096, 1 << 20, 8 << 20};
  for (size_t k = 0; k < sizes.size(); ++k) {
    const std::vector<uint8_t> payload = MakePayload(kTestNode, k, sizes[k]);
    auto echo = Echo(payload);
    ASSERT_TRUE(echo.ok()) << echo.status();
    EXPECT_EQ(echo->from, kPeerNode);
    EXPECT_TRUE(echo->payload == payload) << "size " << sizes[k];
  }
}

TEST_P(UcxMultiProcessTest, PeerBurstsArriveInOrderWithItsId) {
  struct Burst {
    uint64_t count, size;
  };
  for (const Burst burst : {Burst{300, 4096}, Burst{3, 8 << 20}, Burst{50, 0}}) {
    const uint64_t command[2] = {burst.count, burst.size};
    ASSERT_TRUE(transport_
                    ->Send(kPeerNode, kBurstTag,
                           {reinterpret_cast<const uint8_t*>(command), sizeof command})
                    .ok());
    for (uint64_t i = 0; i < burst.count; ++i) {
      auto m = transport_->Receive(kBurstReplyTag, kAll, kTimeout);
      ASSERT_TRUE(m.ok()) << m.status();
      ASSERT_EQ(CheckPayload(*m, kPeerNode, i, burst.size), "");
    }
  }
}

// Reported, not asserted: round trips of a 4 KiB and a 1 MiB message (the peer echoes).
TEST_P(UcxMultiProcessTest, RoundTripLatency) {
  for (const auto& [size, rounds] : {std::pair<size_t, int>{4096, 1000}, {1 << 20, 200}}) {
    const std::vector<uint8_t> payload = MakePayload(kTestNode, 0, size);
    std::vector<double> us;
    for (int r = 0; r < rounds + rounds / 10; ++r) {  // the first tenth warms up
      const absl::Time start = absl::Now();
      auto echo = Echo(payload);
      const absl::Duration rtt = absl::Now() - start;
      ASSERT_TRUE(echo.ok()) << echo.status();
      ASSERT_EQ(echo->payload.size(), size);
      if (r >= rounds / 10) us.push_back(absl::ToDoubleMicroseconds(rtt));
    }
    std::sort(us.begin(), us.end());
    const std::string line =
        absl::StrCat("UCX (", PeerFailureMode(GetParam()), ") round trip ", size, " bytes over ", rounds, " rounds: median ",
                     us[us.size() / 2], " us, p10 ", us[us.size() / 10], " us, p90 ",
                     us[us.size() * 9 / 10], " us");
    std::cout << line << std::endl;
    RecordProperty(absl::StrCat("rtt_median_us_", size), std::to_string(us[us.size() / 2]));
  }
}

TEST_P(UcxMultiProcessTest, PeerStopsCleanly) {
  ASSERT_TRUE(transport_->Send(kPeerNode, kStopTag, {}).ok());
  const std::optional<int> status = peer_.WaitExit(kTimeout);
  ASSERT_TRUE(status.has_value()) << "the peer did not exit after kStopTag";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
}

TEST_P(UcxMultiProcessTest, KilledPeerBecomesUnavailableAndReceiveTimesOut) {
  auto echo = Echo(MakePayload(kTestNode, 0, 4096));  // the connection is up
  ASSERT_TRUE(echo.ok()) << echo.status();
  peer_.Kill();

  // The first send after the kill is rendezvous-sized: it must fail, not hang. Eager sends may
  // still "succeed" (into the dead peer's shared-memory queue) until UCX notices the death.
  const absl::Time killed = absl::Now();
  absl::Status send = transport_->Send(kPeerNode, kEchoTag, MakePayload(kTestNode, 1, 8 << 20));
  int sends = 1;
  while (send.ok() && absl::Now() - killed < absl::Seconds(15)) {
    auto m = transport_->Receive(kEchoTag, kAll, absl::Milliseconds(20));
    EXPECT_EQ(m.status().code(), absl::StatusCode::kDeadlineExceeded) << m.status();
    send = transport_->Send(kPeerNode, kEchoTag, MakePayload(kTestNode, 2, 4096));
    ++sends;
  }
  const absl::Duration detected = absl::Now() - killed;
  std::cout << PeerFailureMode(GetParam()) << ": dead peer detected after " << absl::FormatDuration(detected) << " (" << sends
            << " sends): " << send << std::endl;
  EXPECT_EQ(send.code(), absl::StatusCode::kUnavailable) << send;
  EXPECT_THAT(send.message(), HasSubstr("peer 1"));
  EXPECT_LT(detected, absl::Seconds(15));
  if (!GetParam()) EXPECT_GE(detected, kSendTimeout);  // noticed through the timeout

  // From now on failing is immediate, for any size, and Receive still times out cleanly.
  const absl::Time start = absl::Now();
  EXPECT_EQ(transport_->Send(kPeerNode, kEchoTag, MakePayload(kTestNode, 3, 8 << 20)).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(transport_->Send(kPeerNode, kEchoTag, {}).code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_EQ(transport_->Receive(0, 0, absl::Milliseconds(20)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

// A reply expected from a peer that dies: ReceiveFrom returns UNAVAILABLE naming it as soon as
// the transport knows, long before its timeout (with peer failure detection; without it the
// transport learns nothing, so the wait runs to its end).
TEST_P(UcxMultiProcessTest, ReceiveFromADeadPeerFailsFast) {
  ASSERT_TRUE(Echo(MakePayload(kTestNode, 0, 4096)).ok());
  if (!GetParam()) GTEST_SKIP() << "needs peer failure detection";
  peer_.Kill();
  const NodeId senders[] = {kPeerNode};
  const absl::Time start = absl::Now();
  auto m = transport_->ReceiveFrom(senders, kEchoTag, kAll, absl::Seconds(60));
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();
  EXPECT_THAT(m.status().message(), HasSubstr("peer 1 unavailable"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
}

// A node restarts with a new address: Connect replaces the old endpoint and traffic resumes.
TEST_P(UcxMultiProcessTest, RestartedPeerIsReachableAfterConnect) {
  ASSERT_TRUE(Echo(MakePayload(kTestNode, 0, 4096)).ok());
  peer_.Kill();
  PeerProcess restarted;
  ASSERT_TRUE(restarted.Spawn(kPeerNode, GetParam()).ok());
  ASSERT_TRUE(testing::WriteAddress(restarted.to_peer(), kTestNode, transport_->address()).ok());
  auto address = testing::ReadAddress(restarted.from_peer(), kTimeout);
  ASSERT_TRUE(address.ok()) << address.status();
  ASSERT_TRUE(transport_->Connect(kPeerNode, address->second).ok());
  for (const size_t size : {size_t{4096}, size_t{8} << 20}) {
    const std::vector<uint8_t> payload = MakePayload(kTestNode, size, size);
    auto echo = Echo(payload);
    ASSERT_TRUE(echo.ok()) << echo.status();
    EXPECT_TRUE(echo->payload == payload) << "size " << size;
  }
}

INSTANTIATE_TEST_SUITE_P(PeerFailureDetection, UcxMultiProcessTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return PeerFailureMode(info.param);
                         });

}  // namespace
}  // namespace dmoe::transport
