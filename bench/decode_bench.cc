// One decode step of dmoe's CPU engine at batch 1, 8 and 32, beside the
// bandwidth roofline measured in the same run:
//   roofline time = (weight bytes the step touches + latent cache bytes it
//                    reads) / measured read bandwidth
// Weight bytes count every non-expert weight the step reads plus each
// routed expert selected by at least one token (taken from the step's own
// routing). Models: tiny-v3 (bundled) and a 2-layer v2-lite-shape model made
// with `dmoe make-model` (written to $DMOE_BENCH_DIR, default /tmp).
//
//   build/bin/decode_bench --benchmark_repetitions=3
#include <benchmark/benchmark.h>

#include <filesystem>
#include <map>
#include <memory>
#include <set>

#include "bench/memory_bandwidth.h"
#include "core/engine.h"
#include "core/log.h"
#include "core/synthetic_checkpoint.h"

namespace dmoe::bench {
namespace {

constexpr int64_t kContext = 128;  // tokens already in each sequence's cache

struct Model {
  std::unique_ptr<Engine> engine;
  std::unique_ptr<LocalExperts> experts;
};

std::filesystem::path ModelDir(const std::string& name) {
  if (name == "tiny") return std::filesystem::path(DMOE_SOURCE_DIR) / "tests/golden/tiny-v3";
  const char* env = std::getenv("DMOE_BENCH_DIR");
  const std::filesystem::path dir = std::filesystem::path(env ? env : "/tmp") / "dmoe-bench-v2-lite-shape-2l-bf16";
  if (!std::filesystem::exists(dir / "config.json")) {
    SyntheticModelOptions o;
    o.preset = "v2-lite-shape";
    o.num_layers = 2;
    o.dtype = DType::kBF16;
    absl::Status st = WriteSyntheticModel(o, dir);
    if (!st.ok()) DMOE_LOG(kError, "bench") << st;
  }
  return dir;
}

Model& GetModel(const std::string& name) {
  static std::map<std::string, Model> models;
  auto it = models.find(name);
  if (it != models.end()) return it->second;
  auto weights = ModelWeights::Load(ModelDir(name));
  if (!weights.ok()) {
    DMOE_LOG(kError, "bench") << weights.status();
    std::abort();
  }
  Model m;
  m.engine = std::move(Engine::Create(*weights)).value();
  m.experts = std::make_unique<LocalExperts>(m.engine->weights());
  return models[name] = std::move(m);
}

int64_t MlpBytes(const MlpWeights& m) { return m.bytes(); }

// Bytes of weights one decode step reads, given the experts it routed to.
int64_t WeightBytesTouched(const ModelWeights& w, const std::vector<std::vector<int32_t>>& topk, int64_t batch) {
  const ModelConfig& c = w.config;
  int64_t bytes = batch * c.hidden_size * DTypeSize(w.embed_tokens.dtype) + w.lm_head.bytes();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    const AttentionWeights& a = lw.attn;
    // Absorbed decode reads W_UK^T and the W_UV half of kv_b, not all of kv_b twice.
    bytes += a.q_proj.bytes() + a.q_a_proj.bytes() + a.q_b_proj.bytes() + a.kv_a_proj_with_mqa.bytes() +
             a.w_uk_t.bytes() + a.kv_b_proj.bytes() / 2 + a.o_proj.bytes();
    if (!c.is_moe_layer(l)) {
      bytes += MlpBytes(lw.mlp);
      continue;
    }
    bytes += lw.moe.router.bytes() + MlpBytes(lw.moe.shared_experts);
    std::set<int32_t> used;
    if (l < static_cast<int64_t>(topk.size())) used.insert(topk[l].begin(), topk[l].end());
    for (int32_t e : used) bytes += MlpBytes(lw.moe.experts[e]);
  }
  return bytes;
}

void BM_DecodeStep(benchmark::State& state, const std::string& name) {
  Model& m = GetModel(name);
  const int64_t batch = state.range(0);
  const ModelConfig& c = m.engine->config();
  auto cache = std::move(LatentCache::Create(m.engine->CacheOptions(batch * (kContext / 64 + 2)))).value();
  // Prefill each sequence with a distinct prompt.
  for (int64_t s = 0; s < batch; ++s) {
    std::vector<int32_t> prompt(kContext);
    for (int64_t i = 0; i < kContext; ++i) prompt[i] = static_cast<int32_t>((s * 7919 + i * 104729) % c.vocab_size);
    auto out = m.engine->Step({{s, prompt, false}}, *cache, *m.experts);
    if (!out.ok()) {
      state.SkipWithError(std::string(out.status().message()).c_str());
      return;
    }
  }
  std::vector<StepSequence> step;
  for (int64_t s = 0; s < batch; ++s) step.push_back({s, {static_cast<int32_t>((s * 31 + 5) % c.vocab_size)}, false});
  std::vector<std::vector<int32_t>> topk;
  StepRouting routing;
  routing.topk_idx_out = &topk;
  int64_t weight_bytes = 0;
  for (auto _ : state) {
    auto out = m.engine->Step(step, *cache, *m.experts, routing);
    benchmark::DoNotOptimize(out);
    state.PauseTiming();
    weight_bytes += WeightBytesTouched(m.engine->weights(), topk, batch);
    for (int64_t s = 0; s < batch; ++s) cache->Truncate(s, kContext);  // same context every iteration
    state.ResumeTiming();
  }
  const double bandwidth = MeasureReadBandwidth();
  const double cache_bytes =
      static_cast<double>(batch) * c.num_hidden_layers * (kContext + 1) * c.latent_entry_width() * sizeof(float);
  const double bytes_per_step = static_cast<double>(weight_bytes) / state.iterations() + cache_bytes;
  const double roofline_s = bytes_per_step / bandwidth;
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["roofline_tokens_per_s"] = static_cast<double>(batch) / roofline_s;
  state.counters["read_GBps"] = bandwidth / 1e9;
  state.counters["MB_per_step"] = bytes_per_step / 1e6;
  state.counters["roofline_frac"] =
      benchmark::Counter(roofline_s, benchmark::Counter::kIsIterationInvariantRate);  // roofline_s / step time
}

BENCHMARK_CAPTURE(BM_DecodeStep, tiny, std::string("tiny"))->Arg(1)->Arg(8)->Arg(32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_DecodeStep, v2_lite_shape_2layers, std::string("v2-lite-shape"))
    ->Arg(1)->Arg(8)->Arg(32)->Unit(benchmark::kMillisecond)->MinTime(2.0)->UseRealTime();

}  // namespace
}  // namespace dmoe::bench

BENCHMARK_MAIN();
