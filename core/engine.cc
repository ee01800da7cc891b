#include "core/engine.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/cpu/cpu_backend.h"
#include "core/cpu/parallel.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace dmoe {

Engine::Engine(std::shared_ptr<ComputeBackend> backend, const EngineOptions& options)
    : backend_(std::move(backend)), options_(options), gate_(backend_->config()) {}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::shared_ptr<const ModelWeights> weights,
                                                       const EngineOptions& options) {
  if (weights == nullptr) return absl::InvalidArgumentError("engine needs weights");
  return Create(std::make_shared<CpuBackend>(std::move(weights)), options);
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::shared_ptr<ComputeBackend> backend,
                                                       const EngineOptions& options) {
  if (backend == nullptr || !backend->has_non_expert_weights()) {
    return absl::FailedPreconditionError("engine needs the non-expert weights (embeddings, attention, head)");
  }
  return std::unique_ptr<Engine>(new Engine(std::move(backend), options));
}

absl::StatusOr<std::unique_ptr<LatentCache>> Engine::CreateCache(int64_t num_pages, int64_t page_size) const {
  return backend_->CreateCache(CacheOptions(num_pages, page_size));
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

namespace {

// Layer l's serving bias [E], or empty when none is in effect.
absl::Span<const float> ServingBias(const StepRouting& routing, int64_t l) {
  if (routing.serving_bias == nullptr || l >= static_cast<int64_t>(routing.serving_bias->size())) return {};
  return (*routing.serving_bias)[l];
}

}  // namespace

// One micro-batch of a step: a contiguous run of the batch's sequences.
struct Engine::MicroBatch {
  std::vector<MlaSequence> seqs;  // row_begin relative to this micro-batch
  std::unique_ptr<AttentionPlan> plan;
  int64_t n = 0;
  Buffer x, h, delta, shared;  // [n, D] each, in the backend's memory
  // Host copies of h and the routed experts' output, for an ExpertBackend
  // that takes host arrays while the backend computes on a device.
  std::vector<float> host_h, host_delta;
  std::vector<int32_t> topk_idx;
  std::vector<int32_t> unbiased_topk_idx;  // only while a serving bias is measured
  int64_t pending_layer = -1;  // MoE layer whose routed experts are in flight
  bool pending_on_device = false;  // ... routed by the backend itself (delta holds them)
  int64_t first_row = 0;           // of this micro-batch in the step
};

absl::Status Engine::BeginLayer(int64_t l, int index, MicroBatch& mb, LatentCache& cache, ExpertBackend& experts,
                                const StepRouting& routing) const {
  const ModelConfig& c = config();
  ComputeBackend& be = *backend_;
  const int64_t D = c.hidden_size, n = mb.n;
  float *x = mb.x.data(), *h = mb.h.data(), *delta = mb.delta.data();
  DMOE_RETURN_IF_ERROR(be.RmsNorm(l, NormKind::kInputLayernorm, x, n, h));
  DMOE_RETURN_IF_ERROR(be.Attention(l, *mb.plan, options_.mla_form, h, n, cache, delta));
  DMOE_RETURN_IF_ERROR(be.AddTo(x, delta, nullptr, n * D));
  DMOE_RETURN_IF_ERROR(be.RmsNorm(l, NormKind::kPostAttentionLayernorm, x, n, h));
  if (!c.is_moe_layer(l)) {
    DMOE_RETURN_IF_ERROR(be.DenseMlp(l, h, n, delta));
    return be.AddTo(x, delta, nullptr, n * D);
  }
  const MoeWeights& moe = weights().layers[l].moe;
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
  if (mb.shared.empty()) {
    DMOE_ASSIGN_OR_RETURN(mb.shared, be.Allocate(n * D));
  }
  const absl::Span<const float> serving_bias = ServingBias(routing, l);
  if (RoutesOnDevice(l, experts)) {
    // Router, gate, routed and shared experts queued on the device; the
    // choices reach the step's routing record at its final synchronization
    // (Step sized those vectors).
    int32_t* topk_out = nullptr;
    int32_t* unbiased_out = nullptr;
    if (routing.topk_idx_out != nullptr) topk_out = (*routing.topk_idx_out)[l].data() + mb.first_row * k;
    if (routing.unbiased_topk_idx_out != nullptr && !serving_bias.empty()) {
      unbiased_out = (*routing.unbiased_topk_idx_out)[l].data() + mb.first_row * k;
    }
    DMOE_RETURN_IF_ERROR(
        be.DeviceRoutedExperts(l, h, n, serving_bias, delta, topk_out, unbiased_out, mb.shared.data()));
    mb.pending_layer = l;
    mb.pending_on_device = true;
    return absl::OkStatus();
  }
  // The shared experts run while the routed ones are in flight (on expert
  // nodes, or on the CPU in Begin); on a device whose own buffers the
  // experts read, they are queued behind the router instead, so the device
  // computes them while the host waits for the logits and runs the gate.
  const bool shared_first = be.memory() != MemorySpace::kHost && experts.takes_backend_buffers();
  std::vector<float> logits(n * E);
  DMOE_RETURN_IF_ERROR(be.RouterLogits(l, h, n, logits.data(),  // float32 router
                                       shared_first ? std::function<absl::Status()>([&] {
                                         return be.SharedExperts(l, h, n, mb.shared.data());
                                       })
                                                    : nullptr));
  mb.topk_idx.resize(n * k);
  std::vector<float> topk_weights(n * k);
  // Tokens route independently (MoeGate is immutable): in parallel, which
  // matters for large decode batches on a GPU, where this is host time the
  // device waits for.
  constexpr int64_t kRouteGrain = 32;
  cpu::ParallelFor(n, kRouteGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      gate_.Route(absl::MakeConstSpan(logits.data() + t * E, E), moe.e_score_correction_bias, serving_bias,
                  mb.topk_idx.data() + t * k, topk_weights.data() + t * k);
    }
  });
  mb.unbiased_topk_idx.clear();
  if (routing.unbiased_topk_idx_out != nullptr && !serving_bias.empty()) {
    mb.unbiased_topk_idx.resize(n * k);
    cpu::ParallelFor(n, kRouteGrain, [&](int64_t b, int64_t e) {
      std::vector<float> unused(k);
      for (int64_t t = b; t < e; ++t) {
        gate_.Route(absl::MakeConstSpan(logits.data() + t * E, E), moe.e_score_correction_bias, {},
                    mb.unbiased_topk_idx.data() + t * k, unused.data());
      }
    });
  }
  const float* expert_input = h;
  if (StagesExperts(experts)) {
    mb.host_h.resize(n * D);
    DMOE_RETURN_IF_ERROR(be.Download(h, n * D, mb.host_h.data()));
    expert_input = mb.host_h.data();
  }
  DMOE_RETURN_IF_ERROR(
      experts.BeginRoutedExperts(l, index, expert_input, n, k, mb.topk_idx.data(), topk_weights.data()));
  mb.pending_layer = l;
  return shared_first ? absl::OkStatus() : be.SharedExperts(l, h, n, mb.shared.data());
}

