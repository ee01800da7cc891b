#include "core/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace dmoe {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using json = nlohmann::json;

std::string ReadText(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

const Tokenizer& Tiny() {
  static const Tokenizer* tokenizer = [] {
    auto loaded = Tokenizer::Load(testing::GoldenModelDir());
    if (!loaded.ok()) {
      ADD_FAILURE() << loaded.status();
      std::abort();
    }
    return loaded->release();
  }();
  return *tokenizer;
}

json TinyJson() { return json::parse(ReadText(testing::GoldenModelDir() / "tokenizer.json")); }

// An independent UTF-8 validity check (RFC 3629).
bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char b = s[i];
    size_t n;
    uint32_t cp;
    if (b < 0x80) {
      ++i;
      continue;
    } else if ((b & 0xE0) == 0xC0) {
      n = 1;
      cp = b & 0x1F;
    } else if ((b & 0xF0) == 0xE0) {
      n = 2;
      cp = b & 0x0F;
    } else if ((b & 0xF8) == 0xF0) {
      n = 3;
      cp = b & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;
    for (size_t k = 1; k <= n; ++k) {
      const unsigned char c = s[i + k];
      if ((c & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (c & 0x3F);
    }
    const uint32_t min[] = {0, 0x80, 0x800, 0x10000};
    if (cp < min[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

// The byte-level alphabet (MODEL_SPEC 5), written independently.
std::string ByteChar(int byte) {
  int next = 0x100;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const int cp = printable ? b : next++;
    if (b == byte) {
      std::string s;
      if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
      } else {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      return s;
    }
  }
  return "";
}

int32_t ByteId(const Tokenizer& t, int byte) {
  std::optional<int32_t> id = t.TokenId(ByteChar(byte));
  EXPECT_TRUE(id.has_value()) << "byte " << byte;
  return id.value_or(-1);
}

// Texts beyond the golden cases.
std::vector<std::string> OwnTexts() {
  return {
      "深度求索 DeepSeek 的混合专家模型。日本語のテキスト、カタカナとひらがな。",
      "emoji 🤖🚀 ok 👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵",
      "combining: e\u0301 n\u0303 a\u0308\u0304 Z\u0351\u0360\u036B",
      "Ελληνικά, русский, עברית, العربية, हिन्दी",
      std::string(3000, ' ') + "x" + std::string(1000, ' '),
      std::string(2000, '\n') + "y\r\n\r\n\t\t  \n",
      std::string(1500, '7') + " 3.14159 1e-9 0x7f",
      "tabs\tand\tspaces   \t \n mixed\u00a0nbsp\u2003emsp\u3000ideo",
      "It's we'LL they'RE I'M x'D 's",
      "code: for (int i = 0; i < n; ++i) { x[i] += y[i] * 2; }\n",
      "\x01\x02\x7f control \u0085 chars",
  };
}

std::vector<std::string> GoldenTexts() {
  std::vector<std::string> texts;
  const json cases = json::parse(ReadText(testing::GoldenModelDir() / "tokenizer_cases.json"));
  for (const json& c : cases["cases"]) texts.push_back(c["text"].get<std::string>());
  return texts;
}

// A tokenizer over the 256 byte tokens (ids 0..255 in byte order) plus
// `extra` tokens (ids from 256) and string merges.
json MiniJson(const json& pre_tokenizer, const std::vector<std::string>& extra,
              const std::vector<std::string>& merges, const json& added = json::array()) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
  int next = 256;
  for (const std::string& token : extra) vocab[token] = next++;
  json j;
  j["version"] = "1.0";
  j["added_tokens"] = added;
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = pre_tokenizer;
  j["post_processor"] = nullptr;
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true},
                  {"use_regex", true}};
  j["model"] = {{"type", "BPE"},         {"dropout", nullptr},       {"unk_token", nullptr},
                {"fuse_unk", false},     {"byte_fallback", false},   {"ignore_merges", false},
                {"vocab", vocab},        {"merges", merges}};
  return j;
}

std::unique_ptr<Tokenizer> MustLoad(const json& tokenizer_json, const std::string& config = "") {
  auto t = Tokenizer::FromJson(tokenizer_json.dump(), config);
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return nullptr;
  return *std::move(t);
}

json SplitStep(const json& pattern, const std::string& behavior) {
  return {{"type", "Split"}, {"pattern", pattern}, {"behavior", behavior}, {"invert", false}};
}

json ByteLevelStep(bool add_prefix_space, bool use_regex) {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", add_prefix_space},
          {"trim_offsets", true},
          {"use_regex", use_regex}};
}

// The tokens of `ids` in byte-level form, for readable expectations.
std::vector<std::string> Pieces(const Tokenizer& t, const std::vector<int32_t>& ids) {
  std::vector<std::string> out;
  for (int32_t id : ids) out.push_back(t.Decode({id}));
  return out;
}

// ---------------------------------------------------------------------------

TEST(TokenizerTest, LoadsTinyV3) {
  const Tokenizer& t = Tiny();
  EXPECT_EQ(t.vocab_size(), 512);
  EXPECT_TRUE(t.add_bos_token());
  EXPECT_EQ(t.bos_token_id(), 0);
  EXPECT_EQ(t.eos_token_id(), 1);
  EXPECT_EQ(t.TokenId("<｜begin▁of▁sentence｜>"), 0);
  EXPECT_EQ(t.TokenId("<｜end▁of▁sentence｜>"), 1);
  EXPECT_EQ(t.TokenId("Ġthe"), 271);
  EXPECT_EQ(t.TokenId("no such token"), std::nullopt);
  EXPECT_TRUE(t.IsSpecial(0));
  EXPECT_TRUE(t.IsSpecial(1));
  EXPECT_FALSE(t.IsSpecial(2));
  EXPECT_FALSE(t.IsSpecial(-1));
  EXPECT_FALSE(t.IsSpecial(100000));
  // Every byte has its token, and it decodes back to the byte.
  for (int b = 0; b < 128; ++b) {
    EXPECT_EQ(t.Decode({ByteId(t, b)}), std::string(1, static_cast<char>(b))) << b;
  }
  EXPECT_EQ(t.Decode({ByteId(t, ' ')}), " ");
  EXPECT_EQ(ByteChar(' '), "Ġ");
  EXPECT_EQ(ByteChar('\n'), "Ċ");
}

TEST(TokenizerTest, GoldenCases) {
  const Tokenizer& t = Tiny();
  const json cases = json::parse(ReadText(testing::GoldenModelDir() / "tokenizer_cases.json"));
  ASSERT_GE(cases["cases"].size(), 1u);
  for (const json& c : cases["cases"]) {
    const std::string text = c["text"];
    const std::vector<int32_t> ids = c["ids"];
    EXPECT_EQ(t.Encode(text), ids) << text;
    auto checked = t.EncodeChecked(text);
    ASSERT_TRUE(checked.ok()) << checked.status();
    EXPECT_EQ(*checked, ids) << text;
    EXPECT_EQ(t.Decode(ids), c["decoded"].get<std::string>()) << text;
    EXPECT_TRUE(t.ValidateIds(ids).ok());
  }
}

TEST(TokenizerTest, RoundTripsOwnTexts) {
  const Tokenizer& t = Tiny();
  for (const std::string& text : OwnTexts()) {
    const std::vector<int32_t> ids = t.Encode(text);
    for (int32_t id : ids) {
      ASSERT_GE(id, 0);
      ASSERT_LT(id, t.vocab_size());
    }
    EXPECT_TRUE(t.ValidateIds(ids).ok());
    EXPECT_EQ(t.Decode(ids), text);
    auto checked = t.EncodeChecked(text);
    ASSERT_TRUE(checked.ok()) << checked.status();
    EXPECT_EQ(*checked, ids);
  }
}

// The pre-tokenizer, normalizer and decoder as DeepSeek-V3's own
// tokenizer.json has them (CJK runs isolated, punctuation kept with letters).
json WithDeepSeekV3PreTokenizer(json j) {
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array()}};
  j["decoder"] = {{"type", "ByteLevel"}};
  auto& steps = j["pre_tokenizer"]["pretokenizers"];
  steps[0]["pattern"]["Regex"] = "\\p{N}{1,3}";
  steps[1]["pattern"]["Regex"] = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+";
  steps[2]["pattern"]["Regex"] =
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
      "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
  return j;
}

