#include "router/expert_placement.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace dmoe::router {
namespace {

using json = nlohmann::json;

// A JSON integer as int64, or nullopt for non-integers and values beyond int64.
std::optional<int64_t> AsInt64(const json& v) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  return std::nullopt;
}

absl::Status CheckExpertCount(int64_t n_routed_experts) {
  if (n_routed_experts < 1 || n_routed_experts > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert placement: n_routed_experts ", n_routed_experts, " must be in [1, 2^31)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ExpertPlacement> ParseExpertToNode(const json& root, int64_t n_routed_experts) {
  const json& map = root["expert_to_node"];
  if (!map.is_array()) return absl::InvalidArgumentError("expert placement: expert_to_node must be an array");
  if (static_cast<int64_t>(map.size()) != n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert placement: expert_to_node has ", map.size(),
                                                   " entries, n_routed_experts is ", n_routed_experts));
  }
  std::vector<int32_t> expert_to_node(map.size());
  int64_t max_node = -1;
  for (size_t e = 0; e < map.size(); ++e) {
    const std::optional<int64_t> node = AsInt64(map[e]);
    if (!node || *node < 0 || *node > INT32_MAX) {
      return absl::InvalidArgumentError(absl::StrCat("expert placement: expert_to_node[", e, "] = ", map[e].dump(),
                                                     " is not a node id (an integer >= 0)"));
    }
    expert_to_node[e] = static_cast<int32_t>(*node);
    max_node = std::max(max_node, *node);
  }
  int64_t num_nodes = max_node + 1;
  if (root.contains("num_expert_nodes")) {
    const std::optional<int64_t> m = AsInt64(root["num_expert_nodes"]);
    if (!m) {
      return absl::InvalidArgumentError(absl::StrCat("expert placement: num_expert_nodes = ",
                                                     root["num_expert_nodes"].dump(), " is not an integer"));
    }
    num_nodes = *m;
  }
  return ExpertPlacement::FromMap(n_routed_experts, num_nodes, std::move(expert_to_node));
}

absl::StatusOr<ExpertPlacement> ParseExpertShards(const json& root, int64_t n_routed_experts) {
  const json& shards = root["expert_shards"];
  if (!shards.is_array()) return absl::InvalidArgumentError("expert placement: expert_shards must be an array");
  std::vector<int32_t> expert_to_node(n_routed_experts, -1);
  for (size_t node = 0; node < shards.size(); ++node) {
    const json& shard = shards[node];
    if (!shard.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert placement: expert_shards[", node, "] must be an array of expert ids"));
    }
    if (shard.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("expert placement: expert_shards[", node, "] is empty"));
    }
    for (size_t i = 0; i < shard.size(); ++i) {
      const std::optional<int64_t> e = AsInt64(shard[i]);
      if (!e || *e < 0 || *e >= n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat("expert placement: expert_shards[", node, "][", i, "] = ",
                                                       shard[i].dump(), " is not an expert id in [0, ",
                                                       n_routed_experts, ")"));
      }
      if (expert_to_node[*e] >= 0) {
        return absl::InvalidArgumentError(absl::StrCat("expert placement: expert_shards[", node, "][", i,
                                                       "]: expert ", *e, " is already in expert_shards[",
                                                       expert_to_node[*e], "]"));
      }
      expert_to_node[*e] = static_cast<int32_t>(node);
    }
  }
  for (int64_t e = 0; e < n_routed_experts; ++e) {
    if (expert_to_node[e] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("expert placement: expert_shards: expert ", e, " is in no shard"));
    }
  }
  return ExpertPlacement::FromMap(n_routed_experts, static_cast<int64_t>(shards.size()), std::move(expert_to_node));
}

}  // namespace

