// MoE gate (MODEL_SPEC.md 3.7): hand-computed routes on a few experts, and a
// seeded cross-check against a small independent float64 reference.
//
// Hand cases give the affinities s (v3) as sigmoid(z) by choosing
// z = logit(s); the expected weights below are worked out from those s by hand.
#include "core/moe_gate.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/config.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using json = nlohmann::json;

// Weights come from float32 sigmoid/softmax of float logits; 2e-6 covers that.
constexpr double kWeightTol = 2e-6;

json V3Config(int E, int G, int kg, int k, bool norm, double rsf) {
  return json{{"model_type", "deepseek_v3"},
              {"n_routed_experts", E},
              {"n_group", G},
              {"topk_group", kg},
              {"num_experts_per_tok", k},
              {"norm_topk_prob", norm},
              {"routed_scaling_factor", rsf}};
}

json V2Config(const std::string& method, int E, int G, int kg, int k, double rsf) {
  json j{{"model_type", "deepseek_v2"},
         {"n_routed_experts", E},
         {"num_experts_per_tok", k},
         {"topk_method", method},
         {"routed_scaling_factor", rsf}};
  if (method == "group_limited_greedy") {
    j["n_group"] = G;
    j["topk_group"] = kg;
  }
  return j;
}

// z with sigmoid(z) == s (to float rounding).
std::vector<float> Logits(const std::vector<double>& s) {
  std::vector<float> z;
  for (double v : s) z.push_back(static_cast<float>(std::log(v / (1.0 - v))));
  return z;
}

struct Routed {
  std::vector<int32_t> idx;
  std::vector<float> w;
  double WeightSum() const { return std::accumulate(w.begin(), w.end(), 0.0); }
};

Routed RouteWith(const json& cfg, const std::vector<float>& z, const std::vector<float>& bias = {},
                 const std::vector<float>& serving = {}) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(cfg.dump());
  if (!c.ok()) {
    ADD_FAILURE() << c.status() << "\n" << cfg.dump();
    return {};
  }
  MoeGate gate(*c);
  EXPECT_EQ(gate.num_experts(), static_cast<int64_t>(z.size()));
  Routed r;
  r.idx.assign(gate.top_k(), -1);
  r.w.assign(gate.top_k(), -1.0f);
  gate.Route(z, bias, serving, r.idx.data(), r.w.data());
  return r;
}

void ExpectWeights(const Routed& r, const std::vector<double>& expected) {
  ASSERT_EQ(r.w.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(r.w[i], expected[i], kWeightTol * std::max(1.0, std::abs(expected[i]))) << "slot " << i;
  }
}

// ---- deepseek_v3 (noaux_tc) -------------------------------------------------
// E=8, G=4 (groups {0,1} {2,3} {4,5} {6,7}), kg=2.

// s: group sums (top-2 of 2) g0 0.3, g1 1.2, g2 1.1, g3 0.2 -> keep g1, g2.
const std::vector<double> kS1 = {0.1, 0.2, 0.9, 0.3, 0.5, 0.6, 0.05, 0.15};

TEST(MoeGateV3Test, BasicRenormalizedTop2) {
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), Logits(kS1), std::vector<float>(8, 0.f));
  // Kept experts 2..5; top-2: 2 (0.9), 5 (0.6). w = s / 1.5 * 2.5.
  EXPECT_THAT(r.idx, ElementsAre(2, 5));
  ExpectWeights(r, {1.5, 1.0});
  EXPECT_NEAR(r.WeightSum(), 2.5, 1e-5);
}

TEST(MoeGateV3Test, EmptyCorrectionBiasMeansZero) {
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), Logits(kS1));
  EXPECT_THAT(r.idx, ElementsAre(2, 5));
  ExpectWeights(r, {1.5, 1.0});
}

TEST(MoeGateV3Test, Top3) {
  const Routed r = RouteWith(V3Config(8, 4, 2, 3, true, 2.5), Logits(kS1), std::vector<float>(8, 0.f));
  // Top-3 of kept {2:0.9, 3:0.3, 4:0.5, 5:0.6}: 2, 5, 4; sum 2.0; w = s / 2.0 * 2.5.
  EXPECT_THAT(r.idx, ElementsAre(2, 5, 4));
  ExpectWeights(r, {1.125, 0.75, 0.625});
  EXPECT_NEAR(r.WeightSum(), 2.5, 1e-5);
}