TEST(TokenizerTest, DeepSeekV3FileForm) {
  auto t = MustLoad(WithDeepSeekV3PreTokenizer(TinyJson()));
  ASSERT_NE(t, nullptr);
  std::vector<std::string> texts = GoldenTexts();
  for (const std::string& text : OwnTexts()) texts.push_back(text);
  texts.push_back(".Hello,world!!\n\n中文abc日本語のテキスト x");
  for (const std::string& text : texts) {
    const std::vector<int32_t> ids = t->Encode(text);
    EXPECT_EQ(t->Decode(ids), text);
  }
  // A non-empty normalizer Sequence is still rejected.
  json j = WithDeepSeekV3PreTokenizer(TinyJson());
  j["normalizer"]["normalizers"].push_back({{"type", "NFKC"}});
  auto bad = Tokenizer::FromJson(j.dump(), "");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("NFKC"));
}

TEST(TokenizerTest, EmptyText) {
  const Tokenizer& t = Tiny();
  EXPECT_TRUE(t.Encode("").empty());
  EXPECT_EQ(t.Decode({}), "");
}

TEST(TokenizerTest, PreTokenizerSplitsDigitGroups) {
  const Tokenizer& t = Tiny();
  // \p{N}{1,3}: digits in groups of three from the left.
  const std::vector<int32_t> ids = t.Encode("1234567");
  EXPECT_EQ(t.Decode(ids), "1234567");
  std::vector<std::string> pieces = Pieces(t, ids);
  std::string joined;
  for (const std::string& p : pieces) joined += p + "|";
  EXPECT_EQ(joined.find("34"), std::string::npos) << joined;  // "123" and "456" never merge across
}

