#include "core/sampling.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace dmoe {
namespace {

using ::testing::HasSubstr;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

SamplingParams Params(float temperature, int32_t top_k = 0, float top_p = 1.0f, float min_p = 0.0f,
                      uint64_t seed = 1) {
  SamplingParams params;
  params.temperature = temperature;
  params.top_k = top_k;
  params.top_p = top_p;
  params.min_p = min_p;
  params.seed = seed;
  return params;
}

int32_t Argmax(const std::vector<float>& logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

std::vector<double> LogSoftmax(const std::vector<float>& logits) {
  double max = -std::numeric_limits<double>::infinity();
  for (float x : logits) max = std::max<double>(max, x);
  double sum = 0.0;
  for (float x : logits) sum += std::exp(static_cast<double>(x) - max);
  std::vector<double> out;
  for (float x : logits) out.push_back(static_cast<double>(x) - max - std::log(sum));
  return out;
}

std::vector<float> RandomLogits(int64_t vocab, double scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (float& x : logits) x = static_cast<float>(normal(rng));
  return logits;
}

// The distribution a sampler should draw from, computed literally from the
// spec in sampling.h: full sort, float64 throughout. Finite logits only.
std::vector<double> ReferenceProbs(const std::vector<float>& logits, const SamplingParams& p) {
  const int64_t vocab = static_cast<int64_t>(logits.size());
  std::vector<double> probs(logits.size(), 0.0);
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  if (p.temperature == 0.0f) {
    probs[order[0]] = 1.0;
    return probs;
  }
  std::vector<double> e(logits.size());
  const double max = logits[order[0]];
  for (int64_t t = 0; t < vocab; ++t) e[t] = std::exp((logits[t] - max) / p.temperature);
  int64_t keep = vocab;
  if (p.top_k > 0) keep = std::min<int64_t>(keep, p.top_k);
  double total = 0.0;
  for (int64_t j = 0; j < keep; ++j) total += e[order[j]];
  if (p.top_p < 1.0f) {
    double cum = 0.0;
    for (int64_t j = 0; j < keep; ++j) {
      cum += e[order[j]] / total;
      if (cum >= p.top_p) {
        keep = j + 1;
        break;
      }
    }
  }
  double kept = 0.0;
  for (int64_t j = 0; j < keep; ++j) {
    const int32_t t = order[j];
    if (e[t] >= p.min_p) {  // e = p / p_max
      probs[t] = e[t];
      kept += e[t];
    }
  }
  for (double& x : probs) x /= kept;
  return probs;
}

// Draws `n` tokens and checks their frequencies against `expected`: every
// token within 5 standard errors, and a chi-square statistic far below what
// a wrong distribution gives. Never draws a zero-probability token.
void ExpectDistribution(const std::vector<float>& logits, const SamplingParams& params,
                        const std::vector<double>& expected, int n) {
  Sampler sampler(params);
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < n; ++i) ++counts[sampler.Sample(logits).token];
  double chi2 = 0.0;
  int categories = 0;
  for (size_t t = 0; t < logits.size(); ++t) {
    if (expected[t] == 0.0) {
      EXPECT_EQ(counts[t], 0) << "token " << t << " has probability 0";
      continue;
    }
    const double mean = n * expected[t];
    const double sd = std::sqrt(n * expected[t] * (1.0 - expected[t]));
    EXPECT_NEAR(counts[t], mean, 5.0 * sd + 1.0) << "token " << t;
    chi2 += (counts[t] - mean) * (counts[t] - mean) / mean;
    ++categories;
  }
  // df = categories - 1; mean df, sd sqrt(2 df). 6 sd above the mean is far
  // out in the tail (and the seed is fixed, so the test is deterministic).
  const double df = std::max(categories - 1, 1);
  EXPECT_LT(chi2, df + 6.0 * std::sqrt(2.0 * df)) << "categories " << categories;
}

// --- ValidateSamplingParams -------------------------------------------------

TEST(ValidateSamplingParamsTest, AcceptsDefaultsAndBoundaries) {
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
  SamplingParams params;
  params.temperature = 2.5f;
  params.top_k = 1;
  params.top_p = 1.0f;
  params.min_p = 1.0f;
  params.top_logprobs = kMaxTopLogprobs;
  EXPECT_TRUE(ValidateSamplingParams(params).ok());
  params.top_p = 1e-6f;
  params.min_p = 0.0f;
  params.top_logprobs = 0;
  params.top_k = 1 << 30;
  EXPECT_TRUE(ValidateSamplingParams(params).ok());
}

TEST(ValidateSamplingParamsTest, RejectsEachBadField) {
  struct Case {
    std::string field;
    std::function<void(SamplingParams&)> corrupt;
  };
  const std::vector<Case> cases = {
      {"temperature", [](SamplingParams& p) { p.temperature = -0.5f; }},
      {"temperature", [](SamplingParams& p) { p.temperature = kNaN; }},
      {"temperature", [](SamplingParams& p) { p.temperature = kInf; }},
      {"top_k", [](SamplingParams& p) { p.top_k = -1; }},
      {"top_p", [](SamplingParams& p) { p.top_p = 0.0f; }},
      {"top_p", [](SamplingParams& p) { p.top_p = -0.1f; }},
      {"top_p", [](SamplingParams& p) { p.top_p = 1.01f; }},
      {"top_p", [](SamplingParams& p) { p.top_p = kNaN; }},
      {"min_p", [](SamplingParams& p) { p.min_p = -0.01f; }},
      {"min_p", [](SamplingParams& p) { p.min_p = 1.5f; }},
      {"min_p", [](SamplingParams& p) { p.min_p = kNaN; }},
      {"top_logprobs", [](SamplingParams& p) { p.top_logprobs = -1; }},
      {"top_logprobs", [](SamplingParams& p) { p.top_logprobs = kMaxTopLogprobs + 1; }},
  };
  for (const Case& c : cases) {
    SamplingParams params;
    c.corrupt(params);
    const absl::Status status = ValidateSamplingParams(params);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.field));
  }
  SamplingParams params;
  params.top_k = -7;
  EXPECT_THAT(std::string(ValidateSamplingParams(params).message()), HasSubstr("-7"));
}

