#include "attention_node/attention_service.h"

#include "router/expert_load.h"

#include <fcntl.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/cpu/cpu_backend.h"
#include "core/log.h"
#include "core/metrics/metrics.h"
#include "core/status_macros.h"
#include "proto/grpc_status.h"

namespace dmoe::attention {
namespace {

// The same status, its message prefixed with the step.
absl::Status InStep(int64_t step_id, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat("step ", step_id, ": ", status.message()));
}

SamplingParams ToSamplingParams(const v1::StepSequence& s) {
  SamplingParams p;
  p.temperature = s.temperature();
  p.top_k = s.top_k();
  p.top_p = s.top_p() == 0.0f ? 1.0f : s.top_p();  // proto3 default: unset
  p.min_p = s.min_p();
  p.seed = s.seed();
  p.top_logprobs = s.top_logprobs();
  return p;
}

bool SameParams(const SamplingParams& a, const SamplingParams& b) {
  return a.temperature == b.temperature && a.top_k == b.top_k && a.top_p == b.top_p && a.min_p == b.min_p &&
         a.seed == b.seed && a.top_logprobs == b.top_logprobs;
}

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionService>> AttentionService::Create(std::shared_ptr<const ModelWeights> weights,
                                                                           ExpertBackend& experts,
                                                                           const AttentionServiceOptions& options) {
  if (weights == nullptr) return absl::InvalidArgumentError("attention service needs weights");
  return Create(std::make_shared<CpuBackend>(std::move(weights)), experts, options);
}

absl::StatusOr<std::unique_ptr<AttentionService>> AttentionService::Create(std::shared_ptr<ComputeBackend> backend,
                                                                           ExpertBackend& experts,
                                                                           const AttentionServiceOptions& options) {
  if (options.ping_pong_min_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ping_pong_min_tokens = ", options.ping_pong_min_tokens, " must be >= 0"));
  }
  DMOE_ASSIGN_OR_RETURN(
      std::unique_ptr<Engine> engine,
      Engine::Create(std::move(backend), EngineOptions{MlaForm::kAuto, options.ping_pong_min_tokens}));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<LatentCache> cache, engine->CreateCache(options.cache_pages, options.page_size));
  return std::unique_ptr<AttentionService>(new AttentionService(std::move(engine), std::move(cache), experts));
}

AttentionService::AttentionService(std::unique_ptr<Engine> engine, std::unique_ptr<LatentCache> cache,
                                   ExpertBackend& experts)
    : engine_(std::move(engine)), cache_(std::move(cache)), experts_(experts) {}

absl::StatusOr<v1::StepResult> AttentionService::RunStep(const v1::StepRequest& request) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<v1::StepResult> result = RunStepLocked(request);
  if (!result.ok()) {
    absl::Status status = InStep(request.step_id(), result.status());
    DMOE_LOG(kWarning, "attention-node") << status;
    return status;
  }
  return result;
}

