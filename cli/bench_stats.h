// Latency percentiles for `dmoe bench` (docs/cli.md): small enough to live in
// a header, and tested in tests/cli/cluster_cli_test.cc.
#ifndef DMOE_CLI_BENCH_STATS_H_
#define DMOE_CLI_BENCH_STATS_H_

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmoe::cli {

// The q-th percentile (q in [0, 100]) of `samples`, interpolating linearly
// between the two closest ranks (numpy's default "linear" method): rank
// q/100 * (n - 1) in the sorted samples. NaN when there are no samples.
inline double Percentile(std::vector<double> samples, double q) {
  if (samples.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(samples.begin(), samples.end());
  const double rank = std::clamp(q, 0.0, 100.0) / 100.0 * static_cast<double>(samples.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, samples.size() - 1);
  const double frac = rank - static_cast<double>(lo);
  return samples[lo] + (samples[hi] - samples[lo]) * frac;
}

// p50/p90/p99 of a latency distribution, in the samples' unit (NaN if none).
struct LatencySummary {
  double p50 = 0.0;
  double p90 = 0.0;
  double p99 = 0.0;
};

inline LatencySummary Summarize(const std::vector<double>& samples) {
  return {Percentile(samples, 50.0), Percentile(samples, 90.0), Percentile(samples, 99.0)};
}

}  // namespace dmoe::cli

#endif  // DMOE_CLI_BENCH_STATS_H_
