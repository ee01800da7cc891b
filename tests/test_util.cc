#include "tests/test_util.h"

#include <unistd.h>

#include <cstdlib>
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

}  // namespace dmoe::testing
