#include "tests/cluster/cluster_harness.h"

#include <grpcpp/grpcpp.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tests/expert_node/node_test_util.h"
#include "tests/test_util.h"

namespace dmoe::testing {
namespace {

pid_t Spawn(const std::string& binary, const std::vector<std::string>& args, const std::string& log = "") {
  const pid_t pid = fork();
  if (pid == 0) {
    if (!log.empty()) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, STDERR_FILENO);
        ::dup2(fd, STDOUT_FILENO);
      }
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
    setenv("UCX_NET_DEVICES", "lo", 0);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 0);
    setenv("DMOE_NUM_THREADS", "1", 0);  // many processes share 2 cores
    std::vector<char*> argv;
    const std::string path = (BinDir() / binary).string();
    argv.push_back(const_cast<char*>(path.c_str()));
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(path.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

// Polls for a port file written by a child (bounded); -1 on timeout or if the child died.
int ReadPort(const std::string& file, const char* key, pid_t child, int timeout_ms) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < end) {
    std::ifstream in(file);
    if (in) {
      nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
      if (!j.is_discarded() && j.contains(key)) return j[key].get<int>();
    }
    int status;
    if (child > 0 && waitpid(child, &status, WNOHANG) == child) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Cluster>> Cluster::Start(const ClusterOptions& o) {
  static int counter = 0;
  auto c = std::unique_ptr<Cluster>(new Cluster());
  c->dir_ = ScratchDir(absl::StrCat("cluster_", ++counter)).string();
  const std::string port_file = c->dir_ + "/scheduler.json";
  std::vector<std::string> args = {"--model", o.model_dir, "--port", "0", "--control-port", "0",
                                   "--attention-nodes", std::to_string(o.attention_nodes),
                                   "--expert-nodes", std::to_string(o.expert_nodes), "--port-file", port_file};
  args.insert(args.end(), o.scheduler_flags.begin(), o.scheduler_flags.end());
  const std::vector<std::string> metrics_flags =
      o.metrics ? std::vector<std::string>{"--metrics-port", "0"} : std::vector<std::string>{};
  args.insert(args.end(), metrics_flags.begin(), metrics_flags.end());
  c->attention_nodes_ = o.attention_nodes;
  auto add = [&](const std::string& binary, const std::vector<std::string>& a, const std::string& pf) {
    c->binaries_.push_back(binary);
    c->args_.push_back(a);
    c->port_files_.push_back(pf);
    c->pids_.push_back(Spawn(binary, a));
  };
  add("dmoe-scheduler", args, port_file);
  const int port = ReadPort(port_file, "port", c->pids_[0], 30000);
  const int control = ReadPort(port_file, "control_port", c->pids_[0], 1000);
  if (port <= 0 || control <= 0) return absl::UnavailableError("dmoe-scheduler did not start");
  // A restarted scheduler comes back on the same ports.
  for (size_t i = 0; i + 1 < c->args_[0].size(); ++i) {
    if (c->args_[0][i] == "--port") c->args_[0][i + 1] = std::to_string(port);
    if (c->args_[0][i] == "--control-port") c->args_[0][i + 1] = std::to_string(control);
  }
  c->client_port_ = port;
  const std::string scheduler = absl::StrCat("127.0.0.1:", control);
  auto node_args = [&](std::vector<std::string> args, const std::string& pf) {
    args.insert(args.end(), {"--port-file", pf});
    args.insert(args.end(), metrics_flags.begin(), metrics_flags.end());
    return args;
  };
  for (int i = 0; i < o.attention_nodes; ++i) {
    const std::string pf = absl::StrCat(c->dir_, "/attention-", i, ".json");
    add("dmoe-attention-node",
        node_args({"--model", o.model_dir, "--scheduler", scheduler, "--port", "0", "--cache-pages",
                   std::to_string(o.cache_pages)},
                  pf),
        pf);
  }
  for (int i = 0; i < o.expert_nodes; ++i) {
    const std::string pf = absl::StrCat(c->dir_, "/expert-", i, ".json");
    add("dmoe-expert-node",
        node_args({"--model", o.model_dir, "--scheduler", scheduler, "--port", "0"}, pf), pf);
  }
  c->client_address_ = absl::StrCat("127.0.0.1:", port);
  c->client_ = v1::Generation::NewStub(grpc::CreateChannel(c->client_address_, grpc::InsecureChannelCredentials()));
  c->coordinator_ = v1::Coordinator::NewStub(grpc::CreateChannel(scheduler, grpc::InsecureChannelCredentials()));
  // Ready when the stats RPC answers (the serving loop exists).
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < end) {
    if (c->Stats().ok()) {
      // Serving: every node wrote its port file long before it was ready.
      for (size_t i = 0; o.metrics && i < c->port_files_.size(); ++i) {
        const int metrics_port = ReadPort(c->port_files_[i], "metrics_port", c->pids_[i], 5000);
        if (metrics_port <= 0) return absl::UnavailableError(absl::StrCat(c->port_files_[i], ": no metrics_port"));
        c->metrics_ports_.push_back(metrics_port);
      }
      return c;
    }
    for (pid_t pid : c->pids_) {
      int status;
      if (waitpid(pid, &status, WNOHANG) == pid) return absl::UnavailableError(absl::StrCat("process ", pid, " exited early"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError("cluster did not become ready within 60 s");
}

absl::StatusOr<v1::GetClusterStatsResponse> Cluster::Stats() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::GetClusterStatsResponse r;
  grpc::Status st = coordinator_->GetClusterStats(&ctx, v1::GetClusterStatsRequest(), &r);
  if (!st.ok()) return absl::UnavailableError(st.error_message());
  return r;
}

int Cluster::WaitScheduler(int timeout_ms) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < end) {
    int status;
    if (waitpid(pids_[0], &status, WNOHANG) == pids_[0]) {
      pids_[0] = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

int Cluster::Slot(Role role, int index) const {
  switch (role) {
    case Role::kScheduler: return 0;
    case Role::kAttention: return 1 + index;
    case Role::kExpert: return 1 + attention_nodes_ + index;
  }
  return 0;
}

pid_t Cluster::pid(Role role, int index) const { return pids_[Slot(role, index)]; }

void Cluster::Kill(Role role, int index) {
  pid_t& pid = pids_[Slot(role, index)];
  if (pid <= 0) return;
  kill(pid, SIGKILL);
  int status;
  waitpid(pid, &status, 0);
  pid = -1;
}

absl::Status Cluster::Restart(Role role, int index) {
  const int slot = Slot(role, index);
  if (pids_[slot] > 0) return absl::FailedPreconditionError("the process still runs");
  std::vector<std::string> args = args_[slot];
  if (role != Role::kScheduler) {
    const int port = ReadPort(port_files_[slot], "port", -1, 1000);
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] == "--port" && port > 0) args[i + 1] = std::to_string(port);
    }
  }
  pids_[slot] = Spawn(binaries_[slot], args);
  return absl::OkStatus();
}

absl::StatusOr<pid_t> Cluster::StartExtra(Role role, int index, int port, const std::string& log_name) {
  const int slot = Slot(role, index);
  std::vector<std::string> args = args_[slot];
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == "--port") args[i + 1] = std::to_string(port);
    if (args[i] == "--port-file") args[i + 1] = absl::StrCat(dir_, "/", log_name, ".json");
  }
  const pid_t pid = Spawn(binaries_[slot], args, absl::StrCat(dir_, "/", log_name, ".log"));
  pids_.push_back(pid);
  return pid;
}

