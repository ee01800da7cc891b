// The forward pass of a DeepSeek-V2/V3 model over a batch of sequences
// (MODEL_SPEC.md 3), on a compute backend (core/compute_backend.h: CPU or
// CUDA). The single-process CLI and the cluster's attention nodes run this
// same step; only the ComputeBackend and the ExpertBackend differ
// (in-process experts, expert nodes over the transport, or the compute
// backend's own resident experts).
#ifndef DMOE_CORE_ENGINE_H_
#define DMOE_CORE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/compute_backend.h"
#include "core/latent_cache.h"
#include "core/mla.h"
#include "core/mlp.h"
#include "core/model_weights.h"
#include "core/moe_gate.h"
#include "core/rope.h"

namespace dmoe {

struct EngineOptions {
  // kAuto: expanded MLA for prefill chunks, absorbed for decode tokens.
  MlaForm mla_form = MlaForm::kAuto;
  // Steps of at least this many tokens (and two sequences) run as two
  // micro-batches, so one's expert exchange overlaps the other's attention
  // (ping-pong, as MegaScale-Infer does). 0: never split. Results do not
  // depend on the split.
  int64_t ping_pong_min_tokens = 0;
  // Decode steps that run wholly on a device (one token per sequence,
  // greedy, MoE routed there, a serving bias on all MoE layers or none) replay device graphs
  // (ComputeBackend::BeginStepGraph) where the backend has them.
  bool device_graphs = true;
};

// One sequence's part of a step: `tokens` appended at positions
// [cache length, cache length + tokens.size()).
struct StepSequence {
  SequenceId seq = 0;
  std::vector<int32_t> tokens;
  bool all_logits = false;  // logits of every position, else only the last
  // Only the last position's greedy token and its log-probability, no
  // logits (ignored with all_logits): a GPU backend then sends back one id
  // per sequence instead of vocab_size floats.
  bool greedy_only = false;
};

struct SequenceLogits {
  std::vector<int64_t> positions;
  std::vector<float> logits;  // [positions.size(), vocab_size]; empty for greedy_only
  // greedy_only: what Sampler gives at temperature 0 for the last position
  // (the token exactly; the log-probability up to float rounding on a GPU).
  int32_t greedy_token = -1;
  float greedy_logprob = 0.0f;
};

// Per-step hooks into the MoE layers, e.g. the balancer's serving bias.
struct StepRouting {
  // Per MoE layer serving bias [E] added to the selection score (empty: none).
  const std::vector<std::vector<float>>* serving_bias = nullptr;
  // When set, receives every token's chosen experts: [layer][n * k].
  std::vector<std::vector<int32_t>>* topk_idx_out = nullptr;
  // When set (with topk_idx_out) and a serving bias is in effect, also
  // receives the experts the model's own routing (no serving bias) would
  // choose, to measure what the balancer changed: [layer][n * k].
  std::vector<std::vector<int32_t>>* unbiased_topk_idx_out = nullptr;
};

// Holds the compute backend (which holds the weights) and derived tables.
// Step() may be called from one thread at a time per LatentCache on the CPU
// backend, and from one thread at a time on others.
class Engine {
 public:
  // On the CPU backend.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::shared_ptr<const ModelWeights> weights,
                                                        const EngineOptions& options = {});
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::shared_ptr<ComputeBackend> backend,
                                                        const EngineOptions& options = {});

  const ModelConfig& config() const { return backend_->config(); }
  const ModelWeights& weights() const { return backend_->weights(); }
  ComputeBackend& backend() const { return *backend_; }

  // LatentCacheOptions sized for this model with `num_pages` pages.
  LatentCacheOptions CacheOptions(int64_t num_pages, int64_t page_size = 64) const;
  // A latent cache of `num_pages` pages in the backend's memory.
  absl::StatusOr<std::unique_ptr<LatentCache>> CreateCache(int64_t num_pages, int64_t page_size = 64) const;

  // Runs one forward step: extends each sequence's cache by its tokens,
  // runs every layer, returns logits in input order. INVALID_ARGUMENT for a
  // token outside the vocabulary, an empty chunk, a repeated sequence or a
  // context beyond max_position_embeddings; RESOURCE_EXHAUSTED when the
  // cache lacks pages (nothing is changed then).
  absl::StatusOr<std::vector<SequenceLogits>> Step(const std::vector<StepSequence>& batch, LatentCache& cache,
                                                   ExpertBackend& experts, const StepRouting& routing = {}) const;
  // Steps that ran as device graphs so far.
  int64_t graph_steps() const { return graph_steps_.load(std::memory_order_relaxed); }

 private:
  Engine(std::shared_ptr<ComputeBackend> backend, const EngineOptions& options);
  absl::Status Validate(const std::vector<StepSequence>& batch, const LatentCache& cache) const;
  struct MicroBatch;
  // Runs attention and starts the FFN of `layer` for one micro-batch.
  absl::Status BeginLayer(int64_t layer, int index, MicroBatch& mb, LatentCache& cache, ExpertBackend& experts,
                          const StepRouting& routing) const;
  // Adds the routed experts' output of the pending MoE layer, if any.
  absl::Status FinishLayer(int index, MicroBatch& mb, ExpertBackend& experts) const;
  // Whether routed-expert activations go through host copies (a device
  // backend with experts that take host arrays).
  bool StagesExperts(const ExpertBackend& experts) const;
  // Whether MoE layer `layer`'s routing and routed experts run on the
  // backend's device (the backend serves them itself, no host gate).
  bool RoutesOnDevice(int64_t layer, const ExpertBackend& experts) const;
  // The device-graph key of a decode step that can replay one (after the
  // cache has been extended), or nullopt.
  std::optional<StepGraphKey> GraphKeyFor(const std::vector<StepSequence>& batch, size_t split,
                                          const LatentCache& cache, const ExpertBackend& experts,
                                          const StepRouting& routing) const;
  // The step after its cache extension: buffers, embedding, layers, head
  // (inside BeginStepGraph / EndStepGraph when `graph`). The caller rolls
  // the cache back on failure.
  absl::StatusOr<std::vector<SequenceLogits>> RunStep(const std::vector<StepSequence>& batch, size_t split,
                                                      std::vector<MicroBatch>& mbs, LatentCache& cache,
                                                      ExpertBackend& experts, const StepRouting& routing,
                                                      bool device_routed, bool graph) const;

  // Decode batches up to this many sequences replay device graphs.
  static constexpr int64_t kMaxGraphTokens = 256;

  std::shared_ptr<ComputeBackend> backend_;
  EngineOptions options_;
  MoeGate gate_;
  mutable std::mutex graph_mu_;
  mutable std::set<StepGraphKey> failed_graph_keys_;  // captures that failed: not tried again
  mutable std::set<StepGraphKey> graphed_keys_;       // ran as graphs before
  mutable std::optional<StepGraphKey> last_graph_key_;
  mutable std::atomic<int64_t> graph_steps_{0};
};

}  // namespace dmoe

#endif  // DMOE_CORE_ENGINE_H_
