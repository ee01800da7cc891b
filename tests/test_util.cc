#include "tests/test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <vector>

namespace dmoe::testing {
namespace {

struct ScratchRoot {
  std::filesystem::path path;
  ScratchRoot() {
    const char* tmp = std::getenv("TEST_TMPDIR");
    std::filesystem::path base = tmp ? tmp : std::filesystem::temp_directory_path();
    path = base / ("dmoe_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(path);
  }
  ~ScratchRoot() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

}  // namespace

std::filesystem::path GoldenModelDir() {
  return std::filesystem::path(DMOE_TESTS_DIR) / "golden" / "tiny-v3";
}

std::filesystem::path ScratchDir(const std::string& name) {
  static ScratchRoot root;
  std::filesystem::path p = root.path / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

std::filesystem::path BinDir() { return DMOE_BIN_DIR; }

namespace {

std::string ShellQuote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

}  // namespace

ProgramRun RunProgram(const std::string& program, const std::vector<std::string>& args) {
  static int runs = 0;
  const std::filesystem::path err_file = ScratchDir("program_stderr_" + std::to_string(++runs)) / "stderr.txt";
  std::string cmd = ShellQuote(program);
  for (const std::string& a : args) cmd += " " + ShellQuote(a);
  cmd += " </dev/null 2>" + ShellQuote(err_file.string());
  ProgramRun r;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 1 << 16> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  return r;
}

}  // namespace dmoe::testing
