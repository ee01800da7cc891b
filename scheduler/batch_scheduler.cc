#include "scheduler/batch_scheduler.h"

#include <algorithm>
#include <deque>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "scheduler/stop_matcher.h"

namespace dmoe::scheduler {
namespace {

// ceil(a / b) for a >= 0, b > 0 (as LatentCache computes pages).
int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

template <typename T, typename U>
bool Contains(const std::vector<T>& values, U value) {
  return std::find(values.begin(), values.end(), static_cast<T>(value)) != values.end();
}

void Erase(std::vector<RequestId>& ids, RequestId id) { ids.erase(std::find(ids.begin(), ids.end(), id)); }

}  // namespace

struct BatchScheduler::Impl {
  struct Entry {
    Request request;  // request.prompt stays the original prompt
    RequestState state = RequestState::kWaiting;
    int node = -1;
    int64_t cache_len = 0;   // tokens reserved on `node`
    int64_t admission = -1;  // admission counter: larger is newer
    std::vector<int32_t> generated;
    int64_t preemptions = 0;
    bool cancelled = false;
    std::unique_ptr<StopMatcher> matcher;  // null without a tokenizer

    // Tokens the cache must hold before the next sample: the prompt and
    // every generated token (a recompute prefills them all).
    int64_t known() const { return static_cast<int64_t>(request.prompt.size() + generated.size()); }
    int32_t token(int64_t i) const {
      const int64_t p = static_cast<int64_t>(request.prompt.size());
      return i < p ? request.prompt[i] : generated[i - p];
    }
    // The most tokens its cache ever holds (the last sample is never fed).
    int64_t max_cached() const {
      return static_cast<int64_t>(request.prompt.size()) + request.max_tokens - 1;
    }
  };

  // Scratch of the plan being built.
  struct StepState {
    std::vector<int64_t> budget;  // tokens left per node
    absl::flat_hash_set<RequestId> scheduled;
    absl::flat_hash_set<RequestId> preempted;
  };

  struct Outstanding {
    int64_t step_id = 0;
    std::vector<RequestId> sampling;  // plan order
  };

  explicit Impl(const Options& o) : options(o) {
    if (options.max_prefill_chunk == 0) options.max_prefill_chunk = options.max_batch_tokens;
    const size_t n = options.pages_per_node.size();
    running.resize(n);
    to_free.resize(n);
    pages_used.assign(n, 0);
    down.assign(n, false);
  }

  int num_nodes() const { return static_cast<int>(options.pages_per_node.size()); }
  int64_t PagesFor(int64_t tokens) const { return CeilDiv(tokens, options.page_size); }
  int64_t PagesNeeded(int64_t length, int64_t new_tokens) const {
    return new_tokens <= 0 ? 0 : PagesFor(length + new_tokens) - PagesFor(length);
  }
  int64_t FreePages(int node) const { return options.pages_per_node[node] - pages_used[node]; }
  // Tokens a sequence of `length` can grow by within the node's free pages.
  int64_t TokensThatFit(int64_t length, int node) const {
    return PagesFor(length) * options.page_size - length + FreePages(node) * options.page_size;
  }
  Entry& Get(RequestId id) { return *requests.at(id); }

  absl::Status Submit(Request request);
  StepPlan PlanStep(absl::Time now);
  std::vector<RequestEvent> Apply(const Outstanding& step, const std::vector<SampledToken>& sampled,
                                  const std::string& missing_error,
                                  const std::vector<NodeFailure>& failed = {});

  void Reap(absl::Time now, StepPlan& plan);
  void ScheduleDecodes(StepPlan& plan, StepState& step);
  void SchedulePrefills(StepPlan& plan, StepState& step);
  void Admit(StepPlan& plan, StepState& step);
  void Schedule(Entry& e, int64_t chunk, StepPlan& plan, StepState& step);
  void Preempt(Entry& e, StepPlan& plan, StepState& step);
  void AppendToken(Entry& e, const SampledToken& sample, RequestEvent& event);
  // Marks `e` finished; a placed request keeps its pages until the next plan.
  void Finish(Entry& e, FinishReason reason, std::string error, RequestEvent& event);

