#include "core/flags/flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace dmoe {

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args, const std::set<std::string>& value_flags,
                                   const std::set<std::string>& bool_flags) {
  Flags flags;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    std::string name = arg.substr(2), value;
    const size_t eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (bool_flags.contains(name)) {
      if (inline_value && value != "true" && value != "false") {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value (or =true/=false)"));
      }
      if (!inline_value || value == "true") flags.values_[name] = "true";
      continue;
    }
    if (!value_flags.contains(name)) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    if (!inline_value) {
      if (i + 1 >= args.size()) return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      value = args[++i];
    }
    flags.values_[name] = value;
  }
  return flags;
}

std::optional<std::string> Flags::Get(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::string> Flags::Require(const std::string& name) const {
  auto v = Get(name);
  if (!v.has_value()) return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
  return *v;
}

absl::StatusOr<int64_t> Flags::GetInt(const std::string& name, int64_t def) const {
  auto v = Get(name);
  if (!v.has_value()) return def;
  int64_t out;
  if (!absl::SimpleAtoi(*v, &out)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " = '", *v, "' is not an integer"));
  }
  return out;
}

absl::StatusOr<double> Flags::GetDouble(const std::string& name, double def) const {
  auto v = Get(name);
  if (!v.has_value()) return def;
  double out;
  if (!absl::SimpleAtod(*v, &out)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " = '", *v, "' is not a number"));
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> Flags::GetIds(const std::string& name, bool allow_empty) const {
  auto v = Get(name);
  if (!v.has_value()) return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
  std::vector<int32_t> ids;
  for (absl::string_view item : absl::StrSplit(*v, ',')) {
    item = absl::StripAsciiWhitespace(item);
    if (item.empty()) continue;
    int32_t id;
    if (!absl::SimpleAtoi(item, &id)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", std::string(item), "' is not a token id"));
    }
    ids.push_back(id);
  }
  if (ids.empty() && !allow_empty) return absl::InvalidArgumentError(absl::StrCat("--", name, " lists no token ids"));
  return ids;
}

}  // namespace dmoe
