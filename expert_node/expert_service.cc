#include "expert_node/expert_service.h"

#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"

namespace dmoe::expert {

absl::StatusOr<WeightSelection> ShardSelection(const ModelConfig& config, const std::vector<int32_t>& expert_shard) {
  if (expert_shard.empty()) return absl::InvalidArgumentError("expert_shard is empty");
  auto hosted = std::make_shared<std::vector<bool>>(config.n_routed_experts, false);
  for (int32_t e : expert_shard) {
    if (e < 0 || e >= config.n_routed_experts) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expert_shard names expert ", e, ", outside [0, n_routed_experts = ", config.n_routed_experts, ")"));
    }
    if ((*hosted)[e]) return absl::InvalidArgumentError(absl::StrCat("expert_shard lists expert ", e, " twice"));
    (*hosted)[e] = true;
  }
  return WeightSelection{false, [hosted](int64_t, int64_t e) { return (*hosted)[e]; }};
}

LoadReporter::LoadReporter(ExpertWorker& worker, node::CoordinatorClient& coordinator, int32_t node_id)
    : worker_(worker), coordinator_(coordinator), node_id_(node_id) {}

absl::Status LoadReporter::ReportOnce() {
  int64_t dispatches = 0;
  const std::vector<int64_t> tokens = worker_.TakeLoad(&dispatches);
  if (unsent_tokens_.size() != tokens.size()) unsent_tokens_.assign(tokens.size(), 0);
  for (size_t i = 0; i < tokens.size(); ++i) unsent_tokens_[i] += tokens[i];
  unsent_steps_ += dispatches;
  v1::ExpertLoadReport report;
  report.set_node_id(node_id_);
  report.set_steps(unsent_steps_);
  report.mutable_tokens()->Add(unsent_tokens_.begin(), unsent_tokens_.end());
  absl::Status st = coordinator_.ReportExpertLoad(report);
  if (st.ok()) {
    std::fill(unsent_tokens_.begin(), unsent_tokens_.end(), 0);
    unsent_steps_ = 0;
  }
  return st;
}

}  // namespace dmoe::expert