TEST(TokenizerTest, SpecialTokensInsideText) {
  const Tokenizer& t = Tiny();
  const std::string bos = "<｜begin▁of▁sentence｜>";
  const std::string eos = "<｜end▁of▁sentence｜>";
  const std::string text = "Hello " + bos + "world" + eos + eos + " end";
  const std::vector<int32_t> ids = t.Encode(text);
  std::vector<int32_t> expected = t.Encode("Hello ");
  expected.push_back(0);
  for (int32_t id : t.Encode("world")) expected.push_back(id);
  expected.push_back(1);
  expected.push_back(1);
  for (int32_t id : t.Encode(" end")) expected.push_back(id);
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(t.Decode(ids), text);
  EXPECT_EQ(t.Decode(ids, /*skip_special_tokens=*/true), "Hello world end");
  // A prefix of an added token is ordinary text.
  const std::vector<int32_t> partial = t.Encode("<｜begin▁of");
  EXPECT_EQ(std::count(partial.begin(), partial.end(), 0), 0);
  EXPECT_EQ(t.Decode(partial), "<｜begin▁of");
  // At the very start and end.
  EXPECT_THAT(t.Encode(bos), ElementsAre(0));
  EXPECT_EQ(t.Encode(bos + "x").front(), 0);
  EXPECT_EQ(t.Encode("x" + eos).back(), 1);
}

TEST(TokenizerTest, AddedTokensLongestMatchLeftToRight) {
  const json added = json::array({
      {{"id", 300}, {"content", "<a>"}, {"special", true}},
      {{"id", 301}, {"content", "<a><b>"}, {"special", false}},
      {{"id", 302}, {"content", "abc"}, {"special", false}},
      {{"id", 303}, {"content", "bcd"}, {"special", false}},
  });
  auto t = MustLoad(MiniJson(ByteLevelStep(false, false), {}, {}, added));
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->vocab_size(), 304);
  EXPECT_THAT(t->Encode("x<a><b>y<a>z<a><"),
              ElementsAre('x', 301, 'y', 300, 'z', 300, '<'));
  EXPECT_THAT(t->Encode("abcd"), ElementsAre(302, 'd'));
  EXPECT_THAT(t->Encode("xbcd"), ElementsAre('x', 303));
  EXPECT_TRUE(t->IsSpecial(300));
  EXPECT_FALSE(t->IsSpecial(301));
  EXPECT_EQ(t->Decode({'x', 300, 301}, /*skip_special_tokens=*/true), "x<a><b>");
  EXPECT_EQ(t->Decode({'x', 300, 301}), "x<a><a><b>");
}

