#include "cli/child_processes.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/log.h"

extern char** environ;

namespace dmoe::cli {
namespace {

constexpr int kStopSignals[] = {SIGINT, SIGTERM, SIGHUP};
constexpr int kHandledSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGCHLD};

// The self-pipe's write end, for the handler (any thread may run it).
int g_signal_write_fd = -1;
struct sigaction g_previous[std::size(kHandledSignals)];

void OnSignal(int signal) {
  const int saved_errno = errno;
  const unsigned char byte = static_cast<unsigned char>(signal);
  // Non-blocking: when the pipe is full, a wake-up is pending anyway.
  [[maybe_unused]] ssize_t n = ::write(g_signal_write_fd, &byte, 1);
  errno = saved_errno;
}

int PollTimeoutMs(absl::Duration timeout) {
  if (timeout == absl::InfiniteDuration()) return -1;
  return static_cast<int>(
      std::clamp<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(timeout, absl::Milliseconds(1))), 0, 1 << 30));
}

// Between fork and exec only async-signal-safe calls: these write(2) a
// fixed message and _exit.
[[noreturn]] void ChildFail(int report_fd, int error) {
  [[maybe_unused]] ssize_t n = ::write(report_fd, &error, sizeof error);
  ::_exit(127);
}

}  // namespace

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return absl::StrCat("was killed by signal ", WTERMSIG(status), " (", ::strsignal(WTERMSIG(status)), ")");
  }
  return absl::StrCat("changed state (wait status ", status, ")");
}

absl::StatusOr<std::unique_ptr<ChildProcesses>> ChildProcesses::Create() {
  if (g_signal_write_fd >= 0) return absl::FailedPreconditionError("ChildProcesses exists already in this process");
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  }
  const int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (devnull < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return absl::InternalError(absl::StrCat("open /dev/null: ", std::strerror(errno)));
  }
  g_signal_write_fd = fds[1];
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART | SA_NOCLDSTOP;
  for (size_t i = 0; i < std::size(kHandledSignals); ++i) ::sigaction(kHandledSignals[i], &action, &g_previous[i]);
  auto children = std::unique_ptr<ChildProcesses>(new ChildProcesses(fds[0], devnull));
  std::set<std::string> names;
  for (char** e = environ; *e != nullptr; ++e) {
    children->env_.emplace_back(*e);
    names.insert(children->env_.back().substr(0, children->env_.back().find('=')));
  }
  // Local clusters stay on loopback: UCX, and NCCL's bootstrap (whose root the scheduler hosts).
  for (const char* kv : {"UCX_NET_DEVICES=lo", "UCX_WARN_UNUSED_ENV_VARS=n", "NCCL_SOCKET_IFNAME=lo"}) {
    const std::string entry(kv);
    if (!names.contains(entry.substr(0, entry.find('=')))) children->env_.push_back(entry);
  }
  return children;
}

ChildProcesses::ChildProcesses(int signal_read_fd, int devnull_fd)
    : signal_read_fd_(signal_read_fd), devnull_fd_(devnull_fd) {}

ChildProcesses::~ChildProcesses() {
  stopping_ = true;
  KillAll(SIGKILL);
  for (Child& c : children_) {
    if (!c.running) continue;
    int status;
    while (::waitpid(c.pid, &status, 0) < 0 && errno == EINTR) {
    }
    c.running = false;
  }
  for (size_t i = 0; i < std::size(kHandledSignals); ++i) ::sigaction(kHandledSignals[i], &g_previous[i], nullptr);
  ::close(g_signal_write_fd);
  g_signal_write_fd = -1;
  ::close(signal_read_fd_);
  ::close(devnull_fd_);
}

