// dmoe forward | generate | tokenize | detokenize: one process, in-process
// experts. The JSON they print is a contract (docs/cli.md).
#include <cstdio>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "core/flags/flags.h"
#include "cli/generate_flags.h"
#include "core/backends.h"
#include "core/engine.h"
#include "core/generate.h"
#include "core/status_macros.h"
#include "core/tokenizer.h"
#include "core/in_process/in_process_experts.h"
#include "router/expert_placement.h"
#include "nlohmann/json.hpp"

namespace dmoe::cli {
namespace {

using json = nlohmann::ordered_json;

// The one-process deployment: the cluster's step code with one expert node
// on a thread behind the in-process transport (LocalExperts for models
// without routed experts). On a GPU the routed experts run on the compute
// backend itself, on its device buffers (BackendExperts).
struct LoadedModel {
  std::unique_ptr<Engine> engine;
  std::unique_ptr<in_process::InProcessExperts> in_process;
  std::unique_ptr<ExpertBackend> local;
  ExpertBackend& experts() { return in_process ? static_cast<ExpertBackend&>(in_process->backend()) : *local; }
};

// The flags every one-process command takes for its backend.
const std::set<std::string> kBackendFlags = {"device", "load-format"};

std::set<std::string> WithBackendFlags(std::set<std::string> flags) {
  flags.insert(kBackendFlags.begin(), kBackendFlags.end());
  return flags;
}

absl::StatusOr<LoadedModel> LoadModel(const std::string& dir, const Flags& flags) {
  DMOE_ASSIGN_OR_RETURN(BackendOptions options, ParseBackendOptions(flags.Get("device").value_or("cpu"),
                                                                    flags.Get("load-format").value_or("auto")));
  DMOE_ASSIGN_OR_RETURN(std::shared_ptr<ComputeBackend> backend,
                        LoadComputeBackend(dir, WeightSelection::All(), options));
  LoadedModel m;
  DMOE_ASSIGN_OR_RETURN(m.engine, Engine::Create(backend));
  const ModelWeights& weights = m.engine->weights();
  if (backend->memory() != MemorySpace::kHost) {
    m.local = std::make_unique<BackendExperts>(*backend);
  } else if (weights.config.has_moe()) {
    DMOE_ASSIGN_OR_RETURN(router::ExpertPlacement placement,
                          router::ExpertPlacement::Contiguous(weights.config.n_routed_experts, 1));
    DMOE_ASSIGN_OR_RETURN(m.in_process, in_process::InProcessExperts::Create(m.engine->weights(), placement));
  } else {
    m.local = std::make_unique<LocalExperts>(m.engine->weights());
  }
  return m;
}

// Enough pages for `tokens` positions.
absl::StatusOr<std::unique_ptr<LatentCache>> CacheFor(const Engine& engine, int64_t tokens) {
  const int64_t page = 64;
  return engine.CreateCache(std::max<int64_t>(1, (tokens + page - 1) / page), page);
}

void PrintJson(const json& j) { std::cout << j.dump() << "\n"; }

}  // namespace

absl::Status RunForward(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args, WithBackendFlags({"model", "ids"}), {"all-positions"}));
  DMOE_ASSIGN_OR_RETURN(std::string dir, flags.Require("model"));
  DMOE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, flags.GetIds("ids"));
  DMOE_ASSIGN_OR_RETURN(LoadedModel m, LoadModel(dir, flags));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<LatentCache> cache, CacheFor(*m.engine, static_cast<int64_t>(ids.size())));
  StepSequence seq{0, ids, flags.Has("all-positions")};
  DMOE_ASSIGN_OR_RETURN(std::vector<SequenceLogits> out, m.engine->Step({seq}, *cache, m.experts()));
  const int64_t V = m.engine->config().vocab_size;
  json logits = json::array();
  for (size_t p = 0; p < out[0].positions.size(); ++p) {
    logits.push_back(std::vector<float>(out[0].logits.begin() + p * V, out[0].logits.begin() + (p + 1) * V));
  }
  PrintJson({{"positions", out[0].positions}, {"logits", logits}});
  return absl::OkStatus();
}

absl::Status RunGenerate(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args,
                                                  WithBackendFlags({"model", "prompt", "ids", "max-tokens",
                                                                    "temperature", "top-p", "top-k", "min-p", "seed",
                                                                    "prefill-chunk"}),
                                                  {"json", "ignore-eos"}));
  DMOE_ASSIGN_OR_RETURN(std::string dir, flags.Require("model"));
  if (flags.Has("prompt") == flags.Has("ids")) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT or --ids 1,2,3");
  }
  DMOE_ASSIGN_OR_RETURN(GenerateFlags g, ParseGenerateFlags(flags));
  GenerateOptions opts;
  opts.max_tokens = g.max_tokens;
  opts.sampling = g.sampling;
  opts.stop_at_eos = !g.ignore_eos;
  DMOE_ASSIGN_OR_RETURN(opts.prefill_chunk, flags.GetInt("prefill-chunk", 0));

  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(dir));
  std::vector<int32_t> prompt;
  if (flags.Has("ids")) {
    DMOE_ASSIGN_OR_RETURN(prompt, flags.GetIds("ids"));
  } else {
    DMOE_ASSIGN_OR_RETURN(prompt, tokenizer->EncodeChecked(*flags.Get("prompt")));
    if (tokenizer->add_bos_token() && tokenizer->bos_token_id().has_value()) {
      prompt.insert(prompt.begin(), *tokenizer->bos_token_id());
    }
  }
  DMOE_ASSIGN_OR_RETURN(LoadedModel m, LoadModel(dir, flags));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<LatentCache> cache,
                        CacheFor(*m.engine, static_cast<int64_t>(prompt.size()) + opts.max_tokens));
  const bool as_json = flags.Has("json");
  StreamingDetokenizer stream(*tokenizer);
  DMOE_ASSIGN_OR_RETURN(GenerateResult result,
                        Generate(*m.engine, *cache, m.experts(), prompt, opts, [&](const SampleResult& s) {
                          if (as_json) return;
                          std::cout << stream.Push(s.token) << std::flush;
                        }));
  if (as_json) {
    PrintJson({{"ids", result.ids}, {"text", tokenizer->Decode(result.ids)}});
  } else {
    std::cout << stream.Finish() << std::endl;
  }
  return absl::OkStatus();
}

absl::Status RunTokenize(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args, {"model", "text"}, {}));
  DMOE_ASSIGN_OR_RETURN(std::string dir, flags.Require("model"));
  DMOE_ASSIGN_OR_RETURN(std::string text, flags.Require("text"));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(dir));
  DMOE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer->EncodeChecked(text));
  PrintJson({{"ids", ids}});
  return absl::OkStatus();
}

absl::Status RunDetokenize(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args, {"model", "ids"}, {}));
  DMOE_ASSIGN_OR_RETURN(std::string dir, flags.Require("model"));
  DMOE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, flags.GetIds("ids", /*allow_empty=*/true));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(dir));
  DMOE_RETURN_IF_ERROR(tokenizer->ValidateIds(ids));
  std::cout << tokenizer->Decode(ids) << "\n";
  return absl::OkStatus();
}

}  // namespace dmoe::cli
