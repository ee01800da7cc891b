// The cluster commands of the dmoe CLI (docs/cli.md): `up`, `generate
// --server`, `bench`, run as a user runs them.
//
// `dmoe up` is tested against fake servers: this test binary itself, run
// under the names dmoe-scheduler / dmoe-attention-node / dmoe-expert-node
// (symlinks in a scratch dir that DMOE_SERVER_BIN_DIR points at). The fake
// scheduler serves grpc.health.v1 and a canned Generation service, so the
// whole client path runs. The fakes take orders from DMOE_FAKE_* variables
// and append what they see to $DMOE_FAKE_EVENTS. The RealCluster tests run
// the real servers on tests/golden/tiny-v3; they skip while those are not
// built beside dmoe.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "cli/bench_stats.h"
#include "dmoe/v1/control.grpc.pb.h"
#include "dmoe/v1/generation.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/core/model_test_util.h"
#include "tests/expert_node/node_test_util.h"
#include "tests/test_util.h"

extern char** environ;

namespace dmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------
// The fake servers.

std::string EnvOr(const char* name, const std::string& def = "") {
  const char* v = std::getenv(name);
  return v == nullptr ? def : v;
}

void AppendEvent(const std::string& line) {
  const std::string path = EnvOr("DMOE_FAKE_EVENTS");
  if (path.empty()) return;
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  const std::string text = line + "\n";
  [[maybe_unused]] ssize_t n = ::write(fd, text.data(), text.size());
  ::close(fd);
}

void WritePortFile(const std::string& path, const json& j) {
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << j.dump();
  fs::rename(tmp, path);
}

// Generates ids (sum(prompt) + seed + i) % 512, one response per token, a
// millisecond apart; text "t<id> " per token.
class FakeGeneration final : public v1::Generation::Service {
 public:
  FakeGeneration(int attention_nodes, int expert_nodes, std::string balance)
      : attention_nodes_(attention_nodes), expert_nodes_(expert_nodes), balance_(std::move(balance)) {}

  grpc::Status Generate(grpc::ServerContext*, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    if (request->max_tokens() < 1) return {grpc::StatusCode::INVALID_ARGUMENT, "max_tokens must be >= 1"};
    int64_t sum = static_cast<int64_t>(request->sampling().seed());
    for (int32_t id : request->token_ids().ids()) sum += id;
    for (unsigned char c : request->text()) sum += c;
    for (int i = 0; i < request->max_tokens(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      v1::GenerateResponse response;
      const int32_t id = static_cast<int32_t>((sum + i) % 512);
      response.add_token_ids(id);
      response.set_text("t" + std::to_string(id) + " ");
      if (i + 1 == request->max_tokens()) response.set_finish_reason(v1::FINISH_REASON_LENGTH);
      if (!writer->Write(response)) break;
    }
    return grpc::Status::OK;
  }
  grpc::Status Tokenize(grpc::ServerContext*, const v1::TokenizeRequest*, v1::TokenizeResponse*) override {
    return {grpc::StatusCode::UNIMPLEMENTED, "fake"};
  }
  grpc::Status GetModelInfo(grpc::ServerContext*, const v1::GetModelInfoRequest*, v1::ModelInfo* info) override {
    info->set_name("fake");
    info->set_vocab_size(512);
    info->set_max_position_embeddings(256);
    info->set_attention_nodes(attention_nodes_);
    info->set_expert_nodes(expert_nodes_);
    info->set_balance_mode(balance_);
    return grpc::Status::OK;
  }

 private:
  const int attention_nodes_, expert_nodes_;
  const std::string balance_;
};

// The control port's stats, as far as `dmoe up` reads them.
class FakeCoordinator final : public v1::Coordinator::Service {
 public:
  explicit FakeCoordinator(std::string balance) : balance_(std::move(balance)) {}
  grpc::Status GetClusterStats(grpc::ServerContext*, const v1::GetClusterStatsRequest*,
                               v1::GetClusterStatsResponse* stats) override {
    stats->set_balance_mode(balance_);
    return grpc::Status::OK;
  }