TEST(MoeGateV3Test, Top3WithoutNormalization) {
  const Routed r = RouteWith(V3Config(8, 4, 2, 3, false, 2.5), Logits(kS1), std::vector<float>(8, 0.f));
  EXPECT_THAT(r.idx, ElementsAre(2, 5, 4));
  ExpectWeights(r, {0.9 * 2.5, 0.6 * 2.5, 0.5 * 2.5});
}

TEST(MoeGateV3Test, CorrectionBiasChoosesButDoesNotWeigh) {
  // u3 = 0.3 + 0.7 = 1.0 now beats u2 = 0.9: order 3, 2. Weights use s.
  std::vector<float> bias(8, 0.f);
  bias[3] = 0.7f;
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), Logits(kS1), bias);
  EXPECT_THAT(r.idx, ElementsAre(3, 2));
  // s3 / (0.3 + 0.9) * 2.5, s2 / 1.2 * 2.5.
  ExpectWeights(r, {0.625, 1.875});
  EXPECT_NEAR(r.WeightSum(), 2.5, 1e-5);
}

TEST(MoeGateV3Test, CorrectionBiasChangesGroupSelection) {
  // bias +1 on expert 0: u0 = 1.1, g0 sum 1.3 > g1 1.2 > g2 1.1 -> keep g0, g1.
  std::vector<float> bias(8, 0.f);
  bias[0] = 1.0f;
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), Logits(kS1), bias);
  EXPECT_THAT(r.idx, ElementsAre(0, 2));
  // s0 = 0.1, s2 = 0.9, sum 1.0.
  ExpectWeights(r, {0.25, 2.25});
}

TEST(MoeGateV3Test, NoNormalizationWeightsAreSigmoidTimesRsf) {
  std::vector<float> bias(8, 0.f);
  bias[3] = 0.7f;
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, false, 2.5), Logits(kS1), bias);
  EXPECT_THAT(r.idx, ElementsAre(3, 2));
  ExpectWeights(r, {0.3 * 2.5, 0.9 * 2.5});
}

TEST(MoeGateV3Test, RsfAppliedAfterRenormalization) {
  for (double rsf : {1.0, 2.5, 16.0}) {
    const Routed r = RouteWith(V3Config(8, 4, 2, 3, true, rsf), Logits(kS1), std::vector<float>(8, 0.f));
    EXPECT_THAT(r.idx, ElementsAre(2, 5, 4));
    ExpectWeights(r, {0.45 * rsf, 0.3 * rsf, 0.25 * rsf});
    EXPECT_NEAR(r.WeightSum(), rsf, 1e-5 * rsf) << "rsf " << rsf;
  }
}

TEST(MoeGateV3Test, GroupScoreIsTop2SumNotMax) {
  // g0 (0.95, 0.05): max 0.95, sum 1.00
  // g1 (0.62, 0.58): max 0.62, sum 1.20
  // g2 (0.56, 0.54): max 0.56, sum 1.10
  // g3 (0.10, 0.10)
  // top-2 sum keeps g1, g2 -> 2, 3. (Max would keep g0, g1 -> 0, 2.)
  const std::vector<double> s = {0.95, 0.05, 0.62, 0.58, 0.56, 0.54, 0.1, 0.1};
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), Logits(s), std::vector<float>(8, 0.f));
  EXPECT_THAT(r.idx, ElementsAre(2, 3));
  ExpectWeights(r, {0.62 / 1.2 * 2.5, 0.58 / 1.2 * 2.5});
}

