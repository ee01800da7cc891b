// RoPE frequencies, yarn, softmax scale and rotation (MODEL_SPEC.md 3.3, 3.4).
// Expected values are computed here in float64 from the spec's formulas.
#include "core/rope.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/config.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using json = nlohmann::json;

constexpr double kPi = 3.14159265358979323846;
// inv_freq is float32; the spec's formula is float64.
constexpr double kFreqRelTol = 1e-6;

json BaseConfig(const std::string& model_type = "deepseek_v3", int dn = 128, int dr = 64, double theta = 10000.0) {
  return json{{"model_type", model_type}, {"qk_nope_head_dim", dn}, {"qk_rope_head_dim", dr}, {"rope_theta", theta}};
}

json V3PublishedYarn() {
  return json{{"type", "yarn"},         {"factor", 40},  {"original_max_position_embeddings", 4096},
              {"beta_fast", 32},        {"beta_slow", 1}, {"mscale", 1.0},
              {"mscale_all_dim", 1.0}};
}

ModelConfig Parse(const json& j) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(j.dump());
  EXPECT_TRUE(c.ok()) << c.status() << "\n" << j.dump();
  if (c.ok()) return *c;
  ModelConfig fallback;  // keeps the test running (and failing) sanely
  fallback.qk_nope_head_dim = 128;
  fallback.qk_rope_head_dim = 64;
  return fallback;
}

double M(double s, double mu) { return s <= 1.0 ? 1.0 : 0.1 * mu * std::log(s) + 1.0; }

// The spec's yarn inv_freq in float64.
struct YarnRef {
  int dr;
  double theta_base;
  double factor;
  double l0;
  double beta_fast = 32, beta_slow = 1;
  bool truncate = true;

  double Corr(double b) const { return dr * std::log(l0 / (2 * kPi * b)) / (2 * std::log(theta_base)); }
  double Lo() const { return std::max(truncate ? std::floor(Corr(beta_fast)) : Corr(beta_fast), 0.0); }
  double Hi() const {
    double lo = Lo();
    double hi = std::min(truncate ? std::ceil(Corr(beta_slow)) : Corr(beta_slow), dr - 1.0);
    if (lo == hi) hi += 0.001;
    return hi;
  }
  double Theta(int i) const { return std::pow(theta_base, -2.0 * i / dr); }
  double Ramp(int i) const { return std::clamp((i - Lo()) / (Hi() - Lo()), 0.0, 1.0); }
  double InvFreq(int i) const { return Theta(i) / factor * Ramp(i) + Theta(i) * (1 - Ramp(i)); }
};

void ExpectInvFreq(const Rope& rope, const YarnRef& ref) {
  ASSERT_EQ(static_cast<int>(rope.inv_freq().size()), ref.dr / 2);
  for (int i = 0; i < ref.dr / 2; ++i) {
    const double want = ref.InvFreq(i);
    EXPECT_NEAR(rope.inv_freq()[i], want, kFreqRelTol * want) << "i=" << i << " ramp=" << ref.Ramp(i);
  }
}

double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// ---- No scaling -------------------------------------------------------------

TEST(RopeTest, NoScalingFrequenciesAndScale) {
  for (int dr : {8, 64}) {
    for (double theta : {10000.0, 500000.0}) {
      const Rope rope(Parse(BaseConfig("deepseek_v3", 128, dr, theta)));
      ASSERT_EQ(static_cast<int>(rope.inv_freq().size()), dr / 2);
      for (int i = 0; i < dr / 2; ++i) {
        const double want = std::pow(theta, -2.0 * i / dr);
        EXPECT_NEAR(rope.inv_freq()[i], want, kFreqRelTol * want) << "dr=" << dr << " theta=" << theta << " i=" << i;
      }
      EXPECT_EQ(rope.inv_freq()[0], 1.0f);
      EXPECT_NEAR(rope.softmax_scale(), 1.0 / std::sqrt(128.0 + dr), 1e-7);
      EXPECT_EQ(rope.attention_factor(), 1.0f);
    }
  }
}

TEST(RopeTest, DefaultRopeTypeIsNoScaling) {
  json j = BaseConfig();
  j["rope_scaling"] = {{"type", "default"}};
  const Rope rope(Parse(j));
  EXPECT_EQ(rope.attention_factor(), 1.0f);
  EXPECT_NEAR(rope.softmax_scale(), 1.0 / std::sqrt(192.0), 1e-7);
  for (int i = 0; i < 32; ++i) EXPECT_NEAR(rope.inv_freq()[i], std::pow(1e4, -i / 32.0), kFreqRelTol * std::pow(1e4, -i / 32.0));
}

