// Debian's real Prometheus server against a real local cluster: it loads
// deploy/prometheus/prometheus.yml (targets pointed at the cluster's ports,
// intervals shortened) and alerts.yml, scrapes every dmoe process, and
// answers every query of the Grafana dashboard with data. Fails, never
// skips, when prometheus cannot start (scripts/setup.sh installs it).
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cluster/cluster_harness.h"
#include "tests/core/metrics/scrape.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A port the kernel had free a moment ago (Prometheus cannot report the port
// it bound to 0; the window for another process to take it is tiny).
int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

// The prometheus process; always stopped.
class PrometheusServer {
 public:
  PrometheusServer(const fs::path& config, const fs::path& dir, int port) : port_(port), log_(dir / "prometheus.log") {
    const std::string config_flag = absl::StrCat("--config.file=", config.string());
    const std::string storage_flag = absl::StrCat("--storage.tsdb.path=", (dir / "data").string());
    const std::string listen_flag = absl::StrCat("--web.listen-address=127.0.0.1:", port);
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      execlp("prometheus", "prometheus", config_flag.c_str(), storage_flag.c_str(), listen_flag.c_str(),
             "--log.level=warn", static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  ~PrometheusServer() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    const absl::Time end = absl::Now() + absl::Seconds(10);
    int status;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (absl::Now() > end) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
  }

  // Ready for queries, or why not (its log when it exited).
  absl::Status WaitReady(absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    while (absl::Now() < end) {
      if (testing::HttpGet(port_, "/-/ready", absl::Seconds(2)).ok()) return absl::OkStatus();
      int status;
      if (pid_ <= 0 || waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return absl::UnavailableError(
            absl::StrCat("prometheus exited (is Debian's prometheus installed? "
                         "scripts/setup.sh installs it); its log:\n",
                         ReadFile(log_)));
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
    return absl::DeadlineExceededError(absl::StrCat("prometheus not ready in time; its log:\n", ReadFile(log_)));
  }

  // /api/v1/query: the result vector (empty on errors, which are recorded).
  json Query(const std::string& promql) {
    absl::StatusOr<std::string> body = testing::HttpGet(port_, "/api/v1/query?query=" + testing::UrlEncode(promql));
    if (!body.ok()) {
      ADD_FAILURE() << promql << ": " << body.status();
      return json::array();
    }
    json j = json::parse(*body, nullptr, false);
    if (j.is_discarded() || j["status"] != "success") {
      ADD_FAILURE() << promql << ": " << *body;
      return json::array();
    }
    return j["data"]["result"];
  }
  double Scalar(const std::string& promql) {
    json r = Query(promql);
    if (r.empty()) return -1;
    return std::stod(r[0]["value"][1].get<std::string>());
  }
  json Get(const std::string& path) {
    absl::StatusOr<std::string> body = testing::HttpGet(port_, path);
    if (!body.ok()) return json();
    return json::parse(*body, nullptr, false);
  }

 private:
  pid_t pid_ = -1;
  const int port_;
  const fs::path log_;
};

struct PanelQuery {
  std::string panel;
  std::string expr;
};

std::vector<PanelQuery> DashboardQueries(const json& dashboard) {
  std::vector<PanelQuery> out;
  std::vector<const json*> panels;
  for (const json& p : dashboard["panels"]) {
    panels.push_back(&p);
    if (p.contains("panels")) {
      for (const json& q : p["panels"]) panels.push_back(&q);
    }
  }
  for (const json* p : panels) {
    if (!p->contains("targets")) continue;
    for (const json& t : (*p)["targets"])
      out.push_back({(*p)["title"].get<std::string>(), t["expr"].get<std::string>()});
  }
  return out;
}

// Points the local config at the cluster's ports; fails on a line that is
// not there any more (the config changed under the test).
std::string LocalConfigFor(const std::vector<int>& metrics_ports) {
  const fs::path dir = fs::path(DMOE_TESTS_DIR).parent_path() / "deploy" / "prometheus";
  std::string config = ReadFile(dir / "prometheus.yml");
  const std::vector<std::pair<std::string, std::string>> edits = {
      {"scrape_interval: 5s", "scrape_interval: 1s"},
      {"evaluation_interval: 5s", "evaluation_interval: 1s"},
      {"  - alerts.yml", absl::StrCat("  - ", (dir / "alerts.yml").string())},
      {"['127.0.0.1:9400']", absl::StrCat("['127.0.0.1:", metrics_ports[0], "']")},
      {"['127.0.0.1:9401']", absl::StrCat("['127.0.0.1:", metrics_ports[1], "']")},
      {"['127.0.0.1:9402', '127.0.0.1:9403']",
       absl::StrCat("['127.0.0.1:", metrics_ports[2], "', '127.0.0.1:", metrics_ports[3], "']")},
  };
  for (const auto& [from, to] : edits) {
    EXPECT_NE(config.find(from), std::string::npos) << "prometheus.yml no longer has: " << from;
    absl::StrReplaceAll({{from, to}}, &config);
  }
  return config;
}

TEST(PrometheusServer, ScrapesTheClusterAndAnswersEveryDashboardQuery) {
  testing::ClusterOptions o;
  o.model_dir = testing::GoldenModelDir().string();
  o.attention_nodes = 1;
  o.expert_nodes = 2;
  o.metrics = true;
  o.scheduler_flags = {"--balance", "bias", "--balance-window-steps", "4"};
  absl::StatusOr<std::unique_ptr<testing::Cluster>> started = testing::Cluster::Start(o);
  ASSERT_TRUE(started.ok()) << started.status();
  testing::Cluster& cluster = **started;
  ASSERT_EQ(cluster.metrics_ports().size(), 4u);

  const fs::path dir = testing::ScratchDir("prometheus");
  const fs::path config = dir / "prometheus.yml";
  std::ofstream(config) << LocalConfigFor(cluster.metrics_ports());
  const int port = FreePort();
  ASSERT_GT(port, 0);
  PrometheusServer prometheus(config, dir, port);
  const absl::Status ready = prometheus.WaitReady(absl::Seconds(30));
  ASSERT_TRUE(ready.ok()) << ready;

  // Every dmoe process is scraped.
  const absl::Time up_deadline = absl::Now() + absl::Seconds(30);
  while (prometheus.Scalar("sum(up{job=~\"dmoe-.*\"})") < 4 && absl::Now() < up_deadline) {
    absl::SleepFor(absl::Milliseconds(200));
  }
  ASSERT_EQ(prometheus.Scalar("sum(up{job=~\"dmoe-.*\"})"), 4);
  ASSERT_EQ(prometheus.Query("up{job=\"dmoe-expert-node\"}").size(), 2u);

  const int kRequests = 8, kMaxTokens = 8;
  for (int i = 0; i < kRequests; ++i) {
    testing::Generated g = testing::GenerateIds(cluster.client(), {1, 2, 3, 4, 5, 6}, kMaxTokens);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  }
  {  // One refused request, so the rejections have a rate too.
    v1::GenerateRequest bad;
    bad.mutable_token_ids()->add_ids(1);
    bad.set_max_tokens(0);
    const auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(30);
    EXPECT_EQ(testing::GenerateRequest(cluster.client(), bad, deadline).status.error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }

  // The requests' series arrive in Prometheus.
  const std::string finished = "sum(dmoe_request_success_total{finish_reason=\"length\"})";
  const absl::Time arrive_deadline = absl::Now() + absl::Seconds(30);
  while (prometheus.Scalar(finished) < kRequests && absl::Now() < arrive_deadline) {
    absl::SleepFor(absl::Milliseconds(200));
  }
  ASSERT_EQ(prometheus.Scalar(finished), kRequests);
  EXPECT_EQ(prometheus.Scalar("sum(dmoe_generation_tokens_total)"), kRequests * kMaxTokens);

  // The dashboard names only metrics the processes expose...
  std::set<std::string> exposed;
  for (int metrics_port : cluster.metrics_ports()) {
    absl::StatusOr<testing::Scrape> s = testing::ScrapeMetrics(metrics_port);
    ASSERT_TRUE(s.ok()) << s.status();
    exposed.insert(s->names.begin(), s->names.end());
  }
  const json dashboard =
      json::parse(ReadFile(fs::path(DMOE_TESTS_DIR).parent_path() / "deploy/grafana/dashboards/dmoe.json"));
  const std::vector<PanelQuery> queries = DashboardQueries(dashboard);
  ASSERT_GE(queries.size(), 30u);
  for (const PanelQuery& q : queries) {
    const std::set<std::string> names = testing::PromqlMetricNames(q.expr);
    EXPECT_FALSE(names.empty()) << q.panel << ": " << q.expr;
    for (const std::string& name : names) EXPECT_TRUE(exposed.contains(name)) << q.panel << ": " << name;
  }
  // ...and every query returns data. Grafana's $__rate_interval becomes 1m
  // (at least four 1 s scrapes); a series that appeared in the last
  // scrape may need one more sample, hence the bounded retries.
  std::vector<bool> answered(queries.size(), false);
  const absl::Time query_deadline = absl::Now() + absl::Seconds(30);
  for (;;) {
    bool all = true;
    for (size_t i = 0; i < queries.size(); ++i) {
      if (!answered[i])
        answered[i] = !prometheus.Query(absl::StrReplaceAll(queries[i].expr, {{"$__rate_interval", "1m"}})).empty();
      all = all && answered[i];
    }
    if (all || absl::Now() > query_deadline) break;
    absl::SleepFor(absl::Milliseconds(500));
  }
  for (size_t i = 0; i < queries.size(); ++i) {
    EXPECT_TRUE(answered[i]) << queries[i].panel << ": no data for " << queries[i].expr;
  }

  // The rules load and evaluate cleanly on real data; no node is down.
  int alerts = 0;
  const absl::Time rules_deadline = absl::Now() + absl::Seconds(20);
  for (;;) {
    const json rules = prometheus.Get("/api/v1/rules");
    ASSERT_EQ(rules["status"], "success") << rules.dump();
    bool evaluated = true;
    alerts = 0;
    for (const json& group : rules["data"]["groups"]) {
      for (const json& rule : group["rules"]) {
        evaluated = evaluated && rule["health"] != "unknown";
        if (absl::Now() > rules_deadline || rule["health"] != "unknown") {
          EXPECT_EQ(rule["health"], "ok") << rule.dump();
        }
        if (rule["type"] == "alerting") {
          ++alerts;
          if (rule["name"] == "DmoeNodeDown") EXPECT_EQ(rule["state"], "inactive") << rule.dump();
        }
      }
    }
    if (evaluated || absl::Now() > rules_deadline) break;
    absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_EQ(alerts, 6);
}

}  // namespace
}  // namespace dmoe
