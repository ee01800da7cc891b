#include "core/moe_gate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace dmoe {
namespace {

// Indices of the k largest values, descending; ties go to the lower index.
void TopK(const std::vector<float>& v, int64_t k, std::vector<int32_t>& out) {
  out.resize(v.size());
  std::iota(out.begin(), out.end(), 0);
  std::partial_sort(out.begin(), out.begin() + k, out.end(), [&](int32_t a, int32_t b) {
    return v[a] > v[b] || (v[a] == v[b] && a < b);
  });
  out.resize(k);
}

}  // namespace

MoeGate::MoeGate(const ModelConfig& c)
    : model_type_(c.model_type),
      topk_method_(c.topk_method),
      num_experts_(c.n_routed_experts),
      top_k_(c.num_experts_per_tok),
      n_group_(c.n_group),
      topk_group_(c.topk_group),
      norm_topk_prob_(c.norm_topk_prob),
      routed_scaling_factor_(static_cast<float>(c.routed_scaling_factor)) {}

void MoeGate::Route(absl::Span<const float> z, absl::Span<const float> correction_bias,
                    absl::Span<const float> serving_bias, int32_t* topk_idx, float* topk_weights) const {
  const int64_t E = num_experts_;
  std::vector<float> scores(E);
  if (model_type_ == ModelType::kDeepseekV3) {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-z[e]));
  } else {
    const float mx = *std::max_element(z.begin(), z.end());
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(z[e] - mx));
    for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
  }
  // Selection score: affinity + trained bias + serving bias.
  std::vector<float> select = scores;
  for (int64_t e = 0; e < static_cast<int64_t>(correction_bias.size()); ++e) select[e] += correction_bias[e];
  for (int64_t e = 0; e < static_cast<int64_t>(serving_bias.size()); ++e) select[e] += serving_bias[e];

  if (topk_method_ != TopkMethod::kGreedy) {
    const int64_t per_group = E / n_group_;
    std::vector<float> group_score(n_group_);
    for (int64_t g = 0; g < n_group_; ++g) {
      const float* s = select.data() + g * per_group;
      if (topk_method_ == TopkMethod::kNoauxTc) {
        // Sum of the two largest selection scores in the group.
        float a = -INFINITY, b = -INFINITY;
        for (int64_t i = 0; i < per_group; ++i) {
          if (s[i] > a) {
            b = a;
            a = s[i];
          } else if (s[i] > b) {
            b = s[i];
          }
        }
        group_score[g] = a + b;
      } else {
        group_score[g] = *std::max_element(s, s + per_group);
      }
    }
    std::vector<int32_t> kept;
    TopK(group_score, topk_group_, kept);
    std::vector<bool> keep(n_group_, false);
    for (int32_t g : kept) keep[g] = true;
    // transformers masks dropped groups with 0 (DeepSeek code: -inf).
    for (int64_t e = 0; e < E; ++e) {
      if (!keep[e / per_group]) select[e] = 0.0f;
    }
  }
  std::vector<int32_t> top;
  TopK(select, top_k_, top);
  float denom = 0.f;
  for (int32_t e : top) denom += scores[e];
  const bool renormalize = model_type_ == ModelType::kDeepseekV3 && norm_topk_prob_;
  for (int64_t i = 0; i < top_k_; ++i) {
    float w = scores[top[i]];
    if (renormalize) w /= (denom + 1e-20f);
    topk_idx[i] = top[i];
    topk_weights[i] = w * routed_scaling_factor_;
  }
}

}  // namespace dmoe
