#include "tests/expert_node/node_test_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

extern char** environ;

namespace dmoe::testing {

FakeCoordinator::FakeCoordinator(int num_attention_nodes, std::vector<std::vector<int32_t>> expert_shards)
    : num_attention_(num_attention_nodes), shards_(std::move(expert_shards)) {}

FakeCoordinator::~FakeCoordinator() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now());
}

void FakeCoordinator::AddNode(int32_t node_id, v1::NodeKind kind, const std::string& transport_address) {
  absl::MutexLock lock(&mu_);
  ++epoch_;
  v1::ClusterNode& n = nodes_[node_id];
  n.set_node_id(node_id);
  n.set_kind(kind);
  n.set_grpc_address(absl::StrCat("test-node-", node_id));
  n.set_transport_address(transport_address);
  if (kind == v1::NODE_KIND_EXPERT)
    n.mutable_expert_shard()->Add(shards_[node_id - num_attention_].begin(), shards_[node_id - num_attention_].end());
}

absl::StatusOr<std::string> FakeCoordinator::Start() {
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(this);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) return absl::UnavailableError("fake coordinator: cannot listen");
  return absl::StrCat("127.0.0.1:", port);
}

grpc::Status FakeCoordinator::RegisterNode(grpc::ServerContext*, const v1::RegisterNodeRequest* request,
                                           v1::RegisterNodeResponse* reply) {
  absl::MutexLock lock(&mu_);
  registrations_.push_back(*request);
  const bool expert = request->kind() == v1::NODE_KIND_EXPERT;
  if (!expert && request->kind() != v1::NODE_KIND_ATTENTION) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "unknown node kind");
  }
  int32_t id = -1;
  for (const auto& [node_id, n] : nodes_) {
    if (n.grpc_address() == request->grpc_address()) id = node_id;
  }
  if (id < 0) {  // a new node: the lowest free id of its kind
    const int32_t begin = expert ? num_attention_ : 0;
    const int32_t end = expert ? num_attention_ + static_cast<int32_t>(shards_.size()) : num_attention_;
    for (int32_t i = begin; i < end && id < 0; ++i) {
      if (!nodes_.contains(i)) id = i;
    }
    if (id < 0) return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "no free node id of this kind");
  }
  v1::ClusterNode& n = nodes_[id];
  n.set_node_id(id);
  n.set_kind(request->kind());
  n.set_grpc_address(request->grpc_address());
  if (!request->transport_address().empty()) n.set_transport_address(request->transport_address());
  ++epoch_;
  reply->set_node_id(id);
  if (expert) {
    const auto& shard = shards_[id - num_attention_];
    n.mutable_expert_shard()->Clear();
    n.mutable_expert_shard()->Add(shard.begin(), shard.end());
    reply->mutable_expert_shard()->Add(shard.begin(), shard.end());
    reply->set_expert_node_index(id - num_attention_);
  }
  return grpc::Status::OK;
}

grpc::Status FakeCoordinator::NodeReady(grpc::ServerContext*, const v1::NodeReadyRequest* request,
                                        v1::NodeReadyResponse*) {
  absl::MutexLock lock(&mu_);
  ready_[request->node_id()] = request->weight_bytes();
  return grpc::Status::OK;
}

grpc::Status FakeCoordinator::GetCluster(grpc::ServerContext* context, const v1::GetClusterRequest* request,
                                         v1::GetClusterResponse* reply) {
  absl::MutexLock lock(&mu_);
  if (request->has_wait_past_epoch()) {  // a long poll, answered before the call's deadline
    const int64_t past = request->wait_past_epoch();
    auto moved = [this, past]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || epoch_ > past; };
    mu_.AwaitWithDeadline(absl::Condition(&moved), absl::FromChrono(context->deadline()) - absl::Seconds(1));
  }
  reply->set_epoch(epoch_);
  reply->set_caller_registered(request->has_node_id() && nodes_.contains(request->node_id()));
  reply->set_complete(static_cast<int>(nodes_.size()) == num_attention_ + static_cast<int>(shards_.size()));
  for (const auto& [id, n] : nodes_) *reply->add_nodes() = n;
  int64_t num_experts = 0;
  for (const auto& shard : shards_) {
    for (int32_t e : shard) num_experts = std::max<int64_t>(num_experts, e + 1);
  }
  std::vector<int32_t> expert_to_node(num_experts, -1);
  for (size_t i = 0; i < shards_.size(); ++i) {
    for (int32_t e : shards_[i]) {
      if (e >= 0) expert_to_node[e] = num_attention_ + static_cast<int32_t>(i);
    }
  }
  reply->mutable_expert_to_node()->Add(expert_to_node.begin(), expert_to_node.end());
  return grpc::Status::OK;
}

grpc::Status FakeCoordinator::ReportExpertLoad(grpc::ServerContext*, const v1::ExpertLoadReport* report,
                                               v1::ExpertLoadAck*) {
  absl::MutexLock lock(&mu_);
  std::vector<int64_t>& total = load_[report->node_id()];
  if (total.size() < static_cast<size_t>(report->tokens_size())) total.resize(report->tokens_size(), 0);
  for (int i = 0; i < report->tokens_size(); ++i) total[i] += report->tokens(i);
  steps_[report->node_id()] += report->steps();
  return grpc::Status::OK;
}

