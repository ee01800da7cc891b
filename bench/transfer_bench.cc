// The MoE data plane's transfer time per layer, transport by transport, in one run: an
// "attention" rank sends each MoE layer's dispatch (real router wire format, DeepSeek-V2-Lite
// dims by default) to an "expert" rank, which answers with the layer's partial sums at once (no
// expert compute), so a layer's round trip is pure transfer. Transports: in-process (the
// baseline: a copy), UCX (host memory; shared memory or tcp here) and, where built and 2 GPUs
// are visible, NCCL (GPU 0 <-> GPU 1, host payloads staged through device memory), whose
// per-Send GPU time (CUDA events around the staging copy and ncclSend) is reported as well.
//
//   transfer_bench [--tokens 1,16,64,256] [--hidden 2048] [--top-k 6] [--layers 26] [--steps 20]
//
// Prints one JSON object per (transport, tokens) on stdout.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "router/data_plane_tags.h"
#include "router/dispatch_wire.h"
#include "transport/in_process_transport.h"
#include "transport/ucx_transport.h"
#if DMOE_HAVE_NCCL
#include "core/cuda/cuda_backend.h"
#include "transport/nccl_transport.h"
#endif

namespace dmoe {
namespace {

using transport::Transport;

struct Args {
  std::vector<int64_t> tokens = {1, 16, 64, 256};
  int64_t hidden = 2048;  // DeepSeek-V2-Lite
  int64_t top_k = 6;
  int64_t layers = 26;    // V2-Lite's MoE layers (27 layers, the first dense)
  int64_t steps = 20;
};

absl::StatusOr<Args> ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    int64_t v = 0;
    if (flag == "--tokens") {
      a.tokens.clear();
      for (absl::string_view t : absl::StrSplit(value, ',')) {
        if (!absl::SimpleAtoi(t, &v) || v < 1) return absl::InvalidArgumentError("--tokens: positive integers");
        a.tokens.push_back(v);
      }
    } else if (!absl::SimpleAtoi(value, &v) || v < 1) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " ", value, ": a positive integer"));
    } else if (flag == "--hidden") {
      a.hidden = v;
    } else if (flag == "--top-k") {
      a.top_k = v;
    } else if (flag == "--layers") {
      a.layers = v;
    } else if (flag == "--steps") {
      a.steps = v;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", flag));
    }
  }
  if (argc % 2 == 0) return absl::InvalidArgumentError("flags come in pairs: --flag value");
  return a;
}

double Percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5))];
}

// Runs `steps` steps of `layers` layers: per layer one dispatch 0 -> 1 and one reply 1 -> 0.
struct Timed {
  std::vector<double> rtt;  // every layer's round trip (seconds)
  size_t dispatch_bytes = 0, reply_bytes = 0;
};
absl::StatusOr<Timed> RoundTrips(Transport& attention, Transport& expert, const Args& a,
                                               int64_t tokens) {
  const std::vector<float> hidden(tokens * a.hidden, 0.5f);
  const std::vector<int32_t> idx(tokens * a.top_k, 1);
  const std::vector<float> weights(tokens * a.top_k, 1.0f / a.top_k);
  DMOE_ASSIGN_OR_RETURN(const std::vector<uint8_t> dispatch,
                        router::EncodeDispatch(1, 0, a.hidden, a.top_k, hidden, idx, weights));
  DMOE_ASSIGN_OR_RETURN(const std::vector<uint8_t> reply, router::EncodePartialSums(1, 0, a.hidden, hidden));
  const int64_t total = a.steps * a.layers;
  absl::Status expert_status;
  std::thread expert_thread([&] {
    for (int64_t i = 0; i < total && expert_status.ok(); ++i) {
      absl::StatusOr<transport::Message> m = expert.Receive(0, router::kReplyBit, absl::Seconds(30));
      if (!m.ok()) {
        expert_status = m.status();
        break;
      }
      expert_status = expert.Send(m->from, router::ReplyTag(m->tag), reply);
    }
  });
  std::vector<double> rtt;
  absl::Status status;
  for (int64_t step = 0; step < a.steps && status.ok(); ++step) {
    for (int64_t layer = 1; layer <= a.layers && status.ok(); ++layer) {
      const uint64_t tag = router::DispatchTag(step, layer, 0);
      const absl::Time start = absl::Now();
      status = attention.Send(expert.node_id(), tag, dispatch);
      if (!status.ok()) break;
      absl::StatusOr<transport::Message> back = attention.Receive(router::ReplyTag(tag), router::kAllTagBits,
                                                                  absl::Seconds(30));
      if (!back.ok()) status = back.status();
      rtt.push_back(absl::ToDoubleSeconds(absl::Now() - start));
    }
  }
  expert_thread.join();
  DMOE_RETURN_IF_ERROR(status);
  DMOE_RETURN_IF_ERROR(expert_status);
  return Timed{std::move(rtt), dispatch.size(), reply.size()};
}