  Options options;
  absl::flat_hash_map<RequestId, std::unique_ptr<Entry>> requests;
  std::deque<RequestId> waiting;
  std::vector<std::vector<RequestId>> running;  // per node, by admission (oldest first)
  std::vector<std::vector<RequestId>> to_free;  // per node: finished, pages still held
  std::vector<int64_t> pages_used;              // per node
  std::vector<bool> down;                       // per node: NodeDown
  int64_t next_step_id = 0;
  int64_t next_admission = 0;
  std::optional<Outstanding> outstanding;
};

absl::Status BatchScheduler::Impl::Submit(Request request) {
  const RequestId id = request.id;
  const int64_t prompt = static_cast<int64_t>(request.prompt.size());
  if (prompt == 0) return absl::InvalidArgumentError(absl::StrCat("request ", id, ": prompt is empty"));
  if (request.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("request ", id, ": max_tokens must be >= 1, got ", request.max_tokens));
  }
  const bool has_stop_strings =
      std::any_of(request.stop.begin(), request.stop.end(), [](const std::string& s) { return !s.empty(); });
  if (has_stop_strings && options.tokenizer == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "request ", id, ": stop strings need a tokenizer (BatchScheduler::Options::tokenizer is null)"));
  }
  if (requests.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("request ", id, " is already queued or running"));
  }
  if (static_cast<int64_t>(waiting.size()) >= options.max_waiting_requests) {
    return absl::ResourceExhaustedError(
        absl::StrCat("waiting queue is full (", waiting.size(), " requests)"));
  }
  if (prompt + request.max_tokens > options.context_length) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "request ", id, ": prompt of ", prompt, " tokens + max_tokens ", request.max_tokens, " = ",
        prompt + request.max_tokens, " exceeds the context length ", options.context_length));
  }
  const int64_t most_pages = *std::max_element(options.pages_per_node.begin(), options.pages_per_node.end());
  const int64_t pages = PagesFor(prompt + request.max_tokens - 1);
  if (pages > most_pages) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request ", id, ": prompt of ", prompt, " tokens + max_tokens ", request.max_tokens,
                     " needs up to ", pages, " latent cache pages of ", options.page_size,
                     " tokens, but the largest attention node has ", most_pages, " pages"));
  }
  auto entry = std::make_unique<Entry>();
  if (options.tokenizer != nullptr) {
    entry->matcher =
        std::make_unique<StopMatcher>(*options.tokenizer, request.stop, options.skip_special_tokens);
  }
  entry->request = std::move(request);
  requests.emplace(id, std::move(entry));
  waiting.push_back(id);
  return absl::OkStatus();
}

StepPlan BatchScheduler::Impl::PlanStep(absl::Time now) {
  StepPlan plan;
  if (outstanding.has_value()) {
    const Outstanding step = *std::move(outstanding);
    outstanding.reset();
    plan.events = Apply(step, {}, absl::StrCat("the results of step ", step.step_id, " were never applied"));
  }
  plan.step_id = next_step_id++;
  plan.nodes.resize(num_nodes());
  outstanding = Outstanding{plan.step_id, {}};

  Reap(now, plan);
  for (int n = 0; n < num_nodes(); ++n) {
    for (RequestId id : to_free[n]) {
      plan.nodes[n].frees.push_back(id);
      pages_used[n] -= PagesFor(Get(id).cache_len);
      requests.erase(id);
    }
    to_free[n].clear();
  }

  StepState step;
  step.budget.assign(num_nodes(), options.max_batch_tokens);
  ScheduleDecodes(plan, step);
  SchedulePrefills(plan, step);
  Admit(plan, step);
  return plan;
}

void BatchScheduler::Impl::Reap(absl::Time now, StepPlan& plan) {
  auto expired = [&](const Entry& e) { return e.cancelled || now > e.request.deadline; };
  auto finish = [&](Entry& e) {
    RequestEvent event;
    event.id = e.request.id;
    Finish(e, FinishReason::kCancelled, e.cancelled ? "" : "deadline exceeded", event);
    plan.events.push_back(std::move(event));
  };
  std::deque<RequestId> still_waiting;
  for (RequestId id : waiting) {
    Entry& e = Get(id);
    if (!expired(e)) {
      still_waiting.push_back(id);
      continue;
    }
    finish(e);
    requests.erase(id);  // never placed: no pages to free
  }
  waiting = std::move(still_waiting);
  for (int n = 0; n < num_nodes(); ++n) {
    const std::vector<RequestId> placed = running[n];
    for (RequestId id : placed) {
      Entry& e = Get(id);
      if (expired(e)) finish(e);  // moves it to to_free[n]
    }
  }
}

