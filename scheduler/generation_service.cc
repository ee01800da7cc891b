#include "scheduler/generation_service.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/sampling.h"
#include "metrics/metrics.h"
#include "proto/grpc_status.h"

namespace dmoe::scheduler {
namespace {

// How often a waiting Generate call checks for client cancellation.
constexpr absl::Duration kPollInterval = absl::Milliseconds(20);

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kError: return v1::FINISH_REASON_ERROR;
  }
  return v1::FINISH_REASON_ERROR;
}

}  // namespace

absl::StatusOr<Request> ValidateGenerateRequest(const v1::GenerateRequest& r, const ModelConfig& config,
                                                const Tokenizer& tokenizer, const std::string& model_name) {
  if (!r.model().empty() && r.model() != model_name) {
    return absl::InvalidArgumentError(absl::StrCat("unknown model '", r.model(), "' (serving '", model_name, "')"));
  }
  Request q;
  switch (r.prompt_case()) {
    case v1::GenerateRequest::kText: {
      absl::StatusOr<std::vector<int32_t>> ids = tokenizer.EncodeChecked(r.text());
      if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("prompt text: ", ids.status().message()));
      if (ids->empty()) return absl::InvalidArgumentError("prompt is empty");
      q.prompt = std::move(*ids);
      if (tokenizer.add_bos_token() && tokenizer.bos_token_id().has_value()) {
        q.prompt.insert(q.prompt.begin(), *tokenizer.bos_token_id());
      }
      break;
    }
    case v1::GenerateRequest::kTokenIds:
      q.prompt.assign(r.token_ids().ids().begin(), r.token_ids().ids().end());
      if (q.prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
      for (size_t i = 0; i < q.prompt.size(); ++i) {
        if (q.prompt[i] < 0 || q.prompt[i] >= config.vocab_size) {
          return absl::InvalidArgumentError(absl::StrCat("token id ", q.prompt[i], " at position ", i,
                                                         " is outside the vocabulary [0, ", config.vocab_size, ")"));
        }
      }
      break;
    default:
      return absl::InvalidArgumentError("prompt is empty (set text or token_ids)");
  }
  const int64_t context = config.max_position_embeddings;
  if (static_cast<int64_t>(q.prompt.size()) >= context) {
    return absl::ResourceExhaustedError(absl::StrCat("prompt of ", q.prompt.size(),
                                                     " tokens does not fit the context of ", context, " positions"));
  }
  if (r.max_tokens() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens = ", r.max_tokens(), " must be at least 1"));
  }
  if (static_cast<int64_t>(q.prompt.size()) + r.max_tokens() > context) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens = ", r.max_tokens(), " with a prompt of ",
                                                   q.prompt.size(), " tokens exceeds the context of ", context,
                                                   " positions"));
  }
  q.max_tokens = r.max_tokens();
  const v1::SamplingParams& s = r.sampling();
  q.sampling.temperature = s.temperature();
  q.sampling.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  q.sampling.top_k = s.top_k();
  q.sampling.min_p = s.min_p();
  q.sampling.seed = s.has_seed() ? s.seed() : 0;
  if (r.top_logprobs() < -1 || r.top_logprobs() > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("top_logprobs = ", r.top_logprobs(), " outside [-1, ",
                                                   kMaxTopLogprobs, "]"));
  }
  q.sampling.top_logprobs = std::max(0, r.top_logprobs());
  absl::Status st = ValidateSamplingParams(q.sampling);
  if (!st.ok()) return st;
  for (int32_t id : r.stop_token_ids()) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("stop token id ", id, " is outside the vocabulary"));
    }
    q.stop_token_ids.push_back(id);
  }
  for (const std::string& stop : r.stop()) {
    if (stop.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
    q.stop.push_back(stop);
  }
  q.eos_token_ids = config.eos_token_ids;
  q.ignore_eos = r.ignore_eos();
  return q;
}