absl::Status Report(const std::string& name, Transport& attention, Transport& expert, const Args& a,
                    const std::function<nlohmann::json()>& extra = nullptr) {
  for (int64_t tokens : a.tokens) {
    DMOE_ASSIGN_OR_RETURN(Timed timed, RoundTrips(attention, expert, a, tokens));
    std::vector<double>& rtt = timed.rtt;
    const size_t warm = std::min<size_t>(rtt.size() / 10, a.layers);  // the first step warms up
    rtt.erase(rtt.begin(), rtt.begin() + warm);
    nlohmann::json j = {{"transport", name},
                        {"tokens", tokens},
                        {"hidden", a.hidden},
                        {"top_k", a.top_k},
                        {"layers_timed", rtt.size()},
                        {"dispatch_bytes", timed.dispatch_bytes},
                        {"reply_bytes", timed.reply_bytes},
                        {"layer_round_trip_us_p50", Percentile(rtt, 0.5) * 1e6},
                        {"layer_round_trip_us_p90", Percentile(rtt, 0.9) * 1e6},
                        {"step_transfer_ms_p50", Percentile(rtt, 0.5) * a.layers * 1e3}};
    if (extra) j.update(extra());
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status Run(const Args& a) {
  {
    transport::InProcessFabric fabric;
    auto n0 = fabric.CreateEndpoint(0), n1 = fabric.CreateEndpoint(1);
    DMOE_RETURN_IF_ERROR(Report("in_process", *n0, *n1, a));
  }
  {
    setenv("UCX_NET_DEVICES", "lo", 0);
    DMOE_ASSIGN_OR_RETURN(auto n0, transport::CreateUcxTransport({.node_id = 0, .detect_peer_failure = false}));
    DMOE_ASSIGN_OR_RETURN(auto n1, transport::CreateUcxTransport({.node_id = 1, .detect_peer_failure = false}));
    DMOE_RETURN_IF_ERROR(n0->Connect(1, n1->address()));
    DMOE_RETURN_IF_ERROR(n1->Connect(0, n0->address()));
    DMOE_RETURN_IF_ERROR(Report("ucx_shm", *n0, *n1, a));
  }
#if DMOE_HAVE_NCCL
  absl::StatusOr<std::vector<cuda::CudaDeviceInfo>> gpus = cuda::ListDevices();
  if (!gpus.ok() || gpus->size() < 2) {
    std::fprintf(stderr, "transfer_bench: NCCL skipped: needs 2 GPUs, %s\n",
                 gpus.ok() ? absl::StrCat(gpus->size(), " visible").c_str() : std::string(gpus.status().message()).c_str());
    return absl::OkStatus();
  }
  setenv("NCCL_SOCKET_IFNAME", "lo", 0);
  DMOE_ASSIGN_OR_RETURN(const std::string id, transport::NewNcclUniqueId());
  std::vector<absl::StatusOr<std::unique_ptr<transport::FramedTransport>>> made(2);
  std::vector<std::thread> threads;
  for (int rank : {0, 1}) {
    threads.emplace_back([&, rank] {
      made[rank] = transport::CreateNcclTransport({.node_id = rank, .num_nodes = 2, .unique_id = id, .cuda_device = rank});
    });
  }
  for (auto& t : threads) t.join();
  for (auto& m : made) DMOE_RETURN_IF_ERROR(m.status());
  transport::FramedTransport& n0 = **made[0];
  transport::FramedTransport& n1 = **made[1];
  DMOE_RETURN_IF_ERROR(n0.Connect(1, n1.address()));
  DMOE_RETURN_IF_ERROR(n1.Connect(0, n0.address()));
  n0.TakeSendRecords();
  n1.TakeSendRecords();
  auto send_times = [&] {
    std::vector<double> dispatch_gpu, reply_gpu;
    for (const auto& r : n0.TakeSendRecords()) dispatch_gpu.push_back(r.device_seconds);
    for (const auto& r : n1.TakeSendRecords()) reply_gpu.push_back(r.device_seconds);
    return nlohmann::json{{"gpus", absl::StrCat((*gpus)[0].name, " x2")},
                          {"dispatch_send_gpu_us_p50", Percentile(dispatch_gpu, 0.5) * 1e6},
                          {"reply_send_gpu_us_p50", Percentile(reply_gpu, 0.5) * 1e6}};
  };
  DMOE_RETURN_IF_ERROR(Report("nccl", n0, n1, a, send_times));
#endif
  return absl::OkStatus();
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) {
  absl::StatusOr<dmoe::Args> args = dmoe::ParseArgs(argc, argv);
  absl::Status s = args.ok() ? dmoe::Run(*args) : args.status();
  if (!s.ok()) {
    std::fprintf(stderr, "transfer_bench: error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