bool FakeCoordinator::AwaitReady(int count, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto ready = [this, count]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return static_cast<int>(ready_.size()) >= count; };
  return mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
}

bool FakeCoordinator::AwaitLoad(int32_t node_id, const std::function<bool(const std::vector<int64_t>&, int64_t)>& done,
                                absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto check = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return done(load_[node_id], steps_[node_id]); };
  return mu_.AwaitWithTimeout(absl::Condition(&check), timeout);
}

std::vector<v1::RegisterNodeRequest> FakeCoordinator::registrations() {
  absl::MutexLock lock(&mu_);
  return registrations_;
}

std::optional<v1::ClusterNode> FakeCoordinator::node(int32_t node_id) {
  absl::MutexLock lock(&mu_);
  const auto it = nodes_.find(node_id);
  if (it == nodes_.end()) return std::nullopt;
  return it->second;
}

std::map<int32_t, int64_t> FakeCoordinator::ready_weight_bytes() {
  absl::MutexLock lock(&mu_);
  return ready_;
}

NodeProcess::~NodeProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    int status;
    waitpid(pid_, &status, 0);
  }
  if (pidfd_ >= 0) close(pidfd_);
}

absl::Status NodeProcess::Spawn(const std::string& binary, const std::vector<std::string>& args,
                                const std::filesystem::path& log) {
  log_ = log;
  const std::string path = (BinDir() / binary).string();
  std::vector<std::string> argv_storage{path};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  // UCX reads UCX_WARN_UNUSED_ENV_VARS when libucs loads, so it must be in
  // the child's environment from exec (the binaries cannot set it).
  std::vector<char*> env;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "UCX_WARN_UNUSED_ENV_VARS=", 25) != 0) env.push_back(*e);
  }
  std::string no_warn = "UCX_WARN_UNUSED_ENV_VARS=n";
  env.push_back(no_warn.data());
  env.push_back(nullptr);
  const int rc = posix_spawn(&pid_, path.c_str(), &actions, nullptr, argv.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    pid_ = -1;
    return absl::InternalError(absl::StrCat("posix_spawn ", path, ": ", std::strerror(rc)));
  }
  // glibc 2.36 declares pidfd_open without extern "C"; call the system call directly.
  pidfd_ = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
  if (pidfd_ < 0) return absl::InternalError(absl::StrCat("pidfd_open: ", std::strerror(errno)));
  return absl::OkStatus();
}

bool NodeProcess::Signal(int signal) { return pid_ > 0 && kill(pid_, signal) == 0; }

std::optional<int> NodeProcess::WaitExit(absl::Duration timeout) {
  if (pid_ <= 0) return std::nullopt;
  pollfd pfd{pidfd_, POLLIN, 0};
  if (poll(&pfd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) != 1) return std::nullopt;
  int status = 0;
  if (waitpid(pid_, &status, 0) != pid_) return std::nullopt;
  pid_ = -1;
  return status;
}

std::string NodeProcess::Log() const {
  std::ifstream in(log_);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::Status AwaitServing(const std::string& address, absl::Duration timeout) {
  return AwaitHealthStatus(address, true, timeout);
}

absl::Status AwaitHealthStatus(const std::string& address, bool serving, absl::Duration timeout) {
  auto stub = grpc::health::v1::Health::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  const absl::Time deadline = absl::Now() + timeout;
  std::string last = "nothing", ended;
  // A watch on a connection to a server that just died ends UNAVAILABLE
  // (wait_for_ready covers only connecting): watch again until the deadline.
  do {
    grpc::ClientContext context;
    context.set_wait_for_ready(true);
    context.set_deadline(absl::ToChronoTime(deadline));
    grpc::health::v1::HealthCheckRequest request;
    std::unique_ptr<grpc::ClientReader<grpc::health::v1::HealthCheckResponse>> reader = stub->Watch(&context, request);
    grpc::health::v1::HealthCheckResponse response;
    while (reader->Read(&response)) {
      if ((response.status() == grpc::health::v1::HealthCheckResponse::SERVING) == serving) {
        context.TryCancel();
        (void)reader->Finish();
        return absl::OkStatus();
      }
      last = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
    }
    const grpc::Status s = reader->Finish();
    ended = s.error_message();
    if (s.error_code() != grpc::StatusCode::UNAVAILABLE) break;
  } while (absl::Now() < deadline);
  return absl::DeadlineExceededError(absl::StrCat(address, " not ", serving ? "SERVING" : "NOT_SERVING", " within ",
                                                  absl::FormatDuration(timeout), ": last status ", last,
                                                  ", stream ended with ", ended));
}

absl::StatusOr<int> ReadPortFile(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("no port file ", path.string()));
  try {
    return nlohmann::json::parse(in).at("port").get<int>();
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(path.string(), ": ", e.what()));
  }
}

}  // namespace dmoe::testing