TEST(MoeGateV3Test, GroupScoreIsTop2SumWithFourPerGroup) {
  // E=16, G=4, kg=2, k=2.
  // g0 (0.9, 0.3, 0.3, 0.3):    max 0.9,  top-2 1.20, all 1.80
  // g1 (0.7, 0.6, 0.01, 0.01):  max 0.7,  top-2 1.30, all 1.32
  // g2 (0.62, 0.65, 0.02, 0.02): max 0.65, top-2 1.27, all 1.31
  // g3 all 0.1
  // top-2 sum keeps g1, g2 -> experts 4 (0.7), 9 (0.65). Max or the sum of
  // all members would keep g0, g1 -> 0, 4.
  const std::vector<double> s = {0.9, 0.3, 0.3,  0.3,  0.7, 0.6, 0.01, 0.01,
                                 0.62, 0.65, 0.02, 0.02, 0.1, 0.1, 0.1, 0.1};
  const Routed r = RouteWith(V3Config(16, 4, 2, 2, true, 2.5), Logits(s), std::vector<float>(16, 0.f));
  EXPECT_THAT(r.idx, ElementsAre(4, 9));
  ExpectWeights(r, {0.7 / 1.35 * 2.5, 0.65 / 1.35 * 2.5});
}

TEST(MoeGateV3Test, DroppedGroupsMaskedWithZeroNotMinusInf) {
  // s    = 0.2  0.1 | 0.9  0.3 | 0.4  0.45 | 0.15 0.05
  // bias = -.5  -.5 |  0   -.5 | -.5  -.5  | -.5  -.5
  const std::vector<double> s = {0.2, 0.1, 0.9, 0.3, 0.4, 0.45, 0.15, 0.05};
  const std::vector<float> bias = {-0.5f, -0.5f, 0.f, -0.5f, -0.5f, -0.5f, -0.5f, -0.5f};
  // u = -0.3 -0.4 | 0.9 -0.2 | -0.1 -0.05 | -0.35 -0.45
  // gs: g0 -0.7, g1 0.7, g2 -0.15, g3 -0.8 -> keep g1, g2.
  // u' = 0 0 | 0.9 -0.2 | -0.1 -0.05 | 0 0: second pick is a masked 0 from a
  // dropped group (lowest index: 0), not expert 5 (-0.05) as -inf masking gives.
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), Logits(s), bias);
  EXPECT_THAT(r.idx, ElementsAre(2, 0));
  ExpectWeights(r, {0.9 / 1.1 * 2.5, 0.2 / 1.1 * 2.5});
}

TEST(MoeGateV3Test, AllKeptNegativeSoMaskedZerosWin) {
  // Every u negative (bias -1): the kept groups' experts all lose to the
  // masked zeros of the dropped groups; ties among zeros: lower index first.
  const std::vector<float> bias(8, -1.0f);
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, false, 1.0), Logits(kS1), bias);
  // Kept g1, g2 (sums -0.8, -0.9); dropped 0, 1, 6, 7 -> 0, 1.
  EXPECT_THAT(r.idx, ElementsAre(0, 1));
  ExpectWeights(r, {0.1, 0.2});
}

TEST(MoeGateV3Test, ServingBiasShiftsSelectionOnly) {
  std::vector<float> serving(8, 0.f);
  serving[3] = 0.7f;
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), Logits(kS1), std::vector<float>(8, 0.f), serving);
  EXPECT_THAT(r.idx, ElementsAre(3, 2));
  ExpectWeights(r, {0.625, 1.875});
}

TEST(MoeGateV3Test, ServingBiasAddsToCorrectionBias) {
  // correction +0.5 and serving +0.5 on expert 0: u0 = 1.1 (either alone: 0.6).
  std::vector<float> bias(8, 0.f), serving(8, 0.f);
  bias[0] = 0.5f;
  serving[0] = 0.5f;
  const Routed both = RouteWith(V3Config(8, 4, 2, 2, false, 2.5), Logits(kS1), bias, serving);
  // g0 sum 1.3 -> keep g0, g1; top-2 by u: 0 (1.1), 2 (0.9).
  EXPECT_THAT(both.idx, ElementsAre(0, 2));
  ExpectWeights(both, {0.1 * 2.5, 0.9 * 2.5});
  const Routed one = RouteWith(V3Config(8, 4, 2, 2, false, 2.5), Logits(kS1), bias);
  // g0 sum 0.8: keep g1, g2 as without bias.
  EXPECT_THAT(one.idx, ElementsAre(2, 5));
}

TEST(MoeGateV3Test, ServingBiasChangesGroupSelectionWithoutCorrectionBias) {
  std::vector<float> serving(8, 0.f);
  serving[7] = 2.0f;  // u7 = 2.15, g3 sum 2.2 -> keep g3, g1
  const Routed r = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), Logits(kS1), {}, serving);
  EXPECT_THAT(r.idx, ElementsAre(7, 2));
  ExpectWeights(r, {0.15 / 1.05 * 2.5, 0.9 / 1.05 * 2.5});
}