TEST(TokenizerTest, SplitBehaviors) {
  // In one piece "a-b--c" becomes [a-, b, --, c].
  const std::vector<std::string> extra = {"a-", "-b", "--", "b-", "-c"};
  const std::vector<std::string> merges = {"a -", "- b", "- -", "b -", "- c"};
  auto pieces = [&](const json& pre) {
    auto t = MustLoad(MiniJson(pre, extra, merges));
    if (t == nullptr) return std::vector<std::string>{};
    const std::vector<int32_t> ids = t->Encode("a-b--c");
    const std::string decoded = t->Decode(ids);
    EXPECT_TRUE(decoded == "a-b--c" || decoded == "abc") << decoded;  // abc: Removed
    return Pieces(*t, ids);
  };
  auto seq = [](const json& split) {
    return json{{"type", "Sequence"},
                {"pretokenizers", json::array({split, ByteLevelStep(false, false)})}};
  };
  const json dash = {{"String", "-"}};
  EXPECT_THAT(pieces(ByteLevelStep(false, false)), ElementsAre("a-", "b", "--", "c"));
  EXPECT_THAT(pieces(seq(SplitStep(dash, "Isolated"))),
              ElementsAre("a", "-", "b", "-", "-", "c"));
  EXPECT_THAT(pieces(seq(SplitStep(dash, "Removed"))), ElementsAre("a", "b", "c"));
  EXPECT_THAT(pieces(seq(SplitStep(dash, "MergedWithPrevious"))),
              ElementsAre("a-", "b-", "-", "c"));
  EXPECT_THAT(pieces(seq(SplitStep(dash, "MergedWithNext"))), ElementsAre("a", "-b", "-", "-c"));
  EXPECT_THAT(pieces(seq(SplitStep(dash, "Contiguous"))), ElementsAre("a", "-", "b", "--", "c"));
  // Regex patterns; a lone Split (no ByteLevel pre-tokenizer step).
  EXPECT_THAT(pieces(SplitStep({{"Regex", "-+"}}, "Isolated")), ElementsAre("a", "-", "b", "--", "c"));
  // A literal String pattern is not a regex.
  EXPECT_THAT(pieces(seq(SplitStep({{"String", "-+"}}, "Isolated"))),
              ElementsAre("a-", "b", "--", "c"));
}

TEST(TokenizerTest, OnigurumaUnicodeEscapesInRegex) {
  // "b" + the first byte of 中 (U+4E2D, E4 B8 AD) merge only within a piece.
  const std::string b_e4 = "b" + ByteChar(0xE4);
  const json split = SplitStep({{"Regex", "[\\u4e00-\\u9fa5]+"}}, "Isolated");
  const json pre = {{"type", "Sequence"},
                    {"pretokenizers", json::array({split, ByteLevelStep(false, false)})}};
  auto t = MustLoad(MiniJson(pre, {b_e4}, {"b " + ByteChar(0xE4)}));
  ASSERT_NE(t, nullptr);
  EXPECT_THAT(t->Encode("ab中"), ElementsAre('a', 'b', 0xE4, 0xB8, 0xAD));
  auto unsplit = MustLoad(MiniJson(ByteLevelStep(false, false), {b_e4}, {"b " + ByteChar(0xE4)}));
  ASSERT_NE(unsplit, nullptr);
  EXPECT_THAT(unsplit->Encode("ab中"), ElementsAre('a', 256, 0xB8, 0xAD));
}

