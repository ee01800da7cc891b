// dmoe make-model: a random checkpoint with real DeepSeek dimensions.
#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "core/flags/flags.h"
#include "core/status_macros.h"
#include "core/synthetic_checkpoint.h"

namespace dmoe::cli {

absl::Status RunMakeModel(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args, {"preset", "out", "layers", "dtype", "seed"}, {"config-only"}));
  SyntheticModelOptions o;
  DMOE_ASSIGN_OR_RETURN(o.preset, flags.Require("preset"));
  DMOE_ASSIGN_OR_RETURN(std::string out, flags.Require("out"));
  DMOE_ASSIGN_OR_RETURN(o.num_layers, flags.GetInt("layers", 0));
  if (flags.Has("layers") && o.num_layers <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--layers = ", o.num_layers, " must be positive"));
  }
  DMOE_ASSIGN_OR_RETURN(int64_t seed, flags.GetInt("seed", 0));
  o.seed = static_cast<uint64_t>(seed);
  o.config_only = flags.Has("config-only");
  const std::string dtype = flags.Get("dtype").value_or("bf16");
  if (dtype == "f32") {
    o.dtype = DType::kF32;
  } else if (dtype == "bf16") {
    o.dtype = DType::kBF16;
  } else if (dtype == "fp8") {
    o.dtype = DType::kF8E4M3;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--dtype = '", dtype, "' (choose f32, bf16 or fp8)"));
  }
  return WriteSyntheticModel(o, out);
}

}  // namespace dmoe::cli
