// The dmoe CLI as a user runs it: the real binary, its JSON contract
// (docs/cli.md), and one-line errors with a non-zero exit for bad input.
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using json = nlohmann::json;

struct CliRun {
  int exit_code = -1;
  bool signaled = false;
  std::string out, err;
};

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

CliRun Dmoe(const std::vector<std::string>& args) {
  const std::string err_file = testing::ScratchDir("cli_stderr") / "stderr.txt";
  std::string cmd = Quote((testing::BinDir() / "dmoe").string());
  for (const std::string& a : args) cmd += " " + Quote(a);
  cmd += " 2>" + Quote(err_file);
  CliRun r;
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 1 << 16> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.signaled = WIFSIGNALED(status);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  return r;
}

std::string Ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

const std::string kModel = testing::GoldenModelDir().string();

TEST(Cli, ForwardPrintsGoldenLogits) {
  const auto cases = testing::LoadGoldenCases(testing::GoldenModelDir());
  const auto& gc = cases[1];
  CliRun last = Dmoe({"forward", "--model", kModel, "--ids", Ids(gc.prompt_ids)});
  ASSERT_EQ(last.exit_code, 0) << last.err;
  json j = json::parse(last.out);
  ASSERT_EQ(j["positions"], json({gc.prompt_ids.size() - 1}));
  const int64_t V = 512;
  const std::vector<float> golden_last(gc.logits.end() - V, gc.logits.end());
  EXPECT_LE(testing::MaxRelativeError(j["logits"][0].get<std::vector<float>>(), golden_last, V), 1e-4);

  CliRun all = Dmoe({"forward", "--model", kModel, "--ids", Ids(gc.prompt_ids), "--all-positions"});
  ASSERT_EQ(all.exit_code, 0) << all.err;
  j = json::parse(all.out);
  ASSERT_EQ(j["logits"].size(), gc.prompt_ids.size());
  std::vector<float> flat;
  for (const auto& row : j["logits"]) {
    for (float v : row.get<std::vector<float>>()) flat.push_back(v);
  }
  EXPECT_LE(testing::MaxRelativeError(flat, gc.logits, V), 1e-4);
}