TEST(MoeGateV3Test, ExactTiesLowerIndexFirst) {
  // All logits equal: every u = 0.5, every group sum 1.0: keep g0, g1, then
  // experts 0, 1 (then 2).
  const std::vector<float> z(8, 0.0f);
  const Routed r2 = RouteWith(V3Config(8, 4, 2, 2, true, 2.5), z, std::vector<float>(8, 0.f));
  EXPECT_THAT(r2.idx, ElementsAre(0, 1));
  ExpectWeights(r2, {1.25, 1.25});
  const Routed r3 = RouteWith(V3Config(8, 4, 2, 3, false, 2.0), z, std::vector<float>(8, 0.f));
  EXPECT_THAT(r3.idx, ElementsAre(0, 1, 2));
  ExpectWeights(r3, {1.0, 1.0, 1.0});
}

TEST(MoeGateV3Test, GroupScoreTieKeepsLowerGroup) {
  // g1 and g3 have bit-identical members; g0 best, so the second kept group is
  // g1 (lower index), and the third pick is expert 2, not its twin 6.
  const std::vector<double> s = {0.9, 0.8, 0.3, 0.2, 0.1, 0.1, 0.3, 0.2};
  const Routed r = RouteWith(V3Config(8, 4, 2, 3, false, 1.0), Logits(s), std::vector<float>(8, 0.f));
  EXPECT_THAT(r.idx, ElementsAre(0, 1, 2));
  ExpectWeights(r, {0.9, 0.8, 0.3});
}

TEST(MoeGateV3Test, OutputInDescendingSelectionScore) {
  // E=8, G=2 (two groups of 4), kg=2 (all kept), k=4, positions scrambled.
  const std::vector<double> s = {0.3, 0.8, 0.1, 0.6, 0.7, 0.2, 0.9, 0.4};
  const Routed r = RouteWith(V3Config(8, 2, 2, 4, false, 1.0), Logits(s), std::vector<float>(8, 0.f));
  EXPECT_THAT(r.idx, ElementsAre(6, 1, 4, 3));
  ExpectWeights(r, {0.9, 0.8, 0.7, 0.6});
}

// ---- deepseek_v2 ------------------------------------------------------------

std::vector<double> Softmax(const std::vector<float>& z) {
  double mx = -INFINITY, sum = 0;
  for (float v : z) mx = std::max(mx, static_cast<double>(v));
  std::vector<double> p;
  for (float v : z) p.push_back(std::exp(v - mx));
  for (double v : p) sum += v;
  for (double& v : p) v /= sum;
  return p;
}

TEST(MoeGateV2Test, GreedyNoRenormalization) {
  const std::vector<float> z = {0.5f, 2.0f, -1.0f, 1.5f, 0.0f, 3.0f, -2.0f, 1.0f};
  const std::vector<double> p = Softmax(z);
  const Routed r = RouteWith(V2Config("greedy", 8, 1, 1, 2, 16.0), z);
  EXPECT_THAT(r.idx, ElementsAre(5, 1));
  ExpectWeights(r, {p[5] * 16.0, p[1] * 16.0});
  // Not renormalized: the sum is rsf * (p5 + p1) < rsf.
  EXPECT_LT(r.WeightSum(), 16.0 * 0.95);
}

TEST(MoeGateV2Test, GreedyHandValues) {
  // z = ln(1), ln(2), ln(3), ln(4) -> p = 0.1, 0.2, 0.3, 0.4.
  const std::vector<float> z = {0.f, std::log(2.f), std::log(3.f), std::log(4.f)};
  const Routed r = RouteWith(V2Config("greedy", 4, 1, 1, 3, 16.0), z);
  EXPECT_THAT(r.idx, ElementsAre(3, 2, 1));
  ExpectWeights(r, {6.4, 4.8, 3.2});
}