TEST(TokenizerTest, RegexClassesFollowOniguruma) {
  // Removes what `regex` matches and returns what is left.
  auto removed = [](const std::string& regex, const std::string& text) {
    const json pre = {{"type", "Sequence"},
                      {"pretokenizers", json::array({SplitStep({{"Regex", regex}}, "Removed"),
                                                     ByteLevelStep(false, false)})}};
    auto t = MustLoad(MiniJson(pre, {}, {}));
    return t == nullptr ? std::string("(load failed)") : t->Decode(t->Encode(text));
  };
  // \s is Unicode White_Space: U+00A0, U+0085, U+3000 yes; U+180E (PCRE2's
  // own \s has it) and U+200B no.
  EXPECT_EQ(removed("\\s+", "a\u00a0b\u0085c\u3000d\u180ee\u200bf\tg"), "abcd\u180ee\u200bfg");
  EXPECT_EQ(removed("\\S+", "a\u180e b"), " ");
  EXPECT_EQ(removed("[\\s]+", "a\u180e b"), "a\u180eb");
  // \w: letters, marks, decimal digits, connectors; not other numbers.
  EXPECT_EQ(removed("\\w+", "a\u0301_9\u00b2 x"), "\u00b2 ");
  EXPECT_EQ(removed("[\\w-]+", "ab-c d"), " ");
  EXPECT_EQ(removed("\\W+", "a\u0301 \u00b2b"), "a\u0301b");
  // \h is a hex digit.
  EXPECT_EQ(removed("\\h+", "12 ab xyz"), "  xyz");
  // ] first in a class is a literal; POSIX classes pass through.
  EXPECT_EQ(removed("[]a]+", "x]a]y"), "xy");
  EXPECT_EQ(removed("[[:digit:]\\s]+", "a 1 b"), "ab");
}

TEST(TokenizerTest, LoneByteLevelWithRegexAndPrefixSpace) {
  // "o" + "Ġ" merges only when "Hello" and " world" share a piece.
  const std::vector<std::string> extra = {"oĠ"};
  const std::vector<std::string> merges = {"o Ġ"};
  auto gpt2 = MustLoad(MiniJson(ByteLevelStep(false, true), extra, merges));
  ASSERT_NE(gpt2, nullptr);
  EXPECT_THAT(Pieces(*gpt2, gpt2->Encode("Hello world")),
              ElementsAre("H", "e", "l", "l", "o", " ", "w", "o", "r", "l", "d"));
  auto plain = MustLoad(MiniJson(ByteLevelStep(false, false), extra, merges));
  ASSERT_NE(plain, nullptr);
  EXPECT_THAT(Pieces(*plain, plain->Encode("Hello world")),
              ElementsAre("H", "e", "l", "l", "o ", "w", "o", "r", "l", "d"));
  auto prefixed = MustLoad(MiniJson(ByteLevelStep(true, true), extra, merges));
  ASSERT_NE(prefixed, nullptr);
  EXPECT_EQ(prefixed->Decode(prefixed->Encode("Hi")), " Hi");
  EXPECT_EQ(prefixed->Decode(prefixed->Encode(" Hi")), " Hi");
}

TEST(TokenizerTest, MergeRanksAndFormats) {
  // Lowest rank first, leftmost on ties: "aaaa" -> [aa, a, a] -> [aa, aa]
  // (rank 0 "a a" beats rank 2 "aa a").
  const std::vector<std::string> extra = {"aa", "aaa", "ab"};
  auto t = MustLoad(MiniJson(ByteLevelStep(false, false), extra, {"a a", "a b", "aa a"}));
  ASSERT_NE(t, nullptr);
  EXPECT_THAT(Pieces(*t, t->Encode("aaa")), ElementsAre("aaa"));
  EXPECT_THAT(Pieces(*t, t->Encode("aaaa")), ElementsAre("aa", "aa"));
  EXPECT_THAT(Pieces(*t, t->Encode("aab")), ElementsAre("aa", "b"));
  auto t2 = MustLoad(MiniJson(ByteLevelStep(false, false), extra, {"a b", "a a", "aa a"}));
  ASSERT_NE(t2, nullptr);
  EXPECT_THAT(Pieces(*t2, t2->Encode("aab")), ElementsAre("a", "ab"));
  // Array-form merges (as in the golden file) give the same result.
  json j = MiniJson(ByteLevelStep(false, false), extra, {});
  j["model"]["merges"] = json::array({json::array({"a", "b"}), json::array({"a", "a"}),
                                      json::array({"aa", "a"})});
  auto t3 = MustLoad(j);
  ASSERT_NE(t3, nullptr);
  EXPECT_EQ(t3->Encode("aab"), t2->Encode("aab"));
}

