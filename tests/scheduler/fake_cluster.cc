#include "tests/scheduler/fake_cluster.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace dmoe::scheduler::testing {

int32_t HashModel(RequestId id, int64_t sample_index, const std::vector<int32_t>& history) {
  // FNV-1a over (id, sample_index, history).
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t v) {
    for (int byte = 0; byte < 8; ++byte) {
      h ^= (v >> (8 * byte)) & 0xFF;
      h *= 1099511628211ull;
    }
  };
  mix(static_cast<uint64_t>(id));
  mix(static_cast<uint64_t>(sample_index));
  for (int32_t t : history) mix(static_cast<uint64_t>(static_cast<uint32_t>(t)));
  return 2 + static_cast<int32_t>(h % 400);
}

std::vector<int32_t> SoloTokens(const Request& request, int64_t context_length, const FakeModel& model) {
  std::vector<int32_t> history = request.prompt;
  std::vector<int32_t> out;
  while (true) {
    const int32_t token = model(request.id, static_cast<int64_t>(out.size()), history);
    out.push_back(token);
    history.push_back(token);
    const auto& stops = request.stop_token_ids;
    const auto& eos = request.eos_token_ids;
    if (std::find(stops.begin(), stops.end(), token) != stops.end()) break;
    if (!request.ignore_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) break;
    if (static_cast<int64_t>(out.size()) >= request.max_tokens) break;
    if (static_cast<int64_t>(history.size()) >= context_length) break;
  }
  return out;
}

FakeCluster::FakeCluster(const BatchScheduler::Options& options, FakeModel model)
    : model_(std::move(model)), histories_(options.pages_per_node.size()) {
  for (int64_t pages : options.pages_per_node) {
    LatentCacheOptions cache;
    cache.num_layers = 1;
    cache.kv_lora_rank = 1;
    cache.qk_rope_head_dim = 1;
    cache.page_size = options.page_size;
    cache.num_pages = pages;
    auto created = LatentCache::Create(cache);
    EXPECT_TRUE(created.ok()) << created.status();
    caches_.push_back(*std::move(created));
  }
}

std::vector<SampledToken> FakeCluster::Run(const StepPlan& plan, int drop_node) {
  EXPECT_EQ(plan.nodes.size(), caches_.size());
  std::vector<SampledToken> sampled;
  for (size_t n = 0; n < plan.nodes.size() && n < caches_.size(); ++n) {
    LatentCache& cache = *caches_[n];
    const NodeStep& node = plan.nodes[n];
    absl::flat_hash_set<RequestId> freed;
    for (RequestId id : node.frees) {
      EXPECT_TRUE(cache.Contains(id)) << "node " << n << " frees unknown sequence " << id;
      cache.Free(id);
      histories_[n].erase(id);
      freed.insert(id);
    }
    for (const ScheduledSequence& s : node.sequences) {
      EXPECT_FALSE(freed.contains(s.id)) << "sequence " << s.id << " freed and run in one step";
      EXPECT_FALSE(s.tokens.empty()) << "sequence " << s.id;
      EXPECT_EQ(s.position, cache.SequenceLength(s.id)) << "sequence " << s.id << " on node " << n;
      const absl::Status extended = cache.Extend(s.id, static_cast<int64_t>(s.tokens.size()));
      EXPECT_TRUE(extended.ok()) << "step " << plan.step_id << ": " << extended;
      std::vector<int32_t>& history = histories_[n][s.id];
      history.insert(history.end(), s.tokens.begin(), s.tokens.end());
      if (s.sample && static_cast<int>(n) != drop_node) {
        SampledToken t;
        t.id = s.id;
        t.token = model_(s.id, s.sample_index, history);
        t.logprob = -0.25f;
        sampled.push_back(std::move(t));
      }
    }
  }
  return sampled;
}

const std::vector<int32_t>& FakeCluster::History(int node, RequestId id) const {
  return histories_[node].at(id);
}

std::string FormatScheduled(const StepPlan& plan) {
  std::vector<std::string> parts;
  for (size_t n = 0; n < plan.nodes.size(); ++n) {
    for (const ScheduledSequence& s : plan.nodes[n].sequences) {
      parts.push_back(absl::StrCat(s.id, "@", n, ":", s.tokens.size(), s.sample ? "*" : ""));
    }
  }
  return absl::StrJoin(parts, " ");
}

