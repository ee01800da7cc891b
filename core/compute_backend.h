// The compute-backend seam: the engine's per-layer work (embedding, norms,
// MLA attention over the paged latent cache, dense and shared MLPs, the
// float32 router, grouped routed experts, the head) behind one interface, so
// that the engine's step (core/engine.h), the scheduler, router, transport
// and serving loop are the same whatever computes. Implementations:
// CpuBackend (core/cpu/cpu_backend.h, today's exact float32 code) and
// CudaBackend (core/cuda/cuda_compute_backend.h, weights resident in GPU
// memory, only with -DDMOE_CUDA=ON). CreateComputeBackend
// (core/backends.h) picks one by --device.
//
// Activations are float32 and live where the backend computes (host memory
// for CPU, device memory for CUDA): every `const float*` / `float*` below is
// a pointer into a Buffer of this backend unless it is named `host_*`.
// The MoE gate (core/moe_gate.h) and sampling (core/sampling.h) run on the
// host from the float32 router logits the backend hands back, except where
// a device backend serves a layer's routed experts itself
// (DeviceRoutedExperts: the gate on the device, no host round trip) or
// picks greedy tokens (GreedyTokens).
#ifndef DMOE_CORE_COMPUTE_BACKEND_H_
#define DMOE_CORE_COMPUTE_BACKEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "core/config.h"
#include "core/latent_cache.h"
#include "core/mla.h"
#include "core/mlp.h"
#include "core/model_weights.h"

namespace dmoe {

enum class MemorySpace { kHost, kDevice };

// A float32 allocation owned by a compute backend (host or device memory).
// Move-only; frees itself through the backend's release function.
class Buffer {
 public:
  Buffer() = default;
  Buffer(float* data, int64_t size, std::function<void(float*)> release)
      : data_(data), size_(size), release_(std::move(release)) {}
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { Reset(); }

  float* data() const { return data_; }
  int64_t size() const { return size_; }  // floats
  bool empty() const { return data_ == nullptr; }
  void Reset();

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
  std::function<void(float*)> release_;
};

enum class NormKind { kInputLayernorm, kPostAttentionLayernorm };

// Block-table width (pages per sequence) of a step whose sequences hold up
// to `pages` pages: a power of two, at least 4, so that one device graph
// serves a range of context lengths (and eager steps size their attention
// alike: the same kernels, the same results).
inline int64_t PaddedPagesPerSequence(int64_t pages) {
  int64_t p = 4;
  while (p < pages) p *= 2;
  return p;
}

// What fixes a decode step's device graph: tokens (one per sequence), the
// block-table width in pages (a bucket, >= every sequence's pages), whether
// the routing record is copied back, whether every MoE layer routes with a
// serving bias (its values are inputs of each replay; then the record holds
// the unbiased choices too), and the latent cache it writes (its storage,
// LatentCache::storage()).
struct StepGraphKey {
  int64_t tokens = 0;
  int64_t max_pages = 0;
  bool record_routing = false;
  bool serving_bias = false;
  bool record_unbiased = false;  // the unbiased choices copied back (with a serving bias)
  const void* cache = nullptr;
  auto tie() const { return std::tie(tokens, max_pages, record_routing, serving_bias, record_unbiased, cache); }
  bool operator<(const StepGraphKey& o) const { return tie() < o.tie(); }
  bool operator==(const StepGraphKey& o) const { return tie() == o.tie(); }
};

// What a step's attention needs besides the activations, made once per
// micro-batch and step (PlanAttention) and shared by every layer: the
// sequences and, on a device, their positions, cache slots and block tables
// in device memory.
class AttentionPlan {
 public:
  explicit AttentionPlan(std::vector<MlaSequence> sequences) : sequences_(std::move(sequences)) {}
  virtual ~AttentionPlan() = default;
  const std::vector<MlaSequence>& sequences() const { return sequences_; }

 private:
  std::vector<MlaSequence> sequences_;
};

// One backend per loaded model; its weights are resident where it computes.
// Not thread-safe unless an implementation says so: one step loop (an
// Engine::Step, an expert worker) at a time.
class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;