TEST(RopeTest, PositionZeroIsIdentity) {
  for (bool interleave : {true, false}) {
    json j = BaseConfig();
    j["rope_interleave"] = interleave;
    j["rope_scaling"] = V3PublishedYarn();
    const Rope rope(Parse(j));
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    std::vector<float> y(64), orig;
    for (float& v : y) v = nd(rng);
    orig = y;
    rope.Apply(0, y.data());
    for (int i = 0; i < 64; ++i) EXPECT_EQ(y[i], orig[i]) << "i=" << i << " interleave=" << interleave;
  }
}

TEST(RopeTest, ApplyTouchesOnlyTheRopeDims) {
  const Rope rope(Parse(BaseConfig("deepseek_v3", 128, 16)));
  std::vector<float> y(20, 1.0f);
  y[16] = y[17] = y[18] = y[19] = 42.0f;
  rope.Apply(123, y.data());
  for (int i = 16; i < 20; ++i) EXPECT_EQ(y[i], 42.0f);
}

TEST(RopeTest, RotationPreservesPairNormTimesAttentionFactorSquared) {
  struct Case {
    json scaling;
    bool interleave;
  };
  json af_yarn = V3PublishedYarn();
  af_yarn.erase("mscale");
  af_yarn.erase("mscale_all_dim");  // attention_factor = m(40, 1) = 1.3689
  const std::vector<Case> cases = {{nullptr, true}, {nullptr, false}, {V3PublishedYarn(), true}, {af_yarn, true},
                                   {af_yarn, false}};
  for (const Case& c : cases) {
    json j = BaseConfig();
    j["rope_interleave"] = c.interleave;
    if (!c.scaling.is_null()) j["rope_scaling"] = c.scaling;
    const Rope rope(Parse(j));
    const double af2 = static_cast<double>(rope.attention_factor()) * rope.attention_factor();
    std::mt19937 rng(11);
    std::normal_distribution<float> nd;
    for (int64_t pos : {1, 17, 4095, 12345, 163839}) {
      std::vector<float> y(64);
      for (float& v : y) v = nd(rng);
      const std::vector<float> orig = y;
      rope.Apply(pos, y.data());
      for (int i = 0; i < 32; ++i) {
        const int a = c.interleave ? 2 * i : i, b = c.interleave ? 2 * i + 1 : i + 32;
        const double before = double(orig[a]) * orig[a] + double(orig[b]) * orig[b];
        const double after = double(y[a]) * y[a] + double(y[b]) * y[b];
        EXPECT_NEAR(after, before * af2, 1e-5 * std::max(before * af2, 1e-3))
            << "pos " << pos << " pair " << i << " scaling " << c.scaling.dump();
      }
    }
  }
}

// ---- Yarn ---------------------------------------------------------------------

TEST(RopeYarnTest, V3PublishedScaleAndFrequencies) {
  json j = BaseConfig();
  j["max_position_embeddings"] = 163840;
  j["rope_scaling"] = V3PublishedYarn();
  const Rope rope(Parse(j));
  const double m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(rope.softmax_scale(), std::pow(192.0, -0.5) * m * m, 1e-6);
  EXPECT_NEAR(rope.softmax_scale(), 0.135234, 1e-6);
  EXPECT_EQ(rope.attention_factor(), 1.0f);

  const YarnRef ref{64, 10000.0, 40.0, 4096.0};
  // corr(32) = 10.47 -> lo 10; corr(1) = 22.51 -> hi 23.
  EXPECT_EQ(ref.Lo(), 10.0);
  EXPECT_EQ(ref.Hi(), 23.0);
  ExpectInvFreq(rope, ref);
  const std::vector<float>& f = rope.inv_freq();
  EXPECT_EQ(f[0], 1.0f);
  for (int i = 0; i <= 10; ++i) {
    EXPECT_NEAR(f[i], ref.Theta(i), kFreqRelTol * ref.Theta(i)) << "fast pair keeps theta, i=" << i;
  }
  for (int i = 23; i < 32; ++i) {
    EXPECT_NEAR(f[i], ref.Theta(i) / 40.0, kFreqRelTol * ref.Theta(i) / 40.0) << "slow pair = theta/f, i=" << i;
  }
  // Inside the ramp: strictly between theta/f and theta.
  for (int i = 11; i < 23; ++i) {
    EXPECT_LT(f[i], ref.Theta(i) * (1 - 1e-4)) << i;
    EXPECT_GT(f[i], ref.Theta(i) / 40.0 * (1 + 1e-4)) << i;
  }
}