TEST(MoeGateV2Test, GreedyIgnoresGroups) {
  // greedy with n_group/topk_group present still picks the global top-k.
  json cfg = V2Config("greedy", 8, 1, 1, 3, 1.0);
  cfg["n_group"] = 4;
  cfg["topk_group"] = 1;
  const std::vector<float> z = {2.9f, -3.f, 2.5f, 2.4f, 1.0f, 0.5f, 3.0f, -2.5f};
  const std::vector<double> p = Softmax(z);
  const Routed r = RouteWith(cfg, z);
  EXPECT_THAT(r.idx, ElementsAre(6, 0, 2));
  ExpectWeights(r, {p[6], p[0], p[2]});
}

TEST(MoeGateV2Test, GroupLimitedGreedyUsesMaxAndDropsGroups) {
  // E=8, G=4, kg=2, k=3.
  // group max: g0 2.9, g1 2.5, g2 1.0, g3 3.0 -> keep g3, g0.
  // Global top-3 would be 6, 0, 2 (2 is in dropped g1; g1 also has the
  // largest sum, 4.9). Kept: 6 (3.0), 0 (2.9), 7 (-2.5), 1 (-3).
  const std::vector<float> z = {2.9f, -3.f, 2.5f, 2.4f, 1.0f, 0.5f, 3.0f, -2.5f};
  const std::vector<double> p = Softmax(z);
  const Routed r = RouteWith(V2Config("group_limited_greedy", 8, 4, 2, 3, 16.0), z);
  EXPECT_THAT(r.idx, ElementsAre(6, 0, 7));
  ExpectWeights(r, {p[6] * 16.0, p[0] * 16.0, p[7] * 16.0});
}

TEST(MoeGateV2Test, GroupLimitedGreedyMaxNotSum) {
  // g0 (2.0, 1.9): max 2.0, sum 3.9; g1 (2.2, -3): max 2.2; g2 (2.1, -3);
  // g3 (-1, -1). kg=2 keeps g1, g2 (max) -> 2, 4; sum would keep g0.
  const std::vector<float> z = {2.0f, 1.9f, 2.2f, -3.f, 2.1f, -3.f, -1.f, -1.f};
  const std::vector<double> p = Softmax(z);
  const Routed r = RouteWith(V2Config("group_limited_greedy", 8, 4, 2, 2, 1.0), z);
  EXPECT_THAT(r.idx, ElementsAre(2, 4));
  ExpectWeights(r, {p[2], p[4]});
}

TEST(MoeGateV2Test, GreedyTiesLowerIndexFirst) {
  const std::vector<float> z = {0.f, 2.f, 1.f, 2.f, 1.f, -1.f, 3.f, 0.f};
  const std::vector<double> p = Softmax(z);
  const Routed r = RouteWith(V2Config("greedy", 8, 1, 1, 4, 1.0), z);
  EXPECT_THAT(r.idx, ElementsAre(6, 1, 3, 2));
  ExpectWeights(r, {p[6], p[1], p[3], p[2]});
  const Routed all = RouteWith(V2Config("greedy", 8, 1, 1, 3, 1.0), std::vector<float>(8, 0.5f));
  EXPECT_THAT(all.idx, ElementsAre(0, 1, 2));
  ExpectWeights(all, {0.125, 0.125, 0.125});
}

TEST(MoeGateV2Test, ServingBiasShiftsSelectionOnly) {
  const std::vector<float> z = {0.f, std::log(2.f), std::log(3.f), std::log(4.f)};
  const std::vector<float> serving = {0.5f, 0.f, 0.f, 0.f};  // selection 0.6 for expert 0
  const Routed r = RouteWith(V2Config("greedy", 4, 1, 1, 2, 16.0), z, {}, serving);
  EXPECT_THAT(r.idx, ElementsAre(0, 3));
  ExpectWeights(r, {1.6, 6.4});
}

// ---- Seeded cross-check against an independent float64 reference -----------

struct RefCase {
  bool v3;
  bool grouped;  // v2: group_limited_greedy
  int E, G, kg, k;
  bool norm;
  double rsf;
};