absl::Status Engine::FinishLayer(int index, MicroBatch& mb, ExpertBackend& experts) const {
  if (mb.pending_layer < 0) return absl::OkStatus();
  const int64_t layer = mb.pending_layer;
  mb.pending_layer = -1;
  const int64_t count = mb.n * config().hidden_size;
  if (std::exchange(mb.pending_on_device, false)) {
    // delta already holds the routed experts' output.
  } else if (StagesExperts(experts)) {
    mb.host_delta.resize(count);
    DMOE_RETURN_IF_ERROR(experts.FinishRoutedExperts(layer, index, mb.host_delta.data()));
    DMOE_RETURN_IF_ERROR(backend_->Upload(mb.host_delta.data(), count, mb.delta.data()));
  } else {
    DMOE_RETURN_IF_ERROR(experts.FinishRoutedExperts(layer, index, mb.delta.data()));
  }
  return backend_->AddTo(mb.x.data(), mb.delta.data(), mb.shared.data(), count);
}

bool Engine::StagesExperts(const ExpertBackend& experts) const {
  return backend_->memory() != MemorySpace::kHost && !experts.takes_backend_buffers();
}

bool Engine::RoutesOnDevice(int64_t layer, const ExpertBackend& experts) const {
  return config().is_moe_layer(layer) && experts.takes_backend_buffers() && backend_->RoutesOnDevice(layer);
}

