// The CPU forward pass against the golden HF transformers data of tiny-v3
// (MODEL_SPEC.md 6): prefill logits, greedy decoding over the paged latent
// cache through the absorbed form, expanded vs absorbed, chunked prefill.
#include <algorithm>
#include <fstream>
#include <memory>

#include "core/engine.h"
#include "core/generate.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::GoldenCase;
using testing::GoldenModelDir;
using testing::LoadGoldenCases;
using testing::MaxRelativeError;

class GoldenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto weights = ModelWeights::Load(GoldenModelDir());
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = new std::shared_ptr<const ModelWeights>(*weights);
    cases_ = new std::vector<GoldenCase>(LoadGoldenCases(GoldenModelDir()));
  }
  static void TearDownTestSuite() {
    delete weights_;
    delete cases_;
  }

  std::unique_ptr<Engine> MakeEngine(MlaForm form) {
    auto engine = Engine::Create(*weights_, EngineOptions{form});
    EXPECT_TRUE(engine.ok()) << engine.status();
    return std::move(engine).value();
  }
  std::unique_ptr<LatentCache> MakeCache(const Engine& engine, int64_t pages = 16, int64_t page_size = 64) {
    auto cache = LatentCache::Create(engine.CacheOptions(pages, page_size));
    EXPECT_TRUE(cache.ok()) << cache.status();
    return std::move(cache).value();
  }

  static std::shared_ptr<const ModelWeights>* weights_;
  static std::vector<GoldenCase>* cases_;
};
std::shared_ptr<const ModelWeights>* GoldenTest::weights_ = nullptr;
std::vector<GoldenCase>* GoldenTest::cases_ = nullptr;

TEST_F(GoldenTest, PrefillLogitsMatchEveryPosition) {
  ASSERT_EQ(cases_->size(), 4u);
  for (MlaForm form : {MlaForm::kExpanded, MlaForm::kAbsorbed}) {
    auto engine = MakeEngine(form);
    LocalExperts experts(engine->weights());
    double worst = 0;
    for (const GoldenCase& gc : *cases_) {
      auto cache = MakeCache(*engine);
      auto out = engine->Step({{1, gc.prompt_ids, /*all_logits=*/true}}, *cache, experts);
      ASSERT_TRUE(out.ok()) << out.status();
      ASSERT_EQ((*out)[0].positions.size(), gc.prompt_ids.size());
      const double err = MaxRelativeError((*out)[0].logits, gc.logits, engine->config().vocab_size);
      worst = std::max(worst, err);
      EXPECT_LE(err, 1e-4) << "case with " << gc.prompt_ids.size() << " tokens";
    }
    std::printf("[golden] %s prefill: max relative logit error %.3g over %zu cases\n",
                form == MlaForm::kExpanded ? "expanded" : "absorbed", worst, cases_->size());
  }
}

TEST_F(GoldenTest, GreedyDecodeThroughAbsorbedFormEqualsGoldenIds) {
  auto engine = MakeEngine(MlaForm::kAuto);  // decode steps take the absorbed form
  LocalExperts experts(engine->weights());
  // Small pages so the sequences span several pages of the block table.
  auto cache = MakeCache(*engine, 64, 4);
  for (const GoldenCase& gc : *cases_) {
    GenerateOptions opts;
    opts.max_tokens = static_cast<int64_t>(gc.greedy_ids.size());
    opts.stop_at_eos = false;
    auto result = Generate(*engine, *cache, experts, gc.prompt_ids, opts);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->ids, gc.greedy_ids);
    EXPECT_EQ(cache->pages_free(), cache->pages_total()) << "generation must free its pages";
  }
}

TEST_F(GoldenTest, ExpandedAndAbsorbedFormsAgree) {
  auto expanded = MakeEngine(MlaForm::kExpanded);
  auto absorbed = MakeEngine(MlaForm::kAbsorbed);
  LocalExperts experts(expanded->weights());
  double worst = 0;
  for (const GoldenCase& gc : *cases_) {
    auto c1 = MakeCache(*expanded);
    auto c2 = MakeCache(*absorbed);
    auto a = expanded->Step({{7, gc.prompt_ids, true}}, *c1, experts);
    auto b = absorbed->Step({{7, gc.prompt_ids, true}}, *c2, experts);
    ASSERT_TRUE(a.ok() && b.ok());
    const double err = MaxRelativeError((*a)[0].logits, (*b)[0].logits, expanded->config().vocab_size);
    worst = std::max(worst, err);
    EXPECT_LE(err, 1e-5);
  }
  std::printf("[golden] expanded vs absorbed: max relative difference %.3g\n", worst);
}

