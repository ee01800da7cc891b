// Test seams for the BatchScheduler: a fake cluster of attention nodes that
// runs StepPlans against real LatentCaches, and a runner for per-iteration
// scenario tables (STYLE.md 7; TensorRT-LLM capacitySchedulerTest
// ExpectedState).
#ifndef DMOE_TESTS_SCHEDULER_FAKE_CLUSTER_H_
#define DMOE_TESTS_SCHEDULER_FAKE_CLUSTER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "core/latent_cache.h"
#include "scheduler/batch_scheduler.h"

namespace dmoe::scheduler::testing {

// A "model": the token sampled for request `id` after it sampled
// `sample_index` tokens, given everything its sequence's cache holds.
using FakeModel =
    std::function<int32_t(RequestId id, int64_t sample_index, const std::vector<int32_t>& history)>;

// Deterministic in (id, sample_index, history); never 0 or 1. Any mistake in
// what the scheduler feeds (a lost or repeated token, a wrong recompute, a
// wrong sample_index) changes the tokens that follow.
int32_t HashModel(RequestId id, int64_t sample_index, const std::vector<int32_t>& history);

// What a request produces when it runs alone: the model's tokens until a
// stop token id, EOS (unless ignore_eos), max_tokens or the context length.
std::vector<int32_t> SoloTokens(const Request& request, int64_t context_length,
                                const FakeModel& model = HashModel);

// The attention nodes: per node a real LatentCache (tiny entries) with the
// scheduler's page geometry, and each sequence's token history.
class FakeCluster {
 public:
  explicit FakeCluster(const BatchScheduler::Options& options, FakeModel model = HashModel);

  // Every node frees, then runs its sequences: checks (as gtest failures)
  // that frees name cached sequences, each chunk starts at the sequence's
  // cache length, and the cache always has the pages (LatentCache::Extend).
  // `drop_node`: that node "fails" (its samples are not returned).
  std::vector<SampledToken> Run(const StepPlan& plan, int drop_node = -1);

  int64_t pages_free(int node) const { return caches_[node]->pages_free(); }
  // The tokens cached for a sequence on a node.
  const std::vector<int32_t>& History(int node, RequestId id) const;

 private:
  FakeModel model_;
  std::vector<std::unique_ptr<LatentCache>> caches_;
  std::vector<absl::flat_hash_map<RequestId, std::vector<int32_t>>> histories_;
};

// "id@node:tokens" per scheduled sequence, by node then plan order, with
// '*' when it samples: "1@0:8 2@0:5*".
std::string FormatScheduled(const StepPlan& plan);
// "id@node" per free, by node then plan order.
std::string FormatFrees(const StepPlan& plan);
// "id:reason" per finished event, in event order.
std::string FormatFinished(const std::vector<RequestEvent>& events);

// One row of a scenario table: the state after planning and running `step`.
struct ExpectedStep {
  int step = 0;
  std::string scheduled;
  std::string frees;
  std::vector<int64_t> pages_free;  // per node, after the plan
  std::string finished;             // plan events, then ApplyResults events
  int64_t waiting = 0;              // after the plan
};

// Drives a BatchScheduler through numbered steps against a FakeCluster.
// Step s runs at Time0() + s seconds.
class Scenario {
 public:
  explicit Scenario(const BatchScheduler::Options& options, FakeModel model = HashModel);

  static absl::Time Time0();
  BatchScheduler& scheduler() { return *scheduler_; }
  const BatchScheduler::Options& options() const { return options_; }

  // Actions before step `step` is planned / between its plan and results.
  void Before(int step, std::function<void()> action) { before_[step].push_back(std::move(action)); }
  void AfterPlan(int step, std::function<void()> action) { after_plan_[step].push_back(std::move(action)); }
  // Submits at `step` (gtest failure if Submit fails).
  void SubmitAt(int step, Request request);

  // Runs steps 0, 1, ... up to the last row, checking each row's step.
  void Run(const std::vector<ExpectedStep>& rows);
  // Runs until nothing is waiting or running and nothing is left to free
  // (at most `max_steps` steps).
  void RunToCompletion(int max_steps = 1000);

  // Everything streamed for a request so far.
  const std::vector<int32_t>& tokens(RequestId id) { return tokens_[id]; }
  const std::vector<int64_t>& sample_indices(RequestId id) { return sample_indices_[id]; }
  const std::string& text(RequestId id) { return text_[id]; }
  // Finished events, by request (a test fails if one finishes twice).
  const std::map<RequestId, RequestEvent>& finished() const { return finished_; }
  // Every plan run so far, by step.
  const std::vector<StepPlan>& plans() const { return plans_; }
  int next_step() const { return next_step_; }

  // Plans and runs one step; returns its events (the plan's first).
  std::vector<RequestEvent> Step();

 private:
  void Record(const RequestEvent& event);

  BatchScheduler::Options options_;
  std::unique_ptr<BatchScheduler> scheduler_;
  FakeCluster cluster_;
  std::map<int, std::vector<std::function<void()>>> before_;
  std::map<int, std::vector<std::function<void()>>> after_plan_;
  std::map<RequestId, std::vector<int32_t>> tokens_;
  std::map<RequestId, std::vector<int64_t>> sample_indices_;
  std::map<RequestId, std::string> text_;
  std::map<RequestId, RequestEvent> finished_;
  std::vector<StepPlan> plans_;
  int next_step_ = 0;
};

}  // namespace dmoe::scheduler::testing

#endif  // DMOE_TESTS_SCHEDULER_FAKE_CLUSTER_H_