TEST(TokenizerTest, InvalidUtf8) {
  const Tokenizer& t = Tiny();
  auto expect_error_at = [&](const std::string& text, size_t byte) {
    auto ids = t.EncodeChecked(text);
    ASSERT_FALSE(ids.ok());
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ids.status().message(),
                HasSubstr("not valid UTF-8 at byte " + std::to_string(byte)));
  };
  expect_error_at("abc\xff" "def", 3);
  expect_error_at("ab\xe4\xb8", 2);                 // truncated at the end
  expect_error_at("\xc0\xaf", 0);                   // overlong
  expect_error_at("ok \xed\xa0\x80", 3);            // surrogate
  expect_error_at("\xf4\x90\x80\x80", 0);           // above U+10FFFF
  expect_error_at("\xe4\xb8\xad\x80", 3);           // stray continuation
  // Encode replaces each maximal invalid subpart with U+FFFD first.
  EXPECT_EQ(t.Encode("abc\xff" "def"), t.Encode("abc\uFFFD" "def"));
  EXPECT_EQ(t.Encode("x\xe4\xb8y"), t.Encode("x\uFFFDy"));
  EXPECT_EQ(t.Decode(t.Encode("a\xed\xa0\x80z")), "a\uFFFD\uFFFD\uFFFDz");
}

TEST(TokenizerTest, DecodeReplacesInvalidUtf8LikePython) {
  const Tokenizer& t = Tiny();
  auto bytes = [&](std::initializer_list<int> bs) {
    std::vector<int32_t> ids;
    for (int b : bs) ids.push_back(ByteId(t, b));
    return ids;
  };
  // bytes.decode("utf-8", errors="replace") results.
  EXPECT_EQ(t.Decode(bytes({0xE4, 0xB8, 0xAD})), "中");
  EXPECT_EQ(t.Decode(bytes({0xE4, 0xB8})), "\uFFFD");
  EXPECT_EQ(t.Decode(bytes({0xE4, 0xB8, 'a'})), "\uFFFDa");
  EXPECT_EQ(t.Decode(bytes({0xFF, 0xFE})), "\uFFFD\uFFFD");
  EXPECT_EQ(t.Decode(bytes({0xF0, 0x9F, 0x98, 'x', 0xF0, 0x9F, 0x98, 0x80})), "\uFFFDx😀");
  EXPECT_EQ(t.Decode(bytes({0xED, 0xA0, 0x80})), "\uFFFD\uFFFD\uFFFD");
  EXPECT_EQ(t.Decode(bytes({0xC0, 0xAF})), "\uFFFD\uFFFD");
  EXPECT_EQ(t.Decode(bytes({0xE0, 0x80, 0x80})), "\uFFFD\uFFFD\uFFFD");
  EXPECT_EQ(t.Decode(bytes({0xF4, 0x90})), "\uFFFD\uFFFD");
  EXPECT_EQ(t.Decode(bytes({0x80, 'a', 0xBF})), "\uFFFDa\uFFFD");
}

TEST(TokenizerTest, ValidateIdsAndDecodeOfUnknownIds) {
  const Tokenizer& t = Tiny();
  EXPECT_TRUE(t.ValidateIds({0, 5, 511}).ok());
  absl::Status status = t.ValidateIds({5, 512, 7});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("512"));
  EXPECT_THAT(status.message(), HasSubstr("vocab size 512"));
  status = t.ValidateIds({-3});
  EXPECT_THAT(status.message(), HasSubstr("-3"));
  const int32_t a = ByteId(t, 'a');
  EXPECT_EQ(t.Decode({a, 512, -1, 1 << 30, a}), "aa");
  // Ids below vocab_size without a token are rejected and skipped too.
  const json added = json::array({{{"id", 400}, {"content", "<x>"}, {"special", true}}});
  auto holes = MustLoad(MiniJson(ByteLevelStep(false, false), {}, {}, added));
  ASSERT_NE(holes, nullptr);
  EXPECT_EQ(holes->vocab_size(), 401);
  EXPECT_THAT(holes->ValidateIds({'a', 300}).message(), HasSubstr("300"));
  EXPECT_EQ(holes->Decode({'a', 300, 400}), "a<x>");
}

