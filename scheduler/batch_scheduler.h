// Iteration-level (continuous) batching over the attention nodes' paged
// latent caches. Pure logic: no threads, no RPC, no model. The scheduler
// server owns one BatchScheduler and, in its step loop, calls
//   plan = PlanStep(now)  -> sends plan.nodes[n] to attention node n
//                            (frees first, then the sequences), streams
//                            plan.events;
//   ApplyResults(plan, sampled tokens of every node) -> streams the events.
// Exactly one ApplyResults per plan, before the next PlanStep.
//
// Request lifecycle (RequestState):
//
//       Submit
//         │
//         ▼
//     kWaiting ◄──────────────── preempted: its cache is dropped and it goes
//         │                      back to the front of the queue, to be
//         │ admitted             recomputed from prompt + generated tokens
//         ▼                                           ▲
//     kPrefill ── one chunk per step ──┐              │
//         │                      ◄─────┘              │
//         │ last chunk sampled a token                │
//         ▼                                           │
//     kDecode ── one token per step ──┐───────────────┘ (also from kPrefill)
//         │                     ◄─────┘
//         │ stop token id, EOS, stop string, max_tokens, context length,
//         │ Cancel(), deadline, missing result (from any state above)
//         ▼
//     kFinished ── its pages are freed (StepPlan frees) by the next
//                  PlanStep, which then forgets the request.
//
// Each request ends with exactly one RequestEvent with finished = true,
// returned by ApplyResults (stops, errors) or in StepPlan::events (Cancel,
// deadline, a plan whose results never came).
//
// Each step (PlanStep):
//   1. frees the pages of requests finished since the last plan, and of
//      cancelled and expired (now > deadline) requests;
//   2. decode: every request in kDecode gets its one token, oldest first.
//      When its node lacks a page for it, the newest request on that node
//      is preempted (possibly the decoding request itself), until it fits;
//   3. prefill: continuing prefills (oldest first), then admissions from
//      the waiting queue (FCFS: its head is never overtaken), each get a
//      chunk of up to max_prefill_chunk tokens within the node's remaining
//      token budget; a chunk that gets no page preempts newer, not yet
//      scheduled requests on the node, or waits. Only a request's last
//      chunk samples.
// Placement: an admitted request goes to the node with the most free pages
// (ties: lowest index) among the nodes that are up (NodeDown) with token
// budget and a sequence slot left this step, and stays there until it finishes or is preempted.
// It is admitted only when that node's free pages cover its prompt plus one
// token (capped at the most it will ever hold: prompt + max_tokens - 1).
// Pages are reserved for every scheduled token, per node, by the same
// arithmetic as LatentCache::PagesNeeded, so the mirror pages_free(node)
// equals the node's LatentCache::pages_free() once it ran the plan.
//
// Not thread-safe: the server's step loop owns it.
#ifndef DMOE_SCHEDULER_BATCH_SCHEDULER_H_
#define DMOE_SCHEDULER_BATCH_SCHEDULER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "scheduler/request.h"
#include "scheduler/step_plan.h"

namespace dmoe {
class Tokenizer;
}  // namespace dmoe

namespace dmoe::scheduler {

class BatchScheduler {
 public:
  struct Options {
    // Tokens per step PER ATTENTION NODE (decode tokens + prefill chunks).
    // Nodes run their share of a step in parallel, so the busiest node sets
    // the step's latency; a per-node budget keeps that bounded as the
    // cluster grows. It also caps the requests placed on a node (each
    // decodes one token per step). > 0.
    int64_t max_batch_tokens = 512;
    // Requests waiting for admission (preempted ones included) beyond which
    // Submit fails. > 0.
    int64_t max_waiting_requests = 256;
    // Tokens per latent cache page, as the nodes' LatentCache. > 0.
    int64_t page_size = 64;
    // Latent cache pages of each attention node, indexed by node. Non-empty,
    // each > 0.
    std::vector<int64_t> pages_per_node;
    // Most prefill tokens of one request per step; 0: max_batch_tokens.
    int64_t max_prefill_chunk = 0;
    // The model's max_position_embeddings. > 0.
    int64_t context_length = 0;
    // When set (it must outlive the scheduler), events carry text_delta and
    // requests may have stop strings. Null: no text, no stop strings.
    const Tokenizer* tokenizer = nullptr;
    // Whether special tokens (EOS, ...) are left out of the text.
    bool skip_special_tokens = true;
  };