absl::StatusOr<std::vector<SequenceLogits>> Engine::Step(const std::vector<StepSequence>& batch,
                                                         LatentCache& cache, ExpertBackend& experts,
                                                         const StepRouting& routing) const {
  DMOE_RETURN_IF_ERROR(Validate(batch, cache));
  const ModelConfig& c = config();
  ComputeBackend& be = *backend_;

  int64_t total = 0;
  for (const StepSequence& s : batch) total += static_cast<int64_t>(s.tokens.size());
  // Two micro-batches of about equal token counts, split between sequences.
  size_t split = batch.size();
  if (options_.ping_pong_min_tokens > 0 && total >= options_.ping_pong_min_tokens && batch.size() >= 2) {
    int64_t acc = 0;
    for (split = 0; split + 1 < batch.size() && 2 * acc < total; ++split) acc += batch[split].tokens.size();
    if (split == 0) split = 1;
  }
  std::vector<int64_t> start_pos(batch.size());
  for (size_t b = 0; b < batch.size(); ++b) start_pos[b] = cache.SequenceLength(batch[b].seq);
  // The micro-batches' sequences (their buffers come in RunStep).
  auto micro_batches = [&] {
    std::vector<MicroBatch> mbs(split < batch.size() ? 2 : 1);
    for (size_t b = 0; b < batch.size(); ++b) {
      MicroBatch& mb = mbs[b < split ? 0 : 1];
      MlaSequence m;
      m.seq = batch[b].seq;
      m.row_begin = mb.n;
      m.num_tokens = static_cast<int64_t>(batch[b].tokens.size());
      m.start_pos = start_pos[b];
      mb.seqs.push_back(m);
      mb.n += m.num_tokens;
    }
    if (mbs.size() == 2) mbs[1].first_row = mbs[0].n;
    return mbs;
  };
  // Layers routed on the device write their choices straight into the
  // routing record (at the step's final synchronization): size it now.
  bool device_routed = false;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!RoutesOnDevice(l, experts)) continue;
    device_routed = true;
    const size_t slots = static_cast<size_t>(total * c.num_experts_per_tok);
    for (auto* record : {routing.topk_idx_out, routing.unbiased_topk_idx_out}) {
      if (record == nullptr) continue;
      if (static_cast<int64_t>(record->size()) <= l) record->resize(l + 1);
      (*record)[l].assign(slots, -1);
    }
  }
  for (size_t b = 0; b < batch.size(); ++b) {
    absl::Status st = cache.Extend(batch[b].seq, static_cast<int64_t>(batch[b].tokens.size()));
    if (!st.ok()) return absl::InternalError(absl::StrCat("latent cache refused pages it reported free: ", st.message()));
  }
  // If a later stage fails, give back the positions this step added (and
  // let the device finish writing the routing record first).
  auto rollback = [&] {
    if (device_routed) (void)be.Synchronize();
    for (size_t b = 0; b < batch.size(); ++b) {
      if (start_pos[b] == 0) {
        cache.Free(batch[b].seq);
      } else {
        cache.Truncate(batch[b].seq, start_pos[b]);
      }
    }
  };


  // A decode step that runs wholly on the device replays (or first
  // captures) a device graph; should that fail, the step runs as always.
  if (std::optional<StepGraphKey> key = GraphKeyFor(batch, split, cache, experts, routing)) {
    if (be.BeginStepGraph(*key).ok()) {
      std::vector<MicroBatch> mbs = micro_batches();
      absl::StatusOr<std::vector<SequenceLogits>> result =
          RunStep(batch, split, mbs, cache, experts, routing, device_routed, /*graph=*/true);
      if (result.ok()) {
        graph_steps_.fetch_add(1, std::memory_order_relaxed);
        std::lock_guard<std::mutex> lock(graph_mu_);
        graphed_keys_.insert(*key);
        return result;
      }
      be.AbortStepGraph();
      std::lock_guard<std::mutex> lock(graph_mu_);
      failed_graph_keys_.insert(*key);
      DMOE_LOG(kWarning, "engine") << "decode step of " << key->tokens << " tokens runs without a device graph: "
                                   << result.status();
    }
  }
  std::vector<MicroBatch> mbs = micro_batches();
  absl::StatusOr<std::vector<SequenceLogits>> result =
      RunStep(batch, split, mbs, cache, experts, routing, device_routed, /*graph=*/false);
  if (!result.ok()) rollback();
  return result;
}

