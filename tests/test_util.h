// Shared helpers for dmoe's tests: paths to the golden data and scratch dirs.
#ifndef DMOE_TESTS_TEST_UTIL_H_
#define DMOE_TESTS_TEST_UTIL_H_

#include <filesystem>
#include <string>
#include <vector>

namespace dmoe::testing {

// tests/golden/tiny-v3 in the source tree.
std::filesystem::path GoldenModelDir();
// A fresh empty directory under the test's temp dir, removed at exit.
std::filesystem::path ScratchDir(const std::string& name);
// build/bin (where the dmoe CLI is).
std::filesystem::path BinDir();

// What a finished program wrote and how it ended.
struct ProgramRun {
  int exit_code = -1;  // -1: killed by a signal
  std::string out, err;
};
// Runs `program` (a path, or a name looked up on PATH) with `args` to its
// end, with no input, capturing stdout and stderr.
ProgramRun RunProgram(const std::string& program, const std::vector<std::string>& args);

// PEM files for TLS tests, made once per process with the openssl binary
// (P-256 keys, valid 2 days): a CA; a server certificate for 127.0.0.1 and
// scheduler.dmoe.test and a client certificate, both signed by it; and an
// unrelated self-signed CA. Empty paths (and a test failure) if openssl fails.
struct TestPki {
  std::filesystem::path ca, server_cert, server_key, client_cert, client_key, other_ca, other_ca_key;
};
const TestPki& TestCertificates();

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_TEST_UTIL_H_
