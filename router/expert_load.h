// Expert load: tokens per (MoE layer, expert) over a balancing window, and the
// measures the balancer is judged by: load imbalance (max/mean) per expert and
// per expert node, and routing fidelity (how many decisions the bias changed).
#ifndef DMOE_ROUTER_EXPERT_LOAD_H_
#define DMOE_ROUTER_EXPERT_LOAD_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/config.h"
#include "router/expert_placement.h"

namespace dmoe::router {

// Accumulates num_tokens_per_expert reports per MoE layer over one balancing
// window. Reports from several expert nodes (each counting only its own
// experts) and several steps simply add up.
//
// Value type; thread-compatible (the owner, the scheduler's balancer loop,
// serializes Add/EndStep/Reset with its readers).
class ExpertLoadTracker {
 public:
  // Shaped after the model: num_hidden_layers layers, n_routed_experts
  // counters for each MoE layer. INVALID_ARGUMENT when the model has no MoE.
  static absl::StatusOr<ExpertLoadTracker> Create(const ModelConfig& config);

  // Adds one report: num_tokens_per_expert [n_routed_experts] of `layer`.
  // INVALID_ARGUMENT (and nothing added) for a layer that is not MoE, a
  // report of another size, or a negative count.
  absl::Status Add(int64_t layer, absl::Span<const int64_t> num_tokens_per_expert);
  // Counts a finished step; the window is BalancerOptions::window_steps long.
  void EndStep() { ++num_steps_; }
  // Zeroes the counts and the step count: the next window starts.
  void Reset();

  int64_t num_steps() const { return num_steps_; }
  int64_t num_layers() const { return static_cast<int64_t>(counts_.size()); }
  int64_t num_experts() const { return num_experts_; }
  // REQUIRES: 0 <= layer < num_layers().
  bool is_moe_layer(int64_t layer) const { return !counts_[layer].empty(); }
  // Tokens routed to each expert of `layer` in this window: [n_routed_experts],
  // empty for a dense layer. REQUIRES: 0 <= layer < num_layers().
  absl::Span<const int64_t> num_tokens_per_expert(int64_t layer) const { return counts_[layer]; }
  // Sum over all MoE layers: [n_routed_experts].
  std::vector<int64_t> TotalPerExpert() const;

 private:
  ExpertLoadTracker() = default;

  int64_t num_experts_ = 0;
  int64_t num_steps_ = 0;
  std::vector<std::vector<int64_t>> counts_;  // [layer][E], empty for dense layers
};

// max(loads) / mean(loads): 1 is perfect balance, loads.size() the worst
// (everything on one). Returns 1 when nothing was routed or `loads` is empty.
double MaxOverMean(absl::Span<const int64_t> loads);

// Expert work per node: the sum of num_tokens_per_expert over each node's
// expert_shard ((token, expert) pairs the node runs), [num_nodes].
// INVALID_ARGUMENT when the size is not placement.num_experts().
absl::StatusOr<std::vector<int64_t>> LoadPerNode(const ExpertPlacement& placement,
                                                 absl::Span<const int64_t> num_tokens_per_expert);

// Routing fidelity: how many of the reference's (token, expert) decisions the
// other routing of the same tokens does not make (per token set difference,
// so a reordering of the same experts is no change).
struct RoutingChange {
  int64_t changed_decisions = 0;
  int64_t total_decisions = 0;  // the reference's non-skipped slots
  double share() const {
    return total_decisions == 0 ? 0.0 : static_cast<double>(changed_decisions) / total_decisions;
  }
};

// reference_topk_idx (e.g. routed without serving bias) and balanced_topk_idx
// (with it): [num_tokens, top_k] each; slots < 0 are skipped. INVALID_ARGUMENT
// when the sizes differ or are not a multiple of top_k.
absl::StatusOr<RoutingChange> CompareRouting(absl::Span<const int32_t> reference_topk_idx,
                                             absl::Span<const int32_t> balanced_topk_idx, int64_t top_k);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_EXPERT_LOAD_H_
