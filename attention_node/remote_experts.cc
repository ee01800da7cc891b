#include "attention_node/remote_experts.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "core/metrics/metrics.h"
#include "router/data_plane_tags.h"
#include "router/dispatch_wire.h"

namespace dmoe::attention {

namespace {

std::vector<std::vector<transport::NodeId>> OneReplicaEach(std::vector<transport::NodeId> ids) {
  std::vector<std::vector<transport::NodeId>> out;
  for (transport::NodeId id : ids) out.push_back({id});
  return out;
}

}  // namespace

RemoteExperts::RemoteExperts(transport::Transport& transport, router::ExpertPlacement placement,
                             std::vector<transport::NodeId> expert_node_ids, int64_t hidden_size,
                             absl::Duration reply_timeout)
    : RemoteExperts(transport, std::move(placement), OneReplicaEach(std::move(expert_node_ids)), hidden_size,
                    reply_timeout) {}

RemoteExperts::RemoteExperts(transport::Transport& transport, router::ExpertPlacement placement,
                             std::vector<std::vector<transport::NodeId>> replicas, int64_t hidden_size,
                             absl::Duration reply_timeout)
    : transport_(transport),
      placement_(std::move(placement)),
      replicas_(std::move(replicas)),
      hidden_size_(hidden_size),
      reply_timeout_(reply_timeout) {}

absl::Status RemoteExperts::SendToReplica(Sent& s, uint64_t tag, int64_t layer, std::string* why) {
  const std::vector<transport::NodeId>& replicas = replicas_[s.node];
  const int n = static_cast<int>(replicas.size());
  while (s.attempts < n) {
    const transport::NodeId id = replicas[s.replica];
    ++s.attempts;
    const absl::Status st = transport_.Send(id, tag, s.payload);
    if (st.ok()) return absl::OkStatus();
    absl::StrAppend(why, why->empty() ? "" : "; ", NodeName(id), ": ", st.message());
    s.replica = (s.replica + 1) % n;
  }
  return absl::UnavailableError(
      absl::StrCat(ReplicaNames(s.node), " unavailable: dispatch of layer ", layer, " failed: ", *why));
}

absl::Status RemoteExperts::BeginRoutedExperts(int64_t layer, int micro_batch, const float* x, int64_t n, int64_t k,
                                               const int32_t* topk_idx, const float* topk_weights) {
  InFlight& f = in_flight_[micro_batch & 1];
  DMOE_ASSIGN_OR_RETURN(router::DispatchPlan plan,
                        router::DispatchPlan::Build(placement_, absl::MakeConstSpan(topk_idx, n * k),
                                                    absl::MakeConstSpan(topk_weights, n * k), n, k));
  f.tag = router::DispatchTag(step_id_, layer, micro_batch);
  f.layer = layer;
  f.sent.clear();
  f.sent_at = absl::Now();
  const absl::Span<const float> hidden(x, n * hidden_size_);
  for (int32_t node = 0; node < plan.num_nodes(); ++node) {
    if (plan.tokens(node).empty()) continue;  // nothing routed there
    Sent s;
    s.node = node;
    DMOE_ASSIGN_OR_RETURN(s.payload, router::EncodeDispatch(layer, step_id_, hidden_size_, k,
                                                            plan.GatherHidden(node, hidden, hidden_size_),
                                                            plan.topk_idx(node), plan.topk_weights(node)));
    // Replicas share the load: the first one tried rotates.
    s.replica = static_cast<int>((step_id_ + static_cast<uint64_t>(layer)) % replicas_[node].size());
    std::string why;
    DMOE_RETURN_IF_ERROR(SendToReplica(s, f.tag, layer, &why));
    f.sent.push_back(std::move(s));
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
  auto awaited = [&] {
    std::vector<transport::NodeId> ids;
    for (const Sent& s : f.sent) {
      if (!s.replied) ids.push_back(replicas_[s.node][s.replica]);
    }
    return ids;
  };
  for (std::vector<transport::NodeId> ids = awaited(); !ids.empty(); ids = awaited()) {
    const absl::Duration left = std::max(absl::ZeroDuration(), start + reply_timeout_ - absl::Now());
    absl::StatusOr<transport::Message> m = transport_.ReceiveFrom(ids, router::ReplyTag(f.tag), router::kAllTagBits, left);
    if (!m.ok()) {
      std::string missing;
      for (transport::NodeId id : ids) absl::StrAppend(&missing, missing.empty() ? "" : ", ", NodeName(id));
      if (m.status().code() != absl::StatusCode::kUnavailable) {
        return absl::UnavailableError(absl::StrCat(missing, " did not answer layer ", layer, " within ",
                                                   absl::FormatDuration(reply_timeout_)));
      }
      // A replica died with our dispatch: send it to the next one.
      for (Sent& s : f.sent) {
        if (s.replied) continue;
        const transport::NodeId id = replicas_[s.node][s.replica];
        const absl::Status peer = transport_.PeerStatus(id);
        if (peer.ok()) continue;
        std::string why = absl::StrCat(NodeName(id), ": ", peer.message());
        if (s.attempts >= static_cast<int>(replicas_[s.node].size())) {
          return absl::UnavailableError(absl::StrCat("waiting for ", NodeName(id), " in layer ", layer, ": ",
                                                     m.status().message()));
        }
        s.replica = (s.replica + 1) % static_cast<int>(replicas_[s.node].size());
        DMOE_RETURN_IF_ERROR(SendToReplica(s, f.tag, layer, &why));
        DMOE_LOG(kWarning, "attention-node") << "step " << step_id_ << " layer " << layer << ": " << why
                                             << "; dispatch sent again to "
                                             << NodeName(replicas_[s.node][s.replica]);
      }
      continue;
    }
    Sent* from = nullptr;
    for (Sent& s : f.sent) {
      if (!s.replied && replicas_[s.node][s.replica] == m->from) from = &s;
    }
    if (from == nullptr) continue;  // a late reply of a replica given up on
    DMOE_ASSIGN_OR_RETURN(router::PartialSumsMessage reply, router::DecodePartialSums(m->payload));
    sums[from->node] = std::move(reply.partial_sums);
    from->replied = true;
    metrics::AttentionNode().ExpertReply(from->node, absl::Now() - f.sent_at);
  }
  wait_seconds_ += absl::ToDoubleSeconds(absl::Now() - start);
  std::vector<absl::Span<const float>> spans(sums.begin(), sums.end());
  return plan.Combine(spans, hidden_size_, absl::MakeSpan(out, plan.num_tokens() * hidden_size_));
}

std::string RemoteExperts::ReplicaNames(int32_t node) const {
  std::string out;
  for (transport::NodeId id : replicas_[node]) absl::StrAppend(&out, out.empty() ? "" : " and ", NodeName(id));
  return out;
}

std::string RemoteExperts::NodeName(transport::NodeId id) const {
  auto it = names_.find(id);
  if (it != names_.end()) return it->second;
  return absl::StrCat("transport node ", id);
}

double RemoteExperts::TakeWaitSeconds() {
  const double s = wait_seconds_;
  wait_seconds_ = 0;
  return s;
}

}  // namespace dmoe::attention
