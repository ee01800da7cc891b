// The one-process deployment of the MoE data plane: M expert workers on
// threads of this process behind an in-process transport, reached through
// the same RemoteExperts backend an attention node uses. `dmoe generate
// --model DIR` runs the cluster's step code this way.
#ifndef DMOE_CORE_IN_PROCESS_IN_PROCESS_EXPERTS_H_
#define DMOE_CORE_IN_PROCESS_IN_PROCESS_EXPERTS_H_

#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_node/remote_experts.h"
#include "core/model_weights.h"
#include "expert_node/expert_worker.h"
#include "router/expert_placement.h"
#include "transport/in_process_transport.h"

namespace dmoe::in_process {

// Owns the fabric, the workers and their threads; stops and joins them on
// destruction. `weights` (with every routed expert loaded, or at least those
// the placement puts on any node) must outlive it.
class InProcessExperts {
 public:
  static absl::StatusOr<std::unique_ptr<InProcessExperts>> Create(const ModelWeights& weights,
                                                                   const router::ExpertPlacement& placement);
  ~InProcessExperts();

  attention::RemoteExperts& backend() { return *backend_; }

 private:
  InProcessExperts() = default;
  transport::InProcessFabric fabric_;
  std::unique_ptr<transport::Transport> attention_endpoint_;
  std::vector<std::unique_ptr<transport::Transport>> expert_endpoints_;
  std::vector<std::unique_ptr<expert::ExpertWorker>> workers_;
  std::vector<std::thread> threads_;
  std::unique_ptr<attention::RemoteExperts> backend_;
};

}  // namespace dmoe::in_process

#endif  // DMOE_CORE_IN_PROCESS_IN_PROCESS_EXPERTS_H_
