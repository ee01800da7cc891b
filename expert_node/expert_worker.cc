#include "expert_node/expert_worker.h"

#include <map>
#include <tuple>

#include "core/cpu/cpu_backend.h"
#include "core/log.h"
#include "core/metrics/metrics.h"
#include "router/data_plane_tags.h"
#include "router/dispatch_wire.h"

namespace dmoe::expert {
ExpertWorker::ExpertWorker(const ModelWeights& weights, transport::Transport& transport)
    // The caller keeps `weights` alive: a non-owning pointer.
    : ExpertWorker(std::make_shared<CpuBackend>(std::shared_ptr<const ModelWeights>(std::shared_ptr<void>(), &weights)),
                   transport) {}

ExpertWorker::ExpertWorker(std::shared_ptr<ComputeBackend> backend, transport::Transport& transport)
    : backend_(std::move(backend)), weights_(backend_->weights()), transport_(transport) {
  load_.assign(weights_.config.num_hidden_layers * weights_.config.n_routed_experts, 0);
}

std::vector<int64_t> ExpertWorker::TakeLoad(int64_t* dispatches) {
  absl::MutexLock lock(&mu_);
  std::vector<int64_t> out(load_.size(), 0);
  out.swap(load_);
  if (dispatches != nullptr) *dispatches = dispatches_;
  dispatches_ = 0;
  return out;
}

void ExpertWorker::Run() {
  for (;;) {
    // Stop() makes this return CANCELLED.
    absl::StatusOr<transport::Message> first =
        transport_.Receive(0, router::kReplyBit, absl::InfiniteDuration());
    if (!first.ok()) {
      if (first.status().code() == absl::StatusCode::kCancelled) return;
      continue;
    }
    std::vector<transport::Message> batch;
    batch.push_back(std::move(*first));
    // Whatever else already arrived joins this group.
    for (;;) {
      absl::StatusOr<transport::Message> more = transport_.Receive(0, router::kReplyBit, absl::ZeroDuration());
      if (!more.ok()) break;
      batch.push_back(std::move(*more));
    }
    Serve(std::move(batch));
  }
}

void ExpertWorker::Serve(std::vector<transport::Message> batch) {
  const ModelConfig& c = weights_.config;
  const int64_t D = c.hidden_size, E = c.n_routed_experts;
  struct Item {
    transport::Message message;
    router::DispatchMessage dispatch;
    int64_t row_begin = 0;
  };
  // Group by layer: one expert computation per layer over every message's tokens.
  std::map<int64_t, std::vector<Item>> by_layer;
  for (transport::Message& m : batch) {
    absl::StatusOr<router::DispatchMessage> d = router::DecodeDispatch(m.payload);
    if (!d.ok()) {
      DMOE_LOG(kWarning, "expert-node") << "dropping malformed dispatch from node " << m.from << ": " << d.status();
      continue;
    }
    if (d->hidden_size != D || d->layer < 0 || d->layer >= c.num_hidden_layers || !c.is_moe_layer(d->layer) ||
        d->top_k != c.num_experts_per_tok) {
      DMOE_LOG(kWarning, "expert-node") << "dropping dispatch from node " << m.from << " for layer " << d->layer
                                        << " with hidden_size " << d->hidden_size << ", top_k " << d->top_k
                                        << ": does not match the model";
      continue;
    }
    const int64_t layer = d->layer;
    by_layer[layer].push_back({std::move(m), std::move(*d), 0});
  }
  for (auto& [layer, items] : by_layer) {
    const int64_t k = c.num_experts_per_tok;
    int64_t n = 0;
    for (Item& it : items) {
      it.row_begin = n;
      n += it.dispatch.num_tokens;
    }
    std::vector<float> x(n * D), out(n * D);
    std::vector<int32_t> idx(n * k);
    std::vector<float> w(n * k);
    for (const Item& it : items) {
      std::copy(it.dispatch.hidden.begin(), it.dispatch.hidden.end(), x.begin() + it.row_begin * D);
      std::copy(it.dispatch.topk_idx.begin(), it.dispatch.topk_idx.end(), idx.begin() + it.row_begin * k);
      std::copy(it.dispatch.topk_weights.begin(), it.dispatch.topk_weights.end(), w.begin() + it.row_begin * k);
    }
    const absl::Time compute_start = absl::Now();
    absl::Status st = RoutedExpertsOnHost(*backend_, layer, x.data(), n, k, idx.data(), w.data(), out.data());
    if (!st.ok()) {
      DMOE_LOG(kWarning, "expert-node") << "layer " << layer << ": " << st << "; not answering";
      continue;
    }
    metrics::ExpertNode().LayerServed(n, static_cast<int64_t>(items.size()), absl::Now() - compute_start);
    {
      absl::MutexLock lock(&mu_);
      for (int32_t e : idx) {
        if (e >= 0 && e < E) ++load_[layer * E + e];
      }
      dispatches_ += static_cast<int64_t>(items.size());
    }
    for (const Item& it : items) {
      absl::StatusOr<std::vector<uint8_t>> reply = router::EncodePartialSums(
          layer, it.dispatch.step_id, D,
          absl::MakeConstSpan(out.data() + it.row_begin * D, it.dispatch.num_tokens * D));
      if (!reply.ok()) continue;
      absl::Status sent = transport_.Send(it.message.from, router::ReplyTag(it.message.tag), *reply);
      if (!sent.ok()) DMOE_LOG(kWarning, "expert-node") << "reply to node " << it.message.from << ": " << sent;
      messages_served_.fetch_add(1);
    }
  }
}

}  // namespace dmoe::expert