TEST(Cli, GenerateIdsEqualsGoldenGreedy) {
  for (const auto& gc : testing::LoadGoldenCases(testing::GoldenModelDir())) {
    CliRun r = Dmoe({"generate", "--model", kModel, "--ids", Ids(gc.prompt_ids), "--max-tokens", "16", "--json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    json j = json::parse(r.out);
    EXPECT_EQ(j["ids"].get<std::vector<int32_t>>(), gc.greedy_ids);
    EXPECT_TRUE(j["text"].is_string());
  }
}

TEST(Cli, GenerateSamplingIsReproducibleWithASeed) {
  const std::vector<std::string> args = {"generate", "--model", kModel, "--prompt", "Latent attention",
                                         "--max-tokens", "12", "--temperature", "0.9", "--top-p", "0.95",
                                         "--top-k", "40", "--seed", "42", "--json"};
  CliRun a = Dmoe(args), b = Dmoe(args);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  std::vector<std::string> other = args;
  other[other.size() - 2] = "43";
  EXPECT_NE(Dmoe(other).out, a.out);
}

TEST(Cli, StreamedTextEqualsJsonText) {
  CliRun streamed = Dmoe({"generate", "--model", kModel, "--prompt", "DeepSeek", "--max-tokens", "10"});
  CliRun as_json = Dmoe({"generate", "--model", kModel, "--prompt", "DeepSeek", "--max-tokens", "10", "--json"});
  ASSERT_EQ(streamed.exit_code, 0) << streamed.err;
  ASSERT_EQ(as_json.exit_code, 0) << as_json.err;
  EXPECT_EQ(streamed.out, json::parse(as_json.out)["text"].get<std::string>() + "\n");
}

TEST(Cli, TokenizeAndDetokenizeRoundTrip) {
  std::ifstream in(testing::GoldenModelDir() / "tokenizer_cases.json");
  const json cases = json::parse(in)["cases"];
  ASSERT_GE(cases.size(), 5u);
  for (const auto& c : cases) {
    CliRun t = Dmoe({"tokenize", "--model", kModel, "--text", c["text"].get<std::string>()});
    ASSERT_EQ(t.exit_code, 0) << t.err;
    EXPECT_EQ(json::parse(t.out)["ids"], c["ids"]);
    CliRun d = Dmoe({"detokenize", "--model", kModel, "--ids", Ids(c["ids"].get<std::vector<int32_t>>())});
    ASSERT_EQ(d.exit_code, 0) << d.err;
    EXPECT_EQ(d.out, c["decoded"].get<std::string>() + "\n");
  }
}

TEST(Cli, MakeModelWritesALoadableCheckpoint) {
  for (const std::string dtype : {"f32", "bf16", "fp8"}) {
    const std::string dir = testing::ScratchDir("made_" + dtype).string();
    CliRun m = Dmoe({"make-model", "--preset", "tiny", "--out", dir, "--layers", "2", "--dtype", dtype, "--seed", "3"});
    ASSERT_EQ(m.exit_code, 0) << m.err;
    json config = json::parse(std::ifstream(dir + "/config.json"));
    EXPECT_EQ(config["num_hidden_layers"], 2);
    EXPECT_EQ(config.contains("quantization_config"), dtype == "fp8");
    CliRun g = Dmoe({"generate", "--model", dir, "--prompt", "hello", "--max-tokens", "4", "--json"});
    ASSERT_EQ(g.exit_code, 0) << g.err;
    EXPECT_EQ(json::parse(g.out)["ids"].size(), 4u);
  }
}

// Every error: exit code 1, no crash, one line on stderr naming the problem.
void ExpectError(const std::vector<std::string>& args, const std::string& needle) {
  CliRun r = Dmoe(args);
  EXPECT_FALSE(r.signaled) << "crashed: " << r.err;
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "stderr: " << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "stderr: " << r.err;
}

TEST(Cli, ErrorsAreOneLineAndNameTheProblem) {
  ExpectError({"forward", "--ids", "1,2"}, "--model is required");
  ExpectError({"forward", "--model", kModel, "--ids", "1,x"}, "'x' is not a token id");
  ExpectError({"forward", "--model", kModel, "--ids", "1,600"}, "token id 600 is outside the vocabulary");
  ExpectError({"forward", "--model", kModel, "--ids", "1", "--bogus"}, "unknown flag --bogus");
  ExpectError({"forward", "--model", "/nonexistent/model", "--ids", "1"}, "/nonexistent/model/config.json");
  ExpectError({"generate", "--model", kModel, "--ids", "1", "--max-tokens", "0"}, "must be positive");
  ExpectError({"generate", "--model", kModel, "--ids", "1", "--max-tokens", "1000"}, "exceeds the context");
  ExpectError({"generate", "--model", kModel, "--ids", "1", "--temperature", "-1"}, "temperature");
  ExpectError({"generate", "--model", kModel, "--ids", "1", "--top-p", "1.5"}, "top_p");
  ExpectError({"generate", "--model", kModel, "--prompt", "a", "--ids", "1"}, "exactly one of");
  ExpectError({"generate", "--model", kModel, "--prompt", "\xff\xfe bad"}, "UTF-8");
  ExpectError({"make-model", "--preset", "huge", "--out", "/tmp/x"}, "unknown preset 'huge'");
  ExpectError({"make-model", "--preset", "tiny", "--out", "/tmp/x", "--dtype", "int4"}, "--dtype");
  ExpectError({"forward", "--model", kModel, "--ids", "1", "--device", "tpu"}, "--device 'tpu' must be cpu or cuda");
  ExpectError({"forward", "--model", kModel, "--ids", "1", "--load-format", "pt"}, "--load-format 'pt'");

  // A corrupt checkpoint: the golden config beside a truncated weights file.
  const auto dir = testing::ScratchDir("cli_corrupt");
  std::filesystem::copy_file(testing::GoldenModelDir() / "config.json", dir / "config.json");
  {
    std::ifstream in(testing::GoldenModelDir() / "model.safetensors", std::ios::binary);
    std::string bytes(std::istreambuf_iterator<char>(in), {});
    std::ofstream(dir / "model.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  ExpectError({"forward", "--model", dir.string(), "--ids", "1"}, "model.safetensors");
  // An unsupported config value.
  std::ofstream(dir / "config.json") << R"({"model_type": "deepseek_v3", "scoring_func": "softmax"})";
  ExpectError({"forward", "--model", dir.string(), "--ids", "1"}, "scoring_func");
}

// This machine has no GPU (CI): --device cuda fails with one line naming
// CUDA, exit 1, no crash. On a GPU machine it must give the golden ids.
TEST(Cli, DeviceCudaWithoutAGpuIsAnErrorNotACrash) {
  const auto cases = testing::LoadGoldenCases(testing::GoldenModelDir());
  const CliRun r = Dmoe({"generate", "--model", kModel, "--ids", Ids(cases[0].prompt_ids), "--max-tokens", "4",
                         "--ignore-eos", "--json", "--device", "cuda"});
  ASSERT_FALSE(r.signaled) << r.err;
  if (r.exit_code == 0) GTEST_SKIP() << "this machine has a GPU: " << r.out;
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("dmoe generate: error: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("cuda"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(Cli, UnknownCommandAndUsage) {
  CliRun r = Dmoe({"frobnicate"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("unknown command 'frobnicate'"), std::string::npos);
  CliRun help = Dmoe({"--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("make-model"), std::string::npos);
}

}  // namespace
}  // namespace dmoe