std::optional<StepGraphKey> Engine::GraphKeyFor(const std::vector<StepSequence>& batch, size_t split,
                                                const LatentCache& cache, const ExpertBackend& experts,
                                                const StepRouting& routing) const {
  const ModelConfig& c = config();
  if (!options_.device_graphs || !backend_->SupportsStepGraphs() || split < batch.size() || batch.empty() ||
      static_cast<int64_t>(batch.size()) > kMaxGraphTokens) {
    return std::nullopt;
  }
  int64_t max_pages = 1;
  for (const StepSequence& s : batch) {
    if (s.tokens.size() != 1 || !s.greedy_only || s.all_logits) return std::nullopt;
    max_pages = std::max<int64_t>(max_pages, static_cast<int64_t>(cache.BlockTable(s.seq).size()));
  }
  // A serving bias on every MoE layer or on none (its values change from
  // replay to replay; which layers have one fixes the graph).
  int64_t moe_layers = 0, biased = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;
    if (!RoutesOnDevice(l, experts)) return std::nullopt;
    ++moe_layers;
    biased += ServingBias(routing, l).empty() ? 0 : 1;
  }
  if (biased != 0 && biased != moe_layers) return std::nullopt;
  StepGraphKey key;
  key.tokens = static_cast<int64_t>(batch.size());
  key.max_pages = PaddedPagesPerSequence(max_pages);
  key.record_routing = routing.topk_idx_out != nullptr;
  key.serving_bias = biased > 0;
  key.record_unbiased = key.serving_bias && routing.unbiased_topk_idx_out != nullptr;
  key.cache = cache.storage();
  std::lock_guard<std::mutex> lock(graph_mu_);
  if (failed_graph_keys_.contains(key)) return std::nullopt;
  // Capture a shape only once it repeats (a steady decode batch), not for
  // the passing sizes of a batch filling up or draining: a capture costs
  // about a step more.
  const bool repeated = last_graph_key_ == key;
  last_graph_key_ = key;
  if (!repeated && !graphed_keys_.contains(key)) return std::nullopt;
  return key;
}