TEST(RopeYarnTest, CorrUsesOriginalNotMaxPositionEmbeddings) {
  for (int max_pos : {1024, 163840, 1 << 22}) {
    json j = BaseConfig();
    j["max_position_embeddings"] = max_pos;
    j["rope_scaling"] = V3PublishedYarn();
    const Rope rope(Parse(j));
    const YarnRef ref{64, 10000.0, 40.0, 4096.0};
    ExpectInvFreq(rope, ref);
    // Sanity: using max_position_embeddings would give visibly different values.
    const YarnRef wrong{64, 10000.0, 40.0, static_cast<double>(max_pos)};
    double max_rel = 0;
    for (int i = 0; i < 32; ++i) max_rel = std::max(max_rel, std::abs(rope.inv_freq()[i] / wrong.InvFreq(i) - 1.0));
    EXPECT_GT(max_rel, 0.1) << "max_pos " << max_pos;
    // The scale uses the factor, not the position ratio.
    EXPECT_NEAR(rope.softmax_scale(), 0.135234, 1e-6);
  }
}

TEST(RopeYarnTest, FactorFallsBackToPositionRatio) {
  json j = BaseConfig();
  j["max_position_embeddings"] = 32768;
  json rs = V3PublishedYarn();
  rs.erase("factor");  // f = 32768 / 4096 = 8
  j["rope_scaling"] = rs;
  const Rope rope(Parse(j));
  ExpectInvFreq(rope, YarnRef{64, 10000.0, 8.0, 4096.0});
  const double m = 0.1 * std::log(8.0) + 1.0;
  EXPECT_NEAR(rope.softmax_scale(), std::pow(192.0, -0.5) * m * m, 1e-6);
}

TEST(RopeYarnTest, NonDefaultBetasAndOriginal) {
  json j = BaseConfig("deepseek_v3", 128, 64, 50000.0);
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4},     {"original_max_position_embeddings", 8192},
                       {"beta_fast", 16},     {"beta_slow", 2}};
  const Rope rope(Parse(j));
  YarnRef ref{64, 50000.0, 4.0, 8192.0};
  ref.beta_fast = 16;
  ref.beta_slow = 2;
  ExpectInvFreq(rope, ref);
}

TEST(RopeYarnTest, BetasAbsentNullOrZeroMeanDefaults) {
  const YarnRef ref{64, 10000.0, 40.0, 4096.0};  // beta_fast 32, beta_slow 1
  for (int variant = 0; variant < 3; ++variant) {
    json rs = V3PublishedYarn();
    if (variant == 0) {
      rs.erase("beta_fast");
      rs.erase("beta_slow");
    } else if (variant == 1) {
      rs["beta_fast"] = nullptr;
      rs["beta_slow"] = nullptr;
    } else {
      rs["beta_fast"] = 0;
      rs["beta_slow"] = 0.0;
    }
    json j = BaseConfig();
    j["rope_scaling"] = rs;
    SCOPED_TRACE(rs.dump());
    ExpectInvFreq(Rope(Parse(j)), ref);
  }
}

TEST(RopeYarnTest, RampEndsClampedToZeroAndDrMinusOne) {
  // beta_slow tiny: corr(bs) = 102.5 -> ceil 103 -> hi clamped to dr-1 = 63;
  // beta_fast huge: corr(bf) < 0 -> lo clamped to 0. ramp(i) = i / 63.
  json j = BaseConfig();
  json rs = V3PublishedYarn();
  rs["beta_slow"] = 1e-10;
  rs["beta_fast"] = 1e6;
  j["rope_scaling"] = rs;
  const Rope rope(Parse(j));
  YarnRef ref{64, 10000.0, 40.0, 4096.0};
  ref.beta_slow = 1e-10;
  ref.beta_fast = 1e6;
  ASSERT_GT(ref.Corr(ref.beta_slow), 63.0);
  ASSERT_LT(ref.Corr(ref.beta_fast), 0.0);
  EXPECT_EQ(ref.Lo(), 0.0);
  EXPECT_EQ(ref.Hi(), 63.0);
  ExpectInvFreq(rope, ref);
}

