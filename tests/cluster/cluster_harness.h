// Starts a real dmoe cluster (dmoe-scheduler, attention and expert nodes)
// as child processes on 127.0.0.1 with ports chosen by the kernel, and
// always stops them.
#ifndef DMOE_TESTS_CLUSTER_CLUSTER_HARNESS_H_
#define DMOE_TESTS_CLUSTER_CLUSTER_HARNESS_H_

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
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

// The processes of a cluster: the scheduler, attention node i, expert node i.
enum class Role { kScheduler, kAttention, kExpert };

class Cluster {
 public:
  // Starts everything and waits until the scheduler serves (bounded).
  static absl::StatusOr<std::unique_ptr<Cluster>> Start(const ClusterOptions& options);
  ~Cluster();  // SIGTERM, then SIGKILL after a grace period; reaps all

  // A plaintext client of the client API (see client_port() for others).
  v1::Generation::Stub& client() { return *client_; }
  int client_port() const { return client_port_; }
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

  // The process of `role` (index: among the nodes of that kind, in start order).
  pid_t pid(Role role, int index = 0) const;
  // SIGKILLs it and reaps it.
  void Kill(Role role, int index = 0);
  // Starts it again with the same flags and port(s) (a node: the port it
  // listened on; the scheduler: its client and control ports).
  absl::Status Restart(Role role, int index = 0);
  // Starts one more process of `role` with the flags of `index`, on `port`
  // (0: any); it is stopped with the cluster. Returns its slot in pid order.
  absl::StatusOr<pid_t> StartExtra(Role role, int index, int port, const std::string& log_name);
  // Waits for a process started by StartExtra to exit; its wait status, or
  // -1 after `timeout_ms`.
  int WaitExit(pid_t pid, int timeout_ms);
  // grpc host:port of a node (from its port file).
  absl::StatusOr<std::string> NodeAddress(Role role, int index = 0) const;
  // Waits until the scheduler's client health reports `serving` (bounded).
  absl::Status AwaitHealth(bool serving, int timeout_ms);
  // The pages of finished requests are freed by the step after they end:
  // waits (bounded) until every attention node reports all its pages free.
  bool AwaitPagesFree(absl::Duration timeout);
  // RSS of a process in kB, from /proc/PID/status (-1 if gone).
  static int64_t RssKb(pid_t pid);
  // Where the port files and StartExtra's logs (NAME.log) are.
  const std::string& dir() const { return dir_; }
  // The scheduler's client host:port.
  const std::string& client_address() const { return client_address_; }

 private:
  Cluster() = default;
  int Slot(Role role, int index) const;
  std::vector<pid_t> pids_;  // scheduler first, then attention, then expert nodes, then extras
  std::vector<std::string> binaries_;
  std::vector<std::vector<std::string>> args_;
  std::vector<std::string> port_files_;
  int attention_nodes_ = 0;
  int client_port_ = 0;
  std::vector<int> metrics_ports_;
  std::string dir_;
  std::string client_address_;
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
// The same, for any request; `context` (optional) lets the caller cancel.
Generated GenerateRequest(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                          std::chrono::system_clock::time_point deadline, grpc::ClientContext* context = nullptr);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_CLUSTER_CLUSTER_HARNESS_H_