 private:
  const std::string balance_;
};

// Runs a fake server for `role` ("scheduler", "attention", "expert") until
// SIGTERM; returns its exit code.
int RunFake(const std::string& role, const std::vector<std::string>& argv) {
  std::map<std::string, std::string> flags;
  for (size_t i = 1; i + 1 < argv.size(); i += 2) flags[argv[i].substr(2)] = argv[i + 1];
  std::string line = "start";
  for (const std::string& a : argv) line += " " + a;
  AppendEvent(line);
  if (EnvOr("DMOE_FAKE_FAIL") == role) {
    std::this_thread::sleep_for(std::chrono::milliseconds(std::stoi(EnvOr("DMOE_FAKE_FAIL_AFTER_MS", "200"))));
    return 3;
  }
  // Block the stop signals before gRPC starts threads; sigwait below.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<FakeGeneration> service;
  std::unique_ptr<FakeCoordinator> coordinator;
  if (role == "scheduler") {
    grpc::EnableDefaultHealthCheckService(true);
    service = std::make_unique<FakeGeneration>(std::stoi(flags["attention-nodes"]), std::stoi(flags["expert-nodes"]),
                                               flags.contains("balance") ? flags["balance"] : "off");
    grpc::ServerBuilder builder;
    int port = 0, control_port = 0;
    builder.AddListeningPort(flags["host"] + ":" + flags["port"], grpc::InsecureServerCredentials(), &port);
    builder.AddListeningPort(flags["host"] + ":" + flags["control-port"], grpc::InsecureServerCredentials(),
                             &control_port);
    coordinator = std::make_unique<FakeCoordinator>(flags.contains("balance") ? flags["balance"] : "off");
    builder.RegisterService(service.get());
    builder.RegisterService(coordinator.get());
    server = builder.BuildAndStart();
    if (server == nullptr) return 4;
    // Like the real scheduler: the client API's status under its name too
    // (`dmoe up` asks the control port for it).
    server->GetHealthCheckService()->SetServingStatus(v1::Generation::service_full_name(), false);
    server->GetHealthCheckService()->SetServingStatus(false);
    AppendEvent("control_port " + std::to_string(control_port));
    WritePortFile(flags["port-file"], {{"port", port}, {"control_port", control_port}});
  } else {
    WritePortFile(flags["port-file"], {{"port", 1}});
  }
  // The scheduler turns SERVING once every node has started (its "start"
  // line is in the events file), unless told never to.
  const bool never_ready = EnvOr("DMOE_FAKE_NEVER_READY") == "1";
  const int nodes = server != nullptr ? std::stoi(flags["attention-nodes"]) + std::stoi(flags["expert-nodes"]) : 0;
  auto nodes_started = [] {
    std::ifstream in(EnvOr("DMOE_FAKE_EVENTS"));
    int n = 0;
    for (std::string line; std::getline(in, line);) {
      n += line.rfind("start ", 0) == 0 && line.find("dmoe-scheduler") == std::string::npos;
    }
    return n;
  };
  const timespec poll_every = {0, 50'000'000};
  bool ready = false;
  while (true) {
    int signal = -1;
    if (server != nullptr && !ready && !never_ready) {
      siginfo_t info;
      signal = sigtimedwait(&stop, &info, &poll_every);
      if (signal < 0) {
        if (nodes_started() >= nodes) {
          server->GetHealthCheckService()->SetServingStatus(true);
          ready = true;
        }
        continue;
      }
    } else {
      sigwait(&stop, &signal);
    }
    AppendEvent(role + " SIGTERM");
    if (EnvOr("DMOE_FAKE_IGNORE_TERM") == role) continue;
    break;
  }
  if (server != nullptr) {
    server->GetHealthCheckService()->SetServingStatus(false);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // "drain"
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
  AppendEvent(role + " exit");
  return 0;
}

// Before main: when run as one of the servers, be the fake and exit.
[[maybe_unused]] const bool kRanAsFake = [] {
  std::ifstream in("/proc/self/cmdline");
  std::vector<std::string> argv;
  for (std::string arg; std::getline(in, arg, '\0');) argv.push_back(arg);
  if (argv.empty()) return false;
  const std::string name = fs::path(argv[0]).filename();
  const std::map<std::string, std::string> roles = {
      {"dmoe-scheduler", "scheduler"}, {"dmoe-attention-node", "attention"}, {"dmoe-expert-node", "expert"}};
  if (!roles.contains(name)) return false;
  const int code = RunFake(roles.at(name), argv);
  std::fflush(nullptr);
  ::_exit(code);
}();

// ---------------------------------------------------------------------------
// Running the dmoe binary.

// A running `dmoe ...`: stdout through a pipe, stderr to a file. The
// destructor SIGKILLs and reaps it if it still runs.
class DmoeProcess {
 public:
  DmoeProcess(const std::vector<std::string>& args, const std::map<std::string, std::string>& env = {}) {
    static int counter = 0;
    err_path_ = testing::ScratchDir("cluster_cli_stderr_" + std::to_string(counter++)) / "stderr.txt";
    int out[2];
    EXPECT_EQ(::pipe2(out, O_CLOEXEC), 0);
    out_fd_ = out[0];
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const std::string binary = (testing::BinDir() / "dmoe").string();
    std::vector<std::string> argv_s = {binary};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<std::string> env_s;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv(*e);
      if (!env.contains(kv.substr(0, kv.find('=')))) env_s.push_back(kv);
    }
    for (const auto& [k, v] : env) env_s.push_back(k + "=" + v);
    std::vector<char*> argv, envp;
    for (std::string& s : argv_s) argv.push_back(s.data());
    argv.push_back(nullptr);
    for (std::string& s : env_s) envp.push_back(s.data());
    envp.push_back(nullptr);
    EXPECT_EQ(posix_spawn(&pid_, binary.c_str(), &actions, nullptr, argv.data(), envp.data()), 0);
    posix_spawn_file_actions_destroy(&actions);
    ::close(out[1]);
  }
  ~DmoeProcess() {
    if (!status_.has_value()) {
      ::kill(pid_, SIGKILL);
      int status;
      ::waitpid(pid_, &status, 0);
    }
    ::close(out_fd_);
  }

  pid_t pid() const { return pid_; }
  void Signal(int signal) { ::kill(pid_, signal); }

  // The next line of stdout, or nullopt at EOF or after `timeout`.
  std::optional<std::string> ReadLine(std::chrono::milliseconds timeout) {
    const Clock::time_point deadline = Clock::now() + timeout;
    while (true) {
      if (size_t nl = out_.find('\n'); nl != std::string::npos) {
        std::string line = out_.substr(0, nl);
        out_.erase(0, nl + 1);
        return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0 || !ReadSome(static_cast<int>(left.count()))) return std::nullopt;
    }
  }

  // Waits up to `timeout` for the exit; the wait status, or nullopt.
  std::optional<int> Wait(std::chrono::milliseconds timeout) {
    const Clock::time_point deadline = Clock::now() + timeout;
    while (!status_.has_value()) {
      int status;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        status_ = status;
        break;
      }
      if (Clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // no child-exit fd to wait on here
    }
    while (ReadSome(0)) {
    }
    return status_;
  }

  // Everything written to stdout not yet read by ReadLine (after Wait).
  const std::string& out() const { return out_; }
  std::string err() const {
    std::ifstream in(err_path_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

 private:
  // Appends what stdout has within `timeout_ms`; false at EOF or timeout.
  bool ReadSome(int timeout_ms) {
    pollfd p = {out_fd_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[4096];
    const ssize_t n = ::read(out_fd_, buf, sizeof buf);
    if (n <= 0) return false;
    out_.append(buf, static_cast<size_t>(n));
    return true;
  }

  pid_t pid_ = -1;
  int out_fd_ = -1;
  fs::path err_path_;
  std::string out_;
  std::optional<int> status_;
};

struct Result {
  int exit_code = -1;  // -1: killed by a signal or timed out
  std::string out, err;
  double seconds = 0;
};

Result RunDmoe(const std::vector<std::string>& args, const std::map<std::string, std::string>& env = {},
               std::chrono::seconds timeout = std::chrono::seconds(60)) {
  const Clock::time_point start = Clock::now();
  DmoeProcess p(args, env);
  Result r;
  const std::optional<int> status = p.Wait(timeout);
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_TRUE(status.has_value()) << "dmoe did not exit within " << timeout.count() << " s";
  if (status.has_value() && WIFEXITED(*status)) r.exit_code = WEXITSTATUS(*status);
  r.out = p.out();
  r.err = p.err();
  return r;
}

// Exit code 1 and one stderr line naming the problem (docs/cli.md).
void ExpectError(const std::vector<std::string>& args, const std::string& needle) {
  const Result r = RunDmoe(args);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "stderr: " << r.err;
}

// Pids of the live processes whose environment holds `marker` (KEY=VALUE):
// the descendants of a dmoe process started with it, wherever they were
// reparented to.
std::vector<pid_t> ProcessesWithEnv(const std::string& marker) {
  std::vector<pid_t> found;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(entry.path() / "environ");
    const std::string env = std::string(1, '\0') + std::string(std::istreambuf_iterator<char>(in), {});
    if (env.find(std::string(1, '\0') + marker + std::string(1, '\0')) != std::string::npos) {
      found.push_back(std::stoi(name));
    }
  }
  return found;
}

// Waits up to `timeout` for no process to carry `marker`.
std::vector<pid_t> LeftoverProcesses(const std::string& marker, std::chrono::milliseconds timeout) {
  const Clock::time_point deadline = Clock::now() + timeout;
  std::vector<pid_t> left;
  while (!(left = ProcessesWithEnv(marker)).empty() && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return left;
}

std::string Ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

const std::string kModel = testing::GoldenModelDir().string();

// ---------------------------------------------------------------------------
// Percentiles.

TEST(BenchStats, PercentileInterpolatesBetweenClosestRanks) {
  using cli::Percentile;
  EXPECT_TRUE(std::isnan(Percentile({}, 50)));
  EXPECT_DOUBLE_EQ(Percentile({7.0}, 0), 7.0);
  EXPECT_DOUBLE_EQ(Percentile({7.0}, 99), 7.0);
  EXPECT_DOUBLE_EQ(Percentile({4, 1, 3, 2}, 50), 2.5);  // unsorted input
  EXPECT_DOUBLE_EQ(Percentile({4, 1, 3, 2}, 0), 1.0);
  EXPECT_DOUBLE_EQ(Percentile({4, 1, 3, 2}, 100), 4.0);
  std::vector<double> one_to_ten, one_to_hundred;
  for (int i = 1; i <= 10; ++i) one_to_ten.push_back(i);
  for (int i = 1; i <= 100; ++i) one_to_hundred.push_back(i);
  EXPECT_DOUBLE_EQ(Percentile(one_to_ten, 90), 9.1);  // numpy.percentile(range(1, 11), 90)
  EXPECT_DOUBLE_EQ(Percentile(one_to_hundred, 99), 99.01);
  EXPECT_DOUBLE_EQ(Percentile(one_to_hundred, 50), 50.5);
  EXPECT_DOUBLE_EQ(Percentile({1, 2}, 150), 2.0);  // q is clamped to [0, 100]
  const cli::LatencySummary s = cli::Summarize(one_to_hundred);
  EXPECT_DOUBLE_EQ(s.p50, 50.5);
  EXPECT_DOUBLE_EQ(s.p90, 90.1);
  EXPECT_DOUBLE_EQ(s.p99, 99.01);
}

// ---------------------------------------------------------------------------
// Errors that need no server.

TEST(ClusterCli, FlagErrorsAreOneLineAndNameTheProblem) {
  ExpectError({"up"}, "--model is required");
  ExpectError({"up", "--model", "/nonexistent/model"}, "/nonexistent/model/config.json does not exist");
  ExpectError({"up", "--model", kModel, "--balance", "greedy"}, "--balance = 'greedy' must be off or bias");
  ExpectError({"up", "--model", kModel, "--attention-nodes", "0"}, "--attention-nodes = 0");
  ExpectError({"up", "--model", kModel, "--expert-nodes", "x"}, "--expert-nodes = 'x' is not an integer");
  ExpectError({"up", "--model", kModel, "--port", "70000"}, "--port = 70000");
  ExpectError({"up", "--model", kModel, "--cache-pages", "0"}, "--cache-pages = 0");
  ExpectError({"up", "--model", kModel, "--config", "/nonexistent.json"}, "--config /nonexistent.json");
  ExpectError({"up", "--model", kModel, "--bogus"}, "unknown flag --bogus");
  ExpectError({"up", "--model", kModel, "--expert-nodes", "-1"}, "--expert-nodes = -1 must be in 0..256");
  ExpectError({"up", "--model", kModel, "--device", "tpu"}, "--device 'tpu' must be cpu or cuda");
  ExpectError({"up", "--model", kModel, "--gpu-memory-fraction", "0.5"}, "--gpu-memory-fraction needs --device cuda");
  ExpectError({"up", "--model", kModel, "--gpus", "2"}, "--gpus needs --device cuda");
  ExpectError({"up", "--model", kModel, "--transport", "nccl"}, "--transport nccl needs --device cuda --gpus N");
  ExpectError({"up", "--model", kModel, "--device", "cuda", "--gpus", "2", "--transport", "rdma"},
              "--transport = 'rdma' must be ucx or nccl");
  ExpectError({"up", "--model", kModel, "--device", "cuda", "--gpus", "3"},
              "--gpus 3 puts one node on each GPU: --attention-nodes + --expert-nodes is 2");
  ExpectError({"up", "--model", kModel, "--device", "cuda", "--gpus", "2", "--on-node-exit", "restart"},
              "--on-node-exit restart needs --transport ucx (NCCL ranks cannot rejoin)");

  ExpectError({"generate", "--server", "localhost", "--ids", "1"}, "--server = 'localhost' is not HOST:PORT");
  ExpectError({"generate", "--server", "127.0.0.1:1"}, "exactly one of");
  ExpectError({"generate", "--server", "127.0.0.1:1", "--ids", "1", "--max-tokens", "0"}, "must be positive");
  ExpectError({"generate", "--server", "127.0.0.1:1", "--ids", "1", "--temperature", "-1"}, "temperature");
  ExpectError({"generate", "--server", "127.0.0.1:1", "--ids", "1", "--top-p", "1.5"}, "top_p");
  ExpectError({"generate", "--server", "127.0.0.1:1", "--ids", "1,x"}, "'x' is not a token id");
  ExpectError({"generate", "--server", "127.0.0.1:1", "--model", kModel, "--ids", "1"}, "unknown flag --model");

  ExpectError({"bench"}, "--server is required");
  ExpectError({"bench", "--server", "127.0.0.1:0"}, "--server = '127.0.0.1:0'");
  ExpectError({"bench", "--server", "127.0.0.1:1", "--concurrency", "0"}, "--concurrency = 0");
  ExpectError({"bench", "--server", "127.0.0.1:1", "--requests", "-3"}, "--requests = -3");
  ExpectError({"bench", "--server", "127.0.0.1:1", "--prompt-len", "0"}, "--prompt-len = 0");
  ExpectError({"bench", "--server", "127.0.0.1:1", "--max-tokens", "0"}, "--max-tokens = 0");
}

TEST(ClusterCli, NothingListeningIsUnavailableWithinSeconds) {
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"generate", "--server", "127.0.0.1:1", "--ids", "1,2,3"},
        std::vector<std::string>{"generate", "--server", "127.0.0.1:1", "--prompt", "hi", "--json"},
        std::vector<std::string>{"bench", "--server", "127.0.0.1:1", "--requests", "2"}}) {
    const Result r = RunDmoe(args, {}, std::chrono::seconds(30));
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("127.0.0.1:1: UNAVAILABLE"), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
    EXPECT_LT(r.seconds, 10.0);
  }
}

// No GPU visible (CUDA_VISIBLE_DEVICES empty hides them on any machine): dmoe up --gpus 2
// fails before starting anything, naming what is missing.
TEST(ClusterCli, UpOnTwoGpusWithoutGpusFailsNamingWhatIsMissing) {
  const std::string marker = "no-gpus-" + std::to_string(::getpid());
  const Result r = RunDmoe({"up", "--model", kModel, "--device", "cuda", "--gpus", "2"},
                           {{"CUDA_VISIBLE_DEVICES", ""}, {"DMOE_CLUSTER_TEST_MARKER", marker}},
                           std::chrono::seconds(30));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
#if DMOE_TEST_CUDA
  EXPECT_NE(r.err.find("--gpus 2: needs 2 CUDA GPUs (one per node), none is visible: cudaGetDeviceCount"),
            std::string::npos)
      << r.err;
#else
  EXPECT_NE(r.err.find("--gpus 2: this dmoe was built without CUDA"), std::string::npos) << r.err;
#endif
  EXPECT_TRUE(ProcessesWithEnv("DMOE_CLUSTER_TEST_MARKER=" + marker).empty());
}

TEST(ClusterCli, UpWithoutAModelStartsNothing) {
  const std::string marker = "DMOE_CLUSTER_TEST_MARKER=no-model-" + std::to_string(::getpid());
  const Result r =
      RunDmoe({"up", "--model", "/nonexistent/model"},
              {{"DMOE_CLUSTER_TEST_MARKER", marker.substr(marker.find('=') + 1)}}, std::chrono::seconds(30));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("config.json does not exist"), std::string::npos) << r.err;
  EXPECT_LT(r.seconds, 10.0);
  EXPECT_TRUE(ProcessesWithEnv(marker).empty());
}