absl::StatusOr<std::vector<SequenceLogits>> Engine::RunStep(const std::vector<StepSequence>& batch, size_t split,
                                                            std::vector<MicroBatch>& mbs, LatentCache& cache,
                                                            ExpertBackend& experts, const StepRouting& routing,
                                                            bool device_routed, bool graph) const {
  const ModelConfig& c = config();
  ComputeBackend& be = *backend_;
  const int64_t D = c.hidden_size, V = c.vocab_size;
  for (int i = 0; i < static_cast<int>(mbs.size()); ++i) {
    MicroBatch& mb = mbs[i];
    std::vector<int32_t> tokens;
    tokens.reserve(mb.n);
    for (size_t b = (i == 0 ? 0 : split); b < (i == 0 ? split : batch.size()); ++b) {
      tokens.insert(tokens.end(), batch[b].tokens.begin(), batch[b].tokens.end());
    }
    absl::Status st;
    for (Buffer* buf : {&mb.x, &mb.h, &mb.delta}) {
      absl::StatusOr<Buffer> allocated = be.Allocate(mb.n * D);
      if (!allocated.ok()) {
        st = allocated.status();
        break;
      }
      *buf = *std::move(allocated);
    }
    if (st.ok()) st = be.Embed(tokens, mb.x.data());
    if (st.ok()) {
      absl::StatusOr<std::unique_ptr<AttentionPlan>> plan = be.PlanAttention(mb.seqs, mb.n, cache);
      st = plan.status();
      if (st.ok()) mb.plan = *std::move(plan);
    }
    if (!st.ok()) return st;
  }
  // Layer by layer, alternating micro-batches: while one micro-batch's routed
  // experts are in flight, the other computes its attention.
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int i = 0; i < static_cast<int>(mbs.size()); ++i) {
      absl::Status st = FinishLayer(i, mbs[i], experts);
      if (st.ok()) st = BeginLayer(l, i, mbs[i], cache, experts, routing);
      if (st.ok() && routing.topk_idx_out != nullptr && c.is_moe_layer(l) && !RoutesOnDevice(l, experts)) {
        auto& out = *routing.topk_idx_out;
        if (static_cast<int64_t>(out.size()) <= l) out.resize(l + 1);
        if (i == 0) out[l].clear();
        out[l].insert(out[l].end(), mbs[i].topk_idx.begin(), mbs[i].topk_idx.end());
        if (routing.unbiased_topk_idx_out != nullptr) {
          auto& unbiased = *routing.unbiased_topk_idx_out;
          if (static_cast<int64_t>(unbiased.size()) <= l) unbiased.resize(l + 1);
          if (i == 0) unbiased[l].clear();
          // Without a serving bias both routings are the same.
          const auto& src = mbs[i].unbiased_topk_idx.empty() ? mbs[i].topk_idx : mbs[i].unbiased_topk_idx;
          unbiased[l].insert(unbiased[l].end(), src.begin(), src.end());
        }
      }
      if (!st.ok()) {
        for (int j = 0; j < static_cast<int>(mbs.size()); ++j) (void)FinishLayer(j, mbs[j], experts);
        return st;
      }
    }
  }
  for (int i = 0; i < static_cast<int>(mbs.size()); ++i) {
    DMOE_RETURN_IF_ERROR(FinishLayer(i, mbs[i], experts));
  }

  // Head: only the positions asked for, in one pass over both micro-batches
  // (rows of the second follow the first's); greedy_only sequences get their
  // token instead of logits.
  std::vector<SequenceLogits> result(batch.size());
  std::vector<int64_t> rows, greedy_rows;
  std::vector<size_t> greedy_of;  // batch index of each greedy row
  for (size_t b = 0; b < batch.size(); ++b) {
    const MlaSequence& m = mbs[b < split ? 0 : 1].seqs[b < split ? b : b - split];
    const int64_t base = b < split ? 0 : mbs[0].n;
    if (batch[b].greedy_only && !batch[b].all_logits) {
      greedy_rows.push_back(base + m.row_begin + m.num_tokens - 1);
      greedy_of.push_back(b);
      result[b].positions.push_back(m.start_pos + m.num_tokens - 1);
      continue;
    }
    const int64_t first = batch[b].all_logits ? 0 : m.num_tokens - 1;
    for (int64_t t = first; t < m.num_tokens; ++t) {
      rows.push_back(base + m.row_begin + t);
      result[b].positions.push_back(m.start_pos + t);
    }
  }
  const float* hidden = mbs[0].x.data();
  Buffer joined;
  absl::Status st;
  if (mbs.size() == 2) {
    absl::StatusOr<Buffer> allocated = be.Allocate((mbs[0].n + mbs[1].n) * D);
    st = allocated.status();
    if (st.ok()) joined = *std::move(allocated);
    if (st.ok()) st = be.Copy(mbs[0].x.data(), mbs[0].n * D, joined.data());
    if (st.ok()) st = be.Copy(mbs[1].x.data(), mbs[1].n * D, joined.data() + mbs[0].n * D);
    hidden = joined.data();
  }
  std::vector<float> logits(rows.size() * V);
  if (st.ok() && !rows.empty()) st = be.Logits(hidden, rows, logits.data());
  std::vector<int32_t> greedy_tokens(greedy_rows.size());
  std::vector<float> greedy_logprobs(greedy_rows.size());
  if (st.ok() && !greedy_rows.empty()) {
    st = be.GreedyTokens(hidden, greedy_rows, greedy_tokens.data(), greedy_logprobs.data());
  }
  if (st.ok() && graph) {
    st = be.EndStepGraph();  // launched and waited for: greedy tokens and routing record complete
  } else if (st.ok() && device_routed) {
    st = be.Synchronize();  // the routing record is complete from here
  }
  if (st.ok() && device_routed) {
    if (st.ok() && routing.unbiased_topk_idx_out != nullptr && routing.topk_idx_out != nullptr) {
      // Layers without a serving bias: both routings are the same.
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        if (RoutesOnDevice(l, experts) && ServingBias(routing, l).empty()) (*routing.unbiased_topk_idx_out)[l] = (*routing.topk_idx_out)[l];
      }
    }
  }
  if (!st.ok()) return st;
  for (size_t i = 0; i < greedy_of.size(); ++i) {
    result[greedy_of[i]].greedy_token = greedy_tokens[i];
    result[greedy_of[i]].greedy_logprob = greedy_logprobs[i];
  }
  int64_t offset = 0;
  for (size_t b = 0; b < batch.size(); ++b) {
    SequenceLogits& r = result[b];
    if (batch[b].greedy_only && !batch[b].all_logits) continue;
    const int64_t count = static_cast<int64_t>(r.positions.size());
    r.logits.assign(logits.begin() + offset * V, logits.begin() + (offset + count) * V);
    offset += count;
  }
  return result;
}

}  // namespace dmoe
