// dmoe up: a whole cluster on this host (one scheduler, N attention nodes, M
// expert nodes) as child processes of this command, until SIGINT/SIGTERM.
// Flags and output: docs/cli.md.
#include <grpcpp/client_context.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/strings/str_format.h"
#include "cli/child_processes.h"
#include "core/backends.h"
#include "cli/commands.h"
#include "core/flags/flags.h"
#include "cli/grpc_client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "dmoe/v1/control.grpc.pb.h"
#include "dmoe/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#if DMOE_HAVE_CUDA
#include "core/cuda/cuda_backend.h"
#endif

namespace dmoe::cli {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr absl::Duration kProgressEvery = absl::Seconds(5);
// Stop stages: the scheduler drains first, while the nodes still run.
constexpr int kSchedulerStage = 0;
constexpr int kNodeStage = 1;

struct UpOptions {
  std::string model;
  std::string host = "127.0.0.1";
  int64_t attention_nodes = 1;
  int64_t expert_nodes = 1;
  int64_t port = 50051;     // 0 = any free port
  std::string balance;      // empty: the scheduler's default (or --config)
  std::string config;       // empty: none
  int64_t cache_pages = 0;  // 0: the attention node's default
  // Passed to every node: --device, --load-format; to the attention nodes
  // --gpu-memory-fraction (empty: the node's default).
  std::string device = "cpu";
  std::string load_format;
  std::string gpu_memory_fraction;
  int64_t gpus = 0;               // --device cuda: one node per GPU, node i on GPU i (--gpu i)
  std::string transport = "ucx";  // the data plane: ucx, or nccl (the default with --gpus >= 2)
  absl::Duration timeout = absl::Seconds(300);
  absl::Duration grace = absl::Seconds(10);
  bool restart_on_exit = true;  // --on-node-exit restart|stop
  int64_t expert_replicas = 1;  // expert nodes per expert shard
  // Passed to dmoe-scheduler as given (TLS and size limits of the client API).
  std::vector<std::string> scheduler_flags;
  // -1: no metrics endpoints; 0: each process on any free port; P > 0: the
  // scheduler on P, attention node i on P+1+i, expert node j on P+1+N+j.
  int64_t metrics_port = -1;
};

constexpr const char* kSchedulerPassThroughFlags[] = {"tls-cert", "tls-key", "tls-client-ca", "max-request-bytes"};

// A child that exits this many times in a row, each within kCrashWindow of
// its start, is not restarted again: the cluster stops.
constexpr int kMaxQuickExits = 3;
constexpr absl::Duration kCrashWindow = absl::Seconds(10);

// --gpus and --transport with the node counts (before anything starts).
absl::Status CheckGpuFlags(const UpOptions& o) {
  if (o.transport != "ucx" && o.transport != "nccl") {
    return absl::InvalidArgumentError(absl::StrCat("--transport = '", o.transport, "' must be ucx or nccl"));
  }
  if (o.gpus < 0) return absl::InvalidArgumentError(absl::StrCat("--gpus = ", o.gpus, " must be >= 0"));
  if (o.gpus != 0 && o.device != "cuda") return absl::InvalidArgumentError("--gpus needs --device cuda");
  if (o.transport == "nccl" && o.gpus < 2) {
    return absl::InvalidArgumentError("--transport nccl needs --device cuda --gpus N (one GPU per node, N >= 2)");
  }
  if (o.gpus > 0 && o.gpus != o.attention_nodes + o.expert_nodes) {
    return absl::InvalidArgumentError(absl::StrCat("--gpus ", o.gpus, " puts one node on each GPU: --attention-nodes + ",
                                                   "--expert-nodes is ", o.attention_nodes + o.expert_nodes));
  }
  return absl::OkStatus();
}

// Enough GPUs for --gpus, and the transport built: FAILED_PRECONDITION or UNAVAILABLE naming what
// is missing.
absl::Status CheckGpusVisible(const UpOptions& o) {
  if (o.gpus == 0) return absl::OkStatus();
#if DMOE_HAVE_CUDA
  absl::StatusOr<std::vector<cuda::CudaDeviceInfo>> devices = cuda::ListDevices();
  if (!devices.ok()) {
    return absl::UnavailableError(absl::StrCat("--gpus ", o.gpus, ": needs ", o.gpus,
                                               " CUDA GPUs (one per node), none is visible: ",
                                               devices.status().message()));
  }
  if (static_cast<int64_t>(devices->size()) < o.gpus) {
    return absl::FailedPreconditionError(absl::StrCat("--gpus ", o.gpus, ": needs ", o.gpus,
                                                      " CUDA GPUs (one per node), ", devices->size(), " visible"));
  }
#if !DMOE_HAVE_NCCL
  if (o.transport == "nccl") {
    return absl::FailedPreconditionError("--transport nccl: this dmoe was built without NCCL (nccl.h / libnccl)");
  }
#endif
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError(absl::StrCat("--gpus ", o.gpus, ": this dmoe was built without CUDA (-DDMOE_CUDA=OFF)"));
#endif
}

absl::StatusOr<UpOptions> ParseUpOptions(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args,
                                                  {"model", "attention-nodes", "expert-nodes", "balance", "port",
                                                   "config", "cache-pages", "host", "timeout", "grace",
                                                   "on-node-exit", "expert-replicas", "tls-cert", "tls-key",
                                                   "tls-client-ca", "max-request-bytes", "metrics-port", "device",
                                                   "load-format", "gpu-memory-fraction", "gpus", "transport"},
                                                  {}));
  UpOptions o;
  DMOE_ASSIGN_OR_RETURN(o.model, flags.Require("model"));
  DMOE_ASSIGN_OR_RETURN(o.attention_nodes, flags.GetInt("attention-nodes", o.attention_nodes));
  o.device = flags.Get("device").value_or("cpu");
  o.load_format = flags.Get("load-format").value_or("");
  o.gpu_memory_fraction = flags.Get("gpu-memory-fraction").value_or("");
  DMOE_RETURN_IF_ERROR(ParseBackendOptions(o.device, o.load_format.empty() ? "auto" : o.load_format).status());
  if (!o.gpu_memory_fraction.empty() && o.device != "cuda") {
    return absl::InvalidArgumentError("--gpu-memory-fraction needs --device cuda");
  }
  DMOE_ASSIGN_OR_RETURN(o.gpus, flags.GetInt("gpus", o.gpus));
  o.transport = flags.Get("transport").value_or(o.gpus >= 2 ? "nccl" : "ucx");
  // On one GPU the default is one process: the attention node holds the
  // routed experts too (no expert nodes). With --gpus >= 2, one expert node.
  DMOE_ASSIGN_OR_RETURN(o.expert_nodes,
                        flags.GetInt("expert-nodes", o.device == "cuda" && o.gpus < 2 ? 0 : o.expert_nodes));
  DMOE_ASSIGN_OR_RETURN(o.port, flags.GetInt("port", o.port));
  DMOE_ASSIGN_OR_RETURN(o.cache_pages, flags.GetInt("cache-pages", o.cache_pages));
  DMOE_ASSIGN_OR_RETURN(o.metrics_port, flags.GetInt("metrics-port", o.metrics_port));
  DMOE_ASSIGN_OR_RETURN(double timeout_s, flags.GetDouble("timeout", absl::ToDoubleSeconds(o.timeout)));
  DMOE_ASSIGN_OR_RETURN(double grace_s, flags.GetDouble("grace", absl::ToDoubleSeconds(o.grace)));
  o.balance = flags.Get("balance").value_or("");
  o.config = flags.Get("config").value_or("");
  o.host = flags.Get("host").value_or(o.host);
  for (const char* name : kSchedulerPassThroughFlags) {
    if (auto value = flags.Get(name)) o.scheduler_flags.insert(o.scheduler_flags.end(), {absl::StrCat("--", name), *value});
  }
  const std::string on_exit = flags.Get("on-node-exit").value_or("restart");
  if (on_exit != "restart" && on_exit != "stop") {
    return absl::InvalidArgumentError(absl::StrCat("--on-node-exit = '", on_exit, "' must be restart or stop"));
  }
  o.restart_on_exit = on_exit == "restart";
  if (o.transport == "nccl") {
    // A restarted node cannot rejoin the NCCL communicator of the others.
    if (flags.Has("on-node-exit") && o.restart_on_exit) {
      return absl::InvalidArgumentError("--on-node-exit restart needs --transport ucx (NCCL ranks cannot rejoin)");
    }
    o.restart_on_exit = false;
  }
  DMOE_ASSIGN_OR_RETURN(o.expert_replicas, flags.GetInt("expert-replicas", o.expert_replicas));
  if (o.attention_nodes < 1 || o.attention_nodes > 256) {
    return absl::InvalidArgumentError(absl::StrCat("--attention-nodes = ", o.attention_nodes, " must be in 1..256"));
  }
  if (o.expert_nodes < 0 || o.expert_nodes > 256) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--expert-nodes = ", o.expert_nodes, " must be in 0..256 (0: the attention nodes run the experts)"));
  }
  if (o.expert_replicas < 1 || o.expert_nodes % o.expert_replicas != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--expert-replicas = ", o.expert_replicas,
                                                   " must be at least 1 and divide --expert-nodes = ", o.expert_nodes));
  }
  DMOE_RETURN_IF_ERROR(CheckGpuFlags(o));
  if (o.port < 0 || o.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--port = ", o.port, " must be in 0..65535 (0 = any free port)"));
  }
  if (o.metrics_port < -1 || o.metrics_port + o.attention_nodes + o.expert_nodes > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-port = ", o.metrics_port,
                                                   " must be -1 (off), 0 (any free ports) or a first port such that "
                                                   "one port per process stays below 65536"));
  }
  if (flags.Has("balance") && o.balance != "off" && o.balance != "bias") {
    return absl::InvalidArgumentError(absl::StrCat("--balance = '", o.balance, "' must be off or bias"));
  }
  if (flags.Has("cache-pages") && o.cache_pages < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--cache-pages = ", o.cache_pages, " must be positive"));
  }
  if (!(timeout_s > 0) || !(grace_s >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--timeout = ", timeout_s, " must be > 0 and --grace = ", grace_s, " >= 0 (seconds)"));
  }
  o.timeout = absl::Seconds(timeout_s);
  o.grace = absl::Seconds(grace_s);
  if (o.host.empty()) return absl::InvalidArgumentError("--host is empty");
  // Fail here, not in a child a few seconds later.
  std::error_code ec;
  if (!fs::is_regular_file(fs::path(o.model) / "config.json", ec)) {
    return absl::NotFoundError(
        absl::StrCat("--model ", o.model, ": ", (fs::path(o.model) / "config.json").string(), " does not exist"));
  }
  if (!o.config.empty() && !fs::is_regular_file(o.config, ec)) {
    return absl::NotFoundError(absl::StrCat("--config ", o.config, " does not exist"));
  }
  return o;
}