// --- Greedy and its equivalents ---------------------------------------------

TEST(SamplerTest, GreedyIsArgmaxWithLowestIndexOnTies) {
  Sampler sampler(Params(0.0f));
  EXPECT_EQ(sampler.Sample(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}).token, 1);
  EXPECT_EQ(sampler.Sample(std::vector<float>{5.0f, 5.0f}).token, 0);
  EXPECT_EQ(sampler.Sample(std::vector<float>{-2.0f, -1.0f, -1.0f}).token, 1);
  EXPECT_EQ(sampler.Sample(std::vector<float>{7.0f}).token, 0);
  // Filters do not change greedy.
  Sampler filtered(Params(0.0f, /*top_k=*/3, /*top_p=*/0.5f, /*min_p=*/0.2f));
  for (uint64_t seed = 0; seed < 20; ++seed) {
    const std::vector<float> logits = RandomLogits(300, 2.0, seed);
    EXPECT_EQ(filtered.Sample(logits).token, Argmax(logits));
  }
}

TEST(SamplerTest, TopK1IsGreedyAtAnyTemperature) {
  for (float temperature : {0.01f, 0.5f, 1.0f, 3.0f, 1000.0f}) {
    Sampler sampler(Params(temperature, /*top_k=*/1, 1.0f, 0.0f, /*seed=*/9));
    for (uint64_t seed = 0; seed < 50; ++seed) {
      std::vector<float> logits = RandomLogits(200, 1.0, seed);
      logits[seed % 200] = logits[(seed * 7 + 3) % 200] = 10.0f;  // a tie for the top
      ASSERT_EQ(sampler.Sample(logits).token, Argmax(logits)) << "T=" << temperature;
    }
  }
}

TEST(SamplerTest, TinyTopPIsGreedy) {
  for (float temperature : {0.5f, 1.0f, 4.0f}) {
    Sampler sampler(Params(temperature, 0, /*top_p=*/1e-6f, 0.0f, /*seed=*/3));
    for (uint64_t seed = 0; seed < 50; ++seed) {
      const std::vector<float> logits = RandomLogits(500, 1.0, seed);
      ASSERT_EQ(sampler.Sample(logits).token, Argmax(logits)) << "T=" << temperature;
    }
  }
}

