// dmoe generate --server | bench: clients of a running cluster's Generation
// service (proto/dmoe/v1/generation.proto). Output formats: docs/cli.md.
#include <grpc/support/log.h>
#include <grpcpp/client_context.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <optional>
#include <set>
#include <random>
#include <thread>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "cli/bench_stats.h"
#include "cli/commands.h"
#include "core/flags/flags.h"
#include "cli/generate_flags.h"
#include "cli/grpc_client.h"
#include "core/sampling.h"
#include "core/status_macros.h"
#include "dmoe/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "proto/grpc_credentials.h"

namespace dmoe::cli {
namespace {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Flags of both commands: the server's address and TLS towards it.
const std::set<std::string> kServerFlags = {"server", "tls-ca", "tls-cert", "tls-key", "tls-server-name"};

std::set<std::string> WithServerFlags(std::set<std::string> flags) {
  flags.insert(kServerFlags.begin(), kServerFlags.end());
  return flags;
}

// A Generation stub for --server, over TLS when --tls-ca or --tls-cert is given.
absl::StatusOr<std::unique_ptr<v1::Generation::Stub>> DialServer(const Flags& flags, const std::string& server) {
  // gRPC core logs a failed handshake on its own; the call's status says the
  // same, and the CLI reports errors in one line.
  gpr_set_log_function([](gpr_log_func_args*) {});
  DMOE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                        MakeChannelCredentials({.cert = flags.Get("tls-cert").value_or(""),
                                                .key = flags.Get("tls-key").value_or(""),
                                                .ca = flags.Get("tls-ca").value_or("")}));
  return v1::Generation::NewStub(DialScheduler(server, credentials, flags.Get("tls-server-name").value_or("")));
}

// The generated part of one streamed Generate call.
struct StreamedGeneration {
  std::vector<int32_t> ids;
  std::string text;
};

// Reads a Generate stream to its end; `on_response` sees each response as it
// arrives. A failed call or a FINISH_REASON_ERROR response is an error.
absl::StatusOr<StreamedGeneration> StreamGenerate(v1::Generation::Stub& stub, const std::string& server,
                                                  const v1::GenerateRequest& request,
                                                  const std::function<void(const v1::GenerateResponse&)>& on_response) {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub.Generate(&context, request);
  StreamedGeneration out;
  v1::GenerateResponse response;
  std::optional<std::string> server_error;
  while (reader->Read(&response)) {
    out.ids.insert(out.ids.end(), response.token_ids().begin(), response.token_ids().end());
    out.text += response.text();
    if (on_response) on_response(response);
    if (response.finish_reason() == v1::FINISH_REASON_ERROR) server_error = response.error_message();
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) return RpcError("Generate", server, status);
  if (server_error.has_value()) {
    return absl::InternalError(absl::StrCat(
        "Generate on ", server, " finished with an error: ", server_error->empty() ? "(no message)" : *server_error));
  }
  return out;
}

}  // namespace

absl::Status RunGenerateRemote(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args,
                                                  WithServerFlags({"prompt", "ids", "max-tokens", "temperature",
                                                                   "top-p", "top-k", "min-p", "seed", "stop"}),
                                                  {"json", "ignore-eos"}));
  DMOE_ASSIGN_OR_RETURN(std::string server, flags.Require("server"));
  DMOE_RETURN_IF_ERROR(ValidateServerAddress("server", server));
  if (flags.Has("prompt") == flags.Has("ids")) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT or --ids 1,2,3");
  }
  // The same defaults and checks as the offline form (RunGenerate).
  DMOE_ASSIGN_OR_RETURN(GenerateFlags g, ParseGenerateFlags(flags));
  const SamplingParams& sampling = g.sampling;

  v1::GenerateRequest request;
  if (flags.Has("ids")) {
    DMOE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, flags.GetIds("ids"));
    request.mutable_token_ids()->mutable_ids()->Assign(ids.begin(), ids.end());
  } else {
    request.set_text(*flags.Get("prompt"));
  }
  request.set_max_tokens(static_cast<int32_t>(g.max_tokens));
  request.mutable_sampling()->set_temperature(sampling.temperature);
  request.mutable_sampling()->set_top_p(sampling.top_p);
  request.mutable_sampling()->set_top_k(sampling.top_k);
  request.mutable_sampling()->set_min_p(sampling.min_p);
  request.mutable_sampling()->set_seed(sampling.seed);
  if (auto stop = flags.Get("stop"); stop.has_value()) request.add_stop(*stop);
  request.set_ignore_eos(g.ignore_eos);
  request.set_top_logprobs(-1);

  const bool as_json = flags.Has("json");
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<v1::Generation::Stub> stub, DialServer(flags, server));
  bool streamed_any = false;
  absl::StatusOr<StreamedGeneration> result =
      StreamGenerate(*stub, server, request, [&](const v1::GenerateResponse& response) {
        if (as_json || response.text().empty()) return;
        std::cout << response.text() << std::flush;
        streamed_any = true;
      });
  if (!result.ok()) {
    if (streamed_any) std::cout << std::endl;  // keep the partial text's line whole
    return result.status();
  }
  if (as_json) {
    std::cout << json{{"ids", result->ids}, {"text", result->text}}.dump() << "\n";
  } else {
    std::cout << std::endl;
  }
  return absl::OkStatus();
}

