#include "core/sampling.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <string>

#include "absl/strings/str_cat.h"

namespace dmoe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The vocabulary-sized loops are compiled twice, for AVX2 and for the
// baseline, and picked at load time (as core/cpu/matmul.cc does by hand).
// "avx2" without "fma" keeps every operation, and so every result, the same
// in both versions: which one a CPU gets never changes the tokens a seed
// draws.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DMOE_SAMPLING_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DMOE_SAMPLING_CLONES
#endif

[[noreturn]] void SamplingCheckFailed(const std::string& message) {
  std::fprintf(stderr, "dmoe sampling: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

// Per-thread buffers sized to the vocabulary, reused across calls and
// samplers so that a request's Sampler stays small and Sample allocates
// nothing in the steady state.
struct Scratch {
  std::vector<float> logits;           // the input with NaN replaced by -inf
  std::vector<float> weights;          // by token id: p / p_max of the tempered distribution
  std::vector<int32_t> order;          // candidate token ids
  std::vector<int32_t> bucket_tokens;  // top-p's crossing bucket
  std::vector<double> histograms;      // top-p's radix selection
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Descending logit, ties by lower token id: a strict total order on tokens,
// so every selection below is deterministic.
struct ByLogitDesc {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

// Uniform in [0, 1) from the top 53 bits of one RNG output. Spelled out
// rather than std::uniform_real_distribution, whose algorithm differs
// between standard libraries, so a seed means the same on every build.
double Uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// exp(x) for x <= 0 or -inf (Cephes' expf: range reduction to
// [-ln2/2, ln2/2] and a degree-6 polynomial; relative error < 2e-7), exactly
// 1 at 0 and exactly 0 below -87, so masked (-inf) tokens weigh nothing.
// std::exp does not vectorize, and the vocabulary-sized exp passes dominate
// sampling's cost; this is branch-free, with the range test done on the bit
// pattern (float compares keep GCC from if-converting without -ffast-math),
// so the loops calling it vectorize.
inline float ExpNonPositive(float x) {
  constexpr uint32_t kMinBits = 0xC2AE0000u;  // -87.0f; larger patterns are more negative
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const bool underflow = bits > kMinBits;
  const float v = std::bit_cast<float>(underflow ? kMinBits : bits);
  const float fn = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v/ln2)
  const float r = (v - fn * 0.693359375f) + fn * 2.12194440e-4f;            // v - fn*ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t two_n = underflow ? 0 : (static_cast<int32_t>(fn) + 127) << 23;  // 2^fn
  return p * std::bit_cast<float>(two_n);
}

// Sum in float64 with independent partial sums (vectorizable, and a fixed
// association, so the result is deterministic).
constexpr int kLanes = 8;

DMOE_SAMPLING_CLONES double SumDouble(const float* w, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += w[i + j];
  }
  double sum = 0.0;
  for (; i < n; ++i) sum += w[i];
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  return sum;
}

// out = logits with NaN replaced by -inf; returns the largest value and
// sets *argmax to the lowest index holding it (0 when all are -inf). The
// maximum is taken over an order-preserving integer image of the floats,
// which vectorizes where a float max reduction does not.
DMOE_SAMPLING_CLONES float SanitizeAndArgmax(const float* in, float* out, int32_t n,
                                             int32_t* argmax) {
  constexpr uint32_t kNegInfBits = 0xFF800000u;
  int32_t max_key = std::numeric_limits<int32_t>::min();
  for (int32_t i = 0; i < n; ++i) {
    const uint32_t bits = std::bit_cast<uint32_t>(in[i]);
    const uint32_t clean = (bits & 0x7FFFFFFFu) > 0x7F800000u ? kNegInfBits : bits;
    out[i] = std::bit_cast<float>(clean);
    // Negative floats: flip the magnitude bits so larger means greater. The
    // map is its own inverse.
    const int32_t s = static_cast<int32_t>(clean);
    const int32_t key = s ^ ((s >> 31) & 0x7FFFFFFF);
    max_key = key > max_key ? key : max_key;
  }
  const float max = std::bit_cast<float>(max_key ^ ((max_key >> 31) & 0x7FFFFFFF));
  int32_t i = 0;
  while (i < n && !(out[i] == max)) ++i;  // float ==: -0 ties +0
  *argmax = i < n ? i : 0;
  return max;
}

// out[t] = exp((logits[t] - max) / temperature) for all t.
DMOE_SAMPLING_CLONES void ExpScaled(const float* logits, float max, float temperature, float* out,
                                    int32_t n) {
  if (temperature == 1.0f) {  // skips the division; x / 1 == x anyway
    for (int32_t t = 0; t < n; ++t) out[t] = ExpNonPositive(logits[t] - max);
  } else {
    for (int32_t t = 0; t < n; ++t) out[t] = ExpNonPositive((logits[t] - max) / temperature);
  }
}

// The candidate tokens of one draw: all tokens, or an explicit list.
struct Candidates {
  bool all = true;
  int32_t vocab = 0;
  int32_t* list = nullptr;
  int64_t size = 0;          // of `list`
  bool list_sorted = false;  // `list` in ByLogitDesc order

  template <typename F>
  void ForEach(F f) const {
    if (all) {
      for (int32_t t = 0; t < vocab; ++t) f(t);
    } else {
      for (int64_t j = 0; j < size; ++j) f(list[j]);
    }
  }
};

// Below this k, top-k is a heap selection (about one comparison per token for
// typical logits) that leaves the k tokens sorted; above, nth_element.
constexpr int32_t kHeapTopKLimit = 4096;

// Top-p over unsorted candidates in O(candidates): a radix selection on the
// weights' float bit patterns (monotone in the weight for non-negative
// floats). Level 0 histograms the mass by the top 12 bits (sign, exponent,
// 3 mantissa bits: buckets 12.5% wide) and finds the bucket where the
// cumulative mass, from the top, crosses `threshold`; everything above it is
// kept, everything below dropped. Levels 1 and 2 do the same on the next 10
// and the last 10 bits within the crossing bucket, whose tokens then all have
// one weight; they are sorted (by logit, then id) and the prefix reaching the
// threshold is kept. Dropped tokens get weight 0.
void TopPByRadix(const Candidates& candidates, const float* logits, float* weights,
                 double threshold, Scratch& scratch) {
  constexpr int kBuckets = 1024;  // bit_cast<uint32_t>(1.0f) >> 20 == 1016
  // Four interleaved histograms for level 0, so that runs of tokens in one
  // bucket do not serialize on a single accumulator, then their sum.
  scratch.histograms.assign(5 * kBuckets, 0.0);
  double* const partial[4] = {&scratch.histograms[0], &scratch.histograms[kBuckets],
                              &scratch.histograms[2 * kBuckets], &scratch.histograms[3 * kBuckets]};
  double* const mass_in = &scratch.histograms[4 * kBuckets];
  double above = 0.0;  // mass of everything kept outside the crossing bucket
  // Returns the crossing bucket, or -1 when the mass never reaches the
  // threshold (rounding, or min-p having dropped the tail): keep everything.
  auto crossing_bucket = [&]() {
    for (int b = kBuckets - 1; b >= 0; --b) {
      if (above + mass_in[b] >= threshold) return b;
      above += mass_in[b];
    }
    return -1;
  };

  auto top_bits = [&](int32_t t) { return std::bit_cast<uint32_t>(weights[t]) >> 20; };
  int64_t i = 0;
  candidates.ForEach([&](int32_t t) { partial[i++ & 3][top_bits(t)] += weights[t]; });
  for (int b = 0; b < kBuckets; ++b) {
    mass_in[b] = (partial[0][b] + partial[1][b]) + (partial[2][b] + partial[3][b]);
  }
  const int crossing0 = crossing_bucket();
  if (crossing0 < 0) return;
  const uint32_t crossing = static_cast<uint32_t>(crossing0);
  // Branch-free: which side of the crossing bucket a token falls is
  // unpredictable.
  std::vector<int32_t>& tokens = scratch.bucket_tokens;
  tokens.resize(static_cast<size_t>(candidates.all ? candidates.vocab : candidates.size));
  size_t count = 0;
  candidates.ForEach([&](int32_t t) {
    tokens[count] = t;
    count += (top_bits(t) == crossing) & (weights[t] > 0.0f);
  });
  tokens.resize(count);
  candidates.ForEach([&](int32_t t) { weights[t] = top_bits(t) < crossing ? 0.0f : weights[t]; });

  for (int shift : {10, 0}) {
    auto bits_of = [&](int32_t t) {
      return static_cast<int>((std::bit_cast<uint32_t>(weights[t]) >> shift) & (kBuckets - 1));
    };
    std::fill_n(mass_in, kBuckets, 0.0);
    for (int32_t t : tokens) mass_in[bits_of(t)] += weights[t];
    const int sub_crossing = crossing_bucket();
    if (sub_crossing < 0) return;
    size_t kept = 0;
    for (int32_t t : tokens) {
      const int b = bits_of(t);
      tokens[kept] = t;
      kept += b == sub_crossing;
      weights[t] = b < sub_crossing ? 0.0f : weights[t];
    }
    tokens.resize(kept);
  }

  std::sort(tokens.begin(), tokens.end(), ByLogitDesc{logits});
  double mass = above;
  size_t j = 0;
  while (j < tokens.size() && mass < threshold) mass += weights[tokens[j++]];
  for (; j < tokens.size(); ++j) weights[tokens[j]] = 0.0f;
}

// Steps 2-5 of the filter order in sampling.h. `max` is the largest
// (finite) logit; scratch.logits holds the sanitized logits and
// scratch.weights holds exp(logit - max) for every token.
int32_t DrawToken(const SamplingParams& params, std::mt19937_64& rng, Scratch& scratch,
                  int32_t vocab, float max) {
  const float* logits = scratch.logits.data();
  float* weights = scratch.weights.data();
  const ByLogitDesc by_logit{logits};
  Candidates candidates;
  candidates.vocab = vocab;

  // 2. top-k.
  if (params.top_k > 0 && params.top_k < vocab) {
    std::vector<int32_t>& order = scratch.order;
    order.resize(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    const auto kth = order.begin() + params.top_k;
    if (params.top_k <= kHeapTopKLimit) {
      std::partial_sort(order.begin(), kth, order.end(), by_logit);
      candidates.list_sorted = true;
    } else {
      std::nth_element(order.begin(), kth, order.end(), by_logit);
    }
    candidates.all = false;
    candidates.list = order.data();
    candidates.size = params.top_k;
  }

  // 1. temperature: weights proportional to the tempered probabilities,
  // scaled so that the most likely token (always a candidate) weighs 1.
  const float temperature = params.temperature;
  if (temperature != 1.0f) {
    if (candidates.all) {
      ExpScaled(logits, max, temperature, weights, vocab);
    } else {
      candidates.ForEach(
          [&](int32_t t) { weights[t] = ExpNonPositive((logits[t] - max) / temperature); });
    }
  }
  double total = 0.0;
  if (candidates.all) {
    total = SumDouble(weights, vocab);
  } else {
    candidates.ForEach([&](int32_t t) { total += weights[t]; });
  }

  // 4. min-p, applied before 3. so that top-p has less to sort: the tokens
  // with p >= min_p * p_max are a prefix of the candidates in descending
  // order, so is the top-p set, and the result is the shorter prefix either
  // way as long as top-p measures mass against the total from before min-p
  // (it does: `total`). Compared in logit space, exactly:
  // p / p_max = exp((logit - max) / T) >= min_p.
  if (params.min_p > 0.0f) {
    const double cutoff =
        static_cast<double>(max) + static_cast<double>(temperature) * std::log(params.min_p);
    candidates.ForEach([&](int32_t t) {
      if (static_cast<double>(logits[t]) < cutoff) weights[t] = 0.0f;
    });
  }

  // 3. top-p: the shortest prefix of the sorted candidates whose mass reaches
  // top_p * total.
  if (params.top_p < 1.0f) {
    const double threshold = static_cast<double>(params.top_p) * total;
    if (candidates.list_sorted) {
      double mass = 0.0;
      int64_t j = 0;
      while (j < candidates.size && mass < threshold) mass += weights[candidates.list[j++]];
      candidates.size = j;
    } else {
      TopPByRadix(candidates, logits, weights, threshold, scratch);
    }
  }

  // 5. renormalize and draw. Dropped tokens weigh 0 and are never chosen.
  double kept = 0.0;
  if (candidates.all) {
    kept = SumDouble(weights, vocab);
  } else {
    candidates.ForEach([&](int32_t t) { kept += weights[t]; });
  }
  const double target = Uniform01(rng) * kept;
  double mass = 0.0;
  int32_t chosen = -1;
  int32_t last_positive = -1;
  auto visit = [&](int32_t t) {
    if (weights[t] <= 0.0f) return false;
    mass += weights[t];
    last_positive = t;
    if (target < mass) {
      chosen = t;
      return true;
    }
    return false;
  };
  if (candidates.all) {
    for (int32_t t = 0; t < vocab && !visit(t);) ++t;
  } else {
    for (int64_t j = 0; j < candidates.size && !visit(candidates.list[j]);) ++j;
  }
  if (chosen >= 0) return chosen;
  return last_positive;  // target rounded up to `kept`; the argmax weighs 1, so one exists
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& params) {
  if (!(params.temperature >= 0.0f) || std::isinf(params.temperature)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SamplingParams.temperature must be finite and >= 0, got ", params.temperature));
  }
  if (params.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("SamplingParams.top_k must be >= 0 (0 = off), got ", params.top_k));
  }
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SamplingParams.top_p must be in (0, 1], got ", params.top_p));
  }
  if (!(params.min_p >= 0.0f && params.min_p <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SamplingParams.min_p must be in [0, 1], got ", params.min_p));
  }
  if (params.top_logprobs < 0 || params.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("SamplingParams.top_logprobs must be in [0, ",
                                                   kMaxTopLogprobs, "], got ",
                                                   params.top_logprobs));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {
  if (absl::Status status = ValidateSamplingParams(params); !status.ok()) {
    SamplingCheckFailed(std::string(status.message()));
  }
}

SampleResult Sampler::Sample(absl::Span<const float> logits) {
  if (logits.empty() || logits.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    SamplingCheckFailed(absl::StrCat("Sample needs 1..INT32_MAX logits, got ", logits.size()));
  }
  const int32_t vocab = static_cast<int32_t>(logits.size());
  Scratch& scratch = ThreadScratch();
  scratch.logits.resize(static_cast<size_t>(vocab));
  scratch.weights.resize(static_cast<size_t>(vocab));
  float* sanitized = scratch.logits.data();
  float* weights = scratch.weights.data();

  int32_t argmax = 0;  // lowest id among the largest; 0 when all are -inf
  const float max = SanitizeAndArgmax(logits.data(), sanitized, vocab, &argmax);

  // The model's log-normalizer, log(sum(exp(logits))), accumulated in double.
  const bool finite_max = std::isfinite(max);
  double log_z = 0.0;
  float posinf_logprob = kNegInf;  // each +inf token's share when max == +inf
  if (finite_max) {
    ExpScaled(sanitized, max, 1.0f, weights, vocab);
    log_z = static_cast<double>(max) + std::log(SumDouble(weights, vocab));
  } else if (max > 0.0f) {
    const auto count = std::count(sanitized, sanitized + vocab, max);
    posinf_logprob = static_cast<float>(-std::log(static_cast<double>(count)));
  }
  auto logprob = [&](int32_t t) -> float {
    if (finite_max) return static_cast<float>(static_cast<double>(sanitized[t]) - log_z);
    return sanitized[t] == max && max > 0.0f ? posinf_logprob : kNegInf;
  };

  SampleResult result;
  if (params_.temperature == 0.0f) {
    result.token = argmax;
  } else if (!finite_max) {
    result.token = argmax;
    rng_.discard(1);  // keep one RNG output per non-greedy sample
  } else {
    result.token = DrawToken(params_, rng_, scratch, vocab, max);
  }
  result.logprob = logprob(result.token);

  const int32_t num_top = std::min(params_.top_logprobs, vocab);
  if (num_top > 0) {
    std::vector<int32_t>& order = scratch.order;
    order.resize(static_cast<size_t>(vocab));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + num_top, order.end(), ByLogitDesc{sanitized});
    result.top.reserve(static_cast<size_t>(num_top));
    for (int32_t j = 0; j < num_top; ++j) result.top.push_back({order[j], logprob(order[j])});
  }
  return result;
}

}  // namespace dmoe