TEST(SamplerTest, MinP1IsGreedy) {
  for (float temperature : {0.5f, 1.0f, 100.0f}) {
    Sampler sampler(Params(temperature, 0, 1.0f, /*min_p=*/1.0f, /*seed=*/4));
    for (uint64_t seed = 0; seed < 50; ++seed) {
      const std::vector<float> logits = RandomLogits(500, 1.0, seed);
      ASSERT_EQ(sampler.Sample(logits).token, Argmax(logits)) << "T=" << temperature;
    }
  }
}

// --- Seeds ------------------------------------------------------------------

std::vector<int32_t> DrawMany(uint64_t seed, int n) {
  Sampler sampler(Params(1.0f, 0, 1.0f, 0.0f, seed));
  const std::vector<float> logits = RandomLogits(64, 0.5, 77);
  std::vector<int32_t> tokens;
  for (int i = 0; i < n; ++i) tokens.push_back(sampler.Sample(logits).token);
  return tokens;
}

TEST(SamplerTest, SameSeedSameSequence) {
  EXPECT_EQ(DrawMany(42, 500), DrawMany(42, 500));
  EXPECT_EQ(DrawMany(0, 500), DrawMany(0, 500));
}

TEST(SamplerTest, DifferentSeedsDiffer) {
  const std::vector<int32_t> a = DrawMany(42, 500);
  const std::vector<int32_t> b = DrawMany(43, 500);
  int differing = 0;
  for (size_t i = 0; i < a.size(); ++i) differing += a[i] != b[i];
  // Two independent draws over ~64 near-uniform tokens agree ~1/64 of the time.
  EXPECT_GT(differing, 400);
}

// Samplers share thread-local scratch; interleaving them (with different
// vocabulary sizes) must not change what either draws.
TEST(SamplerTest, InterleavedSamplersAreIndependent) {
  const std::vector<float> small = RandomLogits(50, 1.0, 1);
  const std::vector<float> large = RandomLogits(5000, 2.0, 2);
  const SamplingParams pa = Params(0.8f, 20, 0.9f, 0.0f, 11);
  const SamplingParams pb = Params(1.3f, 0, 0.95f, 0.01f, 12);
  std::vector<int32_t> alone_a, alone_b, mixed_a, mixed_b;
  {
    Sampler a(pa), b(pb);
    for (int i = 0; i < 100; ++i) alone_a.push_back(a.Sample(small).token);
    for (int i = 0; i < 100; ++i) alone_b.push_back(b.Sample(large).token);
  }
  {
    Sampler a(pa), b(pb);
    for (int i = 0; i < 100; ++i) {
      mixed_b.push_back(b.Sample(large).token);
      mixed_a.push_back(a.Sample(small).token);
    }
  }
  EXPECT_EQ(alone_a, mixed_a);
  EXPECT_EQ(alone_b, mixed_b);
}

// --- Distributions ----------------------------------------------------------

TEST(SamplerTest, TemperatureOneMatchesSoftmax) {
  const std::vector<float> logits = {1.0f, 0.0f, 2.0f, -1.0f, 0.5f, 1.5f, -3.0f, 0.2f};
  const std::vector<double> log_probs = LogSoftmax(logits);
  std::vector<double> probs;
  for (double lp : log_probs) probs.push_back(std::exp(lp));
  ExpectDistribution(logits, Params(1.0f, 0, 1.0f, 0.0f, 2024), probs, 20000);
}

TEST(SamplerTest, FilteredDistributionsMatchReference) {
  const std::vector<float> logits = {1.0f,  0.0f, 2.0f, -1.0f, 0.5f, 1.5f,
                                     -3.0f, 0.2f, 1.2f, -0.4f, 0.9f, 0.1f};
  const std::vector<SamplingParams> configs = {
      Params(0.5f, 0, 1.0f, 0.0f, 5),                                    // temperature alone
      Params(2.0f, 0, 1.0f, 0.0f, 6),   Params(1.0f, 4, 1.0f, 0.0f, 7),  // top-k
      Params(1.0f, 0, 0.7f, 0.0f, 8),                                    // top-p
      Params(1.0f, 0, 1.0f, 0.3f, 9),                                    // min-p
      Params(0.7f, 6, 0.8f, 0.1f, 10),                                   // all together
      Params(1.5f, 8, 0.9f, 0.05f, 11),
  };
  for (const SamplingParams& params : configs) {
    SCOPED_TRACE(testing::Message() << "T=" << params.temperature << " k=" << params.top_k
                                    << " p=" << params.top_p << " min_p=" << params.min_p);
    ExpectDistribution(logits, params, ReferenceProbs(logits, params), 20000);
  }
}

