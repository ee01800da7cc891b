#include "attention_node/remote_experts.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "router/data_plane_tags.h"
#include "router/dispatch_wire.h"

namespace dmoe::attention {

RemoteExperts::RemoteExperts(transport::Transport& transport, router::ExpertPlacement placement,
                             std::vector<transport::NodeId> expert_node_ids, int64_t hidden_size,
                             absl::Duration reply_timeout)
    : transport_(transport),
      placement_(std::move(placement)),
      expert_node_ids_(std::move(expert_node_ids)),
      hidden_size_(hidden_size),
      reply_timeout_(reply_timeout) {}

absl::Status RemoteExperts::BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                               const int32_t* topk_idx, const float* topk_weights) {
  InFlight& f = in_flight_[micro_batch & 1];
  DMOE_ASSIGN_OR_RETURN(router::DispatchPlan plan,
                        router::DispatchPlan::Build(placement_, absl::MakeConstSpan(topk_idx, n * k),
                                                    absl::MakeConstSpan(topk_weights, n * k), n, k));
  f.tag = router::DispatchTag(step_id_, layer, micro_batch);
  f.nodes_sent.clear();
  const absl::Span<const float> hidden(x, n * hidden_size_);
  for (int32_t node = 0; node < plan.num_nodes(); ++node) {
    if (plan.tokens(node).empty()) continue;  // nothing routed there
    DMOE_ASSIGN_OR_RETURN(std::vector<uint8_t> payload,
                          router::EncodeDispatch(layer, step_id_, hidden_size_, k,
                                                 plan.GatherHidden(node, hidden, hidden_size_), plan.topk_idx(node),
                                                 plan.topk_weights(node)));
    absl::Status st = transport_.Send(expert_node_ids_[node], f.tag, payload);
    if (!st.ok()) {
      return absl::UnavailableError(
          absl::StrCat(NodeName(node), " unavailable: dispatch of layer ", layer, " failed: ", st.message()));
    }
    f.nodes_sent.push_back(node);
  }
  f.plan = std::move(plan);
  return absl::OkStatus();
}

absl::Status RemoteExperts::FinishRoutedExperts(int64_t layer, int micro_batch, float* out) {
  InFlight& f = in_flight_[micro_batch & 1];
  if (!f.plan.has_value()) return absl::InternalError("FinishRoutedExperts without BeginRoutedExperts");
  router::DispatchPlan plan = std::move(*f.plan);
  f.plan.reset();
  std::vector<std::vector<float>> sums(plan.num_nodes());
  const absl::Time start = absl::Now();
  std::vector<transport::NodeId> awaited;
  for (int32_t node : f.nodes_sent) awaited.push_back(expert_node_ids_[node]);
  while (!awaited.empty()) {
    const absl::Duration left = std::max(absl::ZeroDuration(), start + reply_timeout_ - absl::Now());
    absl::StatusOr<transport::Message> m =
        transport_.ReceiveFrom(awaited, router::ReplyTag(f.tag), router::kAllTagBits, left);
    if (!m.ok()) {
      std::string missing;
      for (transport::NodeId id : awaited) {
        const int32_t node = static_cast<int32_t>(
            std::find(expert_node_ids_.begin(), expert_node_ids_.end(), id) - expert_node_ids_.begin());
        absl::StrAppend(&missing, missing.empty() ? "" : ", ", NodeName(node));
      }
      if (m.status().code() == absl::StatusCode::kDeadlineExceeded) {
        return absl::UnavailableError(absl::StrCat(missing, " did not answer layer ", layer, " within ",
                                                   absl::FormatDuration(reply_timeout_)));
      }
      return absl::UnavailableError(
          absl::StrCat("waiting for ", missing, " in layer ", layer, ": ", m.status().message()));
    }
    const auto it = std::find(expert_node_ids_.begin(), expert_node_ids_.end(), m->from);
    if (it == expert_node_ids_.end()) return absl::InternalError(absl::StrCat("reply from unknown node ", m->from));
    DMOE_ASSIGN_OR_RETURN(router::PartialSumsMessage reply, router::DecodePartialSums(m->payload));
    sums[it - expert_node_ids_.begin()] = std::move(reply.partial_sums);
    awaited.erase(std::remove(awaited.begin(), awaited.end(), m->from), awaited.end());
  }
  wait_seconds_ += absl::ToDoubleSeconds(absl::Now() - start);
  std::vector<absl::Span<const float>> spans(sums.begin(), sums.end());
  return plan.Combine(spans, hidden_size_, absl::MakeSpan(out, plan.num_tokens() * hidden_size_));
}

std::string RemoteExperts::NodeName(int32_t node) const {
  if (node >= 0 && node < static_cast<int32_t>(names_.size())) return names_[node];
  const transport::NodeId id = node >= 0 && node < static_cast<int32_t>(expert_node_ids_.size())
                                   ? expert_node_ids_[node]
                                   : -1;
  return absl::StrCat("expert node ", node, " (transport node ", id, ")");
}

double RemoteExperts::TakeWaitSeconds() {
  const double s = wait_seconds_;
  wait_seconds_ = 0;
  return s;
}

}  // namespace dmoe::attention
