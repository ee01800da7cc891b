// Closed-loop simulation of the serving-time bias balancer with core's MoE
// gate: tokens whose router logits favour a few experts are routed window
// after window, the balancer sees each window's load, and the load imbalance
// (max/mean per expert and per expert node) is compared with mode off, along
// with the share of routing decisions the bias changed. Deterministic (seeded).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "core/config.h"
#include "core/moe_gate.h"
#include "router/dispatch_plan.h"
#include "router/expert_load.h"
#include "router/expert_placement.h"
#include "router/load_balancer.h"

namespace dmoe::router {
namespace {

constexpr int64_t kLayer = 1;  // the one MoE layer
constexpr int64_t kWindows = 50;
constexpr int64_t kTokensPerWindow = 1024;
constexpr int64_t kEvalTokens = 8192;
constexpr int32_t kExpertNodes = 4;

ModelConfig SimConfig() {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(
      R"({"model_type": "deepseek_v3", "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
          "num_experts_per_tok": 4, "num_hidden_layers": 2, "first_k_dense_replace": 1})");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

// Router logits [n, E]: N(0, 1) plus a per-expert skew that favours experts
// 0 and 1 (both in group 0, both on node 0), 5 and, less, 10.
std::vector<float> SkewedLogits(int64_t n, int64_t E, uint32_t seed) {
  std::vector<float> skew(E, 0.0f);
  skew[0] = 1.0f;
  skew[1] = 0.8f;
  skew[5] = 0.6f;
  skew[10] = 0.3f;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> z(n * E);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t e = 0; e < E; ++e) z[t * E + e] = normal(rng) + skew[e];
  }
  return z;
}

std::vector<int32_t> Route(const MoeGate& gate, const std::vector<float>& z, const std::vector<float>& bias) {
  const int64_t E = gate.num_experts(), k = gate.top_k(), n = static_cast<int64_t>(z.size()) / E;
  std::vector<int32_t> idx(n * k);
  std::vector<float> w(n * k);
  for (int64_t t = 0; t < n; ++t) {
    gate.Route(absl::MakeConstSpan(z.data() + t * E, E), {}, bias, idx.data() + t * k, w.data() + t * k);
  }
  return idx;
}

struct Imbalance {
  double experts = 0;  // max/mean tokens per expert
  double nodes = 0;    // max/mean expert work per node
};

Imbalance Measure(const std::vector<int32_t>& idx, const ExpertPlacement& placement) {
  absl::StatusOr<std::vector<int64_t>> counts = NumTokensPerExpert(idx, placement.num_experts());
  EXPECT_TRUE(counts.ok()) << counts.status();
  absl::StatusOr<std::vector<int64_t>> per_node = LoadPerNode(placement, *counts);
  EXPECT_TRUE(per_node.ok()) << per_node.status();
  return {MaxOverMean(*counts), MaxOverMean(*per_node)};
}

struct SimResult {
  std::vector<Imbalance> per_window;  // each window's own routing
  Imbalance eval;                     // held-out tokens, final biases
  RoutingChange change;               // eval routing vs no bias
  std::vector<float> final_bias;
};

SimResult Simulate(BalancerOptions options) {
  const ModelConfig c = SimConfig();
  const MoeGate gate(c);
  const int64_t E = c.n_routed_experts;
  absl::StatusOr<ExpertPlacement> placement = ExpertPlacement::Contiguous(E, kExpertNodes);
  absl::StatusOr<ExpertLoadTracker> tracker = ExpertLoadTracker::Create(c);
  absl::StatusOr<BiasBalancer> balancer = BiasBalancer::Create(c, options);
  EXPECT_TRUE(placement.ok() && tracker.ok() && balancer.ok());

  SimResult r;
  for (int64_t w = 0; w < kWindows; ++w) {
    const std::vector<float> z = SkewedLogits(kTokensPerWindow, E, 1000 + static_cast<uint32_t>(w));
    const std::vector<int32_t> idx = Route(gate, z, balancer->biases()[kLayer]);
    r.per_window.push_back(Measure(idx, *placement));
    absl::StatusOr<std::vector<int64_t>> counts = NumTokensPerExpert(idx, E);
    EXPECT_TRUE(tracker->Add(kLayer, *counts).ok());
    tracker->EndStep();
    EXPECT_TRUE(balancer->Update(*tracker).ok());
    tracker->Reset();
  }
  const std::vector<float> z = SkewedLogits(kEvalTokens, E, 7);
  const std::vector<int32_t> reference = Route(gate, z, {});
  const std::vector<int32_t> balanced = Route(gate, z, balancer->biases()[kLayer]);
  r.eval = Measure(balanced, *placement);
  absl::StatusOr<RoutingChange> change = CompareRouting(reference, balanced, c.num_experts_per_tok);
  EXPECT_TRUE(change.ok());
  r.change = *change;
  r.final_bias = balancer->biases()[kLayer];
  return r;
}

