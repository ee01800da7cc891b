// How requests end: stop token ids, EOS (and ignore_eos), max_tokens, the
// context length, and stop strings on the streamed text (golden tokenizer).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "core/tokenizer.h"
#include "scheduler/batch_scheduler.h"
#include "tests/scheduler/fake_cluster.h"
#include "tests/scheduler/golden_tokenizer.h"

namespace dmoe::scheduler {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using testing::Scenario;

const Tokenizer& Tiny() { return testing::GoldenTokenizer(); }

// A "model" that replays a fixed script per request (then token 300).
testing::FakeModel Script(std::map<RequestId, std::vector<int32_t>> scripts) {
  return [scripts](RequestId id, int64_t sample_index, const std::vector<int32_t>&) {
    const std::vector<int32_t>& s = scripts.at(id);
    return sample_index < static_cast<int64_t>(s.size()) ? s[sample_index] : 300;
  };
}

BatchScheduler::Options Opts(int64_t context = 64, const Tokenizer* tokenizer = nullptr) {
  BatchScheduler::Options o;
  o.pages_per_node = {32};
  o.page_size = 4;
  o.max_batch_tokens = 64;
  o.context_length = context;
  o.tokenizer = tokenizer;
  return o;
}

Request Req(RequestId id, int prompt_len, int max_tokens) {
  Request r;
  r.id = id;
  for (int i = 0; i < prompt_len; ++i) r.prompt.push_back(40 + i);
  r.max_tokens = max_tokens;
  r.eos_token_ids = {1};
  return r;
}

TEST(BatchSchedulerStopTest, EachStopConditionEndsItsRequest) {
  Scenario s(Opts(/*context=*/8), Script({
                                      {1, {10, 11, 12, 13}},  // stop id 12
                                      {2, {10, 1, 11, 12}},   // EOS
                                      {3, {10, 1, 11, 12}},   // EOS ignored -> max_tokens
                                      {4, {10, 11, 12, 13}},  // max_tokens
                                      {5, {10, 11, 12, 13}},  // 5 + 3 = context 8
                                      {6, {10, 11, 12, 13}},  // stop id on the last allowed token
                                  }));
  Request stop_id = Req(1, 2, 5);
  stop_id.stop_token_ids = {12};
  Request eos = Req(2, 2, 5);
  Request ignore_eos = Req(3, 2, 3);
  ignore_eos.ignore_eos = true;
  Request length = Req(4, 2, 2);
  Request context = Req(5, 5, 3);
  Request stop_beats_length = Req(6, 2, 3);
  stop_beats_length.stop_token_ids = {12};
  for (const Request& r : {stop_id, eos, ignore_eos, length, context, stop_beats_length}) s.SubmitAt(0, r);
  s.Run({
      {0, "1@0:2* 2@0:2* 3@0:2* 4@0:2* 5@0:5* 6@0:2*", "", {25}, "", 0},
      {1, "1@0:1* 2@0:1* 3@0:1* 4@0:1* 5@0:1* 6@0:1*", "", {25}, "2:stop 4:length", 0},
      {2, "1@0:1* 3@0:1* 5@0:1* 6@0:1*", "2@0 4@0", {27}, "1:stop 3:length 5:length 6:stop", 0},
      {3, "", "1@0 3@0 5@0 6@0", {32}, "", 0},
  });
  EXPECT_THAT(s.tokens(1), ElementsAre(10, 11, 12)) << "stop id included";
  EXPECT_THAT(s.tokens(2), ElementsAre(10, 1)) << "EOS included";
  EXPECT_THAT(s.tokens(3), ElementsAre(10, 1, 11));
  EXPECT_THAT(s.tokens(4), ElementsAre(10, 11));
  EXPECT_THAT(s.tokens(5), ElementsAre(10, 11, 12));
  EXPECT_THAT(s.tokens(6), ElementsAre(10, 11, 12));
  for (const auto& [id, event] : s.finished()) {
    EXPECT_EQ(event.error, "") << id;
    EXPECT_TRUE(event.text_delta.empty()) << "no tokenizer, no text";
  }
  // The context boundary is exact: one more token is refused up front.
  EXPECT_EQ(s.scheduler().Submit(Req(7, 5, 4)).code(), absl::StatusCode::kResourceExhausted);
}

// The generated text is "The answer: 42 tokens. Done"; the stop string
// "42 tok" spans tokens, so generation stops on the token that completes
// it and the stream never shows any of it.
TEST(BatchSchedulerStopTest, StopStringAcrossTokensEndsTheRequest) {
  const std::string text = "The answer: 42 tokens. Done";
  const std::vector<int32_t> script = Tiny().Encode(text);
  Scenario s(Opts(64, &Tiny()), Script({{1, script}, {2, script}}));
  Request r = Req(1, 3, 40);
  r.stop = {"42 tok", "never"};
  Request no_stop = Req(2, 3, static_cast<int>(script.size()));
  s.SubmitAt(0, r);
  s.SubmitAt(0, no_stop);
  s.RunToCompletion();

  const RequestEvent& done = s.finished().at(1);
  EXPECT_EQ(done.reason, FinishReason::kStop);
  EXPECT_EQ(s.text(1), "The answer: ");
  // Tokens up to the one that completes the stop string.
  size_t completing = 0;
  while (Tiny().Decode(std::vector<int32_t>(script.begin(), script.begin() + completing)).find("42 tok") ==
         std::string::npos) {
    ++completing;
  }
  EXPECT_THAT(s.tokens(1), ElementsAreArray(script.begin(), script.begin() + completing));
  EXPECT_LT(completing, script.size());

  EXPECT_EQ(s.finished().at(2).reason, FinishReason::kLength);
  EXPECT_EQ(s.text(2), text);
}

// Every event's text is valid UTF-8 although the tiny vocabulary spells
// "日本語" in byte tokens; a request ending by max_tokens while holding back
// a possible stop prefix ("E" of "END") gets it in its last event.
TEST(BatchSchedulerStopTest, StreamsWholeCharactersAndFlushesAtTheEnd) {
  const std::string text = "日本語 café E";
  const std::vector<int32_t> script = Tiny().Encode(text);
  std::vector<std::string> deltas;
  Scenario s(Opts(64, &Tiny()), Script({{1, script}}));
  Request r = Req(1, 2, static_cast<int>(script.size()));
  r.stop = {"END"};
  s.SubmitAt(0, r);
  for (int step = 0; step < 100 && !s.finished().contains(1); ++step) {
    for (const RequestEvent& e : s.Step()) deltas.push_back(e.text_delta);
  }
  ASSERT_TRUE(s.finished().contains(1));
  EXPECT_EQ(s.finished().at(1).reason, FinishReason::kLength);
  EXPECT_EQ(s.text(1), text);
  EXPECT_EQ(s.finished().at(1).text_delta.back(), 'E') << "the held-back \"E\" comes with the last event";
  for (const std::string& d : deltas) EXPECT_TRUE(testing::IsValidUtf8(d)) << d;
}

// EOS text is skipped (skip_special_tokens), and a request cancelled while
// holding back text still gets that text in its last event.
TEST(BatchSchedulerStopTest, EosHasNoTextAndCancelFlushes) {
  const int32_t eos = *Tiny().eos_token_id();
  std::vector<int32_t> script = Tiny().Encode("ok");
  script.push_back(eos);
  const std::vector<int32_t> partial = Tiny().Encode("wait E");
  Scenario s(Opts(64, &Tiny()), Script({{1, script}, {2, partial}}));
  Request r = Req(1, 2, 10);
  r.eos_token_ids = {eos};
  Request c = Req(2, 2, 50);
  c.stop = {"END"};
  s.SubmitAt(0, r);
  s.SubmitAt(0, c);
  s.Before(static_cast<int>(partial.size()), [&] { s.scheduler().Cancel(2); });
  s.RunToCompletion();
  EXPECT_EQ(s.finished().at(1).reason, FinishReason::kStop);
  EXPECT_EQ(s.text(1), "ok");
  EXPECT_EQ(s.finished().at(2).reason, FinishReason::kCancelled);
  EXPECT_EQ(s.text(2), "wait E");
}

}  // namespace
}  // namespace dmoe::scheduler
