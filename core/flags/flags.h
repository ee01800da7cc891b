// A small command-line flag parser for the dmoe CLI: `--name value` or
// `--name=value`, boolean `--name`; unknown flags are errors.
#ifndef DMOE_CORE_FLAGS_FLAGS_H_
#define DMOE_CORE_FLAGS_FLAGS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe {

class Flags {
 public:
  // `value_flags` take a value, `bool_flags` do not. INVALID_ARGUMENT for an
  // unknown flag, a missing value or a stray positional argument.
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args, const std::set<std::string>& value_flags,
                                     const std::set<std::string>& bool_flags);

  bool Has(const std::string& name) const { return values_.contains(name); }
  std::optional<std::string> Get(const std::string& name) const;
  absl::StatusOr<std::string> Require(const std::string& name) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t def) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double def) const;
  // "3,17,42" -> ids; INVALID_ARGUMENT naming the bad item, or for an
  // empty list unless `allow_empty`.
  absl::StatusOr<std::vector<int32_t>> GetIds(const std::string& name, bool allow_empty = false) const;

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace dmoe

#endif  // DMOE_CORE_FLAGS_FLAGS_H_
