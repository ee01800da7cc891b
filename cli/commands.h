// The dmoe CLI's subcommands. Each returns a Status; main prints a failure
// as one line and exits non-zero.
#ifndef DMOE_CLI_COMMANDS_H_
#define DMOE_CLI_COMMANDS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace dmoe::cli {

absl::Status RunForward(const std::vector<std::string>& args);
absl::Status RunGenerate(const std::vector<std::string>& args);
absl::Status RunTokenize(const std::vector<std::string>& args);
absl::Status RunDetokenize(const std::vector<std::string>& args);
absl::Status RunMakeModel(const std::vector<std::string>& args);

// Cluster commands (cluster_commands.cc, remote_commands.cc).
// `dmoe up`: runs a scheduler and its nodes as children until SIGINT/SIGTERM.
absl::Status RunUp(const std::vector<std::string>& args);
// `dmoe generate --server HOST:PORT`: RunGenerate's flags and output, served remotely.
absl::Status RunGenerateRemote(const std::vector<std::string>& args);
// `dmoe bench --server HOST:PORT`: load generator; throughput and latency percentiles.
absl::Status RunBench(const std::vector<std::string>& args);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_COMMANDS_H_