ExpertPlacement::ExpertPlacement(std::vector<int32_t> expert_to_node, int32_t num_nodes)
    : expert_to_node_(std::move(expert_to_node)), shard_begin_(num_nodes + 1, 0) {
  // Counting sort by node keeps experts ascending within each shard.
  for (int32_t node : expert_to_node_) ++shard_begin_[node + 1];
  for (int32_t i = 0; i < num_nodes; ++i) shard_begin_[i + 1] += shard_begin_[i];
  shards_.resize(expert_to_node_.size());
  std::vector<int64_t> fill(shard_begin_.begin(), shard_begin_.end() - 1);
  for (size_t e = 0; e < expert_to_node_.size(); ++e) shards_[fill[expert_to_node_[e]]++] = static_cast<int32_t>(e);
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::Contiguous(int64_t n_routed_experts, int64_t num_expert_nodes) {
  DMOE_RETURN_IF_ERROR(CheckExpertCount(n_routed_experts));
  if (num_expert_nodes < 1 || num_expert_nodes > n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert placement: num_expert_nodes ", num_expert_nodes,
                                                   " must be in [1, n_routed_experts = ", n_routed_experts, "]"));
  }
  std::vector<int32_t> expert_to_node(n_routed_experts);
  for (int64_t node = 0; node < num_expert_nodes; ++node) {
    const int64_t begin = node * n_routed_experts / num_expert_nodes;
    const int64_t end = (node + 1) * n_routed_experts / num_expert_nodes;
    for (int64_t e = begin; e < end; ++e) expert_to_node[e] = static_cast<int32_t>(node);
  }
  return ExpertPlacement(std::move(expert_to_node), static_cast<int32_t>(num_expert_nodes));
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::FromMap(int64_t n_routed_experts, int64_t num_expert_nodes,
                                                         std::vector<int32_t> expert_to_node) {
  DMOE_RETURN_IF_ERROR(CheckExpertCount(n_routed_experts));
  if (num_expert_nodes < 1 || num_expert_nodes > n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert placement: num_expert_nodes ", num_expert_nodes,
                                                   " must be in [1, n_routed_experts = ", n_routed_experts, "]"));
  }
  if (static_cast<int64_t>(expert_to_node.size()) != n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert placement: expert_to_node has ", expert_to_node.size(),
                                                   " entries, n_routed_experts is ", n_routed_experts));
  }
  std::vector<int64_t> shard_size(num_expert_nodes, 0);
  for (size_t e = 0; e < expert_to_node.size(); ++e) {
    const int32_t node = expert_to_node[e];
    if (node < 0 || node >= num_expert_nodes) {
      return absl::InvalidArgumentError(absl::StrCat("expert placement: expert_to_node[", e, "] = ", node,
                                                     " is outside [0, num_expert_nodes = ", num_expert_nodes, ")"));
    }
    ++shard_size[node];
  }
  for (int64_t node = 0; node < num_expert_nodes; ++node) {
    if (shard_size[node] == 0) {
      return absl::InvalidArgumentError(absl::StrCat("expert placement: node ", node, " of ", num_expert_nodes,
                                                     " hosts no expert"));
    }
  }
  return ExpertPlacement(std::move(expert_to_node), static_cast<int32_t>(num_expert_nodes));
}

absl::StatusOr<ExpertPlacement> ExpertPlacement::FromJson(const std::string& json_text, int64_t n_routed_experts) {
  DMOE_RETURN_IF_ERROR(CheckExpertCount(n_routed_experts));
  const json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError("expert placement: not a JSON object");
  }
  const bool has_map = root.contains("expert_to_node");
  const bool has_shards = root.contains("expert_shards");
  if (has_map == has_shards) {
    return absl::InvalidArgumentError(
        "expert placement: give exactly one of expert_to_node and expert_shards");
  }
  if (has_shards && root.contains("num_expert_nodes")) {
    return absl::InvalidArgumentError(
        "expert placement: num_expert_nodes goes with expert_to_node; expert_shards has one entry per node");
  }
  return has_map ? ParseExpertToNode(root, n_routed_experts) : ParseExpertShards(root, n_routed_experts);
}

std::string ExpertPlacement::ToJson() const {
  json shards = json::array();
  for (int32_t node = 0; node < num_nodes(); ++node) {
    json shard = json::array();
    for (int32_t e : ExpertsOf(node)) shard.push_back(e);
    shards.push_back(std::move(shard));
  }
  return json{{"expert_shards", std::move(shards)}}.dump();
}

absl::Span<const int32_t> ExpertPlacement::ExpertsOf(int32_t node) const {
  return absl::MakeConstSpan(shards_.data() + shard_begin_[node], shards_.data() + shard_begin_[node + 1]);
}

}  // namespace dmoe::router