// ---------------------------------------------------------------------------
// dmoe up over the fake servers.

class FakeCluster : public ::testing::Test {
 protected:
  void SetUp() override {
    static int n = 0;
    dir_ = testing::ScratchDir("fake_cluster_" + std::to_string(n++));
    const fs::path self = fs::read_symlink("/proc/self/exe");
    fs::create_directories(dir_ / "bin");
    for (const char* name : {"dmoe-scheduler", "dmoe-attention-node", "dmoe-expert-node"}) {
      fs::create_symlink(self, dir_ / "bin" / name);
    }
    events_ = dir_ / "events.txt";
    marker_value_ = "fake-" + std::to_string(::getpid()) + "-" + std::to_string(n);
    env_ = {{"DMOE_SERVER_BIN_DIR", (dir_ / "bin").string()},
            {"DMOE_FAKE_EVENTS", events_.string()},
            {"DMOE_CLUSTER_TEST_MARKER", marker_value_}};
  }
  void TearDown() override {
    // Whatever a failed test left running.
    for (pid_t pid : ProcessesWithEnv(Marker())) ::kill(pid, SIGKILL);
  }

  std::string Marker() const { return "DMOE_CLUSTER_TEST_MARKER=" + marker_value_; }
  std::vector<std::string> Events() const {
    std::ifstream in(events_);
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  }