// Where the server binaries are: $DMOE_SERVER_BIN_DIR, else beside this dmoe.
absl::StatusOr<fs::path> ServerBinDir() {
  if (const char* dir = std::getenv("DMOE_SERVER_BIN_DIR"); dir != nullptr && *dir != '\0') return fs::path(dir);
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot read /proc/self/exe: ", ec.message()));
  return self.parent_path();
}

// A fresh directory for the servers' port files, removed with its contents.
class TempDir {
 public:
  static absl::StatusOr<TempDir> Create() {
    std::string pattern = (fs::temp_directory_path() / "dmoe-up-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) {
      return absl::InternalError(absl::StrCat("mkdtemp ", pattern, ": ", std::strerror(errno)));
    }
    return TempDir(pattern);
  }
  TempDir(TempDir&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }
  TempDir& operator=(TempDir&&) = delete;
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  explicit TempDir(fs::path path) : path_(std::move(path)) {}
  fs::path path_;
};

// The JSON object in `path`, or nullopt while it is missing or partly written.
std::optional<json> ReadJsonFile(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  return j;
}

struct SchedulerPorts {
  int port = 0;          // client API (Generation, health)
  int control_port = 0;  // where the nodes register
};

// The cluster being brought up; see RunUp for the order of events.
class Launcher {
 public:
  Launcher(UpOptions opts, fs::path bin_dir, TempDir tmp, ChildProcesses& children)
      : opts_(std::move(opts)),
        bin_dir_(std::move(bin_dir)),
        tmp_(std::move(tmp)),
        children_(children),
        deadline_(absl::Now() + opts_.timeout),
        // Wildcard listen addresses are reached on loopback.
        connect_host_(opts_.host == "0.0.0.0" || opts_.host == "::" || opts_.host == "[::]" ? "127.0.0.1"
                                                                                            : opts_.host) {}

