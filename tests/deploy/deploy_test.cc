// deploy/: the Prometheus configs and rules (promtool), the Grafana dashboard
// (type-checked against @grafana/schema), the Kubernetes overlays (rendered
// by kubectl kustomize, validated offline). Each check also rejects a broken
// fixture, so a checker that accepts anything fails here.
#include <sys/wait.h>

#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using json = nlohmann::json;

struct ShellRun {
  int rc = -1;
  std::string output;  // stdout and stderr
};

// Runs `command` with /bin/sh in the source tree.
ShellRun Shell(const std::string& command) {
  const std::string full = absl::StrCat("cd '", DMOE_SOURCE_DIR, "' && export DMOE_DEPLOY_TOOLS='", DMOE_DEPLOY_TOOLS,
                                        "' && { ", command, "; } 2>&1");
  ShellRun r;
  FILE* p = popen(full.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  while (fgets(buf, sizeof buf, p) != nullptr) r.output += buf;
  const int status = pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(Prometheus, LocalConfigIsValid) {
  const ShellRun r = Shell("promtool check config deploy/prometheus/prometheus.yml");
  EXPECT_EQ(r.rc, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "is valid prometheus config file")) << r.output;
}

TEST(Prometheus, KubernetesConfigIsValidBesidesItsServiceDiscovery) {
  const ShellRun r = Shell(
      "out=$(mktemp --suffix=.yml) && python3 tests/deploy/prometheus_without_k8s_sd.py "
      "deploy/prometheus/prometheus-kubernetes.yml $out && promtool check config $out; rc=$?; rm -f $out; exit $rc");
  EXPECT_EQ(r.rc, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "1 Kubernetes job(s) made static")) << r.output;
  EXPECT_TRUE(Contains(r.output, "is valid prometheus config file")) << r.output;
}

TEST(Prometheus, RulesAreValid) {
  const ShellRun r = Shell("promtool check rules deploy/prometheus/alerts.yml");
  EXPECT_EQ(r.rc, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "SUCCESS: 9 rules found")) << r.output;
}

TEST(Prometheus, AlertUnitTestsPass) {
  const ShellRun r = Shell("cd deploy/prometheus && promtool test rules alerts_test.yml");
  EXPECT_EQ(r.rc, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "SUCCESS")) << r.output;
}

TEST(Prometheus, BrokenRulesAreRejected) {
  const ShellRun r = Shell("promtool check rules tests/deploy/fixtures/broken_alerts.yml");
  EXPECT_NE(r.rc, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "unclosed left parenthesis")) << r.output;
  EXPECT_TRUE(Contains(r.output, "field 'expr' must be set")) << r.output;
}

TEST(Grafana, DashboardTypeChecksAgainstGrafanaSchema) {
  const ShellRun r = Shell("bash tests/deploy/check_dashboard.sh deploy/grafana/dashboards/dmoe.json");
  EXPECT_EQ(r.rc, 0) << r.output;
}

TEST(Grafana, BrokenDashboardIsRejected) {
  const ShellRun r = Shell("bash tests/deploy/check_dashboard.sh tests/deploy/fixtures/broken_dashboard.json");
  EXPECT_NE(r.rc, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "lineWidht")) << r.output;   // unknown field
  EXPECT_TRUE(Contains(r.output, "\"middle\"")) << r.output;  // not a legend placement
}

TEST(Kubernetes, BaseAndEveryOverlayRenderAndValidate) {
  for (const char* dir :
       {"deploy/k8s/base", "deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu", "deploy/k8s/monitoring"}) {
    const ShellRun r = Shell(absl::StrCat("bash tests/deploy/check_k8s.sh ", dir));
    EXPECT_EQ(r.rc, 0) << dir << "\n" << r.output;
    EXPECT_TRUE(Contains(r.output, "objects pass the schema validators")) << r.output;
  }
}

TEST(Kubernetes, BrokenManifestIsRejectedForEachDefect) {
  const ShellRun r = Shell("bash tests/deploy/check_k8s.sh tests/deploy/fixtures/broken_manifest.yaml");
  EXPECT_NE(r.rc, 0) << r.output;
  EXPECT_TRUE(Contains(r.output, "spec/replicas must be integer")) << r.output;
  EXPECT_TRUE(Contains(r.output, "'\"livenesProbe\"' does not exist")) << r.output;
  EXPECT_TRUE(Contains(r.output, "required property containerPort")) << r.output;
  EXPECT_TRUE(Contains(r.output, "'\"protcol\"' does not exist")) << r.output;
}

// The rendered overlay as JSON objects (kubectl kustomize | YAML -> JSON).
json Render(const std::string& dir) {
  const ShellRun r = Shell(absl::StrCat(
      "kubectl kustomize ", dir,
      " | python3 -c \"import sys, yaml, json; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))\""));
  EXPECT_EQ(r.rc, 0) << r.output;
  return json::parse(r.output, nullptr, false);
}

const json* Find(const json& objects, const std::string& kind, const std::string& name) {
  for (const json& o : objects) {
    if (o["kind"] == kind && o["metadata"]["name"] == name) return &o;
  }
  return nullptr;
}

