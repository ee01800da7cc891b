// Shared helpers for dmoe's tests: paths to the golden data and scratch dirs.
#ifndef DMOE_TESTS_TEST_UTIL_H_
#define DMOE_TESTS_TEST_UTIL_H_

#include <filesystem>
#include <string>

namespace dmoe::testing {

// tests/golden/tiny-v3 in the source tree.
std::filesystem::path GoldenModelDir();
// A fresh empty directory under the test's temp dir, removed at exit.
std::filesystem::path ScratchDir(const std::string& name);
// build/bin (where the dmoe CLI is).
std::filesystem::path BinDir();

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_TEST_UTIL_H_