  // INVALID_ARGUMENT naming the first bad option and its value.
  static absl::StatusOr<std::unique_ptr<BatchScheduler>> Create(const Options& options);

  ~BatchScheduler();
  BatchScheduler(const BatchScheduler&) = delete;
  BatchScheduler& operator=(const BatchScheduler&) = delete;

  // Queues a request. RESOURCE_EXHAUSTED "waiting queue is full (N
  // requests)"; RESOURCE_EXHAUSTED when prompt + max_tokens exceeds
  // context_length or its cache could never fit on one node (both name the
  // sizes); INVALID_ARGUMENT for an empty prompt, max_tokens < 1 or stop
  // strings without a tokenizer; ALREADY_EXISTS for the id of a request
  // that is not forgotten yet.
  absl::Status Submit(Request request);

  // The request finishes with kCancelled in the next PlanStep (its pages
  // freed there). A token sampled for it meanwhile is dropped. No-op for
  // unknown or finished requests.
  void Cancel(RequestId id);

  // Plans the next step (see the header comment).
  StepPlan PlanStep(absl::Time now);

  // Attention node `node` is gone (its process died): every request placed
  // on it finishes with kError (`code`, `message`), its pages count as free
  // again without frees (a new process starts empty), and nothing is placed
  // on it until NodeUp. Returns the events. No-op for a node already down.
  std::vector<RequestEvent> NodeDown(int node, absl::StatusCode code, const std::string& message);
  // The node serves again with an empty cache of `pages` pages.
  void NodeUp(int node, int64_t pages);
  bool node_up(int node) const;
  // Ends every waiting and running request with kError (`code`, `message`):
  // the cluster cannot serve any (an expert node is lost). Running requests'
  // pages are freed by the next plan.
  std::vector<RequestEvent> FailAll(absl::StatusCode code, const std::string& message);
  // The earliest deadline among waiting requests (InfiniteFuture: none).
  absl::Time NextDeadline() const;

  // A node whose RunStep failed: its requests in the step end with this.
  struct NodeFailure {
    int node = -1;
    absl::StatusCode code = absl::StatusCode::kUnavailable;
    std::string message;
  };

  // Takes the tokens sampled for `plan` (any order; those of requests that
  // were not sampling in it are ignored) and returns one event per request
  // that was to sample in it (in plan order), except requests cancelled
  // since (the next plan reports those). The scheduler keeps the plan's
  // bookkeeping itself; `plan` only names the step (plan.step_id).
  // Stops are checked in this order: stop token id (kStop, token included),
  // EOS unless ignore_eos (kStop, token included), stop string (kStop, text
  // cut before it), max_tokens (kLength), context length reached (kLength).
  // A sampling request with no token in `sampled` (its node failed)
  // finishes with kError. A plan other than the last one planned, or one
  // applied twice, is ignored (no events).
  // A sampling request of a node in `failed` gets that node's code and
  // message instead.
  std::vector<RequestEvent> ApplyResults(const StepPlan& plan, const std::vector<SampledToken>& sampled,
                                         const std::vector<NodeFailure>& failed = {});

  // Introspection for tests and metrics.
  int num_nodes() const;
  int64_t pages_total(int node) const;
  // Pages not reserved by the requests placed on `node`, as of the last plan.
  int64_t pages_free(int node) const;
  // Waiting for admission (including preempted and not yet reaped cancelled
  // ones).
  int64_t num_waiting() const;
  // In kPrefill or kDecode.
  int64_t num_running() const;
  // Finished requests whose pages the next plan frees.
  int64_t num_to_free() const;
  // nullopt once the request is forgotten (or was never submitted).
  std::optional<RequestView> GetRequest(RequestId id) const;

 private:
  struct Impl;
  explicit BatchScheduler(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_BATCH_SCHEDULER_H_
