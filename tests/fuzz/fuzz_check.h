// A failed property in a fuzz target: print what broke and abort, so
// libFuzzer records the input as a crash (asserts may be compiled out).
#ifndef DMOE_TESTS_FUZZ_FUZZ_CHECK_H_
#define DMOE_TESTS_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define FUZZ_CHECK(cond)                                                              \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: fuzz property failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)

#endif  // DMOE_TESTS_FUZZ_FUZZ_CHECK_H_
