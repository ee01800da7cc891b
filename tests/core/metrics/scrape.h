// Test helpers for the Prometheus side: a plain HTTP/1.0 GET and the text
// exposition format (what /metrics serves), parsed into series -> value.
#ifndef DMOE_TESTS_CORE_METRICS_SCRAPE_H_
#define DMOE_TESTS_CORE_METRICS_SCRAPE_H_

#include <map>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace dmoe::testing {

// GET http://127.0.0.1:port/path_and_query; the body of a 200 answer,
// UNAVAILABLE for a refused connection or another status (with the body).
absl::StatusOr<std::string> HttpGet(int port, const std::string& path_and_query,
                                    absl::Duration timeout = absl::Seconds(10));

// One scrape: "name{label="v",...}" exactly as exposed -> value.
struct Scrape {
  std::map<std::string, double> series;
  // Metric names of the series (histograms give name_bucket, _sum, _count).
  std::set<std::string> names;

  // Sum over the series of `name` whose label text contains every one of
  // `label_filters` (e.g. {"finish_reason=\"length\""}); 0 when none.
  double Sum(const std::string& name, const std::set<std::string>& label_filters = {}) const;
  bool Has(const std::string& name) const { return names.contains(name); }
};
absl::StatusOr<Scrape> ParseExposition(const std::string& text);
absl::StatusOr<Scrape> ScrapeMetrics(int port);

// The metric names a PromQL expression reads: identifiers that are not
// functions, keywords, label names (in by/without/on/ignoring lists and
// matchers) or durations.
std::set<std::string> PromqlMetricNames(const std::string& expr);

// URL query escaping for PromQL.
std::string UrlEncode(const std::string& s);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_CORE_METRICS_SCRAPE_H_