namespace {

struct BenchOptions {
  std::string server;
  int64_t concurrency = 1;
  int64_t requests = 16;
  int64_t prompt_len = 32;
  int64_t max_tokens = 32;
  uint64_t seed = 0;
};

// What the client threads record, under `mu`.
struct BenchRecord {
  const Clock::time_point start = Clock::now();
  absl::Mutex mu;
  int printed_decile ABSL_GUARDED_BY(mu) = 0;
  int64_t done ABSL_GUARDED_BY(mu) = 0;
  int64_t errors ABSL_GUARDED_BY(mu) = 0;
  int64_t output_tokens ABSL_GUARDED_BY(mu) = 0;
  int64_t prompt_tokens ABSL_GUARDED_BY(mu) = 0;
  std::vector<double> ttft_s ABSL_GUARDED_BY(mu);
  std::vector<double> itl_s ABSL_GUARDED_BY(mu);
  absl::Status first_error ABSL_GUARDED_BY(mu);
};

// Random prompts, the same for the same seed: ids in [2, vocab_size)
// (0 and 1 are BOS/EOS in DeepSeek's vocabularies).
std::vector<std::vector<int32_t>> MakePrompts(const BenchOptions& opts, int64_t vocab_size) {
  std::mt19937_64 rng(opts.seed);
  const uint64_t span = static_cast<uint64_t>(vocab_size - 2);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(opts.requests));
  for (auto& p : prompts) {
    p.resize(static_cast<size_t>(opts.prompt_len));
    for (int32_t& id : p) id = static_cast<int32_t>(2 + rng() % span);
  }
  return prompts;
}

// One request: TTFT from the send to the first response with tokens; each
// later response adds (gap since the previous one) / (its tokens) once per
// token to the inter-token latencies.
void RunOneRequest(v1::Generation::Stub& stub, const BenchOptions& opts, const std::vector<int32_t>& prompt,
                   BenchRecord& record) {
  v1::GenerateRequest request;
  request.mutable_token_ids()->mutable_ids()->Assign(prompt.begin(), prompt.end());
  request.set_max_tokens(static_cast<int32_t>(opts.max_tokens));
  request.set_ignore_eos(true);
  request.set_top_logprobs(-1);
  std::vector<double> itl;
  double ttft = -1.0;
  const Clock::time_point start = Clock::now();
  Clock::time_point last = start;
  absl::StatusOr<StreamedGeneration> result =
      StreamGenerate(stub, opts.server, request, [&](const v1::GenerateResponse& response) {
        const Clock::time_point now = Clock::now();
        const int n = response.token_ids_size();
        if (n == 0) return;
        if (ttft < 0) {
          ttft = Seconds(now - start);
        } else {
          itl.insert(itl.end(), static_cast<size_t>(n), Seconds(now - last) / n);
        }
        last = now;
      });
  absl::MutexLock lock(&record.mu);
  ++record.done;
  if (!result.ok()) {
    if (record.errors++ == 0) record.first_error = result.status();
  } else {
    record.output_tokens += static_cast<int64_t>(result->ids.size());
    record.prompt_tokens += static_cast<int64_t>(prompt.size());
    if (ttft >= 0) record.ttft_s.push_back(ttft);
    record.itl_s.insert(record.itl_s.end(), itl.begin(), itl.end());
  }
  // One progress line per 10% done.
  const int decile = static_cast<int>(record.done * 10 / opts.requests);
  if (decile > record.printed_decile) {
    record.printed_decile = decile;
    std::fprintf(stderr, "dmoe bench: %3d%% (%" PRId64 "/%" PRId64 " requests, %" PRId64 " errors, %.1f s)\n",
                 decile * 10, record.done, opts.requests, record.errors, Seconds(Clock::now() - record.start));
  }
}

