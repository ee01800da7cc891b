// Decode-step time of the engine on one GPU, without the serving layers:
// --load-format dummy weights of a preset (default: DeepSeek-V2-Lite's
// dimensions, all 27 layers, bf16), B sequences prefilled with a
// `--prompt`-token prompt, then `--steps` greedy decode steps timed (after
// warm-up steps), once replaying CUDA graphs and once eagerly, on the same
// backend. Prints one JSON line per (B, mode) and, with --md, a table.
// Steps are host-timed around Engine::Step, which returns after the device
// has finished (the greedy tokens come back). Prefill steps (--prefill-seqs
// prompts each) are timed too. --profile prefill|decode brackets the first
// prefill step or the timed decode steps for a profiler started with
// capture off (ncu --profile-from-start off; bench/gpu/run_all.sh's
// profile stage).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "core/compute_backend.h"
#include "core/cuda/cuda_compute_backend.h"
#include "core/engine.h"
#include "core/synthetic_checkpoint.h"

namespace dmoe {
namespace {

struct Args {
  std::string preset = "v2-lite-shape";
  int64_t layers = 0;  // 0: the preset's
  int64_t prompt = 512;
  int64_t steps = 64;
  int64_t warmup = 8;
  int64_t prefill_seqs = 8;
  std::vector<int64_t> batches = {1, 16, 64, 256};
  std::vector<bool> modes = {true, false};  // CUDA graphs, eager
  std::string profile;                      // "", "prefill", "decode"
  std::string md;
};

void Capture(const Args& a, const char* phase, bool on) {
  if (a.profile != phase) return;
  const absl::Status st = cuda::SetProfilerCapture(on);
  if (!st.ok()) std::fprintf(stderr, "decode_step_bench: %s\n", std::string(st.message()).c_str());
}

int Run(const Args& a) {
  SyntheticModelOptions o;
  o.preset = a.preset;
  o.num_layers = a.layers;
  auto text = SyntheticConfigJson(o);
  auto config = text.ok() ? ModelConfig::FromJson(*text) : absl::StatusOr<ModelConfig>(text.status());
  if (!config.ok()) {
    std::fprintf(stderr, "decode_step_bench: %s\n", std::string(config.status().message()).c_str());
    return 1;
  }
  cuda::CudaBackendOptions options;
  options.precision = cuda::CudaPrecision::kBf16;
  auto backend = cuda::CreateDummyCudaBackend(*config, WeightSelection::All(), 0, options);
  if (!backend.ok()) {
    std::fprintf(stderr, "decode_step_bench: %s\n", std::string(backend.status().message()).c_str());
    return 1;
  }
  std::string table =
      "| preset | layers | batch | context | mode | ms per step | tokens/s | prefill tokens per step | prefill ms per "
      "step | prefill tokens/s |\n|---|---|---|---|---|---|---|---|---|---|\n";
  for (int64_t B : a.batches) {
    for (bool graphs : a.modes) {
      EngineOptions eo;
      eo.device_graphs = graphs;
      auto engine = Engine::Create(*backend, eo);
      if (!engine.ok()) return 1;
      const int64_t pages_per_seq = (a.prompt + a.warmup + a.steps + 63) / 64 + 1;
      auto cache = (*engine)->CreateCache(B * pages_per_seq);
      if (!cache.ok()) {
        std::fprintf(stderr, "decode_step_bench: %s\n", std::string(cache.status().message()).c_str());
        return 1;
      }
      BackendExperts experts(**backend);
      std::vector<StepSequence> batch;
      const int64_t V = config->vocab_size;
      // Prefill --prefill-seqs sequences per step.
      double prefill_s = 0;
      int64_t prefill_tokens = 0, prefill_steps = 0;
      for (int64_t s = 0; s < B; s += a.prefill_seqs) {
        std::vector<StepSequence> chunk;
        for (int64_t j = s; j < std::min(B, s + a.prefill_seqs); ++j) {
          std::vector<int32_t> ids(a.prompt);
          for (int64_t i = 0; i < a.prompt; ++i) ids[i] = static_cast<int32_t>((i * 7919 + j * 104729 + 1) % V);
          chunk.push_back({static_cast<SequenceId>(j), ids, false, true});
        }
        if (s == 0) Capture(a, "prefill", true);
        const auto t0 = std::chrono::steady_clock::now();
        auto r = (*engine)->Step(chunk, **cache, experts);
        const auto t1 = std::chrono::steady_clock::now();
        if (s == 0) Capture(a, "prefill", false);
        if (!r.ok()) {
          std::fprintf(stderr, "decode_step_bench: prefill: %s\n", std::string(r.status().message()).c_str());
          return 1;
        }
        // The first prefill step also warms the backend up (cuBLASLt plans,
        // pool growth): timed are the later ones, when there are any.
        if (s > 0 || B <= a.prefill_seqs) {
          prefill_s += std::chrono::duration<double>(t1 - t0).count();
          prefill_tokens += static_cast<int64_t>(chunk.size()) * a.prompt;
          ++prefill_steps;
        }
        for (size_t i = 0; i < chunk.size(); ++i) batch.push_back({chunk[i].seq, {(*r)[i].greedy_token}, false, true});
      }
      double seconds = 0;
      for (int64_t step = 0; step < a.warmup + a.steps; ++step) {
        if (step == a.warmup) Capture(a, "decode", true);
        const auto t0 = std::chrono::steady_clock::now();
        auto r = (*engine)->Step(batch, **cache, experts);
        const auto t1 = std::chrono::steady_clock::now();
        if (!r.ok()) {
          std::fprintf(stderr, "decode_step_bench: decode: %s\n", std::string(r.status().message()).c_str());
          return 1;
        }
        if (step >= a.warmup) seconds += std::chrono::duration<double>(t1 - t0).count();
        for (size_t i = 0; i < batch.size(); ++i) batch[i].tokens = {(*r)[i].greedy_token};
      }
      Capture(a, "decode", false);
      const double ms = 1e3 * seconds / static_cast<double>(a.steps);
      const double tps = static_cast<double>(B) * a.steps / seconds;
      const char* mode = graphs ? "cuda graphs" : "eager";
      std::printf("{\"bench\": \"decode_step\", \"preset\": \"%s\", \"layers\": %lld, \"batch\": %lld, \"context\": %lld, "
                  "\"mode\": \"%s\", \"graph_steps\": %lld, \"ms_per_step\": %.3f, \"tokens_per_s\": %.1f, "
                  "\"prefill_tokens_per_step\": %lld, \"prefill_ms_per_step\": %.3f, \"prefill_tokens_per_s\": %.1f}\n",
                  a.preset.c_str(), static_cast<long long>(config->num_hidden_layers), static_cast<long long>(B),
                  static_cast<long long>(a.prompt), mode, static_cast<long long>((*engine)->graph_steps()), ms, tps,
                  static_cast<long long>(prefill_steps > 0 ? prefill_tokens / prefill_steps : 0),
                  prefill_steps > 0 ? 1e3 * prefill_s / prefill_steps : 0.0,
                  prefill_s > 0 ? prefill_tokens / prefill_s : 0.0);
      std::fflush(stdout);
      char row[256];
      std::snprintf(row, sizeof row, "| %s | %lld | %lld | %lld+ | %s | %.2f | %.0f | %lld | %.2f | %.0f |\n",
                    a.preset.c_str(), static_cast<long long>(config->num_hidden_layers), static_cast<long long>(B),
                    static_cast<long long>(a.prompt), mode, ms, tps,
                    static_cast<long long>(prefill_steps > 0 ? prefill_tokens / prefill_steps : 0),
                    prefill_steps > 0 ? 1e3 * prefill_s / prefill_steps : 0.0,
                    prefill_s > 0 ? prefill_tokens / prefill_s : 0.0);
      table += row;
    }
  }
  if (!a.md.empty()) std::ofstream(a.md) << table;
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) {
  dmoe::Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    int64_t v = 0;
    if (flag == "--preset") {
      a.preset = value;
    } else if (flag == "--md") {
      a.md = value;
    } else if (flag == "--batches") {
      a.batches.clear();
      for (absl::string_view b : absl::StrSplit(value, ',')) {
        if (!absl::SimpleAtoi(b, &v) || v <= 0) {
          std::fprintf(stderr, "decode_step_bench: --batches %s\n", value.c_str());
          return 2;
        }
        a.batches.push_back(v);
      }
    } else if (flag == "--modes") {
      a.modes.clear();
      for (absl::string_view m : absl::StrSplit(value, ',')) {
        if (m != "graphs" && m != "eager") {
          std::fprintf(stderr, "decode_step_bench: --modes takes graphs,eager, not %s\n", value.c_str());
          return 2;
        }
        a.modes.push_back(m == "graphs");
      }
    } else if (flag == "--profile" && (value == "prefill" || value == "decode")) {
      a.profile = value;
    } else if (flag == "--prefill-seqs" && absl::SimpleAtoi(value, &v) && v > 0) {
      a.prefill_seqs = v;
    } else if (absl::SimpleAtoi(value, &v) && v >= 0 &&
               (flag == "--layers" || flag == "--prompt" || flag == "--steps" || flag == "--warmup")) {
      (flag == "--layers" ? a.layers : flag == "--prompt" ? a.prompt : flag == "--steps" ? a.steps : a.warmup) = v;
    } else {
      std::fprintf(stderr,
                   "usage: decode_step_bench [--preset P] [--layers N] [--prompt T] [--steps S] [--warmup W] "
                   "[--batches 1,16,64,256] [--modes graphs,eager] [--prefill-seqs N] [--profile prefill|decode] "
                   "[--md FILE]\n");
      return 2;
    }
  }
  return dmoe::Run(a);
}
