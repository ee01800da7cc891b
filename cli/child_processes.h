// The server processes that `dmoe up` runs: started with fork+exec, watched
// through a self-pipe that SIGINT/SIGTERM/SIGHUP/SIGCHLD write to, and
// stopped in stages (the scheduler drains before the nodes go).
#ifndef DMOE_CLI_CHILD_PROCESSES_H_
#define DMOE_CLI_CHILD_PROCESSES_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace dmoe::cli {

// Not thread-safe: one thread starts, waits for and stops the children, and
// it must outlive them (PR_SET_PDEATHSIG fires when the thread that forked
// exits). At most one instance per process: it owns the signal handlers.
class ChildProcesses {
 public:
  // Installs the handlers for SIGINT, SIGTERM, SIGHUP (stop requests) and
  // SIGCHLD; the destructor restores the previous ones.
  static absl::StatusOr<std::unique_ptr<ChildProcesses>> Create();
  // SIGKILLs and reaps whatever still runs (Stop is the graceful way).
  ~ChildProcesses();

  // Runs `path args...` as `name` ("attention node 0"). The child gets
  // stdin from /dev/null, stdout and stderr on our stderr, its own process
  // group (a terminal's Ctrl-C reaches only us, so we decide the order),
  // SIGTERM when we die, and UCX_NET_DEVICES=lo, NCCL_SOCKET_IFNAME=lo and
  // UCX_WARN_UNUSED_ENV_VARS=n unless our environment sets them. Stop()
  // stops lower `stop_stage`s first. Fails if exec fails.
  absl::Status Start(const std::string& name, const std::string& path, const std::vector<std::string>& args,
                     int stop_stage);

  // Sleeps until a signal arrives, `fd` (when >= 0) is readable or
  // `timeout` passes, then reaps the children that exited.
  void Wait(absl::Duration timeout, int fd = -1);

  // SIGINT, SIGTERM or SIGHUP has arrived.
  bool stop_requested() const { return stop_signals_ > 0; }
  // "attention node 0 (pid 123) exited with status 1" for the first child
  // that exited before Stop(); nullopt while all run.
  const std::optional<std::string>& unexpected_exit() const { return unexpected_exit_; }

  // A child that exited before Stop(), with what started it.
  struct Exit {
    std::string name, path;
    std::vector<std::string> args;
    int stop_stage = 0;
    std::string description;  // as unexpected_exit()
    absl::Duration lived;     // from Start to its exit
  };
  // The exits since the last call, oldest first.
  std::vector<Exit> TakeExits();

  // For each stop stage in turn: SIGTERM to its children, up to `grace` for
  // them to exit, SIGKILL to those left. Another stop signal meanwhile
  // SIGKILLs everything at once. Returns when all children are reaped.
  void Stop(absl::Duration grace);

 private:
  struct Child {
    std::string name;
    pid_t pid = -1;
    int stop_stage = 0;
    bool running = true;
    std::string path;
    std::vector<std::string> args;
    absl::Time started;
  };

  ChildProcesses(int signal_read_fd, int devnull_fd);
  void DrainSignals();
  void Reap();
  void KillAll(int signal);

  const int signal_read_fd_;
  const int devnull_fd_;
  std::vector<std::string> env_;  // our environment plus the UCX and NCCL defaults
  std::vector<Child> children_;
  int stop_signals_ = 0;
  bool stopping_ = false;
  std::optional<std::string> unexpected_exit_;
  std::vector<Exit> exits_;
};

// "exited with status 3" / "was killed by signal 9 (Killed)" for a waitpid status.
std::string DescribeWaitStatus(int status);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_CHILD_PROCESSES_H_