void BatchScheduler::Impl::ScheduleDecodes(StepPlan& plan, StepState& step) {
  for (int n = 0; n < num_nodes(); ++n) {
    std::vector<RequestId>& placed = running[n];
    for (size_t i = 0; i < placed.size(); ++i) {
      Entry& e = Get(placed[i]);
      if (e.state != RequestState::kDecode) continue;
      if (step.budget[n] < 1) break;  // not reached: placements are capped at the budget
      // Everything after i is unscheduled, so the newest (back) is the victim.
      bool preempted_self = false;
      while (PagesNeeded(e.cache_len, 1) > FreePages(n)) {
        Entry& victim = Get(placed.back());
        preempted_self = &victim == &e;
        Preempt(victim, plan, step);
        if (preempted_self) break;
      }
      if (preempted_self) break;  // it was the newest: nothing after it
      Schedule(e, 1, plan, step);
    }
  }
}

void BatchScheduler::Impl::SchedulePrefills(StepPlan& plan, StepState& step) {
  for (int n = 0; n < num_nodes(); ++n) {
    std::vector<RequestId>& placed = running[n];
    for (size_t i = 0; i < placed.size(); ++i) {
      Entry& e = Get(placed[i]);
      if (e.state != RequestState::kPrefill || step.scheduled.contains(e.request.id)) continue;
      const int64_t want = std::min({e.known() - e.cache_len, options.max_prefill_chunk, step.budget[n]});
      if (want <= 0) continue;
      while (TokensThatFit(e.cache_len, n) == 0) {
        // Preempt the newest request placed after this one that has no work
        // in this step yet; if there is none, this one waits.
        size_t j = placed.size();
        while (j > i + 1 && step.scheduled.contains(placed[j - 1])) --j;
        if (j == i + 1) break;
        Preempt(Get(placed[j - 1]), plan, step);
      }
      const int64_t chunk = std::min(want, TokensThatFit(e.cache_len, n));
      if (chunk > 0) Schedule(e, chunk, plan, step);
    }
  }
}

void BatchScheduler::Impl::Admit(StepPlan& plan, StepState& step) {
  while (!waiting.empty()) {
    Entry& e = Get(waiting.front());
    // Re-admitting what was just preempted would only redo its work.
    if (step.preempted.contains(e.request.id)) break;
    int best = -1;
    for (int n = 0; n < num_nodes(); ++n) {
      if (down[n] || step.budget[n] < 1 || static_cast<int64_t>(running[n].size()) >= options.max_batch_tokens) {
        continue;
      }
      if (best < 0 || FreePages(n) > FreePages(best)) best = n;
    }
    if (best < 0) break;
    const int64_t needed = PagesFor(std::min(e.known() + 1, e.max_cached()));
    if (FreePages(best) < needed) break;  // FCFS: the head waits, nobody overtakes it
    waiting.pop_front();
    e.state = RequestState::kPrefill;
    e.node = best;
    e.cache_len = 0;
    e.admission = next_admission++;
    running[best].push_back(e.request.id);
    Schedule(e, std::min({e.known(), options.max_prefill_chunk, step.budget[best]}), plan, step);
  }
}

void BatchScheduler::Impl::Schedule(Entry& e, int64_t chunk, StepPlan& plan, StepState& step) {
  const int n = e.node;
  ScheduledSequence s;
  s.id = e.request.id;
  s.position = e.cache_len;
  s.tokens.reserve(chunk);
  for (int64_t i = e.cache_len; i < e.cache_len + chunk; ++i) s.tokens.push_back(e.token(i));
  s.sample = e.cache_len + chunk == e.known();
  s.sample_index = static_cast<int64_t>(e.generated.size());
  s.sampling = e.request.sampling;
  pages_used[n] += PagesNeeded(e.cache_len, chunk);
  e.cache_len += chunk;
  step.budget[n] -= chunk;
  step.scheduled.insert(s.id);
  if (s.sample) outstanding->sampling.push_back(s.id);
  plan.nodes[n].sequences.push_back(std::move(s));
}

void BatchScheduler::Impl::Preempt(Entry& e, StepPlan& plan, StepState& step) {
  const int n = e.node;
  const RequestId id = e.request.id;
  plan.nodes[n].frees.push_back(id);
  pages_used[n] -= PagesFor(e.cache_len);
  Erase(running[n], id);
  e.state = RequestState::kWaiting;
  e.node = -1;
  e.cache_len = 0;
  e.admission = -1;
  ++e.preemptions;
  // Newest first, so several preempted in one step end up oldest first.
  waiting.push_front(id);
  plan.preempted.push_back(id);
  step.preempted.insert(id);
}