  // Runs until a stop request (OK) or a failure: a child that exits, a
  // cluster not ready by the deadline (the caller then stops the children).
  absl::Status Run() {
    DMOE_ASSIGN_OR_RETURN(std::optional<SchedulerPorts> ports, StartScheduler());
    if (!ports.has_value()) return absl::OkStatus();
    DMOE_RETURN_IF_ERROR(StartNodes(*ports));
    DMOE_ASSIGN_OR_RETURN(bool ready, WaitServing(*ports));
    if (!ready) return absl::OkStatus();
    const int an = static_cast<int>(opts_.attention_nodes), en = static_cast<int>(opts_.expert_nodes);
    const std::string gpus =
        opts_.gpus > 0 ? absl::StrCat(", ", opts_.gpus, " GPUs, transport ", opts_.transport) : std::string();
    std::printf("dmoe: serving %s on %s:%d (%d attention node%s, %d expert node%s, balance %s%s)\n",
                opts_.model.c_str(), opts_.host.c_str(), ports->port, an, an == 1 ? "" : "s", en,
                en == 1 ? "" : "s", BalanceMode(*ports).c_str(), gpus.c_str());
    if (opts_.metrics_port >= 0) PrintMetricsEndpoints();
    std::fflush(stdout);
    (void)children_.TakeExits();  // none: startup stops on any exit
    std::map<std::string, int> quick_exits;
    while (!children_.stop_requested()) {
      children_.Wait(absl::InfiniteDuration());
      for (ChildProcesses::Exit& exit : children_.TakeExits()) {
        if (children_.stop_requested()) break;
        if (!opts_.restart_on_exit) return absl::UnavailableError(absl::StrCat(exit.description, "; stopped the cluster"));
        int& quick = quick_exits[exit.name];
        quick = exit.lived < kCrashWindow ? quick + 1 : 0;
        if (quick >= kMaxQuickExits) {
          return absl::UnavailableError(absl::StrCat(exit.description, " (", quick, " times in a row within ",
                                                     absl::FormatDuration(kCrashWindow),
                                                     " of its start); stopped the cluster"));
        }
        DMOE_LOG(kWarning, "up") << exit.description << "; restarting it";
        DMOE_RETURN_IF_ERROR(children_.Start(exit.name, exit.path, RestartArgs(exit, *ports), exit.stop_stage));
      }
    }
    return absl::OkStatus();
  }

