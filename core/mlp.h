// SwiGLU MLPs (MODEL_SPEC.md 3.6) and routed-expert execution (3.8) on CPU.
#ifndef DMOE_CORE_MLP_H_
#define DMOE_CORE_MLP_H_

#include <cstdint>

#include "absl/status/status.h"
#include "core/model_weights.h"

namespace dmoe {

// out[n, D] = W_down (silu(W_gate x) ⊙ W_up x) for n tokens x[n, D].
void MlpForward(const MlpWeights& mlp, const float* x, int64_t n, float* out);

// Runs routed experts for a batch of one MoE layer's tokens, asynchronously:
// Begin starts the work for one micro-batch and Finish collects it, so the
// engine can compute shared experts and the other micro-batch's attention
// meanwhile (ping-pong). Implementations: LocalExperts (in this process,
// computes in Begin) and the attention node's dispatcher to expert nodes.
class ExpertBackend {
 public:
  virtual ~ExpertBackend() = default;
  // false: x and out of Begin/Finish are host arrays (the engine stages
  // device activations through the host). true: they are pointers into the
  // engine's compute-backend buffers (BackendExperts, core/compute_backend.h).
  virtual bool takes_backend_buffers() const { return false; }
  // Tags the next step's work (the cluster's step id); call before Engine::Step.
  virtual void BeginStep(uint64_t step_id) {}
  // Seconds spent waiting for remote results since the last call (0 when
  // computed locally).
  virtual double TakeWaitSeconds() { return 0; }
  // x: [n, D] normalized hidden states; topk_idx, topk_weights: [n, k]
  // (an index < 0 marks a slot to skip). `micro_batch` (0 or 1) tells
  // concurrent Begin calls of one layer apart. The inputs may be reused once
  // Begin returns.
  virtual absl::Status BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                          const int32_t* topk_idx, const float* topk_weights) = 0;
  // Writes out[n, D] = sum over slots of topk_weights * MLP_expert(x) for the
  // matching Begin.
  virtual absl::Status FinishRoutedExperts(int64_t layer, int micro_batch, float* out) = 0;

  // Begin + Finish.
  absl::Status RunRoutedExperts(int64_t layer, const float* x, int64_t n, int64_t k, const int32_t* topk_idx,
                                const float* topk_weights, float* out);
};

// Routed experts held by this process's ModelWeights. Each expert runs once
// over all its tokens of the step (grouped). Thread-compatible.
class LocalExperts : public ExpertBackend {
 public:
  explicit LocalExperts(const ModelWeights& weights) : weights_(weights) {}
  // FAILED_PRECONDITION when a requested expert is not loaded here.
  absl::Status BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                  const int32_t* topk_idx, const float* topk_weights) override;
  absl::Status FinishRoutedExperts(int64_t layer, int micro_batch, float* out) override;

  // Synchronous form: out[n, D] = sum over slots of w * MLP_expert(x).
  absl::Status Compute(int64_t layer, const float* x, int64_t n, int64_t k, const int32_t* topk_idx,
                       const float* topk_weights, float* out);

 private:
  // Per-slot outputs: y[n, k, D] = MLP_expert(x) (unweighted; skipped slots
  // are left untouched), each expert run once over its tokens.
  absl::Status RunExpertSlots(int64_t layer, const float* x, int64_t n, int64_t k, const int32_t* topk_idx,
                              float* y);

  const ModelWeights& weights_;
  std::vector<float> pending_[2];  // results of Begin, per micro-batch
};

}  // namespace dmoe

#endif  // DMOE_CORE_MLP_H_