  // Reads the endpoint line; returns the port, or -1.
  int ReadEndpoint(DmoeProcess& up, const std::string& expected_tail) {
    const std::optional<std::string> line = up.ReadLine(std::chrono::seconds(30));
    if (!line.has_value()) {
      ADD_FAILURE() << "no endpoint line; stderr: " << up.err();
      return -1;
    }
    std::smatch m;
    const std::regex re("dmoe: serving (.*) on 127\\.0\\.0\\.1:([0-9]+) \\((.*)\\)");
    if (!std::regex_match(*line, m, re)) {
      ADD_FAILURE() << "endpoint line: " << *line;
      return -1;
    }
    EXPECT_EQ(m[1].str(), kModel);
    EXPECT_EQ(m[3].str(), expected_tail);
    return std::stoi(m[2].str());
  }

  fs::path dir_;
  fs::path events_;
  std::string marker_value_;
  std::map<std::string, std::string> env_;
};

TEST_F(FakeCluster, ServesClientsAndStopsTheSchedulerFirst) {
  DmoeProcess up({"up", "--model", kModel, "--port", "0", "--attention-nodes", "2", "--expert-nodes", "3", "--balance",
                  "bias", "--cache-pages", "64"},
                 env_);
  const int port = ReadEndpoint(up, "2 attention nodes, 3 expert nodes, balance bias");
  ASSERT_GT(port, 0);
  const std::string server = "127.0.0.1:" + std::to_string(port);

  // The nodes got the scheduler's control port, their flags, and the UCX defaults.
  std::string control_port;
  int attention = 0, expert = 0;
  for (const std::string& e : Events()) {
    if (e.rfind("control_port ", 0) == 0) control_port = e.substr(13);
  }
  ASSERT_FALSE(control_port.empty());
  for (const std::string& e : Events()) {
    if (e.find("dmoe-attention-node") != std::string::npos) {
      ++attention;
      EXPECT_NE(e.find("--scheduler 127.0.0.1:" + control_port + " "), std::string::npos) << e;
      EXPECT_NE(e.find("--cache-pages 64"), std::string::npos) << e;
    }
    if (e.find("dmoe-expert-node") != std::string::npos) {
      ++expert;
      EXPECT_NE(e.find("--scheduler 127.0.0.1:" + control_port + " "), std::string::npos) << e;
    }
  }
  EXPECT_EQ(attention, 2);
  EXPECT_EQ(expert, 3);
  for (pid_t pid : ProcessesWithEnv(Marker())) {
    if (pid == up.pid()) continue;
    std::ifstream in("/proc/" + std::to_string(pid) + "/environ");
    const std::string env(std::istreambuf_iterator<char>(in), {});
    EXPECT_NE(env.find("UCX_NET_DEVICES="), std::string::npos);
    EXPECT_NE(env.find("UCX_WARN_UNUSED_ENV_VARS="), std::string::npos);
  }

  // generate --server: the fake's ids are (sum(prompt) + seed + i) % 512.
  Result g = RunDmoe({"generate", "--server", server, "--ids", "1,2,3", "--max-tokens", "4", "--seed", "10", "--json"});
  ASSERT_EQ(g.exit_code, 0) << g.err;
  const json j = json::parse(g.out);
  EXPECT_EQ(j["ids"], json({16, 17, 18, 19}));
  EXPECT_EQ(j["text"], "t16 t17 t18 t19 ");
  Result streamed = RunDmoe({"generate", "--server", server, "--ids", "1,2,3", "--max-tokens", "4", "--seed", "10"});
  ASSERT_EQ(streamed.exit_code, 0) << streamed.err;
  EXPECT_EQ(streamed.out, j["text"].get<std::string>() + "\n");
  Result text = RunDmoe({"generate", "--server", server, "--prompt", "A", "--max-tokens", "2", "--json",
                         "--temperature", "0.7", "--top-k", "5", "--stop", "x", "--ignore-eos"});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_EQ(json::parse(text.out)["ids"], json({65, 66}));

  // bench --server: every request generates max-tokens tokens.
  Result b = RunDmoe({"bench", "--server", server, "--concurrency", "3", "--requests", "20", "--prompt-len", "8",
                      "--max-tokens", "5", "--seed", "1", "--json"});
  ASSERT_EQ(b.exit_code, 0) << b.err;
  const json bj = json::parse(b.out);
  EXPECT_EQ(bj["requests"], 20);
  EXPECT_EQ(bj["concurrency"], 3);
  EXPECT_EQ(bj["prompt_len"], 8);
  EXPECT_EQ(bj["max_tokens"], 5);
  EXPECT_EQ(bj["errors"], 0);
  EXPECT_EQ(bj["output_tokens"], 100);
  EXPECT_GT(bj["duration_s"].get<double>(), 0.0);
  EXPECT_NEAR(bj["total_tokens_per_s"].get<double>() / bj["output_tokens_per_s"].get<double>(), 13.0 / 5.0, 1e-6);
  for (const char* key : {"ttft_s", "itl_s"}) {
    const json& s = bj[key];
    EXPECT_GT(s["p50"].get<double>(), 0.0) << key;
    EXPECT_LE(s["p50"].get<double>(), s["p90"].get<double>()) << key;
    EXPECT_LE(s["p90"].get<double>(), s["p99"].get<double>()) << key;
  }
  // One progress line per 10%.
  EXPECT_EQ(std::count(b.err.begin(), b.err.end(), '\n'), 10) << b.err;
  EXPECT_NE(b.err.find("100% (20/20 requests, 0 errors"), std::string::npos) << b.err;
  Result table = RunDmoe({"bench", "--server", server, "--requests", "2", "--max-tokens", "3"});
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_NE(table.out.find("time to first token"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("output tokens/s"), std::string::npos) << table.out;
  ExpectError({"bench", "--server", server, "--prompt-len", "200", "--max-tokens", "100"},
              "exceeds the context of fake (max_position_embeddings 256)");

  // SIGTERM: the scheduler drains and exits before any node is told to stop.
  up.Signal(SIGTERM);
  const std::optional<int> status = up.Wait(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << up.err();
  std::vector<std::string> stops;
  for (const std::string& e : Events()) {
    if (e.rfind("start ", 0) != 0 && e.rfind("control_port ", 0) != 0) stops.push_back(e);
  }
  ASSERT_EQ(stops.size(), 12u);
  EXPECT_EQ(stops[0], "scheduler SIGTERM");
  EXPECT_EQ(stops[1], "scheduler exit");
  EXPECT_TRUE(LeftoverProcesses(Marker(), std::chrono::seconds(1)).empty());
}

TEST_F(FakeCluster, AChildThatDiesWhileStartingStopsTheRest) {
  env_["DMOE_FAKE_NEVER_READY"] = "1";
  for (const std::string role : {"expert", "scheduler"}) {
    env_["DMOE_FAKE_FAIL"] = role;
    const Result r =
        RunDmoe({"up", "--model", kModel, "--port", "0", "--attention-nodes", "2"}, env_, std::chrono::seconds(60));
    EXPECT_EQ(r.exit_code, 1) << r.err;
    const std::string who = role == "expert" ? "expert node 0 (pid " : "scheduler (pid ";
    EXPECT_NE(r.err.find("dmoe up: error: " + who), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(") exited with status 3; stopped the cluster"), std::string::npos) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
    EXPECT_TRUE(LeftoverProcesses(Marker(), std::chrono::seconds(1)).empty());
  }
}

TEST_F(FakeCluster, AChildThatDiesWhileServingIsRestartedUntilItCrashLoops) {
  env_["DMOE_FAKE_FAIL"] = "attention";
  env_["DMOE_FAKE_FAIL_AFTER_MS"] = "2000";  // after the fake scheduler turns SERVING
  DmoeProcess up({"up", "--model", kModel, "--port", "0", "--expert-nodes", "2"}, env_);
  ASSERT_GT(ReadEndpoint(up, "1 attention node, 2 expert nodes, balance off"), 0);
  // Each restarted fake fails again 2 s after its start: restarted twice,
  // then the third quick exit stops the cluster.
  const std::optional<int> status = up.Wait(std::chrono::seconds(60));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << up.err();
  const std::regex restarted("attention node 0 \\(pid [0-9]+\\) exited with status 3; restarting it");
  const std::string err = up.err();
  EXPECT_EQ(std::distance(std::sregex_iterator(err.begin(), err.end(), restarted), std::sregex_iterator()), 2) << err;
  EXPECT_NE(err.find("exited with status 3 (3 times in a row within 10s of its start); stopped the cluster"),
            std::string::npos)
      << err;
  int attention_starts = 0;
  for (const std::string& e : Events()) {
    attention_starts += e.rfind("start ", 0) == 0 && e.find("dmoe-attention-node") != std::string::npos ? 1 : 0;
  }
  EXPECT_EQ(attention_starts, 3);
  EXPECT_TRUE(LeftoverProcesses(Marker(), std::chrono::seconds(1)).empty());
}

TEST_F(FakeCluster, AChildThatDiesWhileServingStopsTheRestWithOnNodeExitStop) {
  env_["DMOE_FAKE_FAIL"] = "attention";
  env_["DMOE_FAKE_FAIL_AFTER_MS"] = "2000";  // after the fake scheduler turns SERVING
  DmoeProcess up({"up", "--model", kModel, "--port", "0", "--expert-nodes", "2", "--on-node-exit", "stop"}, env_);
  ASSERT_GT(ReadEndpoint(up, "1 attention node, 2 expert nodes, balance off"), 0);
  const std::optional<int> status = up.Wait(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << up.err();
  EXPECT_NE(up.err().find("dmoe up: error: attention node 0 (pid "), std::string::npos) << up.err();
  EXPECT_NE(up.err().find(") exited with status 3; stopped the cluster"), std::string::npos) << up.err();
  EXPECT_TRUE(LeftoverProcesses(Marker(), std::chrono::seconds(1)).empty());
}

TEST_F(FakeCluster, NotReadyInTimeFailsAndStopsAll) {
  env_["DMOE_FAKE_NEVER_READY"] = "1";
  const Result r = RunDmoe({"up", "--model", kModel, "--port", "0", "--timeout", "2"}, env_, std::chrono::seconds(60));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("the cluster was not ready within 2s (2 of 2 nodes listening, health NOT_SERVING)"),
            std::string::npos)
      << r.err;
  EXPECT_LT(r.seconds, 20.0);
  EXPECT_TRUE(LeftoverProcesses(Marker(), std::chrono::seconds(1)).empty());
}

TEST_F(FakeCluster, ANodeIgnoringSigtermIsKilledAfterTheGracePeriod) {
  env_["DMOE_FAKE_IGNORE_TERM"] = "attention";
  DmoeProcess up({"up", "--model", kModel, "--port", "0", "--grace", "1"}, env_);
  ASSERT_GT(ReadEndpoint(up, "1 attention node, 1 expert node, balance off"), 0);
  up.Signal(SIGINT);
  const std::optional<int> status = up.Wait(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << up.err();
  EXPECT_NE(up.err().find("attention node 0 (pid"), std::string::npos);
  EXPECT_NE(up.err().find("did not exit within 1s of SIGTERM: killing it"), std::string::npos) << up.err();
  EXPECT_TRUE(LeftoverProcesses(Marker(), std::chrono::seconds(1)).empty());
}

TEST_F(FakeCluster, ChildrenDieWithUp) {
  DmoeProcess up({"up", "--model", kModel, "--port", "0", "--expert-nodes", "2"}, env_);
  ASSERT_GT(ReadEndpoint(up, "1 attention node, 2 expert nodes, balance off"), 0);
  EXPECT_EQ(ProcessesWithEnv(Marker()).size(), 5u);  // up, scheduler, 3 nodes
  up.Signal(SIGKILL);                                // no chance to stop them: PR_SET_PDEATHSIG does
  ASSERT_TRUE(up.Wait(std::chrono::seconds(10)).has_value());
  EXPECT_TRUE(LeftoverProcesses(Marker(), std::chrono::seconds(10)).empty());
}

// ---------------------------------------------------------------------------
// The real servers (skipped until they are built beside dmoe).

class RealCluster : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : {"dmoe-scheduler", "dmoe-attention-node", "dmoe-expert-node"}) {
      if (!fs::exists(testing::BinDir() / name)) {
        GTEST_SKIP() << (testing::BinDir() / name).string() << " is not built; this test needs the real servers";
      }
    }
  }
};

