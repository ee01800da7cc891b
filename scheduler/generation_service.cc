#include "scheduler/generation_service.h"

#include <cmath>
#include <deque>

#include "absl/strings/str_cat.h"
#include "core/log.h"
#include "core/sampling.h"
#include "core/metrics/metrics.h"
#include "proto/grpc_status.h"

namespace dmoe::scheduler {
namespace {

// A long-polling GetCluster answers this long before its call's deadline.
constexpr absl::Duration kLongPollMargin = absl::Seconds(1);
constexpr absl::Duration kLongPollMax = absl::Seconds(30);

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

namespace {

// One Generate call: RequestStream for the step loop, write reactor for
// gRPC. Owned by itself (until OnDone) and by the loop (until the finished
// event), so whichever lets go last frees it.
class GenerateCall final : public grpc::ServerWriteReactor<v1::GenerateResponse>, public RequestStream {
 public:
  GenerateCall(absl::Time arrival, std::string request_id, int prompt_tokens, bool want_logprobs)
      : RequestStream(arrival),
        request_id_(std::move(request_id)),
        prompt_tokens_(prompt_tokens),
        want_logprobs_(want_logprobs),
        request_metrics_(prompt_tokens) {}

  // Starts serving `id` on `loop` (self-owned from here), or ends the call
  // with the error.
  static GenerateCall* Begin(std::shared_ptr<GenerateCall> call, ServingLoop* loop, Request request) {
    GenerateCall* raw = call.get();
    {
      absl::MutexLock lock(&raw->mu_);  // before the loop or gRPC can call back
      raw->self_ = call;
      raw->loop_ = loop;
      raw->id_ = request.id;
    }
    if (absl::Status st = loop->Submit(std::move(request), call); !st.ok()) {
      metrics::Scheduler().RequestRejected(absl::StatusCodeToString(st.code()));
      raw->FinishWith(ToGrpcStatus(st));
    } else {
      raw->request_metrics_.Admitted();
    }
    return raw;
  }

  static GenerateCall* Refuse(std::shared_ptr<GenerateCall> call, const grpc::Status& status) {
    GenerateCall* raw = call.get();
    {
      absl::MutexLock lock(&raw->mu_);
      raw->self_ = call;
    }
    metrics::Scheduler().RequestRejected(absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())));
    raw->FinishWith(status);
    return raw;
  }

  void Push(RequestEvent e) override {
    v1::GenerateResponse response;
    response.set_request_id(request_id_);
    for (size_t i = 0; i < e.new_tokens.size(); ++i) {
      response.add_token_ids(e.new_tokens[i]);
      if (want_logprobs_ && i < e.samples.size()) {
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
    response.set_text(e.text_delta);
    absl::MutexLock lock(&mu_);
    completion_tokens_ += static_cast<int>(e.new_tokens.size());
    request_metrics_.Tokens(static_cast<int64_t>(e.new_tokens.size()));
    if (e.finished) {
      request_metrics_.Finished(FinishReasonName(e.reason), arrival(), first_scheduled(), first_token());
      finished_ = true;
      if (e.reason == FinishReason::kError) {
        // An error is the call's status, not text in an OK stream; the
        // tokens already streamed stay the client's.
        final_status_ = ToGrpcStatus(absl::Status(
            e.error_code == absl::StatusCode::kOk ? absl::StatusCode::kInternal : e.error_code, e.error));
        if (response.token_ids_size() == 0 && response.text().empty()) {
          NextLocked();
          return;
        }
      } else {
        response.set_finish_reason(ToProto(e.reason));
        response.set_error_message(e.error);
        v1::Usage* usage = response.mutable_usage();
        usage->set_prompt_tokens(prompt_tokens_);
        usage->set_completion_tokens(completion_tokens_);
        if (first_scheduled() != absl::InfiniteFuture()) {
          usage->set_queue_time_seconds(absl::ToDoubleSeconds(first_scheduled() - arrival()));
        }
        if (first_token() != absl::InfiniteFuture()) {
          usage->set_time_to_first_token_seconds(absl::ToDoubleSeconds(first_token() - arrival()));
        }
      }
    }
    pending_.push_back(std::move(response));
    NextLocked();
  }

  // Cancel is called with mu_ held and only before the finished event: the
  // loop, which pushes a finished event to every stream before it goes
  // away, is then still there.
  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok && !done_writing_) {
      // The client is gone: stop the request (its pages are freed next step).
      pending_.clear();
      if (!finished_ && loop_ != nullptr) loop_->Cancel(id_);
      finished_ = true;
      final_status_ = ToGrpcStatus(absl::CancelledError("the client went away"));
    }
    NextLocked();
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    if (!finished_ && loop_ != nullptr) loop_->Cancel(id_);  // ends with a kCancelled event
  }

