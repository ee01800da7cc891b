// The client API (dmoe.v1.Generation) and the coordinator's control RPCs,
// as gRPC services over Coordinator and ServingLoop. Request validation
// lives here: every bad request is answered INVALID_ARGUMENT (or
// RESOURCE_EXHAUSTED when it is about size) naming the problem.
#ifndef DMOE_SCHEDULER_GENERATION_SERVICE_H_
#define DMOE_SCHEDULER_GENERATION_SERVICE_H_

#include <atomic>
#include <memory>
#include <string>

#include "core/config.h"
#include "core/tokenizer.h"
#include "dmoe/v1/control.grpc.pb.h"
#include "dmoe/v1/generation.grpc.pb.h"
#include "scheduler/coordinator.h"
#include "scheduler/serving_loop.h"

namespace dmoe::scheduler {

// Turns a GenerateRequest into a scheduler Request, or says what is wrong.
absl::StatusOr<Request> ValidateGenerateRequest(const v1::GenerateRequest& request, const ModelConfig& config,
                                                const Tokenizer& tokenizer, const std::string& model_name);

// Generate runs on gRPC's callback API: the step loop pushes each event to
// the call's reactor, which writes it; a client cancel or deadline reaches
// the loop through the reactor's OnCancel. No thread waits per call. A
// request that fails ends its call with the failure's status (UNAVAILABLE
// naming the lost node, ...), after the tokens it got.
class GenerationService final : public v1::Generation::WithCallbackMethod_Generate<v1::Generation::Service> {
 public:
  GenerationService(const ModelConfig& config, const Tokenizer& tokenizer, std::string model_name,
                    int num_attention_nodes, int num_expert_nodes)
      : config_(config),
        tokenizer_(tokenizer),
        model_name_(std::move(model_name)),
        num_attention_nodes_(num_attention_nodes),
        num_expert_nodes_(num_expert_nodes) {}

  // The loop exists once the cluster is ready; until then Generate answers
  // UNAVAILABLE. After Drain(), new requests are refused.
  void SetLoop(ServingLoop* loop) { loop_.store(loop); }
  void Drain() { draining_.store(true); }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* context,
                                                           const v1::GenerateRequest* request) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const v1::TokenizeRequest* request,
                        v1::TokenizeResponse* response) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                            v1::ModelInfo* response) override;

 private:
  const ModelConfig& config_;
  const Tokenizer& tokenizer_;
  const std::string model_name_;
  const int num_attention_nodes_, num_expert_nodes_;
  std::atomic<ServingLoop*> loop_{nullptr};
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> next_id_{1};
};

class CoordinatorService final : public v1::Coordinator::Service {
 public:
  explicit CoordinatorService(Coordinator& coordinator) : coordinator_(coordinator) {}
  void SetLoop(ServingLoop* loop) { loop_.store(loop); }

  grpc::Status RegisterNode(grpc::ServerContext*, const v1::RegisterNodeRequest* request,
                            v1::RegisterNodeResponse* response) override;
  grpc::Status NodeReady(grpc::ServerContext*, const v1::NodeReadyRequest* request,
                         v1::NodeReadyResponse* response) override;
  // A long poll with wait_past_epoch: answers before the call's deadline.
  grpc::Status GetCluster(grpc::ServerContext* context, const v1::GetClusterRequest* request,
                          v1::GetClusterResponse* response) override;
  grpc::Status ReportExpertLoad(grpc::ServerContext*, const v1::ExpertLoadReport* request,
                                v1::ExpertLoadAck* response) override;
  grpc::Status GetClusterStats(grpc::ServerContext*, const v1::GetClusterStatsRequest* request,
                               v1::GetClusterStatsResponse* response) override;

 private:
  Coordinator& coordinator_;
  std::atomic<ServingLoop*> loop_{nullptr};
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_GENERATION_SERVICE_H_
