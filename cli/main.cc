// dmoe: the command-line entry point (docs/cli.md).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli/commands.h"

namespace {

constexpr char kUsage[] =
    "usage: dmoe <command> [flags]\n"
    "commands:\n"
    "  forward     --model DIR --ids 3,17,42 [--all-positions]       logits as JSON\n"
    "  generate    --model DIR (--prompt TEXT | --ids 1,2,3) --max-tokens N\n"
    "              [--temperature T] [--top-p P] [--top-k K] [--min-p M] [--seed S] [--json]\n"
    "              forward and generate: [--device cpu|cuda] [--load-format auto|dummy]\n"
    "  tokenize    --model DIR --text TEXT                            {\"ids\": [..]}\n"
    "  detokenize  --model DIR --ids 1,2,3                            the text\n"
    "  make-model  --preset tiny|v2-lite-shape|v3-shape --out DIR [--layers N] [--dtype f32|bf16|fp8] [--seed S]\n"
    "              [--config-only]\n"
    "cluster commands:\n"
    "  up          --model DIR [--attention-nodes N] [--expert-nodes M] [--balance off|bias] [--port P]\n"
    "              [--host H] [--config FILE] [--cache-pages N] [--timeout S] [--grace S]\n"
    "              [--on-node-exit restart|stop] [--expert-replicas R]\n"
    "              [--device cpu|cuda] [--load-format auto|dummy] [--gpu-memory-fraction F]\n"
    "              (--expert-nodes 0, the default with --device cuda: experts in the attention node)\n"
    "  generate    --server HOST:PORT (--prompt TEXT | --ids 1,2,3) [--max-tokens N] [sampling flags]\n"
    "              [--stop STR] [--ignore-eos] [--json]\n"
    "  bench       --server HOST:PORT [--concurrency C] [--requests R] [--prompt-len L] [--max-tokens T]\n"
    "              [--seed S] [--json]\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  absl::Status status;
  if (command == "forward") {
    status = dmoe::cli::RunForward(args);
  } else if (command == "generate") {
    // --server: the same command against a running cluster.
    const bool remote = std::any_of(args.begin(), args.end(),
                                    [](const std::string& a) { return a == "--server" || a.rfind("--server=", 0) == 0; });
    status = remote ? dmoe::cli::RunGenerateRemote(args) : dmoe::cli::RunGenerate(args);
  } else if (command == "up") {
    status = dmoe::cli::RunUp(args);
  } else if (command == "bench") {
    status = dmoe::cli::RunBench(args);
  } else if (command == "tokenize") {
    status = dmoe::cli::RunTokenize(args);
  } else if (command == "detokenize") {
    status = dmoe::cli::RunDetokenize(args);
  } else if (command == "make-model") {
    status = dmoe::cli::RunMakeModel(args);
  } else {
    std::fprintf(stderr, "dmoe: unknown command '%s'\n%s", command.c_str(), kUsage);
    return 2;
  }
  if (!status.ok()) {
    std::string message(status.message());
    for (char& c : message) {
      if (c == '\n') c = ' ';
    }
    std::fprintf(stderr, "dmoe %s: error: %s\n", command.c_str(), message.c_str());
    return 1;
  }
  return 0;
}