grpc::Status GenerationService::Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                                         grpc::ServerWriter<v1::GenerateResponse>* writer) {
  ServingLoop* loop = loop_.load();
  auto reject = [](const absl::Status& status) {
    metrics::Scheduler().RequestRejected(absl::StatusCodeToString(status.code()));
    return ToGrpcStatus(status);
  };
  if (draining_.load()) return reject(absl::UnavailableError("server is draining; not accepting requests"));
  if (loop == nullptr) return reject(absl::UnavailableError("cluster is not ready yet"));
  absl::StatusOr<Request> q = ValidateGenerateRequest(*request, config_, tokenizer_, model_name_);
  if (!q.ok()) return reject(q.status());
  q->id = next_id_.fetch_add(1);
  q->arrival = absl::Now();
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) q->deadline = absl::FromChrono(deadline);
  const std::string request_id = request->request_id().empty() ? absl::StrCat("req-", q->id) : request->request_id();
  const int prompt_tokens = static_cast<int>(q->prompt.size());
  // top_logprobs: -1 none, 0 the chosen token's logprob only, n > 0 also the top n.
  const bool want_logprobs = request->top_logprobs() >= 0;
  const RequestId id = q->id;
  absl::StatusOr<std::shared_ptr<RequestStream>> stream = loop->Submit(std::move(*q));
  if (!stream.ok()) return reject(stream.status());
  metrics::RequestMetrics request_metrics(prompt_tokens);

  int completion_tokens = 0;
  for (;;) {
    RequestEvent e;
    if (!(*stream)->Pop(&e, kPollInterval)) {
      if (context->IsCancelled()) loop->Cancel(id);
      continue;
    }
    v1::GenerateResponse response;
    response.set_request_id(request_id);
    for (size_t i = 0; i < e.new_tokens.size(); ++i) {
      response.add_token_ids(e.new_tokens[i]);
      if (want_logprobs && i < e.samples.size()) {
        v1::SampledToken* t = response.add_logprobs();
        t->set_token_id(e.samples[i].token);
        t->set_logprob(e.samples[i].logprob);
        for (const auto& [tok, lp] : e.samples[i].top) {
          v1::TokenLogprob* top = t->add_top_logprobs();
          top->set_token_id(tok);
          top->set_logprob(lp);
        }
      }
    }
    completion_tokens += static_cast<int>(e.new_tokens.size());
    request_metrics.Tokens(static_cast<int64_t>(e.new_tokens.size()));
    response.set_text(e.text_delta);
    if (e.finished) {
      request_metrics.Finished(FinishReasonName(e.reason), (*stream)->arrival(), (*stream)->first_scheduled(),
                               (*stream)->first_token());
      response.set_finish_reason(ToProto(e.reason));
      response.set_error_message(e.error);
      v1::Usage* usage = response.mutable_usage();
      usage->set_prompt_tokens(prompt_tokens);
      usage->set_completion_tokens(completion_tokens);
      const absl::Time arrival = (*stream)->arrival();
      if ((*stream)->first_scheduled() != absl::InfiniteFuture()) {
        usage->set_queue_time_seconds(absl::ToDoubleSeconds((*stream)->first_scheduled() - arrival));
      }
      if ((*stream)->first_token() != absl::InfiniteFuture()) {
        usage->set_time_to_first_token_seconds(absl::ToDoubleSeconds((*stream)->first_token() - arrival));
      }
    }
    if (!writer->Write(response)) {
      loop->Cancel(id);  // the client is gone; its pages are freed next step
      if (e.finished) break;
      continue;
    }
    if (e.finished) break;
  }
  return grpc::Status::OK;
}

grpc::Status GenerationService::Tokenize(grpc::ServerContext*, const v1::TokenizeRequest* request,
                                         v1::TokenizeResponse* response) {
  if (!request->model().empty() && request->model() != model_name_) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("unknown model '", request->model(), "' (serving '", model_name_, "')"));
  }
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer_.EncodeChecked(request->text());
  if (!ids.ok()) return ToGrpcStatus(ids.status());
  if (request->add_special_tokens() && tokenizer_.add_bos_token() && tokenizer_.bos_token_id().has_value()) {
    response->add_ids(*tokenizer_.bos_token_id());
  }
  for (int32_t id : *ids) response->add_ids(id);
  return grpc::Status::OK;
}

grpc::Status GenerationService::GetModelInfo(grpc::ServerContext*, const v1::GetModelInfoRequest*,
                                             v1::ModelInfo* info) {
  info->set_name(model_name_);
  info->set_model_type(config_.model_type_name);
  info->set_vocab_size(config_.vocab_size);
  info->set_max_position_embeddings(config_.max_position_embeddings);
  info->set_num_hidden_layers(config_.num_hidden_layers);
  info->set_n_routed_experts(config_.n_routed_experts);
  info->set_num_experts_per_tok(config_.num_experts_per_tok);
  info->set_attention_nodes(num_attention_nodes_);
  info->set_expert_nodes(num_expert_nodes_);
  ServingLoop* loop = loop_.load();
  info->set_balance_mode(loop ? router::BalanceModeName(loop->balancer_options().mode) : "off");
  return grpc::Status::OK;
}

grpc::Status CoordinatorService::RegisterNode(grpc::ServerContext*, const v1::RegisterNodeRequest* request,
                                              v1::RegisterNodeResponse* response) {
  absl::StatusOr<v1::RegisterNodeResponse> r = coordinator_.RegisterNode(*request);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = std::move(*r);
  return grpc::Status::OK;
}

grpc::Status CoordinatorService::NodeReady(grpc::ServerContext*, const v1::NodeReadyRequest* request,
                                           v1::NodeReadyResponse*) {
  return ToGrpcStatus(coordinator_.NodeReady(*request));
}

grpc::Status CoordinatorService::GetCluster(grpc::ServerContext*, const v1::GetClusterRequest*,
                                            v1::GetClusterResponse* response) {
  *response = coordinator_.GetCluster();
  return grpc::Status::OK;
}

grpc::Status CoordinatorService::ReportExpertLoad(grpc::ServerContext*, const v1::ExpertLoadReport* request,
                                                  v1::ExpertLoadAck*) {
  return ToGrpcStatus(coordinator_.ReportExpertLoad(*request));
}

grpc::Status CoordinatorService::GetClusterStats(grpc::ServerContext*, const v1::GetClusterStatsRequest*,
                                                 v1::GetClusterStatsResponse* response) {
  ServingLoop* loop = loop_.load();
  if (loop == nullptr) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "cluster is not ready yet");
  *response = loop->Stats();
  return grpc::Status::OK;
}

}  // namespace dmoe::scheduler
