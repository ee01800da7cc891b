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

}  // namespace dmoe::cli

#endif  // DMOE_CLI_COMMANDS_H_
