#include "router/expert_load.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace dmoe::router {

absl::StatusOr<ExpertLoadTracker> ExpertLoadTracker::Create(const ModelConfig& config) {
  if (!config.has_moe()) {
    return absl::InvalidArgumentError("expert load tracker: the model has no MoE layers (n_routed_experts or "
                                      "num_experts_per_tok unset)");
  }
  ExpertLoadTracker tracker;
  tracker.num_experts_ = config.n_routed_experts;
  tracker.counts_.resize(config.num_hidden_layers);
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (config.is_moe_layer(layer)) tracker.counts_[layer].assign(config.n_routed_experts, 0);
  }
  return tracker;
}

absl::Status ExpertLoadTracker::Add(int64_t layer, absl::Span<const int64_t> num_tokens_per_expert) {
  if (layer < 0 || layer >= num_layers() || !is_moe_layer(layer)) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert load: layer ", layer, " is not an MoE layer of this ", num_layers(), "-layer model"));
  }
  if (static_cast<int64_t>(num_tokens_per_expert.size()) != num_experts_) {
    return absl::InvalidArgumentError(absl::StrCat("expert load: layer ", layer, ": report has ",
                                                   num_tokens_per_expert.size(), " experts, the model ",
                                                   num_experts_));
  }
  for (size_t e = 0; e < num_tokens_per_expert.size(); ++e) {
    if (num_tokens_per_expert[e] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("expert load: layer ", layer, ": num_tokens_per_expert[", e,
                                                     "] = ", num_tokens_per_expert[e], " < 0"));
    }
  }
  std::vector<int64_t>& counts = counts_[layer];
  for (size_t e = 0; e < counts.size(); ++e) counts[e] += num_tokens_per_expert[e];
  return absl::OkStatus();
}

void ExpertLoadTracker::Reset() {
  num_steps_ = 0;
  for (std::vector<int64_t>& counts : counts_) std::fill(counts.begin(), counts.end(), 0);
}

std::vector<int64_t> ExpertLoadTracker::TotalPerExpert() const {
  std::vector<int64_t> total(num_experts_, 0);
  for (const std::vector<int64_t>& counts : counts_) {
    for (size_t e = 0; e < counts.size(); ++e) total[e] += counts[e];
  }
  return total;
}

double MaxOverMean(absl::Span<const int64_t> loads) {
  if (loads.empty()) return 1.0;
  int64_t sum = 0, max = 0;
  for (int64_t v : loads) {
    sum += v;
    max = std::max(max, v);
  }
  if (sum == 0) return 1.0;
  return static_cast<double>(max) * static_cast<double>(loads.size()) / static_cast<double>(sum);
}

absl::StatusOr<std::vector<int64_t>> LoadPerNode(const ExpertPlacement& placement,
                                                 absl::Span<const int64_t> num_tokens_per_expert) {
  if (static_cast<int64_t>(num_tokens_per_expert.size()) != placement.num_experts()) {
    return absl::InvalidArgumentError(absl::StrCat("load per node: num_tokens_per_expert has ",
                                                   num_tokens_per_expert.size(), " experts, the placement ",
                                                   placement.num_experts()));
  }
  std::vector<int64_t> per_node(placement.num_nodes(), 0);
  for (size_t e = 0; e < num_tokens_per_expert.size(); ++e) {
    per_node[placement.NodeOf(static_cast<int32_t>(e))] += num_tokens_per_expert[e];
  }
  return per_node;
}

absl::StatusOr<RoutingChange> CompareRouting(absl::Span<const int32_t> reference_topk_idx,
                                             absl::Span<const int32_t> balanced_topk_idx, int64_t top_k) {
  if (top_k < 1 || reference_topk_idx.size() != balanced_topk_idx.size() ||
      reference_topk_idx.size() % top_k != 0) {
    return absl::InvalidArgumentError(absl::StrCat("compare routing: topk_idx sizes ", reference_topk_idx.size(),
                                                   " and ", balanced_topk_idx.size(),
                                                   " must be equal multiples of top_k ", top_k));
  }
  RoutingChange change;
  for (size_t base = 0; base < reference_topk_idx.size(); base += top_k) {
    const int32_t* ref = reference_topk_idx.data() + base;
    const int32_t* bal = balanced_topk_idx.data() + base;
    for (int64_t s = 0; s < top_k; ++s) {
      if (ref[s] < 0) continue;
      ++change.total_decisions;
      if (std::find(bal, bal + top_k, ref[s]) == bal + top_k) ++change.changed_decisions;
    }
  }
  return change;
}

}  // namespace dmoe::router
