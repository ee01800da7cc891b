#include "scheduler/stop_matcher.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "core/tokenizer.h"
#include "tests/scheduler/golden_tokenizer.h"

namespace dmoe::scheduler {
namespace {

const Tokenizer& Tiny() { return testing::GoldenTokenizer(); }

// Token ids whose text is exactly `pieces`, token boundaries at least at
// every piece boundary (each piece is encoded on its own).
std::vector<int32_t> EncodePieces(const std::vector<std::string>& pieces) {
  std::vector<int32_t> ids;
  for (const std::string& p : pieces) {
    const std::vector<int32_t> piece = Tiny().Encode(p);
    ids.insert(ids.end(), piece.begin(), piece.end());
  }
  return ids;
}

// The reference: the detokenized text after each token; generation stops at
// the first token after which some stop string occurs, and the output is
// cut at the earliest such occurrence.
struct Reference {
  std::string text;
  size_t stop_token = std::string::npos;  // index of the token that completes a stop
};

Reference ReferenceOutput(const std::vector<int32_t>& ids, const std::vector<std::string>& stops) {
  StreamingDetokenizer detok(Tiny(), /*skip_special_tokens=*/true);
  std::string text;
  for (size_t i = 0; i < ids.size(); ++i) {
    text += detok.Push(ids[i]);
    size_t cut = std::string::npos;
    for (const std::string& s : stops) {
      if (!s.empty()) cut = std::min(cut, text.find(s));
    }
    if (cut != std::string::npos) return {text.substr(0, cut), i};
  }
  text += detok.Finish();
  size_t cut = std::string::npos;
  for (const std::string& s : stops) {
    if (!s.empty()) cut = std::min(cut, text.find(s));
  }
  return {cut == std::string::npos ? text : text.substr(0, cut), std::string::npos};
}

// Runs the matcher over `ids`, checking after every token that what was
// released is a prefix of the reference output (nothing is ever taken back)
// and valid UTF-8, and that it stops on the reference's token.
std::string RunMatcher(const std::vector<int32_t>& ids, const std::vector<std::string>& stops) {
  const Reference ref = ReferenceOutput(ids, stops);
  StopMatcher matcher(Tiny(), stops);
  std::string released;
  for (size_t i = 0; i < ids.size(); ++i) {
    StopMatcher::Delta d = matcher.Push(ids[i]);
    EXPECT_TRUE(testing::IsValidUtf8(d.text)) << "token " << i;
    released += d.text;
    EXPECT_EQ(ref.text.compare(0, released.size(), released), 0)
        << "released \"" << released << "\" is not a prefix of \"" << ref.text << "\"";
    EXPECT_EQ(d.stopped, i == ref.stop_token) << "token " << i;
    if (d.stopped) break;
  }
  released += matcher.Finish();
  EXPECT_EQ(released, ref.text);
  return released;
}

TEST(StopMatcherTest, WithoutStopStringsStreamsTheDecodedText) {
  const std::string text = "Multi-Head Latent Attention, 671B parameters.";
  const std::vector<int32_t> ids = Tiny().Encode(text);
  StopMatcher matcher(Tiny(), {});
  std::string out;
  for (int32_t id : ids) {
    StopMatcher::Delta d = matcher.Push(id);
    EXPECT_FALSE(d.stopped);
    out += d.text;
  }
  EXPECT_EQ(matcher.held_back_bytes(), 0);
  out += matcher.Finish();
  EXPECT_EQ(out, text);
}

TEST(StopMatcherTest, MatchesAStopStringAcrossTokenBoundaries) {
  const std::string text = "router_logits = hidden_state @ router_weight";
  const std::string stop = "state @ rou";
  const std::vector<int32_t> ids = Tiny().Encode(text);
  // The stop string really spans several tokens.
  size_t first = 0, last = 0;
  std::string prefix;
  const size_t start = text.find(stop), end = start + stop.size();
  for (size_t i = 0; i < ids.size(); ++i) {
    prefix = Tiny().Decode(std::vector<int32_t>(ids.begin(), ids.begin() + i + 1));
    if (prefix.size() <= start) first = i + 1;
    if (prefix.size() < end) last = i + 1;
  }
  ASSERT_LT(first, last) << "stop string inside one token; pick another";

  StopMatcher matcher(Tiny(), {stop});
  std::string out;
  size_t stopped_at = ids.size();
  for (size_t i = 0; i < ids.size(); ++i) {
    StopMatcher::Delta d = matcher.Push(ids[i]);
    out += d.text;
    if (d.stopped) {
      stopped_at = i;
      break;
    }
  }
  EXPECT_EQ(stopped_at, last) << "stops on the token that completes the stop string";
  EXPECT_EQ(out, "router_logits = hidden_");
  EXPECT_TRUE(matcher.stopped());
  EXPECT_EQ(matcher.matched_stop(), stop);
  EXPECT_EQ(matcher.Finish(), "");
  EXPECT_TRUE(matcher.Push(ids.back()).text.empty()) << "nothing after a stop";
}

TEST(StopMatcherTest, HoldsBackWhatCouldStartAStopString) {
  StopMatcher matcher(Tiny(), {"END"});
  auto push = [&](const std::string& piece) {
    std::string out;
    for (int32_t id : Tiny().Encode(piece)) {
      StopMatcher::Delta d = matcher.Push(id);
      EXPECT_FALSE(d.stopped);
      out += d.text;
    }
    return out;
  };
  EXPECT_EQ(push("The E"), "The ");
  EXPECT_EQ(matcher.held_back_bytes(), 1);  // "E"
  EXPECT_EQ(push("N"), "");
  EXPECT_EQ(matcher.held_back_bytes(), 2);  // "EN"
  const std::vector<int32_t> d = Tiny().Encode("D");
  ASSERT_EQ(d.size(), 1u);
  const StopMatcher::Delta last = matcher.Push(d[0]);
  EXPECT_EQ(last.text, "") << "completes the stop string";
  EXPECT_TRUE(last.stopped);

  StopMatcher other(Tiny(), {"END"});
  std::string out;
  for (int32_t id : EncodePieces({"The E", "N", " of it"})) out += other.Push(id).text;
  EXPECT_EQ(out, "The EN of it") << "released once it cannot become \"END\"";
  EXPECT_EQ(other.Finish(), "");
}

TEST(StopMatcherTest, FinishReleasesHeldBackText) {
  StopMatcher matcher(Tiny(), {"END"});
  std::string out;
  for (int32_t id : EncodePieces({"stops at E", "N"})) out += matcher.Push(id).text;
  EXPECT_EQ(out, "stops at ");
  EXPECT_EQ(matcher.Finish(), "EN");
  EXPECT_FALSE(matcher.stopped());
}

TEST(StopMatcherTest, EarliestCompletedStopWins) {
  // "bc" completes first, so generation stops there even though "abcd" would
  // have started earlier.
  EXPECT_EQ(RunMatcher(EncodePieces({"xa", "bc", "de"}), {"abcd", "bc"}), "xa");
  // Both complete in one token: cut at the earliest start.
  EXPECT_EQ(RunMatcher(EncodePieces({"x", "abcd"}), {"bcd", "abc"}), "x");
}

TEST(StopMatcherTest, NeverSplitsUtf8) {
  const std::string text = "naïve café: 日本語 🚀 ok";
  const std::vector<int32_t> ids = Tiny().Encode(text);
  // The tiny vocabulary spells multi-byte characters in byte tokens.
  bool split = false;
  for (int32_t id : ids) {
    split |= Tiny().Decode(std::vector<int32_t>{id}).find("\xEF\xBF\xBD") != std::string::npos;
  }
  ASSERT_TRUE(split) << "no token ends inside a character; pick another text";
  ASSERT_FALSE(testing::IsValidUtf8("\xE6\x97")) << "the checker sees a split character";
  StopMatcher matcher(Tiny(), {"本語 X"});
  std::string out;
  for (int32_t id : ids) {
    StopMatcher::Delta d = matcher.Push(id);
    EXPECT_TRUE(testing::IsValidUtf8(d.text)) << "\"" << d.text << "\"";
    out += d.text;
  }
  out += matcher.Finish();
  EXPECT_EQ(out, text);
  EXPECT_EQ(RunMatcher(ids, {"日本"}), "naïve café: ");
  EXPECT_EQ(RunMatcher(ids, {"🚀"}), "naïve café: 日本語 ");
}

TEST(StopMatcherTest, SpecialTokensAreSkippedByDefault) {
  const int32_t eos = *Tiny().eos_token_id();
  StopMatcher matcher(Tiny(), {"end"});
  std::string out;
  for (int32_t id : Tiny().Encode("the en")) out += matcher.Push(id).text;
  out += matcher.Push(eos).text;
  EXPECT_FALSE(matcher.stopped());
  out += matcher.Finish();
  EXPECT_EQ(out, "the en");
}

// Random texts over an alphabet with multi-byte characters, random stop
// strings (often substrings of the text), random token boundaries.
TEST(StopMatcherTest, RandomTextsMatchTheReference) {
  const std::vector<std::string> alphabet = {"a", "b", "c", " ", "é", "日", "🚀", "ab", "\n"};
  std::mt19937 rng(1234);
  for (int iter = 0; iter < 300; ++iter) {
    std::vector<std::string> pieces;
    std::string text;
    const int n = 1 + static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) {
      std::string piece;
      const int len = 1 + static_cast<int>(rng() % 3);
      for (int k = 0; k < len; ++k) piece += alphabet[rng() % alphabet.size()];
      pieces.push_back(piece);
      text += piece;
    }
    std::vector<std::string> stops;
    const int num_stops = static_cast<int>(rng() % 3);
    for (int s = 0; s < num_stops; ++s) {
      if (rng() % 2 == 0 && !text.empty()) {
        // A substring of the text, on character boundaries.
        size_t a = rng() % text.size(), b = a + 1 + rng() % 4;
        while (a > 0 && (static_cast<unsigned char>(text[a]) & 0xC0) == 0x80) --a;
        b = std::min(b, text.size());
        while (b < text.size() && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) ++b;
        stops.push_back(text.substr(a, b - a));
      } else {
        std::string s;
        const int len = 1 + static_cast<int>(rng() % 3);
        for (int k = 0; k < len; ++k) s += alphabet[rng() % alphabet.size()];
        stops.push_back(s);
      }
    }
    SCOPED_TRACE(::testing::Message() << "iteration " << iter << ": \"" << text << "\"");
    RunMatcher(EncodePieces(pieces), stops);
    RunMatcher(Tiny().Encode(text), stops);
  }
}

}  // namespace
}  // namespace dmoe::scheduler