TEST(RopeYarnTest, NoTruncation) {
  json j = BaseConfig();
  json rs = V3PublishedYarn();
  rs["truncate"] = false;
  j["rope_scaling"] = rs;
  const Rope rope(Parse(j));
  YarnRef ref{64, 10000.0, 40.0, 4096.0};
  ref.truncate = false;
  EXPECT_NEAR(ref.Lo(), 10.4722408, 1e-6);
  EXPECT_NEAR(ref.Hi(), 22.5134406, 1e-6);
  ExpectInvFreq(rope, ref);
  // i = 10 now sits below lo = 10.47 (still theta) and i = 11 inside the ramp;
  // i = 23 is past hi = 22.51 (theta/f): differs from the truncated ramp at i=11..22.
  YarnRef truncated = ref;
  truncated.truncate = true;
  for (int i = 11; i <= 22; ++i) {
    EXPECT_GT(std::abs(rope.inv_freq()[i] / truncated.InvFreq(i) - 1.0), 1e-4) << "i=" << i;
  }
}

TEST(RopeYarnTest, RopeThetaInsideScalingOverridesTopLevel) {
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    json j = BaseConfig("deepseek_v3", 128, 64, 10000.0);
    json rs = V3PublishedYarn();
    rs["rope_theta"] = 50000.0;
    j[key] = rs;
    const Rope rope(Parse(j));
    ExpectInvFreq(rope, YarnRef{64, 50000.0, 40.0, 4096.0});
    // And it differs from theta 10000.
    const YarnRef other{64, 10000.0, 40.0, 4096.0};
    EXPECT_GT(std::abs(rope.inv_freq()[20] / other.InvFreq(20) - 1.0), 0.01) << key;
  }
  // With no scaling too.
  json j = BaseConfig("deepseek_v3", 128, 64, 10000.0);
  j["rope_scaling"] = {{"rope_type", "default"}, {"rope_theta", 50000.0}};
  const Rope rope(Parse(j));
  for (int i = 0; i < 32; ++i) {
    const double want = std::pow(50000.0, -i / 32.0);
    EXPECT_NEAR(rope.inv_freq()[i], want, kFreqRelTol * want) << i;
  }
}

TEST(RopeYarnTest, LoEqualsHiGetsEpsilonWidth) {
  // original 6: corr(1) = 64 ln(6 / 2pi) / (2 ln 1e4) = -0.16 -> hi = ceil = 0;
  // lo = max(floor(corr(32)), 0) = 0. lo == hi -> hi = 0.001: ramp(0) = 0
  // (theta kept), ramp(i >= 1) = 1 (theta / f).
  json j = BaseConfig();
  json rs = V3PublishedYarn();
  rs["original_max_position_embeddings"] = 6;
  j["rope_scaling"] = rs;
  const Rope rope(Parse(j));
  const YarnRef ref{64, 10000.0, 40.0, 6.0};
  EXPECT_EQ(ref.Lo(), 0.0);
  EXPECT_EQ(ref.Hi(), 0.001);
  ExpectInvFreq(rope, ref);
  EXPECT_EQ(rope.inv_freq()[0], 1.0f);
  for (int i = 1; i < 32; ++i) {
    EXPECT_NEAR(rope.inv_freq()[i], ref.Theta(i) / 40.0, kFreqRelTol * ref.Theta(i) / 40.0) << i;
  }
}

// ---- attention_factor and softmax scale rules ---------------------------------

struct FactorCase {
  std::string name;
  std::optional<double> mscale, mscale_all_dim, attention_factor;
  double want_af;
  double want_scale_m;  // softmax_scale = dq^-0.5 * want_scale_m^2
};