std::vector<RequestEvent> BatchScheduler::Impl::Apply(const Outstanding& step,
                                                      const std::vector<SampledToken>& sampled,
                                                      const std::string& missing_error,
                                                      const std::vector<NodeFailure>& failed) {
  absl::flat_hash_map<RequestId, const SampledToken*> by_id;
  for (const SampledToken& s : sampled) by_id.try_emplace(s.id, &s);
  std::vector<RequestEvent> events;
  for (RequestId id : step.sampling) {
    auto it = requests.find(id);
    if (it == requests.end()) continue;
    Entry& e = *it->second;
    // Cancelled meanwhile: the next plan reaps it.
    if (e.cancelled || e.state == RequestState::kFinished || e.state == RequestState::kWaiting) continue;
    RequestEvent event;
    event.id = id;
    auto sample = by_id.find(id);
    const auto failure = std::find_if(failed.begin(), failed.end(),
                                      [&](const NodeFailure& f) { return f.node == e.node; });
    if (failure != failed.end() && sample == by_id.end()) {
      event.error_code = failure->code;
      Finish(e, FinishReason::kError, failure->message, event);
    } else if (sample == by_id.end()) {
      Finish(e, FinishReason::kError,
             missing_error.empty()
                 ? absl::StrCat("attention node ", e.node, " returned no token for request ", id, " in step ",
                                step.step_id)
                 : missing_error,
             event);
    } else {
      AppendToken(e, *sample->second, event);
    }
    events.push_back(std::move(event));
  }
  return events;
}

void BatchScheduler::Impl::AppendToken(Entry& e, const SampledToken& sample, RequestEvent& event) {
  const int32_t token = sample.token;
  e.generated.push_back(token);
  event.new_tokens.push_back(token);
  event.samples.push_back(sample);
  bool stop_string = false;
  if (e.matcher != nullptr) {
    StopMatcher::Delta delta = e.matcher->Push(token);
    event.text_delta = std::move(delta.text);
    stop_string = delta.stopped;
  }
  const Request& r = e.request;
  const int64_t generated = static_cast<int64_t>(e.generated.size());
  if (Contains(r.stop_token_ids, token) || (!r.ignore_eos && Contains(r.eos_token_ids, token)) ||
      stop_string) {
    Finish(e, FinishReason::kStop, "", event);
  } else if (generated >= r.max_tokens ||
             static_cast<int64_t>(r.prompt.size()) + generated >= options.context_length) {
    Finish(e, FinishReason::kLength, "", event);
  } else {
    e.state = RequestState::kDecode;
  }
}

void BatchScheduler::Impl::Finish(Entry& e, FinishReason reason, std::string error, RequestEvent& event) {
  event.finished = true;
  event.reason = reason;
  event.error = std::move(error);
  if (e.matcher != nullptr) event.text_delta += e.matcher->Finish();  // "" after a stop string
  if (e.node >= 0) {
    Erase(running[e.node], e.request.id);
    to_free[e.node].push_back(e.request.id);
  }
  e.state = RequestState::kFinished;
}

// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<BatchScheduler>> BatchScheduler::Create(const Options& options) {
  const std::pair<const char*, int64_t> positive[] = {
      {"max_batch_tokens", options.max_batch_tokens},
      {"max_waiting_requests", options.max_waiting_requests},
      {"page_size", options.page_size},
      {"context_length", options.context_length},
  };
  for (const auto& [name, value] : positive) {
    if (value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("BatchScheduler::Options.", name, " must be positive, got ", value));
    }
  }
  if (options.max_prefill_chunk < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("BatchScheduler::Options.max_prefill_chunk must be >= 0 (0: max_batch_tokens), got ",
                     options.max_prefill_chunk));
  }
  if (options.pages_per_node.empty()) {
    return absl::InvalidArgumentError(
        "BatchScheduler::Options.pages_per_node is empty (one entry per attention node)");
  }
  for (size_t n = 0; n < options.pages_per_node.size(); ++n) {
    if (options.pages_per_node[n] <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("BatchScheduler::Options.pages_per_node[", n,
                                                     "] must be positive, got ", options.pages_per_node[n]));
    }
  }
  return std::unique_ptr<BatchScheduler>(new BatchScheduler(std::make_unique<Impl>(options)));
}

