// The compute-backend seam on the CPU: the engine on an explicit CpuBackend
// and the backend's own routed experts give the same bits as before the
// seam; --load-format dummy gives WriteRandomModel's weights; --device cuda
// without a GPU (or without the CUDA build) is UNAVAILABLE, not a crash.
#include <cstring>
#include <memory>

#include "core/backends.h"
#include "core/cpu/cpu_backend.h"
#include "core/engine.h"
#include "core/sampling.h"
#include "core/synthetic_checkpoint.h"
#include "gtest/gtest.h"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using testing::GoldenCase;
using testing::GoldenModelDir;
using testing::LoadGoldenCases;

std::vector<float> PrefillLogits(const Engine& engine, ExpertBackend& experts, const std::vector<int32_t>& ids) {
  auto cache = engine.CreateCache(16);
  EXPECT_TRUE(cache.ok()) << cache.status();
  auto out = engine.Step({{1, ids, /*all_logits=*/true}}, **cache, experts);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? (*out)[0].logits : std::vector<float>();
}

bool BitwiseEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(ComputeBackend, BackendExpertsOnTheCpuGiveLocalExpertsBits) {
  auto weights = ModelWeights::Load(GoldenModelDir());
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto backend = std::make_shared<CpuBackend>(*weights);
  auto engine = Engine::Create(backend);
  ASSERT_TRUE(engine.ok()) << engine.status();
  LocalExperts local(**weights);
  BackendExperts on_backend(*backend);
  for (const GoldenCase& gc : LoadGoldenCases(GoldenModelDir())) {
    const std::vector<float> a = PrefillLogits(**engine, local, gc.prompt_ids);
    const std::vector<float> b = PrefillLogits(**engine, on_backend, gc.prompt_ids);
    ASSERT_FALSE(a.empty());
    EXPECT_TRUE(BitwiseEqual(a, b)) << "prompt of " << gc.prompt_ids.size() << " tokens";
    EXPECT_LE(testing::MaxRelativeError(a, gc.logits, (*engine)->config().vocab_size), 1e-4);
  }
}

TEST(ComputeBackend, GreedyOnlyStepsGiveTheSamplersGreedyResult) {
  auto weights = ModelWeights::Load(GoldenModelDir());
  ASSERT_TRUE(weights.ok());
  auto engine = Engine::Create(*weights);
  ASSERT_TRUE(engine.ok());
  LocalExperts experts(**weights);
  const auto cases = LoadGoldenCases(GoldenModelDir());
  std::vector<StepSequence> with_logits, greedy;
  for (size_t i = 0; i < cases.size(); ++i) {
    with_logits.push_back({static_cast<SequenceId>(i), cases[i].prompt_ids, false, false});
    greedy.push_back({static_cast<SequenceId>(i), cases[i].prompt_ids, false, /*greedy_only=*/i % 2 == 0});
  }
  auto c1 = (*engine)->CreateCache(16);
  auto c2 = (*engine)->CreateCache(16);
  ASSERT_TRUE(c1.ok() && c2.ok());
  auto a = (*engine)->Step(with_logits, **c1, experts);
  auto b = (*engine)->Step(greedy, **c2, experts);
  ASSERT_TRUE(a.ok() && b.ok());
  const int64_t V = (*engine)->config().vocab_size;
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ((*b)[i].positions, (*a)[i].positions);
    if (i % 2 == 1) {
      EXPECT_TRUE(BitwiseEqual((*b)[i].logits, (*a)[i].logits));
      continue;
    }
    EXPECT_TRUE((*b)[i].logits.empty());
    Sampler sampler(SamplingParams{});
    const SampleResult r = sampler.Sample(absl::MakeConstSpan((*a)[i].logits.data(), V));
    EXPECT_EQ((*b)[i].greedy_token, r.token);
    EXPECT_EQ((*b)[i].greedy_logprob, r.logprob);
    EXPECT_EQ((*b)[i].greedy_token, cases[i].greedy_ids[0]);
  }
}

