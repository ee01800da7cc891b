// Serving-time expert load balancing by a per-expert selection bias
// (ARCHITECTURE.md "Dynamic bias-based balancing at serving time").
#ifndef DMOE_ROUTER_LOAD_BALANCER_H_
#define DMOE_ROUTER_LOAD_BALANCER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"
#include "router/expert_load.h"

namespace dmoe::router {

enum class BalanceMode {
  kOff,   // serving bias stays exactly 0: the model's own routing
  kBias,  // serving bias follows the measured load
};

// "off" or "bias"; INVALID_ARGUMENT naming the value otherwise.
absl::StatusOr<BalanceMode> ParseBalanceMode(const std::string& name);
const char* BalanceModeName(BalanceMode mode);

// Bias and gamma are in units of the gate's scores, to which the serving
// bias is added for top-k selection (MODEL_SPEC.md 3.7). The defaults suit
// sigmoid affinities (deepseek_v3, in (0, 1)): gamma is DeepSeek-V3's
// training-time bias update speed (0.001), and max_bias (5% of the score
// range, reached after 50 windows of one-sided load) lets an expert move past
// near-ties without overriding clear preferences, which bounds the fidelity
// cost. Softmax scores (deepseek_v2) are probabilities of order
// 1/n_routed_experts, an order of magnitude smaller: scale both down there.
struct BalancerOptions {
  BalanceMode mode = BalanceMode::kOff;
  double gamma = 0.001;       // per-window step of every bias, >= 0
  double max_bias = 0.05;     // |bias| <= max_bias, >= 0
  int64_t window_steps = 32;  // steps per window (enough tokens per expert to count), >= 1
};

// The bias controller. Once per window the owner feeds the window's
// ExpertLoadTracker to Update(); per MoE layer every expert's bias moves by
//   b_i += gamma * sign(mean_load - load_i)      (sign(0) = 0)
// and is clamped to [-max_bias, max_bias]: overloaded experts become less
// likely to be selected, underloaded ones more. The weights stay unbiased.
// In mode kOff Update() checks its input and changes nothing.
//
// Value type; thread-compatible (one owner, the scheduler's balancer loop;
// it copies biases() out to the attention nodes).
class BiasBalancer {
 public:
  // INVALID_ARGUMENT for a model without MoE or options out of range.
  static absl::StatusOr<BiasBalancer> Create(const ModelConfig& config, const BalancerOptions& options);

  // One balancing step from a finished window; returns the new biases().
  // INVALID_ARGUMENT when the tracker was shaped for another model.
  absl::StatusOr<std::vector<std::vector<float>>> Update(const ExpertLoadTracker& window);

  // [num_hidden_layers][n_routed_experts], empty for dense layers, all 0
  // until an Update in mode kBias: usable as core's StepRouting::serving_bias.
  const std::vector<std::vector<float>>& biases() const { return biases_; }
  const BalancerOptions& options() const { return options_; }
  int64_t num_updates() const { return num_updates_; }

 private:
  BiasBalancer(const ModelConfig& config, const BalancerOptions& options);

  BalancerOptions options_;
  int64_t num_updates_ = 0;
  std::vector<std::vector<double>> bias_;   // [layer][E], accumulated in double
  std::vector<std::vector<float>> biases_;  // float copy of bias_
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_LOAD_BALANCER_H_
