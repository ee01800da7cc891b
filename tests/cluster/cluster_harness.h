// Starts a real dmoe cluster (dmoe-scheduler, attention and expert nodes)
// as child processes on 127.0.0.1 with ports chosen by the kernel, and
// always stops them.
#ifndef DMOE_TESTS_CLUSTER_CLUSTER_HARNESS_H_
#define DMOE_TESTS_CLUSTER_CLUSTER_HARNESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "dmoe/v1/control.grpc.pb.h"
#include "dmoe/v1/generation.grpc.pb.h"

namespace dmoe::testing {

struct ClusterOptions {
  std::string model_dir;
  int attention_nodes = 1;
  int expert_nodes = 1;
  int64_t cache_pages = 64;  // per attention node
  std::vector<std::string> scheduler_flags;
  // Every process serves /metrics on a free port (--metrics-port 0).
  bool metrics = false;
};

class Cluster {
 public:
  // Starts everything and waits until the scheduler serves (bounded).
  static absl::StatusOr<std::unique_ptr<Cluster>> Start(const ClusterOptions& options);
  ~Cluster();  // SIGTERM, then SIGKILL after a grace period; reaps all

  v1::Generation::Stub& client() { return *client_; }
  v1::Coordinator::Stub& coordinator() { return *coordinator_; }
  pid_t scheduler_pid() const { return pids_.empty() ? -1 : pids_[0]; }
  // Every process, in start order (scheduler, attention nodes, expert nodes).
  const std::vector<pid_t>& pids() const { return pids_; }
  // Waits for the scheduler to exit; returns its exit code (-1 on timeout or signal).
  int WaitScheduler(int timeout_ms);
  absl::StatusOr<v1::GetClusterStatsResponse> Stats();
  // With ClusterOptions::metrics: each process's /metrics port on
  // 127.0.0.1, in start order (scheduler, attention nodes, expert nodes).
  const std::vector<int>& metrics_ports() const { return metrics_ports_; }

 private:
  Cluster() = default;
  std::vector<pid_t> pids_;  // scheduler first
  std::vector<int> metrics_ports_;
  std::string dir_;
  std::unique_ptr<v1::Generation::Stub> client_;
  std::unique_ptr<v1::Coordinator::Stub> coordinator_;
};

// Generates to completion; returns the token ids (and the final response).
struct Generated {
  std::vector<int32_t> ids;
  std::string text;
  v1::GenerateResponse last;
  grpc::Status status;
};
Generated GenerateIds(v1::Generation::Stub& stub, const std::vector<int32_t>& prompt, int max_tokens,
                      float temperature = 0.0f, uint64_t seed = 0);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_CLUSTER_CLUSTER_HARNESS_H_