  void OnDone() override {
    std::shared_ptr<GenerateCall> self;  // freed on return (or later by the loop), after the lock
    absl::MutexLock lock(&mu_);
    done_ = true;
    self.swap(self_);
  }

 private:
  // Starts the next write, or the finish once everything is written.
  void NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || done_writing_ || done_) return;
    if (!pending_.empty()) {
      current_ = std::move(pending_.front());
      pending_.pop_front();
      writing_ = true;
      StartWrite(&current_);
    } else if (finished_) {
      done_writing_ = true;
      Finish(final_status_);
    }
  }

  void FinishWith(const grpc::Status& status) {
    absl::MutexLock lock(&mu_);
    finished_ = true;
    final_status_ = status;
    NextLocked();
  }

  const std::string request_id_;
  const int prompt_tokens_;
  const bool want_logprobs_;
  absl::Mutex mu_;
  ServingLoop* loop_ ABSL_GUARDED_BY(mu_) = nullptr;
  RequestId id_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<GenerateCall> self_ ABSL_GUARDED_BY(mu_);
  std::deque<v1::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  v1::GenerateResponse current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;      // the last event arrived
  bool done_writing_ ABSL_GUARDED_BY(mu_) = false;  // Finish called
  bool done_ ABSL_GUARDED_BY(mu_) = false;          // OnDone
  int completion_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
  metrics::RequestMetrics request_metrics_ ABSL_GUARDED_BY(mu_);  // Admitted() needs no lock
};

}  // namespace

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(grpc::CallbackServerContext* context,
                                                                             const v1::GenerateRequest* request) {
  ServingLoop* loop = loop_.load();
  const int64_t id = next_id_.fetch_add(1);
  const std::string request_id = request->request_id().empty() ? absl::StrCat("req-", id) : request->request_id();
  auto refuse = [&](const grpc::Status& status) {
    return GenerateCall::Refuse(std::make_shared<GenerateCall>(absl::Now(), request_id, 0, false), status);
  };
  if (draining_.load()) {
    return refuse(ToGrpcStatus(absl::UnavailableError("server is draining; not accepting requests")));
  }
  if (loop == nullptr) return refuse(ToGrpcStatus(absl::UnavailableError("cluster is not ready yet")));
  absl::StatusOr<Request> q = ValidateGenerateRequest(*request, config_, tokenizer_, model_name_);
  if (!q.ok()) return refuse(ToGrpcStatus(q.status()));
  q->id = id;
  q->arrival = absl::Now();
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) q->deadline = absl::FromChrono(deadline);
  // top_logprobs: -1 none, 0 the chosen token's logprob only, n > 0 also the top n.
  auto call = std::make_shared<GenerateCall>(q->arrival, request_id, static_cast<int>(q->prompt.size()),
                                             request->top_logprobs() >= 0);
  return GenerateCall::Begin(std::move(call), loop, std::move(*q));
}

grpc::Status GenerationService::Tokenize(grpc::ServerContext*, const v1::TokenizeRequest* request,
                                         v1::TokenizeResponse* response) {
  if (!request->model().empty() && request->model() != model_name_) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("unknown model '", request->model(), "' (serving '", model_name_, "')")));
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

grpc::Status CoordinatorService::GetCluster(grpc::ServerContext* context, const v1::GetClusterRequest* request,
                                            v1::GetClusterResponse* response) {
  const absl::Time deadline = std::min(absl::FromChrono(context->deadline()) - kLongPollMargin,
                                       absl::Now() + kLongPollMax);
  *response = coordinator_.GetCluster(*request, deadline);
  return grpc::Status::OK;
}

grpc::Status CoordinatorService::ReportExpertLoad(grpc::ServerContext*, const v1::ExpertLoadReport* request,
                                                  v1::ExpertLoadAck*) {
  return ToGrpcStatus(coordinator_.ReportExpertLoad(*request));
}

grpc::Status CoordinatorService::GetClusterStats(grpc::ServerContext*, const v1::GetClusterStatsRequest*,
                                                 v1::GetClusterStatsResponse* response) {
  ServingLoop* loop = loop_.load();
  if (loop == nullptr) return ToGrpcStatus(absl::FailedPreconditionError("cluster is not ready yet"));
  *response = loop->Stats();
  return grpc::Status::OK;
}

}  // namespace dmoe::scheduler
