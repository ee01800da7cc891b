// The CPU compute backend: float32 activations in host memory, weights as
// loaded (F32 or BF16), the latent cache's host pool; the engine's exact
// CPU code (core/mla.cc, core/mlp.cc, core/cpu/).
#ifndef DMOE_CORE_CPU_CPU_BACKEND_H_
#define DMOE_CORE_CPU_CPU_BACKEND_H_

#include <memory>

#include "core/compute_backend.h"
#include "core/rope.h"

namespace dmoe {

// Stateless apart from the shared weights: safe to use from several threads
// (each on its own buffers and cache).
class CpuBackend : public ComputeBackend {
 public:
  explicit CpuBackend(std::shared_ptr<const ModelWeights> weights);

  const char* name() const override { return "cpu"; }
  MemorySpace memory() const override { return MemorySpace::kHost; }
  const ModelWeights& weights() const override { return *weights_; }
  bool has_non_expert_weights() const override { return !weights_->embed_tokens.empty(); }

  absl::StatusOr<Buffer> Allocate(int64_t floats) override;
  absl::Status Upload(const float* host_src, int64_t count, float* dst) override;
  absl::Status Download(const float* src, int64_t count, float* host_dst) override;
  absl::Status Copy(const float* src, int64_t count, float* dst) override;
  absl::StatusOr<std::unique_ptr<LatentCache>> CreateCache(const LatentCacheOptions& options) override;

  absl::Status Embed(absl::Span<const int32_t> tokens, float* x) override;
  absl::Status RmsNorm(int64_t layer, NormKind which, const float* x, int64_t n, float* out) override;
  absl::Status AddTo(float* x, const float* a, const float* b, int64_t count) override;
  absl::StatusOr<std::unique_ptr<AttentionPlan>> PlanAttention(std::vector<MlaSequence> sequences, int64_t n,
                                                               LatentCache& cache) override;
  absl::Status Attention(int64_t layer, const AttentionPlan& plan, MlaForm form, const float* h, int64_t n,
                         LatentCache& cache, float* out) override;
  absl::Status DenseMlp(int64_t layer, const float* h, int64_t n, float* out) override;
  absl::Status SharedExperts(int64_t layer, const float* h, int64_t n, float* out) override;
  absl::Status RouterLogits(int64_t layer, const float* h, int64_t n, float* host_logits,
                            const std::function<absl::Status()>& meanwhile = nullptr) override;
  bool HasRoutedExpert(int64_t layer, int64_t expert) const override;
  absl::Status RoutedExperts(int64_t layer, const float* x, int64_t n, int64_t k, const int32_t* host_topk_idx,
                             const float* host_topk_weights, float* out) override;
  absl::Status Logits(const float* x, absl::Span<const int64_t> rows, float* host_logits) override;
  absl::Status GreedyTokens(const float* x, absl::Span<const int64_t> rows, int32_t* host_tokens,
                            float* host_logprobs) override;

 private:
  std::shared_ptr<const ModelWeights> weights_;
  Rope rope_;
};

}  // namespace dmoe

#endif  // DMOE_CORE_CPU_CPU_BACKEND_H_