absl::Status ChildProcesses::Start(const std::string& name, const std::string& path,
                                   const std::vector<std::string>& args, int stop_stage) {
  // Everything the child needs is built before fork.
  std::vector<char*> argv, envp;
  argv.push_back(const_cast<char*>(path.c_str()));
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const std::string& e : env_) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  int report[2];  // the child writes errno here if exec fails; EOF = exec'd
  if (::pipe2(report, O_CLOEXEC) != 0) return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  const pid_t parent = ::getpid();

  // Block signals across fork so the child cannot run our handler.
  sigset_t all, previous;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &previous);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(report[0]);
    for (int s : kHandledSignals) ::signal(s, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
    if (::prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) ChildFail(report[1], errno);
    if (::getppid() != parent) ::_exit(127);  // we died before prctl took effect
    ::setpgid(0, 0);
    if (::dup2(devnull_fd_, STDIN_FILENO) < 0 || ::dup2(STDERR_FILENO, STDOUT_FILENO) < 0) {
      ChildFail(report[1], errno);
    }
    ::execve(path.c_str(), argv.data(), envp.data());
    ChildFail(report[1], errno);
  }
  const int fork_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  ::close(report[1]);
  if (pid < 0) {
    ::close(report[0]);
    return absl::ResourceExhaustedError(absl::StrCat("cannot start ", name, ": fork: ", std::strerror(fork_errno)));
  }
  int child_errno = 0;
  ssize_t n;
  while ((n = ::read(report[0], &child_errno, sizeof child_errno)) < 0 && errno == EINTR) {
  }
  ::close(report[0]);
  if (n > 0) {  // the child has _exit(127)ed or is about to
    int status;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return absl::FailedPreconditionError(absl::StrCat("cannot run ", path, ": ", std::strerror(child_errno)));
  }
  children_.push_back({name, pid, stop_stage, true, path, args, absl::Now()});
  DMOE_LOG(kInfo, "up") << "started " << name << " (pid " << pid << ")";
  return absl::OkStatus();
}

void ChildProcesses::Wait(absl::Duration timeout, int fd) {
  pollfd fds[2] = {{signal_read_fd_, POLLIN, 0}, {fd, POLLIN, 0}};
  ::poll(fds, fd >= 0 ? 2 : 1, PollTimeoutMs(timeout));  // EINTR: a signal, handled below
  DrainSignals();
  Reap();
}

void ChildProcesses::DrainSignals() {
  unsigned char buf[64];
  ssize_t n;
  while ((n = ::read(signal_read_fd_, buf, sizeof buf)) > 0) {
    for (ssize_t i = 0; i < n; ++i) {
      if (std::find(std::begin(kStopSignals), std::end(kStopSignals), buf[i]) != std::end(kStopSignals)) {
        if (stop_signals_++ == 0) {
          DMOE_LOG(kInfo, "up") << "got " << ::strsignal(buf[i]) << ": stopping the cluster";
        }
      }
    }
  }
}

void ChildProcesses::Reap() {
  for (Child& c : children_) {
    if (!c.running) continue;
    int status;
    pid_t r;
    while ((r = ::waitpid(c.pid, &status, WNOHANG)) < 0 && errno == EINTR) {
    }
    if (r != c.pid) continue;
    c.running = false;
    const std::string what = absl::StrCat(c.name, " (pid ", c.pid, ") ", DescribeWaitStatus(status));
    if (stopping_) {
      DMOE_LOG(kInfo, "up") << what;
    } else {
      if (!unexpected_exit_.has_value()) unexpected_exit_ = what;
      exits_.push_back({c.name, c.path, c.args, c.stop_stage, what, absl::Now() - c.started});
    }
  }
}

std::vector<ChildProcesses::Exit> ChildProcesses::TakeExits() {
  std::vector<Exit> out;
  out.swap(exits_);
  return out;
}

void ChildProcesses::KillAll(int signal) {
  for (const Child& c : children_) {
    if (c.running) ::kill(c.pid, signal);
  }
}

void ChildProcesses::Stop(absl::Duration grace) {
  stopping_ = true;
  DrainSignals();
  Reap();
  const int signals_at_start = stop_signals_;
  bool killed_all = false;
  std::set<int> stages;
  for (const Child& c : children_) stages.insert(c.stop_stage);
  for (int stage : stages) {
    auto running = [&] {
      return std::any_of(children_.begin(), children_.end(),
                         [&](const Child& c) { return c.running && c.stop_stage == stage; });
    };
    for (const Child& c : children_) {
      if (c.running && c.stop_stage == stage) ::kill(c.pid, SIGTERM);
    }
    const absl::Time deadline = absl::Now() + grace;
    while (running() && absl::Now() < deadline && stop_signals_ == signals_at_start) {
      Wait(deadline - absl::Now());
    }
    if (stop_signals_ != signals_at_start && !killed_all) {
      DMOE_LOG(kWarning, "up") << "second stop request: killing every process at once";
      KillAll(SIGKILL);
      killed_all = true;
    }
    for (const Child& c : children_) {
      if (c.running && c.stop_stage == stage && !killed_all) {
        DMOE_LOG(kWarning, "up") << c.name << " (pid " << c.pid << ") did not exit within "
                                 << absl::FormatDuration(grace) << " of SIGTERM: killing it";
        ::kill(c.pid, SIGKILL);
      }
    }
    while (running()) Wait(absl::InfiniteDuration());  // SIGKILL'ed: exits promptly
  }
}

}  // namespace dmoe::cli