TEST(SamplerTest, TopK2NeverLeavesTheTop2) {
  const std::vector<float> logits = {0.1f, 2.0f, 0.3f, 1.9f, 1.8f, -1.0f, 1.85f};
  Sampler sampler(Params(5.0f, /*top_k=*/2, 1.0f, 0.0f, 99));
  std::set<int32_t> seen;
  for (int i = 0; i < 2000; ++i) seen.insert(sampler.Sample(logits).token);
  EXPECT_EQ(seen, (std::set<int32_t>{1, 3}));
}

// Random logits and parameters on vocabularies up to DeepSeek's: every draw
// lies in the support of the reference distribution, which exercises top-k
// by heap and by nth_element and top-p's block-by-block partial sort.
TEST(SamplerTest, DrawsStayInReferenceSupport) {
  struct Case {
    int64_t vocab;
    double scale;
    SamplingParams params;
  };
  const std::vector<Case> cases = {
      {1000, 3.0, Params(1.0f, 0, 0.9f, 0.0f, 1)},
      {1000, 3.0, Params(0.6f, 50, 0.95f, 0.0f, 2)},
      {1000, 1.0, Params(1.2f, 0, 1.0f, 0.05f, 3)},
      {1000, 0.1, Params(1.0f, 0, 0.5f, 0.0f, 4)},    // flat: a wide nucleus
      {129280, 0.5, Params(1.0f, 0, 0.3f, 0.0f, 5)},  // nucleus of ~thousands
      {129280, 4.0, Params(0.8f, 0, 0.95f, 0.0f, 6)},
      {129280, 1.0, Params(1.0f, 6000, 0.9f, 0.0f, 7)},  // top-k by nth_element
      {129280, 1.0, Params(1.0f, 40, 0.8f, 0.02f, 8)},
      {129280, 2.0, Params(1.0f, 0, 0.9f, 0.001f, 9)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << "vocab=" << c.vocab << " k=" << c.params.top_k
                                    << " p=" << c.params.top_p << " min_p=" << c.params.min_p);
    const std::vector<float> logits = RandomLogits(c.vocab, c.scale, c.params.seed + 100);
    const std::vector<double> probs = ReferenceProbs(logits, c.params);
    const int64_t support =
        std::count_if(probs.begin(), probs.end(), [](double p) { return p > 0; });
    Sampler sampler(c.params);
    std::set<int32_t> seen;
    const int draws = c.vocab > 10000 ? 40 : 200;
    for (int i = 0; i < draws; ++i) {
      const int32_t token = sampler.Sample(logits).token;
      ASSERT_GT(probs[token], 0.0) << "token " << token << " outside a support of " << support;
      seen.insert(token);
    }
    if (support > 1) {
      EXPECT_GT(seen.size(), 1u);
    }
  }
}

// Ties and near-ties at the top-p boundary: the kept set is the prefix in
// (logit descending, id ascending) order, even among tokens whose tempered
// weights are equal as floats.
TEST(SamplerTest, TopPBoundaryInsideTiesMatchesReference) {
  std::vector<float> logits(40);
  for (int t = 0; t < 10; ++t) logits[t * 3] = 2.0f;                        // exact ties
  for (int t = 0; t < 10; ++t) logits[t * 3 + 1] = 2.0f - 1e-6f * (t + 1);  // near ties
  for (int t = 30; t < 40; ++t) logits[t] = -0.1f * t;
  for (int t = 0; t < 10; ++t) logits[t * 3 + 2] = -1.0f - 0.05f * t;
  for (float top_p : {0.23f, 0.5f, 0.77f}) {
    SCOPED_TRACE(testing::Message() << "top_p=" << top_p);
    const SamplingParams params = Params(1.0f, 0, top_p, 0.0f, 31);
    const std::vector<double> probs = ReferenceProbs(logits, params);
    ExpectDistribution(logits, params, probs, 20000);
  }

  // Distinct logits whose tempered weights are equal as floats (at T = 100,
  // steps of 1e-6 in the logit are ~1e-8 in the weight): still ordered by
  // logit, so the highest ids of the rising group are the ones kept.
  std::vector<float> rising(40);
  for (int t = 0; t < 20; ++t) rising[t] = 2.0f + 1e-6f * static_cast<float>(t);
  for (int t = 20; t < 40; ++t) rising[t] = -300.0f - 10.0f * static_cast<float>(t - 20);
  const SamplingParams params = Params(100.0f, 0, 0.5f, 0.0f, 32);
  const std::vector<double> probs = ReferenceProbs(rising, params);
  for (int t = 0; t < 40; ++t) {
    ASSERT_EQ(probs[t] > 0.0, t >= 9 && t < 20) << "reference keeps ids 9..19; t=" << t;
  }
  ExpectDistribution(rising, params, probs, 20000);
}

