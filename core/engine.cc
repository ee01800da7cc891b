#include "core/engine.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/cpu/matmul.h"
#include "core/cpu/ops.h"
#include "core/status_macros.h"

namespace dmoe {

Engine::Engine(std::shared_ptr<const ModelWeights> weights, const EngineOptions& options)
    : weights_(std::move(weights)), options_(options), rope_(weights_->config), gate_(weights_->config) {}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::shared_ptr<const ModelWeights> weights,
                                                       const EngineOptions& options) {
  if (weights == nullptr || weights->embed_tokens.empty()) {
    return absl::FailedPreconditionError("engine needs the non-expert weights (embeddings, attention, head)");
  }
  return std::unique_ptr<Engine>(new Engine(std::move(weights), options));
}

LatentCacheOptions Engine::CacheOptions(int64_t num_pages, int64_t page_size) const {
  const ModelConfig& c = config();
  LatentCacheOptions o;
  o.num_layers = c.num_hidden_layers;
  o.kv_lora_rank = c.kv_lora_rank;
  o.qk_rope_head_dim = c.qk_rope_head_dim;
  o.page_size = page_size;
  o.num_pages = num_pages;
  return o;
}

absl::Status Engine::Validate(const std::vector<StepSequence>& batch, const LatentCache& cache) const {
  const ModelConfig& c = config();
  absl::flat_hash_set<SequenceId> seen;
  int64_t pages = 0;
  for (const StepSequence& s : batch) {
    if (s.tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq, ": no tokens"));
    if (!seen.insert(s.seq).second) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq, " appears twice in one step"));
    }
    for (int32_t t : s.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    const int64_t end = cache.SequenceLength(s.seq) + static_cast<int64_t>(s.tokens.size());
    if (end > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq, ": ", end,
                                                     " positions exceed max_position_embeddings ",
                                                     c.max_position_embeddings));
    }
    pages += cache.PagesNeeded(s.seq, static_cast<int64_t>(s.tokens.size()));
  }
  if (pages > cache.pages_free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("latent cache: step needs ", pages, " pages, ", cache.pages_free(), " free"));
  }
  return absl::OkStatus();
}

absl::Status Engine::MoeLayer(int64_t layer, const float* h, int64_t n, ExpertBackend& experts,
                              const StepRouting& routing, float* out) const {
  const ModelConfig& c = config();
  const MoeWeights& moe = weights_->layers[layer].moe;
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, D = c.hidden_size;
  std::vector<float> logits(n * E);
  cpu::MatMul(h, n, moe.router, logits.data());  // float32 router
  std::vector<int32_t> topk_idx(n * k);
  std::vector<float> topk_weights(n * k);
  absl::Span<const float> serving_bias;
  if (routing.serving_bias != nullptr && layer < static_cast<int64_t>(routing.serving_bias->size())) {
    serving_bias = (*routing.serving_bias)[layer];
  }
  for (int64_t t = 0; t < n; ++t) {
    gate_.Route(absl::MakeConstSpan(logits.data() + t * E, E), moe.e_score_correction_bias, serving_bias,
                topk_idx.data() + t * k, topk_weights.data() + t * k);
  }
  if (routing.topk_idx_out != nullptr) {
    if (static_cast<int64_t>(routing.topk_idx_out->size()) <= layer) routing.topk_idx_out->resize(layer + 1);
    (*routing.topk_idx_out)[layer] = topk_idx;
  }
  DMOE_RETURN_IF_ERROR(experts.RunRoutedExperts(layer, h, n, k, topk_idx.data(), topk_weights.data(), out));
  if (moe.shared_experts.loaded()) {
    std::vector<float> shared(n * D);
    MlpForward(moe.shared_experts, h, n, shared.data());
    for (int64_t i = 0; i < n * D; ++i) out[i] += shared[i];
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SequenceLogits>> Engine::Step(const std::vector<StepSequence>& batch,
                                                         LatentCache& cache, ExpertBackend& experts,
                                                         const StepRouting& routing) const {
  DMOE_RETURN_IF_ERROR(Validate(batch, cache));
  const ModelConfig& c = config();
  const ModelWeights& w = *weights_;
  const int64_t D = c.hidden_size, V = c.vocab_size;

  std::vector<MlaSequence> seqs;
  int64_t n = 0;
  for (const StepSequence& s : batch) {
    MlaSequence m;
    m.seq = s.seq;
    m.row_begin = n;
    m.num_tokens = static_cast<int64_t>(s.tokens.size());
    m.start_pos = cache.SequenceLength(s.seq);
    seqs.push_back(m);
    n += m.num_tokens;
  }
  for (const MlaSequence& m : seqs) {
    absl::Status st = cache.Extend(m.seq, m.num_tokens);
    if (!st.ok()) return absl::InternalError(absl::StrCat("latent cache refused pages it reported free: ", st.message()));
  }
  // If a later stage fails, give back the positions this step added.
  auto rollback = [&] {
    for (const MlaSequence& m : seqs) {
      if (m.start_pos == 0) {
        cache.Free(m.seq);
      } else {
        cache.Truncate(m.seq, m.start_pos);
      }
    }
  };

  std::vector<float> x(n * D), h(n * D), delta(n * D);
  int64_t row = 0;
  for (const StepSequence& s : batch) {
    for (int32_t t : s.tokens) {
      for (int64_t i = 0; i < D; ++i) x[row * D + i] = w.embed_tokens.at(t, i);
      ++row;
    }
  }
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    cpu::RmsNorm(x.data(), n, D, lw.input_layernorm.data(), eps, h.data());
    MlaForward(c, lw.attn, rope_, l, seqs, options_.mla_form, h.data(), n, cache, delta.data());
    for (int64_t i = 0; i < n * D; ++i) x[i] += delta[i];
    cpu::RmsNorm(x.data(), n, D, lw.post_attention_layernorm.data(), eps, h.data());
    if (c.is_moe_layer(l)) {
      absl::Status st = MoeLayer(l, h.data(), n, experts, routing, delta.data());
      if (!st.ok()) {
        rollback();
        return st;
      }
    } else {
      MlpForward(lw.mlp, h.data(), n, delta.data());
    }
    for (int64_t i = 0; i < n * D; ++i) x[i] += delta[i];
  }

  // Head: only the positions asked for.
  std::vector<SequenceLogits> result(batch.size());
  std::vector<int64_t> rows;
  for (size_t b = 0; b < batch.size(); ++b) {
    const MlaSequence& m = seqs[b];
    const int64_t first = batch[b].all_logits ? 0 : m.num_tokens - 1;
    for (int64_t i = first; i < m.num_tokens; ++i) {
      rows.push_back(m.row_begin + i);
      result[b].positions.push_back(m.start_pos + i);
    }
  }
  const int64_t nr = static_cast<int64_t>(rows.size());
  std::vector<float> normed(nr * D), logits(nr * V);
  for (int64_t i = 0; i < nr; ++i) {
    cpu::RmsNorm(x.data() + rows[i] * D, 1, D, w.norm.data(), eps, normed.data() + i * D);
  }
  cpu::MatMul(normed.data(), nr, w.lm_head, logits.data());
  int64_t offset = 0;
  for (SequenceLogits& r : result) {
    const int64_t count = static_cast<int64_t>(r.positions.size());
    r.logits.assign(logits.begin() + offset * V, logits.begin() + (offset + count) * V);
    offset += count;
  }
  return result;
}

}  // namespace dmoe
