#include "tests/core/model_test_util.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "nlohmann/json.hpp"

namespace dmoe::testing {

std::vector<GoldenCase> LoadGoldenCases(const std::filesystem::path& model_dir) {
  std::ifstream in(model_dir / "golden.json");
  nlohmann::json root = nlohmann::json::parse(in);
  std::vector<GoldenCase> cases;
  for (const auto& c : root["cases"]) {
    GoldenCase gc;
    gc.prompt_ids = c["prompt_ids"].get<std::vector<int32_t>>();
    for (const auto& row : c["logits"]) {
      for (const auto& v : row) gc.logits.push_back(v.get<float>());
    }
    gc.greedy_ids = c["greedy_ids"].get<std::vector<int32_t>>();
    cases.push_back(std::move(gc));
  }
  return cases;
}

double MaxRelativeError(const std::vector<float>& a, const std::vector<float>& ref, int64_t vocab) {
  if (a.size() != ref.size() || ref.empty()) return INFINITY;
  double worst = 0;
  for (size_t p = 0; p < ref.size() / vocab; ++p) {
    double max_ref = 0, max_diff = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      const size_t i = p * vocab + v;
      max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
      max_diff = std::max(max_diff, std::fabs(static_cast<double>(a[i]) - ref[i]));
    }
    worst = std::max(worst, std::isfinite(max_diff) ? max_diff / max_ref : INFINITY);
  }
  return worst;
}

}  // namespace dmoe::testing