absl::StatusOr<v1::StepResult> AttentionService::RunStepLocked(const v1::StepRequest& request) {
  const absl::Time start = absl::Now();
  const ModelConfig& c = engine_->config();
  for (int64_t seq : request.free_sequences()) FreeLocked(seq);
  if (request.has_serving_bias()) DMOE_RETURN_IF_ERROR(SetServingBiasLocked(request.serving_bias()));

  // Everything is checked before the step touches the cache.
  std::vector<StepSequence> batch;
  std::vector<SamplingParams> params(request.sequences_size());
  for (int i = 0; i < request.sequences_size(); ++i) {
    const v1::StepSequence& s = request.sequences(i);
    if (s.sample()) {
      params[i] = ToSamplingParams(s);
      if (absl::Status st = ValidateSamplingParams(params[i]); !st.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", s.sequence_id(), ": ", st.message()));
      }
      // A sequence never samples more tokens than its context holds; this
      // also bounds the RNG fast-forward.
      if (s.sample_index() < 0 || s.sample_index() > c.max_position_embeddings) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequence ", s.sequence_id(), ": sample_index ", s.sample_index(),
                         " outside [0, max_position_embeddings = ", c.max_position_embeddings, "]"));
      }
    }
    // Greedy samples without top log-probabilities need no logits here: the
    // backend picks the token where it computes (one id per sequence back
    // from a GPU, not vocab_size floats).
    const bool greedy_only = s.sample() && params[i].temperature == 0.0f && params[i].top_logprobs == 0;
    batch.push_back(
        {s.sequence_id(), std::vector<int32_t>(s.tokens().begin(), s.tokens().end()), false, greedy_only});
  }

  v1::StepResult result;
  result.set_step_id(request.step_id());
  double engine_seconds = 0, expert_wait_seconds = 0;
  if (!batch.empty()) {
    StepRouting routing;
    std::vector<std::vector<int32_t>> topk, unbiased_topk;
    routing.topk_idx_out = &topk;
    if (!serving_bias_.empty()) {
      routing.serving_bias = &serving_bias_;
      routing.unbiased_topk_idx_out = &unbiased_topk;
    }
    experts_.BeginStep(static_cast<uint64_t>(request.step_id()));
    (void)experts_.TakeWaitSeconds();
    const absl::Time engine_start = absl::Now();
    absl::StatusOr<std::vector<SequenceLogits>> logits = engine_->Step(batch, *cache_, experts_, routing);
    engine_seconds = absl::ToDoubleSeconds(absl::Now() - engine_start);
    expert_wait_seconds = experts_.TakeWaitSeconds();
    if (!logits.ok()) return logits.status();  // Engine::Step rolled its extension back
    // Routing fidelity: decisions the serving bias changed vs the model's own routing.
    int64_t tokens = 0;
    for (const StepSequence& s : batch) tokens += static_cast<int64_t>(s.tokens.size());
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.is_moe_layer(l) ? 1 : 0;
    int64_t decisions = tokens * c.num_experts_per_tok * moe_layers, changed = 0;
    for (size_t l = 0; l < topk.size() && l < unbiased_topk.size(); ++l) {
      if (topk[l].empty()) continue;
      absl::StatusOr<router::RoutingChange> change =
          router::CompareRouting(unbiased_topk[l], topk[l], c.num_experts_per_tok);
      if (change.ok()) changed += change->changed_decisions;
    }
    result.set_routing_decisions(decisions);
    result.set_routing_decisions_changed(changed);
    if (c.has_moe()) {
      std::vector<int64_t> load(c.num_hidden_layers * c.n_routed_experts, 0);
      for (size_t l = 0; l < topk.size(); ++l) {
        for (int32_t e : topk[l]) {
          if (e >= 0 && e < c.n_routed_experts) ++load[l * c.n_routed_experts + e];
        }
      }
      for (int64_t v : load) result.add_expert_tokens(v);
    }
    for (const StepSequence& s : batch) sequences_.insert(s.seq);
    for (int i = 0; i < request.sequences_size(); ++i) {
      const v1::StepSequence& s = request.sequences(i);
      if (!s.sample()) continue;
      SequenceSampler& sampler = SamplerFor(s.sequence_id(), params[i], s.sample_index());
      SampleResult sample;
      if (batch[i].greedy_only) {  // what the sampler gives at temperature 0 (it draws nothing)
        sample.token = (*logits)[i].greedy_token;
        sample.logprob = (*logits)[i].greedy_logprob;
      } else {
        const std::vector<float>& l = (*logits)[i].logits;  // the last position's [vocab_size]
        sample = sampler.sampler.Sample(absl::MakeConstSpan(l.data() + l.size() - c.vocab_size, c.vocab_size));
      }
      ++sampler.next_index;
      v1::SampledTokenResult* t = result.add_tokens();
      t->set_sequence_id(s.sequence_id());
      t->set_token_id(sample.token);
      t->set_logprob(sample.logprob);
      for (const TokenLogprob& top : sample.top) {
        t->add_top_token_ids(top.token);
        t->add_top_logprobs(top.logprob);
      }
    }
  }
  result.set_pages_free(cache_->pages_free());
  const double total_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  v1::StepPhaseTimes* times = result.mutable_times();
  times->set_attention_seconds(std::max(0.0, engine_seconds - expert_wait_seconds));
  times->set_expert_wait_seconds(expert_wait_seconds);
  times->set_other_seconds(std::max(0.0, total_seconds - engine_seconds));
  metrics::AttentionNode().StepFinished(*times, request);
  return result;
}