TEST(RopeYarnTest, AttentionFactorAndScaleRules) {
  const double f = 40.0;
  const std::vector<FactorCase> cases = {
      {"explicit attention_factor wins", 1.0, 0.5, 0.8, 0.8, M(f, 0.5)},
      {"explicit attention_factor, no mscales", std::nullopt, std::nullopt, 1.5, 1.5, 1.0},
      {"both mscales", 1.0, 0.5, std::nullopt, M(f, 1.0) / M(f, 0.5), M(f, 0.5)},
      {"mscale only", 0.707, std::nullopt, std::nullopt, M(f, 1.0), 1.0},
      {"mscale_all_dim only", std::nullopt, 0.707, std::nullopt, M(f, 1.0), M(f, 0.707)},
      {"mscale zero", 0.0, 0.707, std::nullopt, M(f, 1.0), M(f, 0.707)},
      {"mscale_all_dim zero", 0.707, 0.0, std::nullopt, M(f, 1.0), 1.0},
      {"neither", std::nullopt, std::nullopt, std::nullopt, M(f, 1.0), 1.0},
      {"v3 published", 1.0, 1.0, std::nullopt, 1.0, M(f, 1.0)},
  };
  for (const char* model_type : {"deepseek_v3", "deepseek_v2"}) {
    for (const FactorCase& c : cases) {
      json rs = {{"type", "yarn"}, {"factor", f}, {"original_max_position_embeddings", 4096}};
      if (c.mscale) rs["mscale"] = *c.mscale;
      if (c.mscale_all_dim) rs["mscale_all_dim"] = *c.mscale_all_dim;
      if (c.attention_factor) rs["attention_factor"] = *c.attention_factor;
      json j = BaseConfig(model_type);
      j["rope_scaling"] = rs;
      const Rope rope(Parse(j));
      EXPECT_NEAR(rope.attention_factor(), c.want_af, 1e-6) << model_type << ": " << c.name;
      EXPECT_NEAR(rope.softmax_scale(), std::pow(192.0, -0.5) * c.want_scale_m * c.want_scale_m, 1e-7)
          << model_type << ": " << c.name;
    }
  }
}

TEST(RopeYarnTest, V2Published) {
  json j = BaseConfig("deepseek_v2");
  j["max_position_embeddings"] = 163840;
  j["rope_scaling"] = {{"type", "yarn"},  {"factor", 40},     {"original_max_position_embeddings", 4096},
                       {"beta_fast", 32}, {"beta_slow", 1},   {"mscale", 0.707},
                       {"mscale_all_dim", 0.707}};
  const Rope rope(Parse(j));
  EXPECT_EQ(rope.attention_factor(), 1.0f);
  const double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
  EXPECT_NEAR(rope.softmax_scale(), std::pow(192.0, -0.5) * m * m, 1e-7);
  EXPECT_NEAR(rope.softmax_scale(), 0.114721, 1e-6);
  ExpectInvFreq(rope, YarnRef{64, 10000.0, 40.0, 4096.0});
}

TEST(RopeYarnTest, FactorAtMostOneHasUnitMscale) {
  json j = BaseConfig();
  json rs = {{"type", "yarn"}, {"factor", 1.0}, {"original_max_position_embeddings", 4096}, {"mscale_all_dim", 1.0}};
  j["rope_scaling"] = rs;
  const Rope rope(Parse(j));
  EXPECT_NEAR(rope.attention_factor(), 1.0, 1e-7);
  EXPECT_NEAR(rope.softmax_scale(), std::pow(192.0, -0.5), 1e-7);
  // f = 1: interpolation == extrapolation.
  for (int i = 0; i < 32; ++i) EXPECT_NEAR(rope.inv_freq()[i], std::pow(1e4, -i / 32.0), kFreqRelTol * std::pow(1e4, -i / 32.0));
}

// ---- Pairing and the rotation itself --------------------------------------------

struct PairingCase {
  const char* model_type;
  std::optional<bool> rope_interleave;
  bool want_interleaved;
};

const std::vector<PairingCase> kPairings = {
    {"deepseek_v3", std::nullopt, true}, {"deepseek_v3", true, true},  {"deepseek_v3", false, false},
    {"deepseek_v2", std::nullopt, true}, {"deepseek_v2", false, true},  // v2 ignores rope_interleave
};

ModelConfig PairingConfig(const PairingCase& p, bool yarn) {
  json j = BaseConfig(p.model_type);
  if (p.rope_interleave) j["rope_interleave"] = *p.rope_interleave;
  if (yarn) {
    json rs = V3PublishedYarn();
    rs.erase("mscale");
    rs.erase("mscale_all_dim");  // attention_factor m(40, 1) != 1
    j["rope_scaling"] = rs;
  }
  return Parse(j);
}

