#include "core/cpu/cpu_backend.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/cpu/matmul.h"
#include "core/cpu/ops.h"
#include "core/cpu/parallel.h"
#include "core/mlp.h"
#include "core/sampling.h"

namespace dmoe {

CpuBackend::CpuBackend(std::shared_ptr<const ModelWeights> weights)
    : weights_(std::move(weights)), rope_(weights_->config) {}

absl::StatusOr<Buffer> CpuBackend::Allocate(int64_t floats) {
  if (floats < 0) return absl::InvalidArgumentError(absl::StrCat("cpu: Allocate(", floats, ")"));
  if (floats == 0) return Buffer();
  float* p = new (std::nothrow) float[floats];
  if (p == nullptr) return absl::ResourceExhaustedError(absl::StrCat("cpu: cannot allocate ", floats, " floats"));
  return Buffer(p, floats, [](float* q) { delete[] q; });
}

absl::Status CpuBackend::Upload(const float* host_src, int64_t count, float* dst) {
  if (count > 0) std::memcpy(dst, host_src, count * sizeof(float));
  return absl::OkStatus();
}

absl::Status CpuBackend::Download(const float* src, int64_t count, float* host_dst) {
  return Upload(src, count, host_dst);
}

absl::Status CpuBackend::Copy(const float* src, int64_t count, float* dst) { return Upload(src, count, dst); }

absl::StatusOr<std::unique_ptr<LatentCache>> CpuBackend::CreateCache(const LatentCacheOptions& options) {
  LatentCacheOptions o = options;
  o.host_pool = true;
  return LatentCache::Create(o);
}

absl::Status CpuBackend::Embed(absl::Span<const int32_t> tokens, float* x) {
  const Matrix& embed = weights_->embed_tokens;
  const int64_t D = weights_->config.hidden_size;
  for (size_t row = 0; row < tokens.size(); ++row) {
    for (int64_t i = 0; i < D; ++i) x[row * D + i] = embed.at(tokens[row], i);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNorm(int64_t layer, NormKind which, const float* x, int64_t n, float* out) {
  const LayerWeights& lw = weights_->layers[layer];
  const std::vector<float>& w =
      which == NormKind::kInputLayernorm ? lw.input_layernorm : lw.post_attention_layernorm;
  cpu::RmsNorm(x, n, weights_->config.hidden_size, w.data(), static_cast<float>(weights_->config.rms_norm_eps), out);
  return absl::OkStatus();
}

absl::Status CpuBackend::AddTo(float* x, const float* a, const float* b, int64_t count) {
  if (b == nullptr) {
    for (int64_t i = 0; i < count; ++i) x[i] += a[i];
  } else {
    for (int64_t i = 0; i < count; ++i) x[i] += a[i] + b[i];
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionPlan>> CpuBackend::PlanAttention(std::vector<MlaSequence> sequences,
                                                                         int64_t n, LatentCache& cache) {
  if (!cache.has_host_pool()) {
    return absl::FailedPreconditionError("cpu: the latent cache has no host pool (created by another backend)");
  }
  return std::make_unique<AttentionPlan>(std::move(sequences));
}

absl::Status CpuBackend::Attention(int64_t layer, const AttentionPlan& plan, MlaForm form, const float* h, int64_t n,
                                   LatentCache& cache, float* out) {
  MlaForward(weights_->config, weights_->layers[layer].attn, rope_, layer, plan.sequences(), form, h, n, cache, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::DenseMlp(int64_t layer, const float* h, int64_t n, float* out) {
  MlpForward(weights_->layers[layer].mlp, h, n, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::SharedExperts(int64_t layer, const float* h, int64_t n, float* out) {
  const MlpWeights& shared = weights_->layers[layer].moe.shared_experts;
  std::fill(out, out + n * weights_->config.hidden_size, 0.0f);
  if (shared.loaded()) MlpForward(shared, h, n, out);
  return absl::OkStatus();
}

absl::Status CpuBackend::RouterLogits(int64_t layer, const float* h, int64_t n, float* host_logits,
                                      const std::function<absl::Status()>& meanwhile) {
  cpu::MatMul(h, n, weights_->layers[layer].moe.router, host_logits);  // float32 router
  return meanwhile ? meanwhile() : absl::OkStatus();
}

bool CpuBackend::HasRoutedExpert(int64_t layer, int64_t expert) const {
  const ModelConfig& c = weights_->config;
  if (layer < 0 || layer >= c.num_hidden_layers || !c.is_moe_layer(layer)) return false;
  const auto& experts = weights_->layers[layer].moe.experts;
  return expert >= 0 && expert < static_cast<int64_t>(experts.size()) && experts[expert].loaded();
}

absl::Status CpuBackend::RoutedExperts(int64_t layer, const float* x, int64_t n, int64_t k,
                                       const int32_t* host_topk_idx, const float* host_topk_weights, float* out) {
  LocalExperts experts(*weights_);
  return experts.Compute(layer, x, n, k, host_topk_idx, host_topk_weights, out);
}

absl::Status CpuBackend::Logits(const float* x, absl::Span<const int64_t> rows, float* host_logits) {
  const ModelConfig& c = weights_->config;
  const int64_t D = c.hidden_size, nr = static_cast<int64_t>(rows.size());
  std::vector<float> normed(nr * D);
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t i = 0; i < nr; ++i) cpu::RmsNorm(x + rows[i] * D, 1, D, weights_->norm.data(), eps, normed.data() + i * D);
  cpu::MatMul(normed.data(), nr, weights_->lm_head, host_logits);
  return absl::OkStatus();
}

absl::Status CpuBackend::GreedyTokens(const float* x, absl::Span<const int64_t> rows, int32_t* host_tokens,
                                      float* host_logprobs) {
  const int64_t V = weights_->config.vocab_size, nr = static_cast<int64_t>(rows.size());
  std::vector<float> logits(nr * V);
  if (absl::Status st = Logits(x, rows, logits.data()); !st.ok()) return st;
  // The Sampler itself (greedy draws no random numbers), one row per task.
  cpu::ParallelFor(nr, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      Sampler greedy(SamplingParams{});
      const SampleResult r = greedy.Sample(absl::MakeConstSpan(logits.data() + i * V, V));
      host_tokens[i] = r.token;
      host_logprobs[i] = r.logprob;
    }
  });
  return absl::OkStatus();
}

}  // namespace dmoe