// The support of a large-vocabulary nucleus is exactly the reference's: the
// top-p boundary falls inside a group of 50 leading tokens, every kept one
// likely enough to be seen (15 times on average), none of the dropped ever
// drawn.
TEST(SamplerTest, LargeVocabNucleusHasExactSupport) {
  std::vector<float> logits = RandomLogits(129280, 1.0, 12);
  std::mt19937_64 rng(13);
  std::uniform_real_distribution<float> uniform(10.0f, 10.2f);
  for (int j = 0; j < 50; ++j) logits[(j * 2579 + 17) % logits.size()] = uniform(rng);
  const SamplingParams params = Params(1.0f, 0, 0.6f, 0.0f, 14);
  const std::vector<double> probs = ReferenceProbs(logits, params);
  std::set<int32_t> support;
  double min_prob = 1.0;
  for (size_t t = 0; t < probs.size(); ++t) {
    if (probs[t] > 0.0) {
      support.insert(static_cast<int32_t>(t));
      min_prob = std::min(min_prob, probs[t]);
    }
  }
  ASSERT_GT(support.size(), 10u);
  ASSERT_LT(support.size(), 50u);
  const int draws = static_cast<int>(std::ceil(15.0 / min_prob));
  ASSERT_LE(draws, 1000);
  Sampler sampler(params);
  std::set<int32_t> seen;
  for (int i = 0; i < draws; ++i) seen.insert(sampler.Sample(logits).token);
  EXPECT_EQ(seen, support);
}

// --- Log-probabilities ------------------------------------------------------

TEST(SamplerTest, LogprobIsLogSoftmaxOfRawLogits) {
  const std::vector<float> logits = RandomLogits(1000, 2.0, 5);
  const std::vector<double> expected = LogSoftmax(logits);
  for (const SamplingParams& params : {Params(0.0f), Params(1.0f), Params(0.3f, 10, 0.9f, 0.0f, 2),
                                       Params(3.0f, 0, 1.0f, 0.1f, 3)}) {
    Sampler sampler(params);
    for (int i = 0; i < 30; ++i) {
      const SampleResult result = sampler.Sample(logits);
      ASSERT_NEAR(result.logprob, expected[result.token], 1e-4) << "token " << result.token;
      EXPECT_TRUE(result.top.empty());
    }
  }
}

TEST(SamplerTest, TopLogprobsAreSortedAndOfRequestedSize) {
  std::vector<float> logits = RandomLogits(3000, 1.0, 6);
  logits[10] = logits[20] = logits[30] = 6.0f;  // tied leaders: ids ascending
  logits[5] = 7.0f;
  const std::vector<double> expected = LogSoftmax(logits);
  std::vector<int32_t> by_logit(logits.size());
  std::iota(by_logit.begin(), by_logit.end(), 0);
  std::stable_sort(by_logit.begin(), by_logit.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });

  for (int32_t n : {1, 4, 20}) {
    SamplingParams params = Params(1.0f, 0, 1.0f, 0.0f, 17);
    params.top_logprobs = n;
    Sampler sampler(params);
    const SampleResult result = sampler.Sample(logits);
    ASSERT_EQ(static_cast<int32_t>(result.top.size()), n);
    for (int32_t j = 0; j < n; ++j) {
      EXPECT_EQ(result.top[j].token, by_logit[j]) << "rank " << j;
      EXPECT_NEAR(result.top[j].logprob, expected[by_logit[j]], 1e-4);
      if (j > 0) {
        EXPECT_GE(result.top[j - 1].logprob, result.top[j].logprob);
      }
    }
    EXPECT_EQ(result.top[0].token, 5);
    if (n >= 4) {
      EXPECT_EQ(result.top[1].token, 10);
      EXPECT_EQ(result.top[2].token, 20);
      EXPECT_EQ(result.top[3].token, 30);
    }
  }

  // Capped at the vocabulary size.
  SamplingParams params = Params(0.0f);
  params.top_logprobs = 20;
  Sampler sampler(params);
  const SampleResult result = sampler.Sample(std::vector<float>{0.0f, 1.0f, 0.5f});
  ASSERT_EQ(result.top.size(), 3u);
  EXPECT_EQ(result.top[0].token, 1);
  EXPECT_EQ(result.top[1].token, 2);
  EXPECT_EQ(result.top[2].token, 0);
  EXPECT_NEAR(std::exp(result.top[0].logprob) + std::exp(result.top[1].logprob) +
                  std::exp(result.top[2].logprob),
              1.0, 1e-6);
}