// Pushes `ids` through a StreamingDetokenizer; checks each delta is valid
// UTF-8 and that the deltas add up to Decode.
void ExpectStreamingMatchesDecode(const Tokenizer& t, const std::vector<int32_t>& ids,
                                  bool skip_special) {
  StreamingDetokenizer stream(t, skip_special);
  std::string all;
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string delta = stream.Push(ids[i]);
    EXPECT_TRUE(IsValidUtf8(delta)) << "delta " << i;
    all += delta;
  }
  const std::string tail = stream.Finish();
  EXPECT_TRUE(IsValidUtf8(tail));
  all += tail;
  EXPECT_EQ(all, t.Decode(ids, skip_special));
}

TEST(StreamingDetokenizerTest, MatchesDecode) {
  const Tokenizer& t = Tiny();
  std::vector<std::string> texts = GoldenTexts();
  for (const std::string& text : OwnTexts()) texts.push_back(text);
  texts.push_back("<｜begin▁of▁sentence｜>中文 🤖<｜end▁of▁sentence｜>");
  for (const std::string& text : texts) {
    SCOPED_TRACE(text.substr(0, 40));
    const std::vector<int32_t> ids = t.Encode(text);
    ExpectStreamingMatchesDecode(t, ids, false);
    ExpectStreamingMatchesDecode(t, ids, true);
  }
  // Arbitrary byte sequences, invalid ones included, and unknown ids.
  std::vector<int32_t> ids;
  uint32_t state = 12345;
  for (int i = 0; i < 3000; ++i) {
    state = state * 1664525u + 1013904223u;
    const int r = static_cast<int>(state >> 24);
    if (r < 4) {
      ids.push_back(600 + r);  // not a token
    } else {
      ids.push_back(ByteId(t, (state >> 8) & 0xFF));
    }
  }
  ExpectStreamingMatchesDecode(t, ids, false);
}

