// Fuzzes the scheduler's request validation: any bytes that parse as a
// dmoe.v1.GenerateRequest are either turned into a scheduler Request that
// the batcher and the sampler can take as is, or refused with
// INVALID_ARGUMENT / RESOURCE_EXHAUSTED. Served model: tests/golden/tiny-v3.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/config.h"
#include "core/sampling.h"
#include "core/tokenizer.h"
#include "dmoe/v1/generation.pb.h"
#include "scheduler/generation_service.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

struct Served {
  dmoe::ModelConfig config;
  std::unique_ptr<dmoe::Tokenizer> tokenizer;
};

const Served& Model() {
  static const Served* served = [] {
    auto* s = new Served;
    auto config = dmoe::ModelConfig::Load(DMOE_GOLDEN_MODEL_DIR);
    FUZZ_CHECK(config.ok());
    s->config = *config;
    auto tokenizer = dmoe::Tokenizer::Load(DMOE_GOLDEN_MODEL_DIR);
    FUZZ_CHECK(tokenizer.ok());
    s->tokenizer = std::move(*tokenizer);
    return s;
  }();
  return *served;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Served& m = Model();
  dmoe::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  absl::StatusOr<dmoe::scheduler::Request> q =
      dmoe::scheduler::ValidateGenerateRequest(request, m.config, *m.tokenizer, "tiny-v3");
  if (!q.ok()) {
    FUZZ_CHECK(q.status().code() == absl::StatusCode::kInvalidArgument ||
               q.status().code() == absl::StatusCode::kResourceExhausted);
    FUZZ_CHECK(!q.status().message().empty());
    return 0;
  }
  const int64_t context = m.config.max_position_embeddings;
  FUZZ_CHECK(!q->prompt.empty());
  for (int32_t id : q->prompt) FUZZ_CHECK(id >= 0 && id < m.config.vocab_size);
  FUZZ_CHECK(q->max_tokens >= 1);
  FUZZ_CHECK(static_cast<int64_t>(q->prompt.size()) + q->max_tokens <= context);
  FUZZ_CHECK(dmoe::ValidateSamplingParams(q->sampling).ok());
  for (int32_t id : q->stop_token_ids) FUZZ_CHECK(id >= 0 && id < m.config.vocab_size);
  for (const std::string& s : q->stop) FUZZ_CHECK(!s.empty());
  FUZZ_CHECK(q->eos_token_ids == m.config.eos_token_ids);
  return 0;
}
