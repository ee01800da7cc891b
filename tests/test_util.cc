#include "tests/test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <vector>

#include "gtest/gtest.h"

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

namespace {

bool Openssl(const std::vector<std::string>& args) {
  const ProgramRun r = RunProgram("openssl", args);
  EXPECT_EQ(r.exit_code, 0) << "openssl failed: " << r.err;
  return r.exit_code == 0;
}

// <dir>/<name>.key and <name>.pem for `subject`: self-signed when `ca` is
// empty, else signed by <ca>.pem/<ca>.key with the extensions in `ext`.
bool MakeCert(const std::filesystem::path& dir, const std::string& name, const std::string& subject,
              const std::string& ca, const std::string& ext) {
  const std::string key = (dir / (name + ".key")).string(), cert = (dir / (name + ".pem")).string();
  const std::vector<std::string> new_key = {"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                                            "-keyout", key, "-subj", subject};
  if (ca.empty()) {
    std::vector<std::string> args = {"req", "-x509", "-out", cert, "-days", "2"};
    args.insert(args.end(), new_key.begin(), new_key.end());
    return Openssl(args);
  }
  const std::string csr = (dir / (name + ".csr")).string(), ext_file = (dir / (name + ".ext")).string();
  std::ofstream(ext_file) << ext << "\n";
  std::vector<std::string> args = {"req", "-out", csr};
  args.insert(args.end(), new_key.begin(), new_key.end());
  return Openssl(args) && Openssl({"x509", "-req", "-in", csr, "-CA", ca + ".pem", "-CAkey", ca + ".key",
                                   "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext_file});
}

}  // namespace

const TestPki& TestCertificates() {
  static const TestPki* pki = [] {
    const std::filesystem::path dir = ScratchDir("pki");
    const std::string ca = (dir / "ca").string();
    const bool ok =
        MakeCert(dir, "ca", "/CN=dmoe test CA", "", "") && MakeCert(dir, "other-ca", "/CN=some other CA", "", "") &&
        MakeCert(dir, "server", "/CN=dmoe-scheduler", ca,
                 "subjectAltName=IP:127.0.0.1,DNS:scheduler.dmoe.test\nextendedKeyUsage=serverAuth") &&
        MakeCert(dir, "client", "/CN=dmoe client", ca, "extendedKeyUsage=clientAuth");
    if (!ok) return new TestPki();
    return new TestPki{dir / "ca.pem",         dir / "server.pem",   dir / "server.key", dir / "client.pem",
                       dir / "client.key",     dir / "other-ca.pem", dir / "other-ca.key"};
  }();
  return *pki;
}

}  // namespace dmoe::testing
