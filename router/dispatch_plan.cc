#include "router/dispatch_plan.h"

#include <algorithm>
#include <cassert>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace dmoe::router {

absl::StatusOr<DispatchPlan> DispatchPlan::Build(const ExpertPlacement& placement,
                                                 absl::Span<const int32_t> topk_idx,
                                                 absl::Span<const float> topk_weights, int64_t num_tokens,
                                                 int64_t top_k) {
  if (top_k < 1 || num_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dispatch plan: num_tokens ", num_tokens, " must be >= 0 and top_k ", top_k, " >= 1"));
  }
  // Division, not num_tokens * top_k, so absurd counts cannot overflow.
  if (topk_idx.size() % top_k != 0 || static_cast<int64_t>(topk_idx.size()) / top_k != num_tokens ||
      topk_weights.size() != topk_idx.size()) {
    return absl::InvalidArgumentError(absl::StrCat("dispatch plan: topk_idx has ", topk_idx.size(),
                                                   " and topk_weights ", topk_weights.size(),
                                                   " entries, expected num_tokens ", num_tokens, " * top_k ", top_k));
  }
  const int64_t E = placement.num_experts();
  const int32_t M = placement.num_nodes();
  for (size_t i = 0; i < topk_idx.size(); ++i) {
    if (topk_idx[i] >= E) {
      return absl::InvalidArgumentError(absl::StrCat("dispatch plan: topk_idx[", i, "] = ", topk_idx[i],
                                                     " >= n_routed_experts ", E));
    }
  }
  // node_of_slot[t*k + s]: the slot's node, -1 when skipped.
  std::vector<int32_t> node_of_slot(topk_idx.size());
  for (size_t i = 0; i < topk_idx.size(); ++i) {
    node_of_slot[i] = topk_idx[i] < 0 ? -1 : placement.NodeOf(topk_idx[i]);
  }
  // A slot opens a row for its node unless an earlier slot of the same token
  // already did (top_k is small: the quadratic scan beats a set).
  auto first_of_node = [&](int64_t t, int64_t s) {
    const int32_t* nodes = node_of_slot.data() + t * top_k;
    if (nodes[s] < 0) return false;
    for (int64_t p = 0; p < s; ++p) {
      if (nodes[p] == nodes[s]) return false;
    }
    return true;
  };

  DispatchPlan plan;
  plan.num_tokens_ = num_tokens;
  plan.top_k_ = top_k;
  plan.node_begin_.assign(M + 1, 0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t s = 0; s < top_k; ++s) {
      if (first_of_node(t, s)) ++plan.node_begin_[node_of_slot[t * top_k + s] + 1];
    }
  }
  for (int32_t node = 0; node < M; ++node) plan.node_begin_[node + 1] += plan.node_begin_[node];
  const int64_t rows = plan.node_begin_[M];
  plan.tokens_.resize(rows);
  plan.topk_idx_.assign(rows * top_k, -1);
  plan.topk_weights_.assign(rows * top_k, 0.0f);

  // Tokens ascend within each node because t ascends here.
  std::vector<int64_t> fill(plan.node_begin_.begin(), plan.node_begin_.end() - 1);
  std::vector<int64_t> row_of_slot(top_k);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t s = 0; s < top_k; ++s) {
      const int64_t i = t * top_k + s;
      const int32_t node = node_of_slot[i];
      if (node < 0) continue;
      if (first_of_node(t, s)) {
        row_of_slot[s] = fill[node]++;
        plan.tokens_[row_of_slot[s]] = t;
      } else {
        for (int64_t p = 0; p < s; ++p) {
          if (node_of_slot[t * top_k + p] == node) {
            row_of_slot[s] = row_of_slot[p];
            break;
          }
        }
      }
      plan.topk_idx_[row_of_slot[s] * top_k + s] = topk_idx[i];
      plan.topk_weights_[row_of_slot[s] * top_k + s] = topk_weights[i];
    }
  }
  return plan;
}

absl::Span<const int64_t> DispatchPlan::tokens(int32_t node) const {
  return absl::MakeConstSpan(tokens_.data() + node_begin_[node], tokens_.data() + node_begin_[node + 1]);
}

absl::Span<const int32_t> DispatchPlan::topk_idx(int32_t node) const {
  return absl::MakeConstSpan(topk_idx_.data() + node_begin_[node] * top_k_,
                             topk_idx_.data() + node_begin_[node + 1] * top_k_);
}

absl::Span<const float> DispatchPlan::topk_weights(int32_t node) const {
  return absl::MakeConstSpan(topk_weights_.data() + node_begin_[node] * top_k_,
                             topk_weights_.data() + node_begin_[node + 1] * top_k_);
}

std::vector<float> DispatchPlan::GatherHidden(int32_t node, absl::Span<const float> x, int64_t hidden_size) const {
  assert(static_cast<int64_t>(x.size()) == num_tokens_ * hidden_size);
  const absl::Span<const int64_t> rows = tokens(node);
  std::vector<float> out(rows.size() * hidden_size);
  for (size_t j = 0; j < rows.size(); ++j) {
    std::memcpy(out.data() + j * hidden_size, x.data() + rows[j] * hidden_size, hidden_size * sizeof(float));
  }
  return out;
}

absl::Status DispatchPlan::Combine(absl::Span<const absl::Span<const float>> partial_sums, int64_t hidden_size,
                                   absl::Span<float> out) const {
  const int32_t M = num_nodes();
  if (hidden_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("combine: hidden_size ", hidden_size, " must be >= 1"));
  }
  if (static_cast<int64_t>(partial_sums.size()) != M) {
    return absl::InvalidArgumentError(
        absl::StrCat("combine: partial sums of ", partial_sums.size(), " nodes, the plan has ", M));
  }
  if (static_cast<int64_t>(out.size()) != num_tokens_ * hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat("combine: out has ", out.size(), " values, expected num_tokens ",
                                                   num_tokens_, " * hidden_size ", hidden_size));
  }
  for (int32_t node = 0; node < M; ++node) {
    const int64_t expected = (node_begin_[node + 1] - node_begin_[node]) * hidden_size;
    if (static_cast<int64_t>(partial_sums[node].size()) != expected) {
      return absl::InvalidArgumentError(absl::StrCat("combine: node ", node, " returned ", partial_sums[node].size(),
                                                     " values, expected ", expected, " (",
                                                     node_begin_[node + 1] - node_begin_[node],
                                                     " tokens * hidden_size ", hidden_size, ")"));
    }
  }
  std::fill(out.begin(), out.end(), 0.0f);
  for (int32_t node = 0; node < M; ++node) {
    const absl::Span<const int64_t> rows = tokens(node);
    const float* src = partial_sums[node].data();
    for (size_t j = 0; j < rows.size(); ++j) {
      float* dst = out.data() + rows[j] * hidden_size;
      const float* p = src + j * hidden_size;
      for (int64_t d = 0; d < hidden_size; ++d) dst[d] += p[d];
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> NumTokensPerExpert(absl::Span<const int32_t> topk_idx,
                                                        int64_t n_routed_experts) {
  std::vector<int64_t> counts(std::max<int64_t>(n_routed_experts, 0), 0);
  for (size_t i = 0; i < topk_idx.size(); ++i) {
    const int32_t e = topk_idx[i];
    if (e < 0) continue;
    if (e >= n_routed_experts) {
      return absl::InvalidArgumentError(absl::StrCat("num_tokens_per_expert: topk_idx[", i, "] = ", e,
                                                     " >= n_routed_experts ", n_routed_experts));
    }
    ++counts[e];
  }
  return counts;
}

}  // namespace dmoe::router