TEST_F(RealCluster, ACorruptCheckpointFailsCleanly) {
  // The golden config and tokenizer beside a truncated weights file: a
  // server fails to load it (today the nodes; the scheduler reads no weights).
  const fs::path dir = testing::ScratchDir("real_cluster_corrupt");
  for (const char* f : {"config.json", "tokenizer.json", "tokenizer_config.json"}) {
    fs::copy_file(testing::GoldenModelDir() / f, dir / f);
  }
  {
    std::ifstream in(testing::GoldenModelDir() / "model.safetensors", std::ios::binary);
    const std::string bytes(std::istreambuf_iterator<char>(in), {});
    std::ofstream(dir / "model.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  const std::string marker_value = "real-corrupt-" + std::to_string(::getpid());
  const Result r = RunDmoe({"up", "--model", dir.string(), "--port", "0", "--timeout", "60"},
                           {{"DMOE_CLUSTER_TEST_MARKER", marker_value}}, std::chrono::seconds(90));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(
      std::regex_search(r.err, std::regex("dmoe up: error: (scheduler|attention node 0|expert node 0) \\(pid [0-9]+\\) "
                                          "exited with status 1; stopped the cluster")))
      << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
  EXPECT_TRUE(LeftoverProcesses("DMOE_CLUSTER_TEST_MARKER=" + marker_value, std::chrono::seconds(2)).empty());
}

// `dmoe up` with `expert_nodes` expert nodes (0: one process, the
// attention node running the routed experts on its own backend) serves the
// golden greedy ids.
void ExpectGoldenOverUp(const std::string& expert_nodes) {
  const std::string marker_value = "real-" + expert_nodes + "-" + std::to_string(::getpid());
  DmoeProcess up({"up", "--model", kModel, "--port", "0", "--attention-nodes", "1", "--expert-nodes", expert_nodes,
                  "--timeout", "60"},
                 {{"DMOE_CLUSTER_TEST_MARKER", marker_value}});
  const std::optional<std::string> line = up.ReadLine(std::chrono::seconds(70));
  ASSERT_TRUE(line.has_value()) << "no endpoint line; stderr: " << up.err();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(*line, m, std::regex("on 127\\.0\\.0\\.1:([0-9]+) "))) << *line;
  const std::string server = "127.0.0.1:" + m[1].str();
  for (const auto& gc : testing::LoadGoldenCases(testing::GoldenModelDir())) {
    const Result r =
        RunDmoe({"generate", "--server", server, "--ids", Ids(gc.prompt_ids), "--max-tokens", "16", "--json"}, {},
                std::chrono::seconds(30));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(json::parse(r.out)["ids"].get<std::vector<int32_t>>(), gc.greedy_ids);
  }
  const Result b = RunDmoe({"bench", "--server", server, "--concurrency", "2", "--requests", "4", "--prompt-len", "8",
                            "--max-tokens", "4", "--json"},
                           {}, std::chrono::seconds(30));
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_EQ(json::parse(b.out)["errors"], 0);
  EXPECT_EQ(json::parse(b.out)["output_tokens"], 16);
  up.Signal(SIGTERM);
  const std::optional<int> status = up.Wait(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << up.err();
  EXPECT_TRUE(LeftoverProcesses("DMOE_CLUSTER_TEST_MARKER=" + marker_value, std::chrono::seconds(2)).empty());
}

TEST_F(RealCluster, GenerateOverTheClusterEqualsGoldenGreedy) { ExpectGoldenOverUp("2"); }

TEST_F(RealCluster, OneProcessWithoutExpertNodesEqualsGoldenGreedy) { ExpectGoldenOverUp("0"); }

TEST_F(RealCluster, UpRestartsAKilledExpertNodeAndServesGoldenAgain) {
  const std::string marker = "DMOE_CLUSTER_TEST_MARKER=real-restart-" + std::to_string(::getpid());
  DmoeProcess up(
      {"up", "--model", kModel, "--port", "0", "--attention-nodes", "1", "--expert-nodes", "2", "--timeout", "60"},
      {{"DMOE_CLUSTER_TEST_MARKER", marker.substr(marker.find('=') + 1)}});
  const std::optional<std::string> line = up.ReadLine(std::chrono::seconds(70));
  ASSERT_TRUE(line.has_value()) << "no endpoint line; stderr: " << up.err();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(*line, m, std::regex("on 127\\.0\\.0\\.1:([0-9]+) "))) << *line;
  const std::string server = "127.0.0.1:" + m[1].str();
  pid_t expert = -1;
  for (pid_t pid : ProcessesWithEnv(marker)) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline");
    const std::string cmdline(std::istreambuf_iterator<char>(in), {});
    if (cmdline.find("dmoe-expert-node") != std::string::npos) expert = pid;
  }
  ASSERT_GT(expert, 0);
  ASSERT_EQ(::kill(expert, SIGKILL), 0);
  // The scheduler turns NOT_SERVING, then SERVING once the restarted node is back.
  EXPECT_TRUE(testing::AwaitHealthStatus(server, false, absl::Seconds(20)).ok());
  const absl::Status back = testing::AwaitHealthStatus(server, true, absl::Seconds(30));
  ASSERT_TRUE(back.ok()) << back << "\n" << up.err();
  EXPECT_NE(up.err().find("was killed by signal 9 (Killed); restarting it"), std::string::npos) << up.err();
  for (const auto& gc : testing::LoadGoldenCases(testing::GoldenModelDir())) {
    const Result r =
        RunDmoe({"generate", "--server", server, "--ids", Ids(gc.prompt_ids), "--max-tokens", "16", "--json"}, {},
                std::chrono::seconds(30));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(json::parse(r.out)["ids"].get<std::vector<int32_t>>(), gc.greedy_ids);
  }
  up.Signal(SIGTERM);
  const std::optional<int> status = up.Wait(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << up.err();
  EXPECT_TRUE(LeftoverProcesses(marker, std::chrono::seconds(2)).empty());
}

// TLS flags reach the scheduler; `dmoe up` itself gets ready without a
// certificate (it asks the control port).
TEST_F(RealCluster, UpServesTheClientApiOverTlsWhenGivenACertificate) {
  const testing::TestPki& pki = testing::TestCertificates();
  ASSERT_FALSE(pki.ca.empty());
  const std::string marker_value = "real-tls-" + std::to_string(::getpid());
  DmoeProcess up({"up", "--model", kModel, "--port", "0", "--timeout", "60", "--tls-cert", pki.server_cert.string(),
                  "--tls-key", pki.server_key.string()},
                 {{"DMOE_CLUSTER_TEST_MARKER", marker_value}});
  const std::optional<std::string> line = up.ReadLine(std::chrono::seconds(70));
  ASSERT_TRUE(line.has_value()) << "no endpoint line; stderr: " << up.err();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(*line, m, std::regex("on 127\\.0\\.0\\.1:([0-9]+) "))) << *line;
  const std::string server = "127.0.0.1:" + m[1].str();
  const auto gc = testing::LoadGoldenCases(testing::GoldenModelDir())[0];
  const Result r = RunDmoe({"generate", "--server", server, "--ids", Ids(gc.prompt_ids), "--max-tokens", "16", "--json",
                            "--tls-ca", pki.ca.string()},
                           {}, std::chrono::seconds(30));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["ids"].get<std::vector<int32_t>>(), gc.greedy_ids);
  const Result plain = RunDmoe({"generate", "--server", server, "--ids", "1,2", "--max-tokens", "2"}, {},
                               std::chrono::seconds(30));
  EXPECT_EQ(plain.exit_code, 1);
  EXPECT_NE(plain.err.find("UNAVAILABLE"), std::string::npos) << plain.err;
  up.Signal(SIGTERM);
  const std::optional<int> status = up.Wait(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << up.err();
  EXPECT_TRUE(LeftoverProcesses("DMOE_CLUSTER_TEST_MARKER=" + marker_value, std::chrono::seconds(2)).empty());
}

}  // namespace
}  // namespace dmoe