absl::Status AttentionService::SetServingBiasLocked(const google::protobuf::RepeatedField<float>& bias) {
  const ModelConfig& c = engine_->config();
  const int64_t L = c.num_hidden_layers, E = c.n_routed_experts;
  if (bias.empty()) {
    serving_bias_.clear();
    return absl::OkStatus();
  }
  if (bias.size() != L * E) {
    return absl::InvalidArgumentError(absl::StrCat("serving_bias has ", bias.size(),
                                                   " values, expected num_hidden_layers x n_routed_experts = ", L,
                                                   " x ", E, " = ", L * E, " (or none)"));
  }
  for (int i = 0; i < bias.size(); ++i) {
    if (!std::isfinite(bias[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("serving_bias[", i / E, "][", i % E, "] = ", bias[i], " is not finite"));
    }
  }
  serving_bias_.assign(L, {});
  for (int64_t l = 0; l < L; ++l) {
    if (c.is_moe_layer(l)) serving_bias_[l].assign(bias.begin() + l * E, bias.begin() + (l + 1) * E);
  }
  return absl::OkStatus();
}

AttentionService::SequenceSampler& AttentionService::SamplerFor(SequenceId seq, const SamplingParams& params,
                                                                int64_t sample_index) {
  std::unique_ptr<SequenceSampler>& s = samplers_[seq];
  if (s == nullptr || s->next_index != sample_index || !SameParams(s->sampler.params(), params)) {
    s = std::make_unique<SequenceSampler>(params);
    // Every non-greedy Sample consumes exactly one RNG draw, whatever the
    // logits (core/sampling.h): replay sample_index of them.
    if (params.temperature > 0) {
      const float one_logit[1] = {0.0f};
      for (int64_t i = 0; i < sample_index; ++i) (void)s->sampler.Sample(one_logit);
    }
    s->next_index = sample_index;
  }
  return *s;
}

void AttentionService::FreeLocked(SequenceId seq) {
  cache_->Free(seq);
  sequences_.erase(seq);
  samplers_.erase(seq);
}

v1::CacheStatus AttentionService::Free(const v1::FreeRequest& request) {
  absl::MutexLock lock(&mu_);
  for (int64_t seq : request.sequence_ids()) FreeLocked(seq);
  return CacheStatusLocked();
}

v1::CacheStatus AttentionService::GetCacheStatus() {
  absl::MutexLock lock(&mu_);
  return CacheStatusLocked();
}

v1::CacheStatus AttentionService::CacheStatusLocked() const {
  v1::CacheStatus status;
  status.set_pages_total(cache_->pages_total());
  status.set_pages_free(cache_->pages_free());
  status.set_page_size(cache_->options().page_size);
  for (SequenceId seq : sequences_) status.add_sequence_ids(seq);
  return status;
}

namespace {

absl::Status NotReady() { return absl::UnavailableError("the attention node is not ready (loading or connecting)"); }

}  // namespace

grpc::Status AttentionNodeGrpcService::RunStep(grpc::ServerContext*, const v1::StepRequest* request,
                                               v1::StepResult* reply) {
  AttentionService* service = service_.load();
  if (service == nullptr) return ToGrpcStatus(NotReady());
  absl::StatusOr<v1::StepResult> result = service->RunStep(*request);
  if (!result.ok()) return ToGrpcStatus(result.status());
  *reply = std::move(*result);
  return grpc::Status::OK;
}

grpc::Status AttentionNodeGrpcService::Free(grpc::ServerContext*, const v1::FreeRequest* request,
                                            v1::CacheStatus* reply) {
  AttentionService* service = service_.load();
  if (service == nullptr) return ToGrpcStatus(NotReady());
  *reply = service->Free(*request);
  return grpc::Status::OK;
}

grpc::Status AttentionNodeGrpcService::GetCacheStatus(grpc::ServerContext*, const v1::GetCacheStatusRequest*,
                                                      v1::CacheStatus* reply) {
  AttentionService* service = service_.load();
  if (service == nullptr) return ToGrpcStatus(NotReady());
  *reply = service->GetCacheStatus();
  return grpc::Status::OK;
}

}  // namespace dmoe::attention