// --- Non-finite logits ------------------------------------------------------

TEST(SamplerTest, NaNIsNegativeInfinity) {
  const std::vector<float> logits = {kNaN, 0.0f, kNaN, 0.0f, -kInf, kNaN};
  SamplingParams params = Params(1.0f, 0, 1.0f, 0.0f, 3);
  params.top_logprobs = 6;
  Sampler sampler(params);
  std::set<int32_t> seen;
  for (int i = 0; i < 200; ++i) {
    const SampleResult result = sampler.Sample(logits);
    seen.insert(result.token);
    EXPECT_NEAR(result.logprob, std::log(0.5), 1e-6);
    ASSERT_EQ(result.top.size(), 6u);
    EXPECT_EQ(result.top[0].token, 1);
    EXPECT_EQ(result.top[1].token, 3);
    for (int j = 2; j < 6; ++j) EXPECT_EQ(result.top[j].logprob, -kInf);
  }
  EXPECT_EQ(seen, (std::set<int32_t>{1, 3}));
  EXPECT_EQ(Sampler(Params(0.0f)).Sample(std::vector<float>{kNaN, -5.0f, kNaN, -4.0f}).token, 3);
}

TEST(SamplerTest, AllNonFiniteFallsBackToGreedy) {
  for (float temperature : {0.0f, 1.0f}) {
    SamplingParams params = Params(temperature, 2, 0.5f, 0.1f, 1);
    params.top_logprobs = 2;
    Sampler sampler(params);
    SampleResult result = sampler.Sample(std::vector<float>{kNaN, -kInf, kNaN});
    EXPECT_EQ(result.token, 0);
    EXPECT_EQ(result.logprob, -kInf);
    ASSERT_EQ(result.top.size(), 2u);

    // +inf tokens take all the mass, shared evenly; the lowest id is chosen.
    result = sampler.Sample(std::vector<float>{1.0f, kInf, kNaN, kInf, 3.0f});
    EXPECT_EQ(result.token, 1);
    EXPECT_NEAR(result.logprob, -std::log(2.0), 1e-6);
    EXPECT_EQ(result.top[0].token, 1);
    EXPECT_EQ(result.top[1].token, 3);
    EXPECT_NEAR(result.top[1].logprob, -std::log(2.0), 1e-6);
  }
}

TEST(SamplerTest, ExtremeLogitsAndTemperatures) {
  const std::vector<float> logits = {-3e38f, 3e38f, 0.0f, 2.9e38f};
  for (float temperature : {1e-30f, 1e-3f, 1.0f, 1e30f}) {
    Sampler sampler(Params(temperature, 0, 1.0f, 0.0f, 8));
    for (int i = 0; i < 20; ++i) {
      const SampleResult result = sampler.Sample(logits);
      ASSERT_GE(result.token, 0);
      ASSERT_LT(result.token, 4);
      EXPECT_FALSE(std::isnan(result.logprob));
    }
  }
}

TEST(SamplerDeathTest, RequiresValidParamsAndLogits) {
  EXPECT_DEATH(Sampler(Params(-1.0f)), "temperature");
  Sampler sampler(Params(1.0f));
  EXPECT_DEATH(sampler.Sample(absl::Span<const float>()), "logits");
}

}  // namespace
}  // namespace dmoe
