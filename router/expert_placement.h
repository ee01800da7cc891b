// Expert placement: which expert node hosts each routed expert.
#ifndef DMOE_ROUTER_EXPERT_PLACEMENT_H_
#define DMOE_ROUTER_EXPERT_PLACEMENT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace dmoe::router {

// Maps each of the n_routed_experts routed experts to one of num_nodes expert
// nodes; the same map holds for every MoE layer. A node's experts are its
// expert_shard. Every expert lives on exactly one node and every node hosts
// at least one expert (a node without experts would only ever receive empty
// dispatches, so it is taken for a configuration mistake; to drain a node,
// build a placement without it).
//
// Immutable value type; safe to share across threads.
class ExpertPlacement {
 public:
  // Balanced contiguous shards: node i hosts experts
  // [floor(i*E/M), floor((i+1)*E/M)), so shard sizes differ by at most one.
  // INVALID_ARGUMENT unless 1 <= num_expert_nodes <= n_routed_experts.
  static absl::StatusOr<ExpertPlacement> Contiguous(int64_t n_routed_experts, int64_t num_expert_nodes);

  // expert_to_node[e] is the node of expert e. INVALID_ARGUMENT naming the
  // index when the map's size is not n_routed_experts, a node id is outside
  // [0, num_expert_nodes), or a node hosts no expert.
  static absl::StatusOr<ExpertPlacement> FromMap(int64_t n_routed_experts, int64_t num_expert_nodes,
                                                 std::vector<int32_t> expert_to_node);

  // Parses a cluster-config fragment, one of
  //   {"expert_to_node": [0, 0, 1, 1, ...]}            // [n_routed_experts]
  //   {"expert_to_node": [...], "num_expert_nodes": 4}  // node count checked
  //   {"expert_shards": [[0, 1, 2], [3, 4, 5], ...]}   // one list per node
  // Without "num_expert_nodes", expert_to_node implies max node id + 1 nodes.
  // INVALID_ARGUMENT naming the field and index for malformed JSON, a
  // missing/duplicated expert, an expert id >= n_routed_experts, or an empty
  // node.
  static absl::StatusOr<ExpertPlacement> FromJson(const std::string& json_text, int64_t n_routed_experts);

  // {"expert_shards": [[...], ...]}, accepted by FromJson.
  std::string ToJson() const;

  int64_t num_experts() const { return static_cast<int64_t>(expert_to_node_.size()); }
  int32_t num_nodes() const { return static_cast<int32_t>(shard_begin_.size()) - 1; }

  // REQUIRES: 0 <= expert < num_experts().
  int32_t NodeOf(int32_t expert) const { return expert_to_node_[expert]; }
  // The node's expert_shard, ascending. REQUIRES: 0 <= node < num_nodes().
  absl::Span<const int32_t> ExpertsOf(int32_t node) const;
  // [num_experts()]
  absl::Span<const int32_t> expert_to_node() const { return expert_to_node_; }

 private:
  ExpertPlacement(std::vector<int32_t> expert_to_node, int32_t num_nodes);

  std::vector<int32_t> expert_to_node_;  // [E]
  std::vector<int32_t> shards_;          // [E], experts grouped by node, ascending within a node
  std::vector<int64_t> shard_begin_;     // [M + 1], node i's shard is shards_[begin[i], begin[i+1])
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_EXPERT_PLACEMENT_H_
