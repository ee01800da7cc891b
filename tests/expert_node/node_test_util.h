// Helpers for tests that run the node binaries (dmoe-expert-node,
// dmoe-attention-node) as child processes: a fake scheduler Coordinator, a
// child process handle, and a grpc.health.v1 watcher.
#ifndef DMOE_TESTS_EXPERT_NODE_NODE_TEST_UTIL_H_
#define DMOE_TESTS_EXPERT_NODE_NODE_TEST_UTIL_H_

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dmoe/v1/control.grpc.pb.h"

namespace dmoe::testing {

// The scheduler's Coordinator service as the node binaries expect it
// (node/cluster_join.h, dmoe::node): ids by kind and order
// (attention nodes 0..N-1, expert nodes N..N+M-1, the lowest free id of the
// kind first), a second RegisterNode with the same grpc_address returns the
// same id and records the transport address, GetCluster answers at once
// (complete when every id is taken) or, as a long poll, once a registration
// moved the epoch. Serves on 127.0.0.1:0. Thread-safe.
class FakeCoordinator final : public v1::Coordinator::Service {
 public:
  // expert_shards[i]: the experts of expert node i (node id N + i).
  FakeCoordinator(int num_attention_nodes, std::vector<std::vector<int32_t>> expert_shards);
  ~FakeCoordinator() override;

  // A node that is not a child process (e.g. the test's own transport).
  void AddNode(int32_t node_id, v1::NodeKind kind, const std::string& transport_address);
  // host:port to pass as --scheduler.
  absl::StatusOr<std::string> Start();

  // Waits until `count` NodeReady calls arrived; false on timeout.
  bool AwaitReady(int count, absl::Duration timeout);
  // Waits until `done(tokens, steps)` over the sum of node_id's load reports.
  bool AwaitLoad(int32_t node_id, const std::function<bool(const std::vector<int64_t>&, int64_t)>& done,
                 absl::Duration timeout);
  // Every RegisterNode request, in arrival order.
  std::vector<v1::RegisterNodeRequest> registrations();
  // The node registered (or added) as `node_id`.
  std::optional<v1::ClusterNode> node(int32_t node_id);
  std::map<int32_t, int64_t> ready_weight_bytes();

  grpc::Status RegisterNode(grpc::ServerContext*, const v1::RegisterNodeRequest* request,
                            v1::RegisterNodeResponse* reply) override;
  grpc::Status NodeReady(grpc::ServerContext*, const v1::NodeReadyRequest* request, v1::NodeReadyResponse*) override;
  grpc::Status GetCluster(grpc::ServerContext*, const v1::GetClusterRequest*, v1::GetClusterResponse* reply) override;
  grpc::Status ReportExpertLoad(grpc::ServerContext*, const v1::ExpertLoadReport* report, v1::ExpertLoadAck*) override;

 private:
  const int num_attention_;
  const std::vector<std::vector<int32_t>> shards_;
  absl::Mutex mu_;
  std::map<int32_t, v1::ClusterNode> nodes_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::RegisterNodeRequest> registrations_ ABSL_GUARDED_BY(mu_);
  std::map<int32_t, int64_t> ready_ ABSL_GUARDED_BY(mu_);
  std::map<int32_t, std::vector<int64_t>> load_ ABSL_GUARDED_BY(mu_);
  std::map<int32_t, int64_t> steps_ ABSL_GUARDED_BY(mu_);
  int64_t epoch_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<grpc::Server> server_;
};

// A binary of build/bin run as a child, its stdout and stderr in `log`.
// Killed (SIGKILL) and reaped on destruction if still running.
class NodeProcess {
 public:
  NodeProcess() = default;
  ~NodeProcess();
  NodeProcess(const NodeProcess&) = delete;
  NodeProcess& operator=(const NodeProcess&) = delete;

  absl::Status Spawn(const std::string& binary, const std::vector<std::string>& args, const std::filesystem::path& log);
  // Sends `signal`; false if the process is gone.
  bool Signal(int signal);
  // The wait status once it exits within `timeout` (reaped), else nullopt.
  std::optional<int> WaitExit(absl::Duration timeout);
  // The log so far (for failure messages).
  std::string Log() const;
  bool running() const { return pid_ > 0; }

 private:
  pid_t pid_ = -1;
  int pidfd_ = -1;
  std::filesystem::path log_;
};

// Watches grpc.health.v1 of `address` (service "") until it reports SERVING;
// the last status seen, or an error, after `timeout`.
absl::Status AwaitServing(const std::string& address, absl::Duration timeout);
// The same until it reports SERVING (`serving`) or anything else (!serving).
absl::Status AwaitHealthStatus(const std::string& address, bool serving, absl::Duration timeout);

// The port of a {"port": P} file.
absl::StatusOr<int> ReadPortFile(const std::filesystem::path& path);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_EXPERT_NODE_NODE_TEST_UTIL_H_