int Cluster::WaitExit(pid_t pid, int timeout_ms) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < end) {
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      for (pid_t& p : pids_) {
        if (p == pid) p = -1;
      }
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // no child-exit fd here
  }
  return -1;
}

absl::StatusOr<std::string> Cluster::NodeAddress(Role role, int index) const {
  const int port = ReadPort(port_files_[Slot(role, index)], "port", -1, 1000);
  if (port <= 0) return absl::NotFoundError("no port file");
  return absl::StrCat("127.0.0.1:", port);
}

absl::Status Cluster::AwaitHealth(bool serving, int timeout_ms) {
  return AwaitHealthStatus(client_address_, serving, absl::Milliseconds(timeout_ms));
}

bool Cluster::AwaitPagesFree(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    absl::StatusOr<v1::GetClusterStatsResponse> stats = Stats();
    bool all = stats.ok();
    for (int i = 0; all && i < stats->attention_pages_free_size(); ++i) {
      all = stats->attention_pages_free(i) == stats->attention_pages_total(i);
    }
    if (all) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // the stats have no change event
  }
  return false;
}

int64_t Cluster::RssKb(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6));
  }
  return -1;
}

Cluster::~Cluster() {
  for (pid_t pid : pids_) {
    if (pid > 0) kill(pid, SIGTERM);
  }
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (pid_t& pid : pids_) {
    while (pid > 0) {
      int status;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
      } else if (std::chrono::steady_clock::now() > end) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        pid = -1;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  }
}

Generated GenerateIds(v1::Generation::Stub& stub, const std::vector<int32_t>& prompt, int max_tokens,
                      float temperature, uint64_t seed) {
  v1::GenerateRequest request;
  for (int32_t id : prompt) request.mutable_token_ids()->add_ids(id);
  request.set_max_tokens(max_tokens);
  request.set_ignore_eos(true);
  request.mutable_sampling()->set_temperature(temperature);
  request.mutable_sampling()->set_seed(seed);
  return GenerateRequest(stub, request, std::chrono::system_clock::now() + std::chrono::seconds(120));
}

Generated GenerateRequest(v1::Generation::Stub& stub, const v1::GenerateRequest& request,
                          std::chrono::system_clock::time_point deadline, grpc::ClientContext* context) {
  grpc::ClientContext own;
  grpc::ClientContext& ctx = context != nullptr ? *context : own;
  ctx.set_deadline(deadline);
  auto reader = stub.Generate(&ctx, request);
  Generated g;
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
    g.ids.insert(g.ids.end(), r.token_ids().begin(), r.token_ids().end());
    g.text += r.text();
    g.last = r;
  }
  g.status = reader->Finish();
  return g;
}

}  // namespace dmoe::testing