TEST(BalancerSimulationTest, BiasReducesImbalanceVersusOff) {
  BalancerOptions off;
  off.mode = BalanceMode::kOff;
  BalancerOptions bias;  // the defaults: gamma 0.001, max_bias 0.05
  bias.mode = BalanceMode::kBias;
  const SimResult r_off = Simulate(off);
  const SimResult r_bias = Simulate(bias);

  std::printf("E=16 (4 groups, topk_group 2, k=4), %d expert nodes, %lld windows x %lld tokens, eval %lld tokens\n",
              kExpertNodes, static_cast<long long>(kWindows), static_cast<long long>(kTokensPerWindow),
              static_cast<long long>(kEvalTokens));
  std::printf("window   off: experts  nodes   bias: experts  nodes\n");
  for (int64_t w : {0, 1, 5, 10, 20, 30, 40, 49}) {
    std::printf("%6lld        %7.3f %6.3f         %7.3f %6.3f\n", static_cast<long long>(w),
                r_off.per_window[w].experts, r_off.per_window[w].nodes, r_bias.per_window[w].experts,
                r_bias.per_window[w].nodes);
  }
  std::printf("eval max/mean per expert: off %.3f, bias %.3f; per node: off %.3f, bias %.3f\n",
              r_off.eval.experts, r_bias.eval.experts, r_off.eval.nodes, r_bias.eval.nodes);
  std::printf("routing decisions changed by the bias: %lld of %lld (%.2f%%)\n",
              static_cast<long long>(r_bias.change.changed_decisions),
              static_cast<long long>(r_bias.change.total_decisions), 100.0 * r_bias.change.share());
  std::printf("final serving bias:");
  for (float b : r_bias.final_bias) std::printf(" %+.3f", b);
  std::printf("\n");
  // The trade-off with a faster, wider bias (not the default).
  BalancerOptions strong = bias;
  strong.gamma = 0.005;
  strong.max_bias = 0.25;
  const SimResult r_strong = Simulate(strong);
  std::printf("gamma 0.005, max_bias 0.25: eval max/mean per expert %.3f, per node %.3f, decisions changed %.2f%%\n",
              r_strong.eval.experts, r_strong.eval.nodes, 100.0 * r_strong.change.share());

  // Off: nothing moves, the skew stays, and routing is exactly the model's.
  EXPECT_EQ(r_off.change.changed_decisions, 0);
  for (float b : r_off.final_bias) EXPECT_EQ(b, 0.0f);
  EXPECT_GT(r_off.eval.experts, 2.0) << "the skew should overload experts";
  // Bias: the favoured experts are pushed down, imbalance falls.
  EXPECT_LT(r_bias.final_bias[0], 0.0f);
  EXPECT_LT(r_bias.final_bias[1], 0.0f);
  EXPECT_LT(r_bias.eval.experts, r_off.eval.experts);
  EXPECT_LT(r_bias.eval.nodes, r_off.eval.nodes);
  EXPECT_LT(r_bias.per_window.back().experts, r_bias.per_window.front().experts);
  EXPECT_GT(r_bias.change.changed_decisions, 0);
  EXPECT_LT(r_strong.eval.experts, r_off.eval.experts);
}

}  // namespace
}  // namespace dmoe::router