 private:
  fs::path PortFile(const std::string& name) const { return tmp_.path() / (name + ".json"); }

  // A restarted process listens where its predecessor did: the scheduler on
  // its ports (the nodes find it again), a node on its port (it takes its
  // slot back; a free port if it never wrote one).
  static std::vector<std::string> RestartArgs(const ChildProcesses::Exit& exit, const SchedulerPorts& ports) {
    std::vector<std::string> args = exit.args;
    auto set = [&args](const std::string& flag, const std::string& value) {
      for (size_t i = 0; i + 1 < args.size(); ++i) {
        if (args[i] == flag) args[i + 1] = value;
      }
    };
    auto get = [&args](const std::string& flag) -> std::string {
      for (size_t i = 0; i + 1 < args.size(); ++i) {
        if (args[i] == flag) return args[i + 1];
      }
      return "";
    };
    if (exit.stop_stage == kSchedulerStage) {
      set("--port", std::to_string(ports.port));
      set("--control-port", std::to_string(ports.control_port));
    } else if (std::optional<json> j = ReadJsonFile(get("--port-file")); j.has_value() && (*j)["port"].is_number_integer()) {
      set("--port", std::to_string((*j)["port"].get<int>()));
    }
    // The same /metrics port too, so that Prometheus keeps its target.
    if (std::optional<json> j = ReadJsonFile(get("--port-file"));
        j.has_value() && (*j)["metrics_port"].is_number_integer() && (*j)["metrics_port"].get<int>() > 0) {
      set("--metrics-port", std::to_string((*j)["metrics_port"].get<int>()));
    }
    return args;
  }

  // An error when a child has exited on its own.
  absl::Status ChildrenStatus() const {
    if (!children_.unexpected_exit().has_value()) return absl::OkStatus();
    return absl::UnavailableError(absl::StrCat(*children_.unexpected_exit(), "; stopped the cluster"));
  }

