#include "tests/scheduler/golden_tokenizer.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "tests/test_util.h"

namespace dmoe::scheduler::testing {

const Tokenizer& GoldenTokenizer() {
  static const Tokenizer* tokenizer = [] {
    auto loaded = Tokenizer::Load(dmoe::testing::GoldenModelDir());
    if (!loaded.ok()) {
      ADD_FAILURE() << loaded.status();
      std::abort();
    }
    return loaded->release();
  }();
  return *tokenizer;
}

bool IsValidUtf8(std::string_view text) {
  return GoldenTokenizer().EncodeChecked(text).status().code() != absl::StatusCode::kInvalidArgument;
}

}  // namespace dmoe::scheduler::testing