std::string FormatFrees(const StepPlan& plan) {
  std::vector<std::string> parts;
  for (size_t n = 0; n < plan.nodes.size(); ++n) {
    for (RequestId id : plan.nodes[n].frees) parts.push_back(absl::StrCat(id, "@", n));
  }
  return absl::StrJoin(parts, " ");
}

std::string FormatFinished(const std::vector<RequestEvent>& events) {
  std::vector<std::string> parts;
  for (const RequestEvent& e : events) {
    if (e.finished) parts.push_back(absl::StrCat(e.id, ":", std::string(FinishReasonName(e.reason))));
  }
  return absl::StrJoin(parts, " ");
}

Scenario::Scenario(const BatchScheduler::Options& options, FakeModel model)
    : options_(options), cluster_(options, std::move(model)) {
  auto created = BatchScheduler::Create(options);
  EXPECT_TRUE(created.ok()) << created.status();
  scheduler_ = *std::move(created);
}

absl::Time Scenario::Time0() { return absl::FromUnixSeconds(1'700'000'000); }

void Scenario::SubmitAt(int step, Request request) {
  Before(step, [this, request]() mutable {
    const RequestId id = request.id;
    const absl::Status status = scheduler_->Submit(std::move(request));
    EXPECT_TRUE(status.ok()) << "request " << id << ": " << status;
  });
}

void Scenario::Record(const RequestEvent& event) {
  std::vector<int32_t>& tokens = tokens_[event.id];
  tokens.insert(tokens.end(), event.new_tokens.begin(), event.new_tokens.end());
  EXPECT_EQ(event.samples.size(), event.new_tokens.size());
  text_[event.id] += event.text_delta;
  if (event.finished) {
    EXPECT_FALSE(finished_.contains(event.id)) << "request " << event.id << " finished twice";
    finished_[event.id] = event;
  } else {
    EXPECT_FALSE(finished_.contains(event.id)) << "event for request " << event.id << " after it finished";
  }
}

std::vector<RequestEvent> Scenario::Step() {
  const int step = next_step_++;
  for (auto& action : before_[step]) action();
  StepPlan plan = scheduler_->PlanStep(Time0() + absl::Seconds(step));
  for (auto& action : after_plan_[step]) action();
  for (const NodeStep& node : plan.nodes) {
    for (const ScheduledSequence& s : node.sequences) {
      if (s.sample) sample_indices_[s.id].push_back(s.sample_index);
    }
  }
  const std::vector<SampledToken> sampled = cluster_.Run(plan);
  std::vector<RequestEvent> events = plan.events;
  std::vector<RequestEvent> applied = scheduler_->ApplyResults(plan, sampled);
  events.insert(events.end(), applied.begin(), applied.end());
  for (const RequestEvent& e : events) Record(e);
  for (int n = 0; n < scheduler_->num_nodes(); ++n) {
    EXPECT_EQ(scheduler_->pages_free(n), cluster_.pages_free(n)) << "node " << n << ", step " << step;
  }
  plans_.push_back(std::move(plan));
  return events;
}

void Scenario::Run(const std::vector<ExpectedStep>& rows) {
  for (const ExpectedStep& row : rows) {
    ASSERT_GE(row.step, next_step_) << "rows must be in step order";
    std::vector<RequestEvent> events;
    while (next_step_ <= row.step) events = Step();
    SCOPED_TRACE(absl::StrCat("step ", row.step));
    const StepPlan& plan = plans_.back();
    EXPECT_EQ(FormatScheduled(plan), row.scheduled);
    EXPECT_EQ(FormatFrees(plan), row.frees);
    std::vector<int64_t> pages_free;
    for (int n = 0; n < scheduler_->num_nodes(); ++n) pages_free.push_back(scheduler_->pages_free(n));
    EXPECT_EQ(pages_free, row.pages_free);
    EXPECT_EQ(FormatFinished(events), row.finished);
    EXPECT_EQ(scheduler_->num_waiting(), row.waiting);
  }
}

void Scenario::RunToCompletion(int max_steps) {
  for (int i = 0; i < max_steps; ++i) {
    const bool pending_frees = std::any_of(finished_.begin(), finished_.end(), [&](const auto& kv) {
      return scheduler_->GetRequest(kv.first).has_value();
    });
    if (scheduler_->num_waiting() == 0 && scheduler_->num_running() == 0 && !pending_frees &&
        before_.lower_bound(next_step_) == before_.end()) {
      return;
    }
    Step();
  }
  ADD_FAILURE() << "not done after " << max_steps << " steps";
}

}  // namespace dmoe::scheduler::testing
