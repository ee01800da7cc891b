// BiasBalancer: mode parsing, option checks, the update rule window by
// window (direction, sign(0) = 0, clamping) and mode off.
#include "router/load_balancer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/config.h"
#include "router/expert_load.h"

namespace dmoe::router {
namespace {

using ::testing::Each;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// 3 layers, layer 0 dense; 4 experts.
ModelConfig SmallMoeConfig(int layers = 3) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(
      absl::StrCat(R"({"model_type": "deepseek_v3", "n_routed_experts": 4, "n_group": 2, "topk_group": 1,
                      "num_experts_per_tok": 2, "first_k_dense_replace": 1, "num_hidden_layers": )",
                   layers, "}"));
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

ExpertLoadTracker Window(const ModelConfig& c, const std::vector<int64_t>& layer1,
                         const std::vector<int64_t>& layer2) {
  absl::StatusOr<ExpertLoadTracker> t = ExpertLoadTracker::Create(c);
  EXPECT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(t->Add(1, layer1).ok());
  EXPECT_TRUE(t->Add(2, layer2).ok());
  return *t;
}

BiasBalancer MakeBalancer(const ModelConfig& c, BalancerOptions options) {
  absl::StatusOr<BiasBalancer> b = BiasBalancer::Create(c, options);
  EXPECT_TRUE(b.ok()) << b.status();
  return *b;
}

TEST(BalanceModeTest, Parse) {
  EXPECT_EQ(*ParseBalanceMode("off"), BalanceMode::kOff);
  EXPECT_EQ(*ParseBalanceMode("bias"), BalanceMode::kBias);
  for (const char* bad : {"", "Bias", "on", "aux_loss"}) {
    absl::StatusOr<BalanceMode> m = ParseBalanceMode(bad);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(m.status().message(), HasSubstr(absl::StrCat("\"", bad, "\" is not one of: off, bias")));
  }
  EXPECT_STREQ(BalanceModeName(BalanceMode::kOff), "off");
  EXPECT_STREQ(BalanceModeName(BalanceMode::kBias), "bias");
}

TEST(BiasBalancerTest, DefaultsAndOptionChecks) {
  const BalancerOptions defaults;
  EXPECT_EQ(defaults.mode, BalanceMode::kOff);
  EXPECT_DOUBLE_EQ(defaults.gamma, 0.001);
  EXPECT_DOUBLE_EQ(defaults.max_bias, 0.05);
  EXPECT_EQ(defaults.window_steps, 32);

  const ModelConfig c = SmallMoeConfig();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THAT(BiasBalancer::Create(c, {BalanceMode::kBias, -0.1, 0.05, 1}).status().message(),
              HasSubstr("gamma -0.1 must be >= 0"));
  EXPECT_EQ(BiasBalancer::Create(c, {BalanceMode::kBias, nan, 0.05, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(BiasBalancer::Create(c, {BalanceMode::kBias, 0.1, -1, 1}).status().message(),
              HasSubstr("max_bias -1 must be >= 0"));
  EXPECT_THAT(BiasBalancer::Create(c, {BalanceMode::kBias, 0.1, 1, 0}).status().message(),
              HasSubstr("window_steps 0 must be >= 1"));
  absl::StatusOr<ModelConfig> dense =
      ModelConfig::FromJson(R"({"model_type": "deepseek_v3", "num_experts_per_tok": null})");
  ASSERT_TRUE(dense.ok());
  EXPECT_EQ(BiasBalancer::Create(*dense, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BiasBalancerTest, BiasesAreShapedForStepRouting) {
  const BiasBalancer b = MakeBalancer(SmallMoeConfig(), {BalanceMode::kBias, 0.01, 0.05, 1});
  ASSERT_EQ(b.biases().size(), 3u);
  EXPECT_THAT(b.biases()[0], IsEmpty());  // dense layer
  EXPECT_THAT(b.biases()[1], ElementsAre(0, 0, 0, 0));
  EXPECT_THAT(b.biases()[2], ElementsAre(0, 0, 0, 0));
}

TEST(BiasBalancerTest, OffKeepsEveryBiasExactlyZero) {
  const ModelConfig c = SmallMoeConfig();
  BiasBalancer b = MakeBalancer(c, {BalanceMode::kOff, 0.01, 0.05, 1});
  for (int window = 0; window < 10; ++window) {
    absl::StatusOr<std::vector<std::vector<float>>> biases = b.Update(Window(c, {100, 0, 0, 0}, {0, 7, 1, 0}));
    ASSERT_TRUE(biases.ok()) << biases.status();
    EXPECT_THAT((*biases)[1], Each(0.0f));
    EXPECT_THAT((*biases)[2], Each(0.0f));
  }
  EXPECT_EQ(b.num_updates(), 10);
  for (const std::vector<float>& layer : b.biases()) {
    for (float v : layer) EXPECT_EQ(std::signbit(v), false);  // +0, not -0
  }
}

TEST(BiasBalancerTest, SkewedLoadMovesBiasesEachWindowThenClamps) {
  const ModelConfig c = SmallMoeConfig();
  // gamma 0.01, max 0.025: two free steps, then the clamp.
  BiasBalancer b = MakeBalancer(c, {BalanceMode::kBias, 0.01, 0.025, 1});
  const std::vector<float> expected_hot = {-0.01f, -0.02f, -0.025f, -0.025f, -0.025f};
  for (size_t window = 0; window < expected_hot.size(); ++window) {
    // Layer 1: expert 0 gets everything. Layer 2: perfectly balanced.
    absl::StatusOr<std::vector<std::vector<float>>> biases = b.Update(Window(c, {40, 0, 0, 0}, {5, 5, 5, 5}));
    ASSERT_TRUE(biases.ok()) << biases.status();
    const float cold = -expected_hot[window];
    EXPECT_THAT((*biases)[1], ElementsAre(expected_hot[window], cold, cold, cold)) << "window " << window;
    EXPECT_THAT((*biases)[2], Each(0.0f)) << "sign(0) = 0";
    EXPECT_EQ(*biases, b.biases());
  }
}

TEST(BiasBalancerTest, ExpertsAtTheMeanStayAndDirectionsFollowLoad) {
  const ModelConfig c = SmallMoeConfig();
  BiasBalancer b = MakeBalancer(c, {BalanceMode::kBias, 0.004, 0.05, 1});
  // mean 2: expert 0 above, 1 below, 2 and 3 at the mean.
  ASSERT_TRUE(b.Update(Window(c, {3, 1, 2, 2}, {0, 0, 0, 0})).ok());
  EXPECT_THAT(b.biases()[1], ElementsAre(-0.004f, 0.004f, 0.0f, 0.0f));
  EXPECT_THAT(b.biases()[2], Each(0.0f)) << "an empty window changes nothing";
  // The load flips: expert 0 now underloaded, 1 overloaded; biases walk back.
  ASSERT_TRUE(b.Update(Window(c, {0, 5, 2, 1}, {0, 0, 0, 0})).ok());
  EXPECT_THAT(b.biases()[1], ElementsAre(0.0f, 0.0f, 0.0f, 0.004f));
  // A fractional mean (7/4): every expert moves.
  ASSERT_TRUE(b.Update(Window(c, {2, 2, 2, 1}, {0, 0, 0, 0})).ok());
  EXPECT_THAT(b.biases()[1], ElementsAre(-0.004f, -0.004f, -0.004f, 0.008f));
}

TEST(BiasBalancerTest, RejectsAWindowOfAnotherModel) {
  BiasBalancer b = MakeBalancer(SmallMoeConfig(3), {BalanceMode::kBias, 0.01, 0.05, 1});
  absl::StatusOr<ExpertLoadTracker> other = ExpertLoadTracker::Create(SmallMoeConfig(4));
  ASSERT_TRUE(other.ok());
  EXPECT_THAT(b.Update(*other).status().message(), HasSubstr("load window has 4 layers, the model 3"));
  EXPECT_EQ(b.num_updates(), 0);
}

}  // namespace
}  // namespace dmoe::router