TEST_F(GoldenTest, ChunkedPrefillEqualsOnePass) {
  auto engine = MakeEngine(MlaForm::kAuto);
  LocalExperts experts(engine->weights());
  const GoldenCase& gc = cases_->back();  // the longest prompt
  ASSERT_GT(gc.prompt_ids.size(), 8u);
  auto whole_cache = MakeCache(*engine);
  auto whole = engine->Step({{3, gc.prompt_ids, true}}, *whole_cache, experts);
  ASSERT_TRUE(whole.ok());
  for (size_t chunk : {1u, 5u, 16u}) {
    auto cache = MakeCache(*engine, 16, 8);
    std::vector<float> logits;
    for (size_t begin = 0; begin < gc.prompt_ids.size(); begin += chunk) {
      const size_t end = std::min(gc.prompt_ids.size(), begin + chunk);
      StepSequence s{3, std::vector<int32_t>(gc.prompt_ids.begin() + begin, gc.prompt_ids.begin() + end), true};
      auto out = engine->Step({s}, *cache, experts);
      ASSERT_TRUE(out.ok()) << out.status();
      logits.insert(logits.end(), (*out)[0].logits.begin(), (*out)[0].logits.end());
    }
    const double err = MaxRelativeError(logits, (*whole)[0].logits, engine->config().vocab_size);
    EXPECT_LE(err, 1e-5) << "chunk " << chunk;
    EXPECT_LE(MaxRelativeError(logits, gc.logits, engine->config().vocab_size), 1e-4);
  }
}

TEST_F(GoldenTest, BatchCompositionAndMicroBatchSplitDoNotChangeResults) {
  // ping_pong_min_tokens 1 splits every multi-sequence step into two
  // micro-batches that alternate per layer.
  for (int64_t ping_pong : {0, 1}) {
    auto engine = Engine::Create(*weights_, EngineOptions{MlaForm::kAuto, ping_pong});
    ASSERT_TRUE(engine.ok());
    LocalExperts experts((*engine)->weights());
    auto cache = MakeCache(**engine, 64, 16);
    std::vector<StepSequence> batch;
    for (size_t i = 0; i < cases_->size(); ++i) {
      batch.push_back({static_cast<SequenceId>(i), (*cases_)[i].prompt_ids, true});
    }
    auto out = (*engine)->Step(batch, *cache, experts);
    ASSERT_TRUE(out.ok()) << out.status();
    for (size_t i = 0; i < cases_->size(); ++i) {
      EXPECT_LE(MaxRelativeError((*out)[i].logits, (*cases_)[i].logits, 512), 1e-4) << "ping_pong " << ping_pong;
    }
    // Decode all four together for the golden continuation: every step is a
    // batch of four single tokens (absorbed form), split in two when ping-ponging.
    std::vector<std::vector<int32_t>> generated(cases_->size());
    for (size_t i = 0; i < cases_->size(); ++i) {
      const std::vector<float>& l = (*out)[i].logits;
      generated[i].push_back(static_cast<int32_t>(std::max_element(l.end() - 512, l.end()) - (l.end() - 512)));
    }
    for (int step = 1; step < 16; ++step) {
      std::vector<StepSequence> decode;
      for (size_t i = 0; i < cases_->size(); ++i) decode.push_back({static_cast<SequenceId>(i), {generated[i].back()}, false});
      auto next = (*engine)->Step(decode, *cache, experts);
      ASSERT_TRUE(next.ok()) << next.status();
      for (size_t i = 0; i < cases_->size(); ++i) {
        const std::vector<float>& l = (*next)[i].logits;
        generated[i].push_back(static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin()));
      }
    }
    for (size_t i = 0; i < cases_->size(); ++i) EXPECT_EQ(generated[i], (*cases_)[i].greedy_ids);
  }
}

TEST_F(GoldenTest, StepRejectsBadInputWithoutTouchingTheCache) {
  auto engine = MakeEngine(MlaForm::kAuto);
  LocalExperts experts(engine->weights());
  auto cache = MakeCache(*engine, 2, 4);
  const int64_t free_before = cache->pages_free();
  auto bad_token = engine->Step({{1, {5, 512}, false}}, *cache, experts);
  EXPECT_EQ(bad_token.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_token.status().message().find("512"), std::string::npos);
  auto too_long = engine->Step({{1, std::vector<int32_t>(9, 3), false}}, *cache, experts);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kResourceExhausted);
  auto empty = engine->Step({{1, {}, false}}, *cache, experts);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->pages_free(), free_before);
}

}  // namespace
}  // namespace dmoe
