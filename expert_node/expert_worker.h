// The expert node's data-plane loop: receives dispatches from attention
// nodes over the transport, runs the local routed experts (each expert once
// over all the tokens routed to it in the messages at hand), and sends back
// each token's weighted partial sum. Counts tokens per expert for the
// balancer's load reports.
#ifndef DMOE_EXPERT_NODE_EXPERT_WORKER_H_
#define DMOE_EXPERT_NODE_EXPERT_WORKER_H_

#include <atomic>
#include <cstdint>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "core/compute_backend.h"
#include "core/mlp.h"
#include "core/model_weights.h"
#include "transport/transport.h"

namespace dmoe::expert {

// Owns nothing it is given (weights and transport outlive it). Run() is
// called from one thread; Stop(), TakeLoad() and the counters from any.
class ExpertWorker {
 public:
  // Experts on the CPU, from `weights`.
  ExpertWorker(const ModelWeights& weights, transport::Transport& transport);
  // Experts resident where `backend` computes (CPU or GPU).
  ExpertWorker(std::shared_ptr<ComputeBackend> backend, transport::Transport& transport);

  // Serves until Stop(). Messages that arrive together are grouped, so every
  // local expert runs once over all their tokens. A malformed message is
  // logged and dropped (its sender times out with an error naming this node).
  void Run();
  // Ends Run() (through Transport::StopReceiving: the transport receives
  // nothing more).
  void Stop() { transport_.StopReceiving(); }

  // Tokens routed to each local expert since the previous call:
  // [num_hidden_layers * n_routed_experts]; `steps` gets the number of
  // dispatches served.
  std::vector<int64_t> TakeLoad(int64_t* dispatches);
  int64_t messages_served() const { return messages_served_.load(); }

 private:
  void Serve(std::vector<transport::Message> batch);

  std::shared_ptr<ComputeBackend> backend_;
  const ModelWeights& weights_;
  transport::Transport& transport_;
  std::atomic<int64_t> messages_served_{0};
  absl::Mutex mu_;
  std::vector<int64_t> load_ ABSL_GUARDED_BY(mu_);
  int64_t dispatches_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace dmoe::expert

#endif  // DMOE_EXPERT_NODE_EXPERT_WORKER_H_
