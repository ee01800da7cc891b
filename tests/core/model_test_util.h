// Helpers for model-level tests: golden cases and logit comparisons.
#ifndef DMOE_TESTS_CORE_MODEL_TEST_UTIL_H_
#define DMOE_TESTS_CORE_MODEL_TEST_UTIL_H_

#include <cstdint>
#include <filesystem>
#include <vector>

namespace dmoe::testing {

struct GoldenCase {
  std::vector<int32_t> prompt_ids;
  std::vector<float> logits;  // [positions, vocab]
  std::vector<int32_t> greedy_ids;
};

std::vector<GoldenCase> LoadGoldenCases(const std::filesystem::path& model_dir);

// MODEL_SPEC.md 6: max over positions of max_v |a - ref| / max_v |ref|.
double MaxRelativeError(const std::vector<float>& a, const std::vector<float>& ref, int64_t vocab);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_CORE_MODEL_TEST_UTIL_H_
