// The attention node's control plane: AttentionService runs the scheduler's
// steps (dmoe.v1.AttentionNode in proto/dmoe/v1/control.proto) over the
// engine, the latent cache and the remote experts; AttentionNodeGrpcService
// is its thin gRPC adapter.
//
// Joining the cluster (both node kinds) is in node/cluster_join.h.
#ifndef DMOE_ATTENTION_NODE_ATTENTION_SERVICE_H_
#define DMOE_ATTENTION_NODE_ATTENTION_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "attention_node/remote_experts.h"
#include "core/engine.h"
#include "core/latent_cache.h"
#include "core/model_weights.h"
#include "core/sampling.h"
#include "dmoe/v1/control.grpc.pb.h"
#include "router/expert_placement.h"
#include "transport/transport.h"

namespace dmoe::attention {

struct AttentionServiceOptions {
  int64_t cache_pages = 512;  // latent cache pool size
  int64_t page_size = 64;     // tokens per page
  // EngineOptions::ping_pong_min_tokens: steps of at least this many tokens
  // run as two micro-batches (0: never).
  int64_t ping_pong_min_tokens = 32;
};

// One attention node's sequences: their latent caches and samplers.
//
// RunStep(request):
//   1. frees request.free_sequences (and their samplers), even if the step
//      then fails;
//   2. when has_serving_bias, replaces the serving bias: [num_hidden_layers *
//      n_routed_experts] floats (rows of dense layers are ignored), or empty
//      to switch it off; it stays until the next has_serving_bias;
//   3. runs every sequence's tokens through Engine::Step in one batch;
//   4. samples one token for each sequence with sample=true.
// A sequence's Sampler lives from its first sampled token until the sequence
// is freed. A request whose sample_index or sampling parameters do not
// continue the kept Sampler (a recomputed, preempted request) gets a new one
// whose RNG has been advanced by sample_index draws, so the n-th token of a
// seed is the same whatever happened before. top_p = 0 is taken as unset
// (1, proto3's default); other parameters are checked as
// ValidateSamplingParams does.
//
// Errors (the step changes no cache state then, except step 1 and 2):
// INVALID_ARGUMENT for a bad token, an empty chunk, a repeated sequence, a
// context too long, bad sampling parameters or a bias of the wrong size;
// RESOURCE_EXHAUSTED when the cache lacks pages; UNAVAILABLE when an expert
// node does not answer. Messages start with "step <id>: ".
//
// routing_decisions / routing_decisions_changed compare the served routing
// with the model's own (without the serving bias).
//
// Thread-safe: every call takes the service's lock, so steps run one at a
// time. Holds `experts` (which must outlive it) and owns its engine and cache.
class AttentionService {
 public:
  // INVALID_ARGUMENT for a non-positive cache size. On the CPU backend.
  static absl::StatusOr<std::unique_ptr<AttentionService>> Create(std::shared_ptr<const ModelWeights> weights,
                                                                  ExpertBackend& experts,
                                                                  const AttentionServiceOptions& options = {});
  // On `backend` (its latent cache in the backend's memory); `experts`:
  // remote expert nodes, or the backend's own routed experts.
  static absl::StatusOr<std::unique_ptr<AttentionService>> Create(std::shared_ptr<ComputeBackend> backend,
                                                                  ExpertBackend& experts,
                                                                  const AttentionServiceOptions& options = {});

  absl::StatusOr<v1::StepResult> RunStep(const v1::StepRequest& request);
  // Frees the sequences (unknown ids are ignored).
  v1::CacheStatus Free(const v1::FreeRequest& request);
  v1::CacheStatus GetCacheStatus();

 private:
  struct SequenceSampler {
    explicit SequenceSampler(const SamplingParams& params) : sampler(params) {}
    Sampler sampler;
    int64_t next_index = 0;  // sample_index of the next token
  };
  AttentionService(std::unique_ptr<Engine> engine, std::unique_ptr<LatentCache> cache, ExpertBackend& experts);
  absl::StatusOr<v1::StepResult> RunStepLocked(const v1::StepRequest& request) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SetServingBiasLocked(const google::protobuf::RepeatedField<float>& bias)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The sequence's sampler, positioned at `sample_index`.
  SequenceSampler& SamplerFor(SequenceId seq, const SamplingParams& params, int64_t sample_index)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeLocked(SequenceId seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::CacheStatus CacheStatusLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::unique_ptr<Engine> engine_;
  absl::Mutex mu_;
  std::unique_ptr<LatentCache> cache_ ABSL_GUARDED_BY(mu_);
  ExpertBackend& experts_;                               // used under mu_
  std::set<SequenceId> sequences_ ABSL_GUARDED_BY(mu_);  // those holding cache entries
  absl::flat_hash_map<SequenceId, std::unique_ptr<SequenceSampler>> samplers_ ABSL_GUARDED_BY(mu_);
  // [layer][n_routed_experts]; empty rows for dense layers; empty: no bias.
  std::vector<std::vector<float>> serving_bias_ ABSL_GUARDED_BY(mu_);
};

// dmoe.v1.AttentionNode over an AttentionService, statuses mapped with
// ToGrpcStatus. Until SetService it answers UNAVAILABLE (the node is still
// loading or connecting), so it can be registered before the service exists.
class AttentionNodeGrpcService final : public v1::AttentionNode::Service {
 public:
  // `service` (or null) must outlive the calls it serves: set null and shut
  // the server down before destroying it.
  void SetService(AttentionService* service) { service_.store(service); }

  grpc::Status RunStep(grpc::ServerContext* context, const v1::StepRequest* request, v1::StepResult* reply) override;
  grpc::Status Free(grpc::ServerContext* context, const v1::FreeRequest* request, v1::CacheStatus* reply) override;
  grpc::Status GetCacheStatus(grpc::ServerContext* context, const v1::GetCacheStatusRequest* request,
                              v1::CacheStatus* reply) override;

 private:
  std::atomic<AttentionService*> service_{nullptr};
};

}  // namespace dmoe::attention

#endif  // DMOE_ATTENTION_NODE_ATTENTION_SERVICE_H_