  virtual const char* name() const = 0;  // "cpu", "cuda"
  virtual MemorySpace memory() const = 0;
  // The model: config, host-side tables (norm weights, score-correction
  // biases) and, for the CPU backend, every matrix. A GPU backend may leave
  // matrices empty (resident on the device only, e.g. --load-format dummy).
  virtual const ModelWeights& weights() const = 0;
  const ModelConfig& config() const { return weights().config; }
  // Whether embeddings, attention and head are present (an attention node
  // or a whole model), as Engine needs.
  virtual bool has_non_expert_weights() const = 0;

  // --- buffers
  // `floats` uninitialized floats (0 gives an empty buffer).
  virtual absl::StatusOr<Buffer> Allocate(int64_t floats) = 0;
  virtual absl::Status Upload(const float* host_src, int64_t count, float* dst) = 0;
  virtual absl::Status Download(const float* src, int64_t count, float* host_dst) = 0;
  virtual absl::Status Copy(const float* src, int64_t count, float* dst) = 0;

  // --- the latent cache this backend reads and writes (host pool for CPU,
  // device pool for CUDA; block tables always on the host).
  virtual absl::StatusOr<std::unique_ptr<LatentCache>> CreateCache(const LatentCacheOptions& options) = 0;
  // Pages of `page_size` tokens (all layers) that fit when this process
  // uses `fraction` of the device's memory in all (weights, cache and
  // working memory), as vLLM's gpu_memory_utilization. UNIMPLEMENTED on the
  // CPU (its pool is sized in pages).
  virtual absl::StatusOr<int64_t> CachePagesForMemoryFraction(double fraction, int64_t page_size) {
    return absl::UnimplementedError(absl::StrCat(name(), ": --gpu-memory-fraction needs --device cuda"));
  }

  // --- per-layer work; n tokens, D = hidden_size. Results are overwritten.
  // x[n, D] = embed_tokens[tokens] (ids already checked against the vocabulary).
  virtual absl::Status Embed(absl::Span<const int32_t> tokens, float* x) = 0;
  // out = RmsNorm(x; layer's `which` weight, rms_norm_eps). out may equal x.
  virtual absl::Status RmsNorm(int64_t layer, NormKind which, const float* x, int64_t n, float* out) = 0;
  // x[i] += a[i], or x[i] += (a[i] + b[i]) when b is given.
  virtual absl::Status AddTo(float* x, const float* a, const float* b, int64_t count) = 0;
  // The plan of one micro-batch's attention in this step (n tokens).
  // REQUIRES: the cache (created by this backend) already holds
  // start_pos + num_tokens positions of each sequence.
  virtual absl::StatusOr<std::unique_ptr<AttentionPlan>> PlanAttention(std::vector<MlaSequence> sequences,
                                                                       int64_t n, LatentCache& cache) = 0;
  // out[n, D] = MLA_layer(h[n, D]) (MODEL_SPEC.md 3.3/3.5), writing each
  // token's latent cache entry first. `form` chooses the CPU's MLA form; a
  // GPU backend computes the absorbed form throughout (the same function).
  virtual absl::Status Attention(int64_t layer, const AttentionPlan& plan, MlaForm form, const float* h, int64_t n,
                                 LatentCache& cache, float* out) = 0;
  // out[n, D] = the dense layer's MLP(h).
  virtual absl::Status DenseMlp(int64_t layer, const float* h, int64_t n, float* out) = 0;
  // out[n, D] = the MoE layer's shared experts(h), zeros when it has none.
  virtual absl::Status SharedExperts(int64_t layer, const float* h, int64_t n, float* out) = 0;
  // host_logits[n, E] = W_router h, in float32 (the gate's input).
  // `meanwhile` (optional) is called once the product is queued and before
  // its result is waited for: device work it queues (the shared experts)
  // runs while the logits travel back and the host runs the gate.
  virtual absl::Status RouterLogits(int64_t layer, const float* h, int64_t n, float* host_logits,
                                    const std::function<absl::Status()>& meanwhile = nullptr) = 0;
  // Whether this backend holds routed expert `expert` of `layer`.
  virtual bool HasRoutedExpert(int64_t layer, int64_t expert) const = 0;
  // out[n, D] = sum over slots of w * MLP_expert(x), every expert run once
  // over its tokens (grouped). host_topk_idx / host_topk_weights: [n, k];
  // an index < 0 skips the slot. INVALID_ARGUMENT for a dense layer or an
  // index >= E, FAILED_PRECONDITION for an expert not loaded here.
  virtual absl::Status RoutedExperts(int64_t layer, const float* x, int64_t n, int64_t k,
                                     const int32_t* host_topk_idx, const float* host_topk_weights, float* out) = 0;
  // host_logits[rows.size(), V] = lm_head RmsNorm(x[row]; model.norm) for
  // each row index into x.
  virtual absl::Status Logits(const float* x, absl::Span<const int64_t> rows, float* host_logits) = 0;
  // For each row: the greedy token of lm_head RmsNorm(x[row]) and its
  // log-probability, as Sampler at temperature 0 gives them (argmax, lowest
  // id on ties, NaN never wins; log_softmax of the raw logits).
  virtual absl::Status GreedyTokens(const float* x, absl::Span<const int64_t> rows, int32_t* host_tokens,
                                    float* host_logprobs) = 0;
  // --- a whole MoE layer on the device: a backend that holds all of the
  // layer's routed experts and serves them itself (one process on a GPU,
  // BackendExperts) routes there, with no host round trip per layer.
  virtual bool RoutesOnDevice(int64_t layer) const { return false; }
  // out[n, D] = the routed experts' weighted sum for h, routed by the gate
  // of MODEL_SPEC.md 3.7 (MoeGate's math and order) over the float32 router
  // logits on the device; serving_bias [E] or empty. host_topk_idx and
  // host_unbiased_topk_idx (the choices without the serving bias), [n, k]
  // each, may be null; they are written by the next Synchronize(), which
  // the caller must call before reading or freeing them. shared_out [n, D],
  // if not null, gets the layer's shared experts(h) as SharedExperts gives
  // them (the backend may compute both side by side).
  virtual absl::Status DeviceRoutedExperts(int64_t layer, const float* h, int64_t n,
                                           absl::Span<const float> serving_bias, float* out, int32_t* host_topk_idx,
                                           int32_t* host_unbiased_topk_idx, float* shared_out) {
    return absl::UnimplementedError(absl::StrCat(name(), ": no device routing"));
  }