TEST(Kubernetes, OverlaysWireTheClusterTogether) {
  for (const char* overlay : {"deploy/k8s/overlays/cpu", "deploy/k8s/overlays/gpu"}) {
    SCOPED_TRACE(overlay);
    const json objects = Render(overlay);
    ASSERT_TRUE(objects.is_array());
    const json* config = Find(objects, "ConfigMap", "dmoe-config");
    ASSERT_NE(config, nullptr);
    // The scheduler waits for exactly the replicas the StatefulSets run.
    for (auto [set, key] : {std::pair{"dmoe-attention", "ATTENTION_NODES"}, std::pair{"dmoe-expert", "EXPERT_NODES"}}) {
      const json* s = Find(objects, "StatefulSet", set);
      ASSERT_NE(s, nullptr) << set;
      EXPECT_EQ(std::to_string((*s)["spec"]["replicas"].get<int>()), (*config)["data"][key].get<std::string>()) << set;
      EXPECT_EQ((*s)["spec"]["podManagementPolicy"], "Parallel") << set;
      const json& c = (*s)["spec"]["template"]["spec"]["containers"][0];
      bool advertises = false;
      for (const json& a : c["args"]) advertises = advertises || Contains(a.get<std::string>(), "--advertise-address=");
      EXPECT_TRUE(advertises) << set;
      for (const char* probe : {"startupProbe", "livenessProbe", "readinessProbe"}) {
        EXPECT_TRUE(c[probe].contains("grpc")) << set << " " << probe;
      }
      const json* headless = Find(objects, "Service", set);
      ASSERT_NE(headless, nullptr) << set;
      EXPECT_EQ((*headless)["spec"]["clusterIP"], "None");
      EXPECT_EQ((*headless)["spec"]["publishNotReadyAddresses"], true);
      EXPECT_EQ((*s)["spec"]["serviceName"], set);
      EXPECT_EQ((*s)["spec"]["template"]["spec"]["initContainers"][0]["name"], "check-model");
    }
    const json* scheduler = Find(objects, "Deployment", "dmoe-scheduler");
    ASSERT_NE(scheduler, nullptr);
    // The drain must fit in the grace period.
    EXPECT_GT((*scheduler)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].get<int>(),
              std::stoi((*config)["data"]["DRAIN_GRACE_S"].get<std::string>()));
    EXPECT_NE(Find(objects, "Service", "dmoe-scheduler-control"), nullptr);
    for (const char* pdb : {"dmoe-scheduler", "dmoe-attention", "dmoe-expert"}) {
      EXPECT_NE(Find(objects, "PodDisruptionBudget", pdb), nullptr) << pdb;
    }
  }
  const json gpu = Render("deploy/k8s/overlays/gpu");
  for (const char* set : {"dmoe-attention", "dmoe-expert"}) {
    const json* s = Find(gpu, "StatefulSet", set);
    ASSERT_NE(s, nullptr);
    const json& c = (*s)["spec"]["template"]["spec"]["containers"][0];
    EXPECT_EQ(c["resources"]["limits"]["nvidia.com/gpu"], "1") << set;
    bool shm = false;
    for (const json& m : c["volumeMounts"]) shm = shm || m["mountPath"] == "/dev/shm";
    EXPECT_TRUE(shm) << set;
  }
  EXPECT_EQ((*Find(gpu, "ConfigMap", "dmoe-config"))["data"]["NCCL_SOCKET_IFNAME"], "eth0");
  EXPECT_NE(Find(gpu, "PersistentVolumeClaim", "dmoe-model"), nullptr);
  EXPECT_EQ(Find(Render("deploy/k8s/overlays/cpu"), "PersistentVolumeClaim", "dmoe-model"), nullptr);
}

// No Docker engine runs here: the Dockerfiles are checked for what can be
// checked without one, that every file they copy from the source tree exists.
TEST(Docker, EverySourceTheDockerfilesCopyExists) {
  for (const char* file : {"deploy/docker/Dockerfile.cpu", "deploy/docker/Dockerfile.gpu"}) {
    const ShellRun r =
        Shell(absl::StrCat("grep -E \"^COPY [^-]\" ", file,
                           " | grep -v \"^COPY \\. \" | awk \"{print \\$2}\" | while read -r src; do "
                           "test -e \"$src\" && echo \"ok $src\" || { echo \"missing $src\"; exit 1; }; done"));
    EXPECT_EQ(r.rc, 0) << file << "\n" << r.output;
    EXPECT_TRUE(Contains(r.output, "ok scripts/setup.sh")) << r.output;
    EXPECT_TRUE(Contains(r.output, "ok deploy/docker/check-model.sh")) << r.output;
  }
}

TEST(Docker, CheckModelAcceptsACheckpointAndRejectsAMissingShard) {
  const ShellRun good = Shell("sh deploy/docker/check-model.sh tests/golden/tiny-v3");
  EXPECT_EQ(good.rc, 0) << good.output;
  const ShellRun sharded = Shell(
      "d=$(mktemp -d) && cp tests/golden/tiny-v3/config.json tests/golden/tiny-v3/tokenizer*.json $d/ && "
      "printf \"{\\\"weight_map\\\": {\\\"a\\\": \\\"model-00001-of-00002.safetensors\\\", "
      "\\\"b\\\": \\\"model-00002-of-00002.safetensors\\\"}}\" > $d/model.safetensors.index.json && "
      "echo x > $d/model-00001-of-00002.safetensors && sh deploy/docker/check-model.sh $d; rc=$?; rm -rf $d; exit $rc");
  EXPECT_NE(sharded.rc, 0) << sharded.output;
  EXPECT_TRUE(Contains(sharded.output, "shard model-00002-of-00002.safetensors")) << sharded.output;
}

}  // namespace
}  // namespace dmoe
