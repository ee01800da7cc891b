// The dispatch/combine plan of one MoE layer's batch: which tokens go to which
// expert node, the expert slots each node runs for them, and the sum of the
// nodes' weighted partial sums (MODEL_SPEC.md 3.8).
#ifndef DMOE_ROUTER_DISPATCH_PLAN_H_
#define DMOE_ROUTER_DISPATCH_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "router/expert_placement.h"

namespace dmoe::router {

// Built on the attention node from the gate's topk_idx/topk_weights for one
// MoE layer of one step (or micro-batch). For every expert node it lists the
// tokens the node must receive (each token at most once, ascending) and, per
// such token, the token's top_k slots with the slots of experts hosted
// elsewhere masked out (expert -1, weight 0). That masked [tokens, top_k] form
// is what core's ExpertBackend::RunRoutedExperts takes, so an expert node
// computes its weighted partial sums with LocalExperts as is, slot order kept.
//
// Immutable value type after Build; safe to share across threads.
class DispatchPlan {
 public:
  // topk_idx, topk_weights: [num_tokens, top_k] as written by MoeGate::Route;
  // an index < 0 marks a skipped slot (sent nowhere). INVALID_ARGUMENT when
  // the spans are not num_tokens * top_k long, top_k < 1, or an expert is
  // >= placement.num_experts(). Copies what it needs; keeps no references.
  static absl::StatusOr<DispatchPlan> Build(const ExpertPlacement& placement, absl::Span<const int32_t> topk_idx,
                                            absl::Span<const float> topk_weights, int64_t num_tokens,
                                            int64_t top_k);

  int64_t num_tokens() const { return num_tokens_; }
  int64_t top_k() const { return top_k_; }
  int32_t num_nodes() const { return static_cast<int32_t>(node_begin_.size()) - 1; }

  // REQUIRES for the per-node accessors: 0 <= node < num_nodes().
  // Token indices (rows of the batch) `node` receives, ascending, each once;
  // empty when the node has nothing to do (send it nothing).
  absl::Span<const int64_t> tokens(int32_t node) const;
  // [tokens(node).size(), top_k]: the gate's slots in slot order, experts
  // hosted on other nodes (and skipped slots) set to -1.
  absl::Span<const int32_t> topk_idx(int32_t node) const;
  // [tokens(node).size(), top_k]: the matching weights, 0 where masked.
  absl::Span<const float> topk_weights(int32_t node) const;

  // The node's rows of x: x [num_tokens, hidden_size] -> [tokens(node).size(), hidden_size].
  // REQUIRES: x.size() == num_tokens() * hidden_size.
  std::vector<float> GatherHidden(int32_t node, absl::Span<const float> x, int64_t hidden_size) const;

  // out [num_tokens, hidden_size] = sum of the nodes' partial sums, each
  // scattered to its tokens, added node 0 first, then node 1, ..., so the
  // result does not depend on the order replies arrived in. Tokens routed
  // nowhere get 0. partial_sums[node]: [tokens(node).size(), hidden_size]
  // (empty for nodes without tokens). INVALID_ARGUMENT naming the node on a
  // size mismatch; `out` is unspecified then.
  absl::Status Combine(absl::Span<const absl::Span<const float>> partial_sums, int64_t hidden_size,
                       absl::Span<float> out) const;

 private:
  DispatchPlan() = default;

  int64_t num_tokens_ = 0;
  int64_t top_k_ = 0;
  std::vector<int64_t> node_begin_;  // [M + 1]: node i owns rows [node_begin_[i], node_begin_[i+1])
  std::vector<int64_t> tokens_;      // [rows]
  std::vector<int32_t> topk_idx_;    // [rows, top_k]
  std::vector<float> topk_weights_;  // [rows, top_k]
};

// num_tokens_per_expert [n_routed_experts]: how many (token, slot) pairs chose
// each expert; slots < 0 are skipped. For the expert nodes' load reports.
// INVALID_ARGUMENT for an expert >= n_routed_experts.
absl::StatusOr<std::vector<int64_t>> NumTokensPerExpert(absl::Span<const int32_t> topk_idx,
                                                        int64_t n_routed_experts);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_DISPATCH_PLAN_H_
