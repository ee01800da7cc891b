#include "core/mlp.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cpu/matmul.h"
#include "core/cpu/ops.h"
#include "core/cpu/parallel.h"

namespace dmoe {

void MlpForward(const MlpWeights& mlp, const float* x, int64_t n, float* out) {
  const int64_t width = mlp.gate_proj.rows;
  std::vector<float> gate(n * width), up(n * width);
  cpu::MatMul(x, n, mlp.gate_proj, gate.data());
  cpu::MatMul(x, n, mlp.up_proj, up.data());
  cpu::SiluMul(gate.data(), up.data(), n * width);
  cpu::MatMul(gate.data(), n, mlp.down_proj, out);
}

absl::Status LocalExperts::RunExpertSlots(int64_t layer, const float* x, int64_t n, int64_t k,
                                          const int32_t* topk_idx, float* y) {
  const ModelConfig& c = weights_.config;
  const int64_t D = c.hidden_size, E = c.n_routed_experts;
  if (layer < 0 || layer >= c.num_hidden_layers || !c.is_moe_layer(layer)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not an MoE layer"));
  }
  const std::vector<MlpWeights>& experts = weights_.layers[layer].moe.experts;
  // Group (token, slot) pairs by expert: counting sort keeps token order.
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t i = 0; i < n * k; ++i) {
    const int32_t e = topk_idx[i];
    if (e < 0) continue;
    if (e >= E) return absl::InvalidArgumentError(absl::StrCat("expert index ", e, " >= n_routed_experts ", E));
    if (!experts[e].loaded()) {
      return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " expert ", e, " is not loaded here"));
    }
    ++count[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  std::vector<int64_t> slots(count[E]);
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < n * k; ++i) {
    if (topk_idx[i] >= 0) slots[fill[topk_idx[i]]++] = i;
  }
  std::vector<int32_t> active;
  for (int64_t e = 0; e < E; ++e) {
    if (count[e + 1] > count[e]) active.push_back(static_cast<int32_t>(e));
  }
  // Experts with many tokens parallelize inside MatMul; many small experts
  // parallelize across experts (nested MatMuls then run inline).
  auto run_expert = [&](int32_t e) {
    const int64_t begin = count[e], m = count[e + 1] - count[e];
    std::vector<float> xe(m * D), ye(m * D);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t token = slots[begin + i] / k;
      std::copy(x + token * D, x + (token + 1) * D, xe.data() + i * D);
    }
    MlpForward(experts[e], xe.data(), m, ye.data());
    for (int64_t i = 0; i < m; ++i) {
      std::copy(ye.data() + i * D, ye.data() + (i + 1) * D, y + slots[begin + i] * D);
    }
  };
  cpu::ParallelFor(static_cast<int64_t>(active.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) run_expert(active[i]);
  });
  return absl::OkStatus();
}

absl::Status ExpertBackend::RunRoutedExperts(int64_t layer, const float* x, int64_t n, int64_t k,
                                             const int32_t* topk_idx, const float* topk_weights, float* out) {
  absl::Status st = BeginRoutedExperts(layer, 0, x, n, k, topk_idx, topk_weights);
  if (!st.ok()) return st;
  return FinishRoutedExperts(layer, 0, out);
}

absl::Status LocalExperts::BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                              const int32_t* topk_idx, const float* topk_weights) {
  std::vector<float>& result = pending_[micro_batch & 1];
  result.assign(n * weights_.config.hidden_size, 0.0f);
  return Compute(layer, x, n, k, topk_idx, topk_weights, result.data());
}

absl::Status LocalExperts::FinishRoutedExperts(int64_t layer, int micro_batch, float* out) {
  std::vector<float>& result = pending_[micro_batch & 1];
  std::copy(result.begin(), result.end(), out);
  result.clear();
  return absl::OkStatus();
}

absl::Status LocalExperts::Compute(int64_t layer, const float* x, int64_t n, int64_t k, const int32_t* topk_idx,
                                   const float* topk_weights, float* out) {
  const int64_t D = weights_.config.hidden_size;
  std::vector<float> y(n * k * D);
  absl::Status st = RunExpertSlots(layer, x, n, k, topk_idx, y.data());
  if (!st.ok()) return st;
  std::fill(out, out + n * D, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t s = 0; s < k; ++s) {
      if (topk_idx[t * k + s] < 0) continue;
      cpu::Axpy(topk_weights[t * k + s], y.data() + (t * k + s) * D, out + t * D, D);
    }
  }
  return absl::OkStatus();
}

}  // namespace dmoe