json SummaryJson(const LatencySummary& s) { return {{"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}}; }

std::string Ms(double seconds) { return std::isnan(seconds) ? "-" : absl::StrFormat("%.2f", seconds * 1e3); }

}  // namespace

absl::Status RunBench(const std::vector<std::string>& args) {
  DMOE_ASSIGN_OR_RETURN(
      Flags flags,
      Flags::Parse(args, WithServerFlags({"concurrency", "requests", "prompt-len", "max-tokens", "seed"}), {"json"}));
  BenchOptions opts;
  DMOE_ASSIGN_OR_RETURN(opts.server, flags.Require("server"));
  DMOE_RETURN_IF_ERROR(ValidateServerAddress("server", opts.server));
  DMOE_ASSIGN_OR_RETURN(opts.concurrency, flags.GetInt("concurrency", opts.concurrency));
  DMOE_ASSIGN_OR_RETURN(opts.requests, flags.GetInt("requests", opts.requests));
  DMOE_ASSIGN_OR_RETURN(opts.prompt_len, flags.GetInt("prompt-len", opts.prompt_len));
  DMOE_ASSIGN_OR_RETURN(opts.max_tokens, flags.GetInt("max-tokens", opts.max_tokens));
  DMOE_ASSIGN_OR_RETURN(int64_t seed, flags.GetInt("seed", 0));
  opts.seed = static_cast<uint64_t>(seed);
  for (const auto& [name, value, max] : {std::tuple{"concurrency", opts.concurrency, int64_t{4096}},
                                         std::tuple{"requests", opts.requests, int64_t{1} << 24},
                                         std::tuple{"prompt-len", opts.prompt_len, int64_t{INT32_MAX}},
                                         std::tuple{"max-tokens", opts.max_tokens, int64_t{INT32_MAX}}}) {
    if (value < 1 || value > max) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " = ", value, " must be in 1..", max));
    }
  }
  const bool as_json = flags.Has("json");

  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<v1::Generation::Stub> stub, DialServer(flags, opts.server));
  v1::ModelInfo info;
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoSeconds(kConnectTimeout));
    const grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
    if (!status.ok()) return RpcError("GetModelInfo", opts.server, status);
  }
  if (info.vocab_size() <= 2) {
    return absl::FailedPreconditionError(
        absl::StrCat(opts.server, " serves a model with vocab_size ", info.vocab_size(), ": no ids to sample from"));
  }
  if (info.max_position_embeddings() > 0 && opts.prompt_len + opts.max_tokens > info.max_position_embeddings()) {
    return absl::InvalidArgumentError(absl::StrCat("--prompt-len ", opts.prompt_len, " + --max-tokens ",
                                                   opts.max_tokens, " exceeds the context of ", info.name(),
                                                   " (max_position_embeddings ", info.max_position_embeddings(), ")"));
  }
  const std::vector<std::vector<int32_t>> prompts = MakePrompts(opts, info.vocab_size());

  BenchRecord record;
  std::atomic<int64_t> next{0};
  std::vector<std::thread> clients;
  for (int64_t c = 0; c < std::min(opts.concurrency, opts.requests); ++c) {
    clients.emplace_back([&] {
      for (int64_t i = next++; i < opts.requests; i = next++) {
        RunOneRequest(*stub, opts, prompts[static_cast<size_t>(i)], record);
      }
    });
  }
  for (std::thread& t : clients) t.join();
  const double duration = Seconds(Clock::now() - record.start);

  absl::MutexLock lock(&record.mu);
  const LatencySummary ttft = Summarize(record.ttft_s);
  const LatencySummary itl = Summarize(record.itl_s);
  const double output_tps = duration > 0 ? static_cast<double>(record.output_tokens) / duration : 0.0;
  const double total_tps =
      duration > 0 ? static_cast<double>(record.output_tokens + record.prompt_tokens) / duration : 0.0;
  if (as_json) {
    std::cout << json{{"requests", opts.requests},
                      {"concurrency", opts.concurrency},
                      {"prompt_len", opts.prompt_len},
                      {"max_tokens", opts.max_tokens},
                      {"duration_s", duration},
                      {"output_tokens_per_s", output_tps},
                      {"total_tokens_per_s", total_tps},
                      {"ttft_s", SummaryJson(ttft)},
                      {"itl_s", SummaryJson(itl)},
                      {"errors", record.errors},
                      {"output_tokens", record.output_tokens}}
                     .dump()
              << "\n";
  } else {
    std::cout << absl::StrFormat("server              %s (%s, %d attention / %d expert nodes, balance %s)\n",
                                 opts.server, info.name(), info.attention_nodes(), info.expert_nodes(),
                                 info.balance_mode().empty() ? "-" : info.balance_mode())
              << absl::StrFormat("requests            %d (%d errors), concurrency %d\n", opts.requests, record.errors,
                                 opts.concurrency)
              << absl::StrFormat("tokens per request  %d prompt + %d generated\n", opts.prompt_len, opts.max_tokens)
              << absl::StrFormat("duration            %.3f s\n", duration)
              << absl::StrFormat("output tokens/s     %.1f\n", output_tps)
              << absl::StrFormat("total tokens/s      %.1f\n", total_tps)
              << absl::StrFormat("%-20s%10s%10s%10s\n", "latency (ms)", "p50", "p90", "p99")
              << absl::StrFormat("%-20s%10s%10s%10s\n", "time to first token", Ms(ttft.p50), Ms(ttft.p90), Ms(ttft.p99))
              << absl::StrFormat("%-20s%10s%10s%10s\n", "inter-token", Ms(itl.p50), Ms(itl.p90), Ms(itl.p99));
  }
  std::cout << std::flush;
  if (record.errors > 0) {
    return absl::Status(record.first_error.code(),
                        absl::StrCat(record.errors, " of ", opts.requests,
                                     " requests failed; the first: ", record.first_error.message()));
  }
  return absl::OkStatus();
}

}  // namespace dmoe::cli