BatchScheduler::BatchScheduler(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BatchScheduler::~BatchScheduler() = default;

absl::Status BatchScheduler::Submit(Request request) { return impl_->Submit(std::move(request)); }

void BatchScheduler::Cancel(RequestId id) {
  auto it = impl_->requests.find(id);
  if (it != impl_->requests.end() && it->second->state != RequestState::kFinished) {
    it->second->cancelled = true;
  }
}

StepPlan BatchScheduler::PlanStep(absl::Time now) { return impl_->PlanStep(now); }

std::vector<RequestEvent> BatchScheduler::ApplyResults(const StepPlan& plan,
                                                       const std::vector<SampledToken>& sampled,
                                                       const std::vector<NodeFailure>& failed) {
  if (!impl_->outstanding.has_value() || impl_->outstanding->step_id != plan.step_id) return {};
  const Impl::Outstanding step = *std::move(impl_->outstanding);
  impl_->outstanding.reset();
  return impl_->Apply(step, sampled, "", failed);
}

std::vector<RequestEvent> BatchScheduler::NodeDown(int node, absl::StatusCode code, const std::string& message) {
  Impl& m = *impl_;
  if (m.down.at(node)) return {};
  m.down[node] = true;
  std::vector<RequestEvent> events;
  const std::vector<RequestId> placed = m.running[node];
  for (RequestId id : placed) {
    RequestEvent event;
    event.id = id;
    event.error_code = code;
    m.Finish(m.Get(id), FinishReason::kError, message, event);
    events.push_back(std::move(event));
  }
  // Nothing to free on a process that is gone.
  for (RequestId id : m.to_free[node]) m.requests.erase(id);
  m.to_free[node].clear();
  m.pages_used[node] = 0;
  return events;
}

void BatchScheduler::NodeUp(int node, int64_t pages) {
  Impl& m = *impl_;
  m.down.at(node) = false;
  if (pages > 0) m.options.pages_per_node[node] = pages;
  m.pages_used[node] = 0;
}

bool BatchScheduler::node_up(int node) const { return !impl_->down.at(node); }

std::vector<RequestEvent> BatchScheduler::FailAll(absl::StatusCode code, const std::string& message) {
  Impl& m = *impl_;
  std::vector<RequestEvent> events;
  auto fail = [&](RequestId id) {
    RequestEvent event;
    event.id = id;
    event.error_code = code;
    m.Finish(m.Get(id), FinishReason::kError, message, event);
    events.push_back(std::move(event));
  };
  for (RequestId id : m.waiting) {
    fail(id);
    m.requests.erase(id);  // never placed: no pages to free
  }
  m.waiting.clear();
  for (int n = 0; n < m.num_nodes(); ++n) {
    const std::vector<RequestId> placed = m.running[n];
    for (RequestId id : placed) fail(id);  // moves it to to_free[n]
  }
  return events;
}

absl::Time BatchScheduler::NextDeadline() const {
  absl::Time next = absl::InfiniteFuture();
  for (RequestId id : impl_->waiting) next = std::min(next, impl_->requests.at(id)->request.deadline);
  return next;
}

int BatchScheduler::num_nodes() const { return impl_->num_nodes(); }
int64_t BatchScheduler::pages_total(int node) const { return impl_->options.pages_per_node.at(node); }
int64_t BatchScheduler::pages_free(int node) const {
  return impl_->options.pages_per_node.at(node) - impl_->pages_used.at(node);
}
int64_t BatchScheduler::num_waiting() const { return static_cast<int64_t>(impl_->waiting.size()); }
int64_t BatchScheduler::num_running() const {
  int64_t n = 0;
  for (const auto& placed : impl_->running) n += static_cast<int64_t>(placed.size());
  return n;
}

int64_t BatchScheduler::num_to_free() const {
  int64_t n = 0;
  for (const auto& ids : impl_->to_free) n += static_cast<int64_t>(ids.size());
  return n;
}

std::optional<RequestView> BatchScheduler::GetRequest(RequestId id) const {
  auto it = impl_->requests.find(id);
  if (it == impl_->requests.end()) return std::nullopt;
  const Impl::Entry& e = *it->second;
  RequestView view;
  view.state = e.state;
  view.node = e.node;
  view.length = e.cache_len;
  view.prompt_tokens = static_cast<int64_t>(e.request.prompt.size());
  view.generated_tokens = static_cast<int64_t>(e.generated.size());
  view.preemptions = e.preemptions;
  return view;
}

}  // namespace dmoe::scheduler