// Returns false when the case is too close to a tie to judge (margin < 1e-4).
bool Reference(const RefCase& c, const std::vector<float>& z, const std::vector<float>& bias,
               const std::vector<float>& serving, std::vector<int32_t>* idx, std::vector<double>* w) {
  const int E = c.E;
  std::vector<double> s(E), u(E);
  if (c.v3) {
    for (int e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(z[e])));
  } else {
    s = Softmax(z);
  }
  for (int e = 0; e < E; ++e) u[e] = s[e] + (bias.empty() ? 0.0 : bias[e]) + (serving.empty() ? 0.0 : serving[e]);
  auto order = [](const std::vector<double>& v) {
    std::vector<int32_t> o(v.size());
    std::iota(o.begin(), o.end(), 0);
    std::stable_sort(o.begin(), o.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
    return o;
  };
  constexpr double kMargin = 1e-4;
  if (c.v3 || c.grouped) {
    const int per = E / c.G;
    std::vector<double> gs(c.G);
    for (int g = 0; g < c.G; ++g) {
      std::vector<double> m(u.begin() + g * per, u.begin() + (g + 1) * per);
      std::sort(m.rbegin(), m.rend());
      gs[g] = c.v3 ? m[0] + m[1] : m[0];
    }
    const std::vector<int32_t> go = order(gs);
    if (c.kg < c.G && gs[go[c.kg - 1]] - gs[go[c.kg]] < kMargin) return false;
    std::vector<bool> keep(c.G, false);
    for (int i = 0; i < c.kg; ++i) keep[go[i]] = true;
    for (int e = 0; e < E; ++e) {
      if (!keep[e / per]) u[e] = 0.0;
    }
  }
  const std::vector<int32_t> eo = order(u);
  for (int i = 0; i + 1 < std::min(c.k + 1, E); ++i) {
    if (u[eo[i]] - u[eo[i + 1]] < kMargin) return false;
  }
  idx->assign(eo.begin(), eo.begin() + c.k);
  double denom = 0;
  for (int32_t e : *idx) denom += s[e];
  w->clear();
  for (int32_t e : *idx) {
    double v = s[e];
    if (c.v3 && c.norm) v /= denom;
    w->push_back(v * c.rsf);
  }
  return true;
}

TEST(MoeGateReferenceTest, SeededRandomCasesMatchFloat64Reference) {
  const std::vector<RefCase> cases = {
      {true, true, 16, 4, 2, 4, true, 2.5},    {true, true, 16, 4, 2, 4, false, 2.5},
      {true, true, 32, 8, 3, 6, true, 1.0},    {true, true, 64, 8, 4, 8, true, 2.5},
      {false, false, 16, 1, 1, 3, false, 16.0}, {false, true, 16, 4, 2, 3, false, 1.0},
      {false, true, 32, 8, 3, 6, false, 16.0},
  };
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> logit(-4.f, 4.f), bias_d(-0.3f, 0.3f), serv_d(-0.1f, 0.1f);
  for (const RefCase& c : cases) {
    json cfg = c.v3 ? V3Config(c.E, c.G, c.kg, c.k, c.norm, c.rsf)
                    : V2Config(c.grouped ? "group_limited_greedy" : "greedy", c.E, c.G, c.kg, c.k, c.rsf);
    absl::StatusOr<ModelConfig> mc = ModelConfig::FromJson(cfg.dump());
    ASSERT_TRUE(mc.ok()) << mc.status();
    const MoeGate gate(*mc);
    int judged = 0;
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> z(c.E), bias, serving;
      for (float& v : z) v = logit(rng);
      if (c.v3) {
        bias.resize(c.E);
        for (float& v : bias) v = bias_d(rng);
      }
      if (trial % 2 == 1) {
        serving.resize(c.E);
        for (float& v : serving) v = serv_d(rng);
      }
      std::vector<int32_t> want_idx;
      std::vector<double> want_w;
      if (!Reference(c, z, bias, serving, &want_idx, &want_w)) continue;
      ++judged;
      std::vector<int32_t> idx(c.k);
      std::vector<float> w(c.k);
      gate.Route(z, bias, serving, idx.data(), w.data());
      ASSERT_THAT(idx, ElementsAreArray(want_idx)) << "E=" << c.E << " v3=" << c.v3 << " trial " << trial;
      for (int i = 0; i < c.k; ++i) {
        EXPECT_NEAR(w[i], want_w[i], 1e-5 * std::max(1.0, want_w[i])) << "trial " << trial << " slot " << i;
      }
    }
    EXPECT_GE(judged, 150) << "too many near-ties for E=" << c.E;
  }
}

}  // namespace
}  // namespace dmoe
