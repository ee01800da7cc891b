#include "router/load_balancer.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace dmoe::router {

absl::StatusOr<BalanceMode> ParseBalanceMode(const std::string& name) {
  if (name == "off") return BalanceMode::kOff;
  if (name == "bias") return BalanceMode::kBias;
  return absl::InvalidArgumentError(absl::StrCat("balance mode \"", name, "\" is not one of: off, bias"));
}

const char* BalanceModeName(BalanceMode mode) { return mode == BalanceMode::kBias ? "bias" : "off"; }

BiasBalancer::BiasBalancer(const ModelConfig& config, const BalancerOptions& options) : options_(options) {
  bias_.resize(config.num_hidden_layers);
  biases_.resize(config.num_hidden_layers);
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (!config.is_moe_layer(layer)) continue;
    bias_[layer].assign(config.n_routed_experts, 0.0);
    biases_[layer].assign(config.n_routed_experts, 0.0f);
  }
}

absl::StatusOr<BiasBalancer> BiasBalancer::Create(const ModelConfig& config, const BalancerOptions& options) {
  if (!config.has_moe()) {
    return absl::InvalidArgumentError("bias balancer: the model has no MoE layers");
  }
  if (!std::isfinite(options.gamma) || options.gamma < 0) {
    return absl::InvalidArgumentError(absl::StrCat("bias balancer: gamma ", options.gamma, " must be >= 0"));
  }
  if (!std::isfinite(options.max_bias) || options.max_bias < 0) {
    return absl::InvalidArgumentError(absl::StrCat("bias balancer: max_bias ", options.max_bias, " must be >= 0"));
  }
  if (options.window_steps < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("bias balancer: window_steps ", options.window_steps, " must be >= 1"));
  }
  return BiasBalancer(config, options);
}

absl::StatusOr<std::vector<std::vector<float>>> BiasBalancer::Update(const ExpertLoadTracker& window) {
  const int64_t num_layers = static_cast<int64_t>(bias_.size());
  if (window.num_layers() != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("bias balancer: load window has ", window.num_layers(),
                                                   " layers, the model ", num_layers));
  }
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    if (window.num_tokens_per_expert(layer).size() != bias_[layer].size()) {
      return absl::InvalidArgumentError(absl::StrCat("bias balancer: load window layer ", layer, " has ",
                                                     window.num_tokens_per_expert(layer).size(),
                                                     " experts, the model ", bias_[layer].size()));
    }
  }
  ++num_updates_;
  if (options_.mode == BalanceMode::kOff) return biases_;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const absl::Span<const int64_t> load = window.num_tokens_per_expert(layer);
    if (load.empty()) continue;
    const int64_t E = static_cast<int64_t>(load.size());
    int64_t total = 0;
    for (int64_t v : load) total += v;
    for (int64_t e = 0; e < E; ++e) {
      // sign(mean - load_e) without rounding: compare load_e * E with total.
      const int64_t scaled = load[e] * E;
      const double step = scaled < total ? options_.gamma : scaled > total ? -options_.gamma : 0.0;
      double& b = bias_[layer][e];
      b = std::clamp(b + step, -options_.max_bias, options_.max_bias);
      biases_[layer][e] = static_cast<float>(b);
    }
  }
  return biases_;
}

}  // namespace dmoe::router