TEST(ComputeBackend, RoutedExpertsOnHostMatchesLocalExperts) {
  auto weights = ModelWeights::Load(GoldenModelDir());
  ASSERT_TRUE(weights.ok());
  CpuBackend backend(*weights);
  const ModelConfig& c = (*weights)->config;
  const int64_t n = 3, k = c.num_experts_per_tok, D = c.hidden_size, layer = c.first_k_dense_replace;
  std::vector<float> x(n * D), w(n * k, 0.25f), a(n * D), b(n * D);
  for (int64_t i = 0; i < n * D; ++i) x[i] = static_cast<float>((i * 37) % 11) / 11.0f - 0.5f;
  std::vector<int32_t> idx = {0, 3, 5, -1, 15, 2, 7, 8, 1, 9, 11, 4};
  ASSERT_EQ(static_cast<int64_t>(idx.size()), n * k);
  LocalExperts local(**weights);
  ASSERT_TRUE(local.Compute(layer, x.data(), n, k, idx.data(), w.data(), a.data()).ok());
  ASSERT_TRUE(RoutedExpertsOnHost(backend, layer, x.data(), n, k, idx.data(), w.data(), b.data()).ok());
  EXPECT_TRUE(BitwiseEqual(a, b));
  // A dense layer has no routed experts.
  EXPECT_EQ(backend.RoutedExperts(0, x.data(), n, k, idx.data(), w.data(), b.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ComputeBackend, DummyWeightsAreTheRandomModelsWeights) {
  const auto dir = testing::ScratchDir("dummy_model");
  ASSERT_TRUE(WriteSyntheticModel({.preset = "tiny", .dtype = DType::kBF16, .seed = 5}, dir).ok());
  BackendOptions files, dummy;
  dummy.load_format = LoadFormat::kDummy;
  dummy.dummy_seed = 5;
  auto from_files = LoadComputeBackend(dir, WeightSelection::All(), files);
  auto generated = LoadComputeBackend(dir, WeightSelection::All(), dummy);
  ASSERT_TRUE(from_files.ok()) << from_files.status();
  ASSERT_TRUE(generated.ok()) << generated.status();
  auto e1 = Engine::Create(*from_files);
  auto e2 = Engine::Create(*generated);
  ASSERT_TRUE(e1.ok() && e2.ok());
  BackendExperts x1(**from_files), x2(**generated);
  const std::vector<int32_t> ids = {0, 17, 300, 5, 9};
  const std::vector<float> a = PrefillLogits(**e1, x1, ids);
  EXPECT_FALSE(a.empty());
  EXPECT_TRUE(BitwiseEqual(a, PrefillLogits(**e2, x2, ids)));
  // Another seed, other weights.
  dummy.dummy_seed = 6;
  auto other = LoadComputeBackend(dir, WeightSelection::All(), dummy);
  ASSERT_TRUE(other.ok());
  auto e3 = Engine::Create(*other);
  ASSERT_TRUE(e3.ok());
  BackendExperts x3(**other);
  EXPECT_FALSE(BitwiseEqual(a, PrefillLogits(**e3, x3, ids)));
}

TEST(ComputeBackend, DummyHonoursTheWeightSelection) {
  auto config = ModelConfig::Load(GoldenModelDir());
  ASSERT_TRUE(config.ok());
  WeightSelection shard{false, [](int64_t, int64_t e) { return e == 2; }};
  auto weights = RandomModelWeights(*config, shard, 1);
  ASSERT_TRUE(weights.ok()) << weights.status();
  EXPECT_TRUE((*weights)->embed_tokens.empty());
  EXPECT_EQ((*weights)->routed_experts_loaded, config->num_hidden_layers - config->first_k_dense_replace);
  CpuBackend backend(*weights);
  EXPECT_FALSE(backend.has_non_expert_weights());
  EXPECT_TRUE(backend.HasRoutedExpert(config->first_k_dense_replace, 2));
  EXPECT_FALSE(backend.HasRoutedExpert(config->first_k_dense_replace, 3));
  EXPECT_EQ(Engine::Create(std::make_shared<CpuBackend>(*weights)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ComputeBackend, CudaWithoutAGpuIsUnavailable) {
  BackendOptions o;
  o.device = Device::kCuda;
  auto backend = LoadComputeBackend(GoldenModelDir(), WeightSelection::All(), o);
  if (backend.ok()) GTEST_SKIP() << "this machine has a usable GPU (" << (*backend)->name() << ")";
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable) << backend.status();
  EXPECT_NE(backend.status().message().find("cuda"), std::string::npos) << backend.status();
}

TEST(ComputeBackend, FlagValues) {
  EXPECT_EQ(*ParseDevice("cpu"), Device::kCpu);
  EXPECT_EQ(*ParseDevice("cuda"), Device::kCuda);
  EXPECT_EQ(ParseDevice("gpu").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseLoadFormat("auto"), LoadFormat::kSafetensors);
  EXPECT_EQ(*ParseLoadFormat("dummy"), LoadFormat::kDummy);
  EXPECT_EQ(ParseLoadFormat("pt").status().code(), absl::StatusCode::kInvalidArgument);
  CpuBackend backend(*ModelWeights::Load(GoldenModelDir()));
  EXPECT_EQ(backend.CachePagesForMemoryFraction(0.5, 64).status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace dmoe