TEST(RopeApplyTest, UnitVectorsRotateTheRightPair) {
  for (const PairingCase& p : kPairings) {
    for (bool yarn : {false, true}) {
      const Rope rope(PairingConfig(p, yarn));
      const float af = rope.attention_factor();
      if (yarn) EXPECT_NEAR(af, M(40.0, 1.0), 1e-6);
      for (int64_t pos : {1, 7, 1000, 100000}) {
        for (int i = 0; i < 32; ++i) {
          const int a = p.want_interleaved ? 2 * i : i;
          const int b = p.want_interleaved ? 2 * i + 1 : i + 32;
          // float32 product, as transformers.
          const float angle = static_cast<float>(pos) * rope.inv_freq()[i];
          const double cs = std::cos(static_cast<double>(angle)) * af;
          const double sn = std::sin(static_cast<double>(angle)) * af;
          for (int which : {0, 1}) {
            std::vector<float> y(64, 0.0f);
            y[which == 0 ? a : b] = 1.0f;
            rope.Apply(pos, y.data());
            // (1, 0) -> (cs, sn); (0, 1) -> (-sn, cs).
            const double want_a = which == 0 ? cs : -sn;
            const double want_b = which == 0 ? sn : cs;
            for (int d = 0; d < 64; ++d) {
              const double want = d == a ? want_a : d == b ? want_b : 0.0;
              EXPECT_NEAR(y[d], want, 2e-6) << p.model_type << " interleave="
                                            << (p.rope_interleave ? (*p.rope_interleave ? "true" : "false") : "absent")
                                            << " yarn=" << yarn << " pos=" << pos << " pair=" << i
                                            << " unit=" << which << " dim=" << d;
            }
          }
        }
      }
    }
  }
}

TEST(RopeApplyTest, GeneralVectorMatchesHandRotation) {
  for (const PairingCase& p : kPairings) {
    const Rope rope(PairingConfig(p, true));
    const double af = rope.attention_factor();
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    std::vector<float> y(64);
    for (float& v : y) v = nd(rng);
    const std::vector<float> orig = y;
    const int64_t pos = 54321;
    rope.Apply(pos, y.data());
    for (int i = 0; i < 32; ++i) {
      const int a = p.want_interleaved ? 2 * i : i;
      const int b = p.want_interleaved ? 2 * i + 1 : i + 32;
      const float angle = static_cast<float>(pos) * rope.inv_freq()[i];
      const double cs = std::cos(static_cast<double>(angle)) * af, sn = std::sin(static_cast<double>(angle)) * af;
      EXPECT_NEAR(y[a], orig[a] * cs - orig[b] * sn, 1e-5) << p.model_type << " pair " << i;
      EXPECT_NEAR(y[b], orig[b] * cs + orig[a] * sn, 1e-5) << p.model_type << " pair " << i;
    }
  }
}

TEST(RopeApplyTest, RelativePositionProperty) {
  // attention_factor 1: no scaling, and V3 published yarn.
  for (bool interleave : {true, false}) {
    for (bool yarn : {false, true}) {
      json j = BaseConfig();
      j["rope_interleave"] = interleave;
      if (yarn) j["rope_scaling"] = V3PublishedYarn();
      const Rope rope(Parse(j));
      ASSERT_EQ(rope.attention_factor(), 1.0f);
      std::mt19937 rng(interleave * 2 + yarn);
      std::normal_distribution<float> nd;
      std::vector<float> q(64), k(64);
      for (float& v : q) v = nd(rng);
      for (float& v : k) v = nd(rng);
      const double norm = std::sqrt(Dot(q, q) * Dot(k, k));
      auto score = [&](int64_t pq, int64_t pk) {
        std::vector<float> rq = q, rk = k;
        rope.Apply(pq, rq.data());
        rope.Apply(pk, rk.data());
        return Dot(rq, rk);
      };
      for (auto [p1, p2, off] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
               {5, 105, 3}, {0, 250, 17}, {40, 1000, 0}, {3, 200, -3}}) {
        const double s1 = score(p1 + off, p1), s2 = score(p2 + off, p2);
        EXPECT_NEAR(s1, s2, 1e-4 * std::max(std::abs(s1), 1e-2 * norm))
            << "interleave=" << interleave << " yarn=" << yarn << " off=" << off;
      }
      // Offset 0 is the plain dot product.
      EXPECT_NEAR(score(77, 77), Dot(q, k), 1e-4 * norm);
    }
  }
}

}  // namespace
}  // namespace dmoe
