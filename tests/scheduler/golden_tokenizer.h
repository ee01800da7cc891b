// The golden tiny-v3 tokenizer (tests/golden/tiny-v3), loaded once, for the
// text streaming and stop string tests.
#ifndef DMOE_TESTS_SCHEDULER_GOLDEN_TOKENIZER_H_
#define DMOE_TESTS_SCHEDULER_GOLDEN_TOKENIZER_H_

#include <string_view>

#include "core/tokenizer.h"

namespace dmoe::scheduler::testing {

// Aborts the test binary if the golden tokenizer does not load.
const Tokenizer& GoldenTokenizer();

// Whether `text` is valid UTF-8 (as Tokenizer::EncodeChecked judges it).
bool IsValidUtf8(std::string_view text);

}  // namespace dmoe::scheduler::testing

#endif  // DMOE_TESTS_SCHEDULER_GOLDEN_TOKENIZER_H_