TEST(StreamingDetokenizerTest, HoldsBackIncompleteCharacters) {
  const Tokenizer& t = Tiny();
  StreamingDetokenizer stream(t);
  // 🤖 is F0 9F A4 96: byte tokens in the tiny vocab.
  EXPECT_EQ(stream.Push(ByteId(t, 'a')), "a");
  EXPECT_EQ(stream.Push(ByteId(t, 0xF0)), "");
  EXPECT_EQ(stream.Push(ByteId(t, 0x9F)), "");
  EXPECT_EQ(stream.Push(ByteId(t, 0xA4)), "");
  EXPECT_EQ(stream.Push(ByteId(t, 0x96)), "🤖");
  // A byte that breaks the sequence: U+FFFD for the prefix, then the byte.
  EXPECT_EQ(stream.Push(ByteId(t, 0xE4)), "");
  EXPECT_EQ(stream.Push(ByteId(t, 'b')), "\uFFFDb");
  EXPECT_EQ(stream.Push(ByteId(t, 0xFF)), "\uFFFD");
  EXPECT_EQ(stream.Push(0), "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(stream.Push(ByteId(t, 0xE4)), "");
  EXPECT_EQ(stream.Push(ByteId(t, 0xB8)), "");
  EXPECT_EQ(stream.Finish(), "\uFFFD");
  EXPECT_EQ(stream.Finish(), "");
  StreamingDetokenizer skipping(t, /*skip_special_tokens=*/true);
  EXPECT_EQ(skipping.Push(0), "");
  EXPECT_EQ(skipping.Push(ByteId(t, 'z')), "z");
}

TEST(TokenizerTest, RejectsBadTokenizerJson) {
  auto error = [](const std::string& tokenizer_json, const std::string& config = "") {
    auto t = Tokenizer::FromJson(tokenizer_json, config);
    EXPECT_FALSE(t.ok());
    return t.ok() ? absl::OkStatus() : t.status();
  };
  absl::Status s = error("{\"model\": ");
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("tokenizer.json"));
  EXPECT_THAT(s.message(), HasSubstr("not valid JSON"));

  json j = TinyJson();
  j["model"]["type"] = "WordPiece";
  s = error(j.dump());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("WordPiece"));
  EXPECT_THAT(s.message(), HasSubstr("model"));

  j = TinyJson();
  j["normalizer"] = {{"type", "NFC"}};
  s = error(j.dump());
  EXPECT_THAT(s.message(), HasSubstr("normalizer"));
  EXPECT_THAT(s.message(), HasSubstr("NFC"));

  j = TinyJson();
  j["decoder"] = {{"type", "Metaspace"}};
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("Metaspace"));

  j = TinyJson();
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("Whitespace"));

  j = TinyJson();
  j["pre_tokenizer"]["pretokenizers"][0]["invert"] = true;
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("invert"));

  j = TinyJson();
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("Sideways"));

  j = TinyJson();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(unclosed"}};
  s = error(j.dump());
  EXPECT_THAT(s.message(), HasSubstr("(unclosed"));
  EXPECT_THAT(s.message(), HasSubstr("pretokenizers[0]"));

  j = TinyJson();
  std::swap(j["pre_tokenizer"]["pretokenizers"][0], j["pre_tokenizer"]["pretokenizers"][3]);
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("ByteLevel must come last"));

  j = TinyJson();
  j["model"]["byte_fallback"] = true;
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("byte_fallback"));

  j = TinyJson();
  j["model"]["merges"].push_back(json::array({"zz", "qq"}));
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("merges[254]"));

  j = TinyJson();
  j["model"]["vocab"]["bad"] = "seven";
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("\"seven\""));

  j = TinyJson();
  j["added_tokens"][0]["lstrip"] = true;
  EXPECT_THAT(error(j.dump()).message(), HasSubstr("lstrip"));

  s = error(TinyJson().dump(), "{oops");
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr("tokenizer_config.json"));

  s = error(TinyJson().dump(), R"({"add_bos_token": true, "bos_token": "<nope>"})");
  EXPECT_THAT(s.message(), HasSubstr("<nope>"));

  // Load: a missing directory.
  auto missing = Tokenizer::Load(testing::GoldenModelDir() / "no_such_dir");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(TokenizerTest, BosFromConfigForms) {
  const std::string tj = TinyJson().dump();
  auto t = Tokenizer::FromJson(
      tj, R"({"add_bos_token": false, "bos_token": {"content": "<｜end▁of▁sentence｜>"}})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE((*t)->add_bos_token());
  EXPECT_EQ((*t)->bos_token_id(), 1);
  t = Tokenizer::FromJson(tj, "");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE((*t)->add_bos_token());  // no config, no post_processor
  EXPECT_EQ((*t)->bos_token_id(), std::nullopt);
  // Without a config, a TemplateProcessing post_processor decides.
  json j = TinyJson();
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", json::array({{{"SpecialToken", {{"id", "<｜begin▁of▁sentence｜>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})}};
  t = Tokenizer::FromJson(j.dump(), "");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE((*t)->add_bos_token());
  EXPECT_EQ((*t)->bos_token_id(), 0);
}

TEST(TokenizerTest, LongRunsAreFast) {
  const Tokenizer& t = Tiny();
  const size_t n = 100000;
  std::string mixed;
  while (mixed.size() < n) mixed += "word 12 \n\n  x";
  std::string cjk;
  while (cjk.size() < n) cjk += "中文日本語";
  const std::vector<std::string> texts = {
      std::string(n, ' '), std::string(n, '\n'), std::string(n, 'a'), std::string(n, '9'),
      std::string(n, '!'), std::string(n - 1, ' ') + "x", mixed, cjk,
  };
  for (const std::string& text : texts) {
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = t.Encode(text);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, 1.0) << text.substr(0, 20);
    EXPECT_EQ(t.Decode(ids), text);
  }
}

TEST(TokenizerTest, ConcurrentEncodeMatchesSingleThreaded) {
  std::vector<std::string> texts = GoldenTexts();
  for (const std::string& text : OwnTexts()) texts.push_back(text);
  std::vector<std::vector<int32_t>> expected;
  for (const std::string& text : texts) expected.push_back(Tiny().Encode(text));
  // A fresh tokenizer, so the threads fill its cache concurrently.
  auto fresh = Tokenizer::Load(testing::GoldenModelDir());
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  const Tokenizer& t = **fresh;
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          const size_t k = (i + static_cast<size_t>(w) * 3 + static_cast<size_t>(round)) % texts.size();
          if (t.Encode(texts[k]) != expected[k]) ++mismatches[w];
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_THAT(mismatches, ElementsAreArray({0, 0, 0, 0}));
}

}  // namespace
}  // namespace dmoe