  // Waits for queued work, and completes the host copies it promised
  // (a no-op on the CPU).
  virtual absl::Status Synchronize() { return absl::OkStatus(); }

  // --- decode steps as device graphs (CUDA graphs). Between BeginStepGraph
  // and EndStepGraph the engine makes the step's calls as always (the same
  // sequence for the same key): the first time they are captured into a
  // graph, later only their host inputs (token ids, positions, block
  // tables, rows) are staged and the graph is replayed. Buffers allocated
  // meanwhile belong to the graph. EndStepGraph launches it, waits, and
  // completes the promised host copies (greedy tokens, routing record).
  // REQUIRES for a key: one token per sequence, greedy-only rows, every MoE
  // layer routed on the device, a serving bias on every MoE layer or none
  // (as key.serving_bias says).
  virtual bool SupportsStepGraphs() const { return false; }
  virtual absl::Status BeginStepGraph(const StepGraphKey& key) {
    return absl::UnimplementedError(absl::StrCat(name(), ": no step graphs"));
  }
  virtual absl::Status EndStepGraph() { return absl::UnimplementedError(absl::StrCat(name(), ": no step graphs")); }
  // Drops a step begun with BeginStepGraph that failed (its capture, or a
  // replay whose calls did not match); the engine then runs it eagerly.
  virtual void AbortStepGraph() {}
};

// RoutedExperts on host arrays, staging through device buffers when the
// backend computes on a device (the expert node's data plane).
absl::Status RoutedExpertsOnHost(ComputeBackend& backend, int64_t layer, const float* host_x, int64_t n, int64_t k,
                                 const int32_t* host_topk_idx, const float* host_topk_weights, float* host_out);

// The ExpertBackend that runs routed experts on the engine's own compute
// backend, on its buffers (no host round trip): the one-process deployment
// on a GPU. Begin computes (queued on the device), Finish copies the result.
class BackendExperts : public ExpertBackend {
 public:
  explicit BackendExperts(ComputeBackend& backend) : backend_(backend) {}
  bool takes_backend_buffers() const override { return true; }
  absl::Status BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                  const int32_t* topk_idx, const float* topk_weights) override;
  absl::Status FinishRoutedExperts(int64_t layer, int micro_batch, float* out) override;

 private:
  ComputeBackend& backend_;
  Buffer pending_[2];
  int64_t pending_count_[2] = {0, 0};
};

}  // namespace dmoe

#endif  // DMOE_CORE_COMPUTE_BACKEND_H_
