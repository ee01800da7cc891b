#include "tests/cluster/cluster_harness.h"

#include <grpcpp/grpcpp.h>
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
#include "tests/test_util.h"

namespace dmoe::testing {
namespace {

pid_t Spawn(const std::string& binary, const std::vector<std::string>& args) {
  const pid_t pid = fork();
  if (pid == 0) {
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
    if (waitpid(child, &status, WNOHANG) == child) return -1;
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
  c->pids_.push_back(Spawn("dmoe-scheduler", args));
  const int port = ReadPort(port_file, "port", c->pids_[0], 30000);
  const int control = ReadPort(port_file, "control_port", c->pids_[0], 1000);
  if (port <= 0 || control <= 0) return absl::UnavailableError("dmoe-scheduler did not start");
  const std::string scheduler = absl::StrCat("127.0.0.1:", control);
  std::vector<std::string> port_files = {port_file};
  auto node_args = [&](std::vector<std::string> args) {
    port_files.push_back(absl::StrCat(c->dir_, "/node-", port_files.size(), ".json"));
    args.insert(args.end(), {"--port-file", port_files.back()});
    args.insert(args.end(), metrics_flags.begin(), metrics_flags.end());
    return args;
  };
  for (int i = 0; i < o.attention_nodes; ++i) {
    c->pids_.push_back(Spawn("dmoe-attention-node", node_args({"--model", o.model_dir, "--scheduler", scheduler,
                                                               "--port", "0", "--cache-pages",
                                                               std::to_string(o.cache_pages)})));
  }
  for (int i = 0; i < o.expert_nodes; ++i) {
    c->pids_.push_back(
        Spawn("dmoe-expert-node", node_args({"--model", o.model_dir, "--scheduler", scheduler, "--port", "0"})));
  }
  c->client_ = v1::Generation::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  c->coordinator_ = v1::Coordinator::NewStub(grpc::CreateChannel(scheduler, grpc::InsecureChannelCredentials()));
  // Ready when the stats RPC answers (the serving loop exists).
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < end) {
    if (c->Stats().ok()) {
      // Serving: every node wrote its port file long before it was ready.
      for (size_t i = 0; o.metrics && i < port_files.size(); ++i) {
        const int metrics_port = ReadPort(port_files[i], "metrics_port", c->pids_[i], 5000);
        if (metrics_port <= 0) return absl::UnavailableError(absl::StrCat(port_files[i], ": no metrics_port"));
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
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
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