  absl::Status PastDeadline(const std::string& waiting_for) const {
    return absl::DeadlineExceededError(absl::StrCat(
        "the cluster was not ready within ", absl::FormatDuration(opts_.timeout), " (", waiting_for, "); stopped it"));
  }

  // Starts the scheduler and waits for its port file; nullopt on a stop
  // request.
  absl::StatusOr<std::optional<SchedulerPorts>> StartScheduler() {
    const fs::path port_file = PortFile("scheduler");
    // Watch the directory before the scheduler can write to it.
    const int inotify = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (inotify < 0) return absl::InternalError(absl::StrCat("inotify_init1: ", std::strerror(errno)));
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{inotify};
    if (::inotify_add_watch(inotify, tmp_.path().c_str(), IN_CLOSE_WRITE | IN_MOVED_TO) < 0) {
      return absl::InternalError(absl::StrCat("inotify_add_watch ", tmp_.path().string(), ": ", std::strerror(errno)));
    }
    // clang-format off
    std::vector<std::string> args = {
        "--model", opts_.model,
        "--host", opts_.host,
        "--port", std::to_string(opts_.port),
        "--control-port", "0",
        "--attention-nodes", std::to_string(opts_.attention_nodes),
        "--expert-nodes", std::to_string(opts_.expert_nodes),
        "--port-file", port_file.string()};
    // clang-format on
    if (!opts_.balance.empty()) args.insert(args.end(), {"--balance", opts_.balance});
    if (opts_.expert_replicas > 1) args.insert(args.end(), {"--expert-replicas", std::to_string(opts_.expert_replicas)});
    if (!opts_.config.empty()) args.insert(args.end(), {"--config", opts_.config});
    args.insert(args.end(), opts_.scheduler_flags.begin(), opts_.scheduler_flags.end());
    if (opts_.metrics_port >= 0) args.insert(args.end(), {"--metrics-port", std::to_string(opts_.metrics_port)});
    DMOE_RETURN_IF_ERROR(children_.Start("scheduler", (bin_dir_ / "dmoe-scheduler").string(), args, kSchedulerStage));

    const absl::Time start = absl::Now();
    absl::Time next_progress = start + kProgressEvery;
    while (true) {
      if (std::optional<json> j = ReadJsonFile(port_file);
          j.has_value() && (*j)["port"].is_number_integer() && (*j)["control_port"].is_number_integer()) {
        SchedulerPorts ports{(*j)["port"].get<int>(), (*j)["control_port"].get<int>()};
        DMOE_LOG(kInfo, "up") << "scheduler listening on " << opts_.host << ":" << ports.port << " (control port "
                              << ports.control_port << ")";
        return ports;
      }
      if (children_.stop_requested()) return std::nullopt;
      DMOE_RETURN_IF_ERROR(ChildrenStatus());
      const absl::Time now = absl::Now();
      if (now >= deadline_) return PastDeadline("the scheduler wrote no port file");
      if (now >= next_progress) {
        DMOE_LOG(kInfo, "up") << "waiting for the scheduler to listen ("
                              << absl::FormatDuration(absl::Trunc(now - start, absl::Seconds(1))) << ")";
        next_progress += kProgressEvery;
      }
      children_.Wait(std::min(deadline_, next_progress) - now, inotify);
      char events[4096];
      while (::read(inotify, events, sizeof events) > 0) {
      }
    }
  }

  absl::Status StartNodes(const SchedulerPorts& ports) {
    const std::string scheduler = absl::StrCat(connect_host_, ":", ports.control_port);
    for (int64_t i = 0; i < opts_.attention_nodes + opts_.expert_nodes; ++i) {
      const bool attention = i < opts_.attention_nodes;
      const int64_t index = attention ? i : i - opts_.attention_nodes;
      const std::string name = absl::StrCat(attention ? "attention node " : "expert node ", index);
      std::vector<std::string> args = {
          "--model",     opts_.model,
          "--scheduler", scheduler,
          "--host",      opts_.host,
          "--port",      "0",
          "--port-file", PortFile(absl::StrCat(attention ? "attention-" : "expert-", index)).string()};
      if (opts_.metrics_port >= 0) {
        const int64_t metrics_port = opts_.metrics_port == 0 ? 0 : opts_.metrics_port + 1 + i;
        args.insert(args.end(), {"--metrics-port", std::to_string(metrics_port)});
      }
      if (attention && opts_.cache_pages > 0) {
        args.insert(args.end(), {"--cache-pages", std::to_string(opts_.cache_pages)});
      }
      args.insert(args.end(), {"--device", opts_.device});
      if (!opts_.load_format.empty()) args.insert(args.end(), {"--load-format", opts_.load_format});
      if (attention && !opts_.gpu_memory_fraction.empty()) {
        args.insert(args.end(), {"--gpu-memory-fraction", opts_.gpu_memory_fraction});
      }
      if (attention && opts_.expert_nodes == 0) args.insert(args.end(), {"--experts", "local"});
      if (opts_.transport != "ucx") args.insert(args.end(), {"--transport", opts_.transport});
      if (opts_.gpus > 0) args.insert(args.end(), {"--gpu", std::to_string(i)});  // node i on GPU i
      DMOE_RETURN_IF_ERROR(children_.Start(
          name, (bin_dir_ / (attention ? "dmoe-attention-node" : "dmoe-expert-node")).string(), args, kNodeStage));
    }
    return absl::OkStatus();
  }

  // One line: every process's /metrics port, from the port files.
  void PrintMetricsEndpoints() const {
    std::string line = "dmoe: metrics on";
    auto add = [&](const std::string& name) {
      const std::optional<json> j = ReadJsonFile(PortFile(name));
      const int port = j.has_value() && (*j)["metrics_port"].is_number_integer() ? (*j)["metrics_port"].get<int>() : -1;
      absl::StrAppend(&line, " ", name, "=", connect_host_, ":", port);
    };
    add("scheduler");
    for (int64_t i = 0; i < opts_.attention_nodes; ++i) add(absl::StrCat("attention-", i));
    for (int64_t i = 0; i < opts_.expert_nodes; ++i) add(absl::StrCat("expert-", i));
    std::printf("%s\n", line.c_str());
  }

  int NodesListening() const {
    int n = 0;
    std::error_code ec;
    for (int64_t i = 0; i < opts_.attention_nodes; ++i) n += fs::exists(PortFile(absl::StrCat("attention-", i)), ec);
    for (int64_t i = 0; i < opts_.expert_nodes; ++i) n += fs::exists(PortFile(absl::StrCat("expert-", i)), ec);
    return n;
  }

  // Watches the scheduler's health until SERVING (every node registered and
  // ready), on a thread that wakes this one through an eventfd; false on a
  // stop request. Asked on the control port, where the scheduler mirrors the
  // client API's status (which may need TLS).
  absl::StatusOr<bool> WaitServing(const SchedulerPorts& ports) {
    const std::string address = absl::StrCat(connect_host_, ":", ports.control_port);
    const int64_t nodes = opts_.attention_nodes + opts_.expert_nodes;
    DMOE_LOG(kInfo, "up") << "waiting for " << nodes << " nodes to register and the scheduler to turn SERVING";
    const int woken = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (woken < 0) return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
    struct Watch {
      absl::Mutex mu;
      std::string state ABSL_GUARDED_BY(mu) = "nothing yet";
      bool serving ABSL_GUARDED_BY(mu) = false;
      bool ended ABSL_GUARDED_BY(mu) = false;
      bool ended_by_deadline ABSL_GUARDED_BY(mu) = false;
      std::string error ABSL_GUARDED_BY(mu);
      grpc::ClientContext context;
    } watch;
    watch.context.set_wait_for_ready(true);
    watch.context.set_deadline(absl::ToChronoTime(deadline_));
    std::thread watcher([&] {
      std::unique_ptr<grpc::health::v1::Health::Stub> health = grpc::health::v1::Health::NewStub(DialScheduler(address));
      grpc::health::v1::HealthCheckRequest request;
      request.set_service(v1::Generation::service_full_name());
      auto reader = health->Watch(&watch.context, request);
      grpc::health::v1::HealthCheckResponse response;
      while (reader->Read(&response)) {
        absl::MutexLock lock(&watch.mu);
        watch.state = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
        if (response.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
          watch.serving = true;
          break;
        }
      }
      watch.context.TryCancel();
      const grpc::Status status = reader->Finish();
      {
        absl::MutexLock lock(&watch.mu);
        watch.ended_by_deadline = status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
        watch.error = absl::StrCat(absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())), ": ",
                                   status.error_message());
        watch.ended = true;
      }
      const uint64_t one = 1;
      (void)!::write(woken, &one, sizeof one);
    });
    struct Stop {
      grpc::ClientContext& context;
      std::thread& watcher;
      int fd;
      ~Stop() {
        context.TryCancel();
        watcher.join();
        ::close(fd);
      }
    } stop{watch.context, watcher, woken};
    const absl::Time start = absl::Now();
    absl::Time next_progress = start + kProgressEvery;
    while (true) {
      std::string state, error;
      bool ended, by_deadline;
      {
        absl::MutexLock lock(&watch.mu);
        if (watch.serving) return true;
        state = watch.state;
        ended = watch.ended;
        by_deadline = watch.ended_by_deadline;
        error = watch.error;
      }
      if (children_.stop_requested()) return false;
      DMOE_RETURN_IF_ERROR(ChildrenStatus());
      const absl::Time now = absl::Now();
      const std::string progress = absl::StrCat(NodesListening(), " of ", nodes, " nodes listening, health ", state);
      if (now >= deadline_ || (ended && by_deadline)) return PastDeadline(progress);
      if (ended) {
        // The stream broke while the scheduler runs (or just exited: reap it first).
        children_.Wait(absl::ZeroDuration());
        DMOE_RETURN_IF_ERROR(ChildrenStatus());
        return absl::UnavailableError(absl::StrCat("the scheduler's health watch ended (", error, "); stopped it"));
      }
      if (now >= next_progress) {
        DMOE_LOG(kInfo, "up") << "waiting for the cluster to be ready ("
                              << absl::FormatDuration(absl::Trunc(now - start, absl::Seconds(1))) << "): " << progress;
        next_progress += kProgressEvery;
      }
      // Wakes on the watch's answer, a signal or a child's exit; the
      // timeout is only for the progress line and the deadline.
      children_.Wait(std::min(next_progress, deadline_) - now, woken);
    }
  }

  // The balance mode the scheduler reports, else what was asked for.
  std::string BalanceMode(const SchedulerPorts& ports) const {
    std::unique_ptr<v1::Coordinator::Stub> stub =
        v1::Coordinator::NewStub(DialScheduler(absl::StrCat(connect_host_, ":", ports.control_port)));
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + kConnectTimeout));
    v1::GetClusterStatsResponse stats;
    if (const grpc::Status status = stub->GetClusterStats(&context, v1::GetClusterStatsRequest(), &stats);
        status.ok() && !stats.balance_mode().empty()) {
      return stats.balance_mode();
    }
    return opts_.balance.empty() ? "off" : opts_.balance;
  }

  const UpOptions opts_;
  const fs::path bin_dir_;
  const TempDir tmp_;
  ChildProcesses& children_;
  const absl::Time deadline_;
  const std::string connect_host_;
};

}  // namespace

// The order of events:
//   start scheduler -> its port file -> start the nodes -> health SERVING
//   -> print the endpoint line -> wait for SIGINT/SIGTERM or a child's exit
//   -> stop: scheduler (drains), then the nodes; SIGKILL after --grace.
absl::Status RunUp(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(UpOptions opts, ParseUpOptions(args));
  DMOE_RETURN_IF_ERROR(CheckGpusVisible(opts));
  DMOE_ASSIGN_OR_RETURN(fs::path bin_dir, ServerBinDir());
  for (const char* binary : {"dmoe-scheduler", "dmoe-attention-node", "dmoe-expert-node"}) {
    if (::access((bin_dir / binary).c_str(), X_OK) != 0) {
      return absl::NotFoundError(absl::StrCat((bin_dir / binary).string(),
                                              " is not there (dmoe up runs the server binaries beside dmoe, "
                                              "or in $DMOE_SERVER_BIN_DIR)"));
    }
  }
  DMOE_ASSIGN_OR_RETURN(TempDir tmp, TempDir::Create());
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<ChildProcesses> children, ChildProcesses::Create());
  const absl::Duration grace = opts.grace;
  Launcher launcher(std::move(opts), std::move(bin_dir), std::move(tmp), *children);
  const absl::Status status = launcher.Run();
  children->Stop(grace);
  if (status.ok()) {
    DMOE_LOG(kInfo, "up") << "stopped";
  }
  return status;
}

}  // namespace dmoe::cli
