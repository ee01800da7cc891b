// The byte-level BPE tokenizer (MODEL_SPEC.md 5). See tokenizer.h.
#include "core/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <deque>
#include <fstream>
#include <functional>
#include <mutex>
#include <queue>
#include <shared_mutex>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace dmoe {
namespace {

using json = nlohmann::json;

// Debian's abseil keeps absl::string_view distinct from std::string_view.
absl::string_view AV(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// A JSON value for an error message, shortened.
std::string Show(const json& value) {
  std::string s = value.dump(-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
  if (s.size() > 120) s = s.substr(0, 117) + "...";
  return s;
}

// Ids above this are rejected: the per-id tables are sized max id + 1.
constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;
// Pieces longer than this (bytes) are not cached; at most this many entries.
constexpr size_t kMaxCachedPieceBytes = 256;
constexpr size_t kMaxCacheEntries = size_t{1} << 17;

// ---------------------------------------------------------------------------
// UTF-8

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

enum class Utf8Kind { kValid, kInvalid, kIncomplete };
struct Utf8Step {
  Utf8Kind kind;
  size_t len;  // kValid: sequence length; kInvalid / kIncomplete: the
               // maximal subpart (bytes that one U+FFFD replaces).
};

// Classifies the sequence starting at p[0] (avail >= 1 bytes available),
// following the Unicode "maximal subpart" practice (as Python's
// errors='replace' and Rust's from_utf8_lossy).
Utf8Step ScanUtf8(const unsigned char* p, size_t avail) {
  const unsigned char b = p[0];
  if (b < 0x80) return {Utf8Kind::kValid, 1};
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the first continuation byte
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2;
    lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2;
    hi = 0x9F;
  } else if (b == 0xF0) {
    need = 3;
    lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3;
    hi = 0x8F;
  } else {
    return {Utf8Kind::kInvalid, 1};
  }
  for (size_t k = 1; k <= need; ++k) {
    if (k >= avail) return {Utf8Kind::kIncomplete, k};
    const unsigned char c = p[k];
    if (c < lo || c > hi) return {Utf8Kind::kInvalid, k};
    lo = 0x80;
    hi = 0xBF;
  }
  return {Utf8Kind::kValid, need + 1};
}

// Appends `bytes` to `out`, each maximal invalid subpart replaced by U+FFFD.
// Unless `flush`, stops before a trailing sequence that is incomplete but
// could still become valid. Returns the number of bytes consumed.
size_t AppendUtf8Lossy(std::string_view bytes, bool flush, std::string* out) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  size_t run_start = 0;  // start of the valid bytes not yet copied
  while (i < n) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = ScanUtf8(p + i, n - i);
    if (step.kind == Utf8Kind::kValid) {
      i += step.len;
      continue;
    }
    out->append(bytes.data() + run_start, i - run_start);
    if (step.kind == Utf8Kind::kIncomplete && !flush) return i;
    out->append(kReplacementChar);
    i += step.len;
    run_start = i;
  }
  out->append(bytes.data() + run_start, n - run_start);
  return n;
}

// Offset of the first byte of the first invalid sequence, if any.
std::optional<size_t> FirstInvalidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = ScanUtf8(p + i, s.size() - i);
    if (step.kind != Utf8Kind::kValid) return i;
    i += step.len;
  }
  return std::nullopt;
}

void AppendCodePoint(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Decodes valid UTF-8 (as every JSON string is) into code points.
std::vector<char32_t> CodePoints(std::string_view s) {
  std::vector<char32_t> cps;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    const Utf8Step step = ScanUtf8(p + i, s.size() - i);
    if (step.kind != Utf8Kind::kValid) {  // not expected from JSON text
      cps.push_back(0xFFFD);
      i += step.len;
      continue;
    }
    char32_t cp;
    switch (step.len) {
      case 1: cp = p[i]; break;
      case 2: cp = ((p[i] & 0x1F) << 6) | (p[i + 1] & 0x3F); break;
      case 3: cp = ((p[i] & 0x0F) << 12) | ((p[i + 1] & 0x3F) << 6) | (p[i + 2] & 0x3F); break;
      default:
        cp = ((p[i] & 0x07) << 18) | ((p[i + 1] & 0x3F) << 12) | ((p[i + 2] & 0x3F) << 6) |
             (p[i + 3] & 0x3F);
    }
    cps.push_back(cp);
    i += step.len;
  }
  return cps;
}

// ---------------------------------------------------------------------------
// The ByteLevel byte table (MODEL_SPEC 5): printable bytes map to themselves,
// the other 68 to U+0100.. in increasing order.

constexpr char32_t kByteTableEnd = 0x100 + 68;  // mapped code points < this

struct ByteTable {
  std::array<char32_t, 256> byte_to_cp;
  std::array<int16_t, kByteTableEnd> cp_to_byte;  // -1: not in the table
  std::array<std::string, 256> byte_to_utf8;
};

const ByteTable& GetByteTable() {
  static const ByteTable* table = [] {
    auto* t = new ByteTable;
    t->cp_to_byte.fill(-1);
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp = printable ? static_cast<char32_t>(b) : next++;
      t->byte_to_cp[b] = cp;
      t->cp_to_byte[cp] = static_cast<int16_t>(b);
      AppendCodePoint(cp, &t->byte_to_utf8[b]);
    }
    return t;
  }();
  return *table;
}

// ---------------------------------------------------------------------------
// Regexes (PCRE2 with UTF + UCP: Unicode classes as Oniguruma has them).

// Rewrites the escapes whose meaning differs between Oniguruma (what HF
// tokenizers uses) and PCRE2 with UCP:
//   \uHHHH  (PCRE2 lacks it)        -> \x{HHHH}
//   \s, \S  (PCRE2 adds U+180E)     -> \p{White_Space}, \P{White_Space}
//   \w      (Onig: Alphabetic, M, Nd, Pc, Join_Control; PCRE2: L, N, _)
//   \W      outside a class         -> the complement of that
//   \h      (Onig: a hex digit; PCRE2: horizontal space) -> [0-9a-fA-F]
// \W and \H inside a character class keep PCRE2's meaning (unsupported
// there). Everything else passes through.
std::string TranslateOnigurumaPattern(std::string_view pattern) {
  constexpr std::string_view kWord = R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control})";
  constexpr std::string_view kHex = "0-9a-fA-F";
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  const size_t n = pattern.size();
  for (size_t i = 0; i < n; ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < n) {
      const char e = pattern[i + 1];
      ++i;
      if (e == 'u' && i + 5 <= n &&
          std::all_of(pattern.begin() + i + 1, pattern.begin() + i + 5,
                      [](char h) { return std::isxdigit(static_cast<unsigned char>(h)) != 0; })) {
        absl::StrAppend(&out, "\\x{", AV(pattern.substr(i + 1, 4)), "}");
        i += 4;
      } else if (e == 's') {
        out += "\\p{White_Space}";
      } else if (e == 'S') {
        out += "\\P{White_Space}";
      } else if (e == 'w') {
        absl::StrAppend(&out, in_class ? "" : "[", AV(kWord), in_class ? "" : "]");
      } else if (e == 'W' && !in_class) {
        absl::StrAppend(&out, "[^", AV(kWord), "]");
      } else if (e == 'h') {
        absl::StrAppend(&out, in_class ? "" : "[", AV(kHex), in_class ? "" : "]");
      } else {
        out.push_back(c);
        out.push_back(e);
      }
      continue;
    }
    out.push_back(c);
    if (!in_class && c == '[') {
      in_class = true;
      // A ']' first in the class ("[]..." or "[^]...") is a literal.
      if (i + 1 < n && pattern[i + 1] == '^') out.push_back(pattern[++i]);
      if (i + 1 < n && pattern[i + 1] == ']') out.push_back(pattern[++i]);
    } else if (in_class && c == '[' && i + 1 < n && pattern[i + 1] == ':') {
      // A POSIX class such as [:alpha:]: copy through its closing ":]".
      const size_t close = pattern.find(":]", i + 2);
      if (close != std::string_view::npos) {
        out.append(pattern.substr(i + 1, close + 2 - (i + 1)));
        i = close + 1;
      }
    } else if (in_class && c == ']') {
      in_class = false;
    }
  }
  return out;
}

struct Pcre2CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct Pcre2MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

std::string Pcre2ErrorMessage(int code) {
  PCRE2_UCHAR buffer[256];
  const int len = pcre2_get_error_message(code, buffer, sizeof(buffer));
  if (len < 0) return absl::StrCat("PCRE2 error ", code);
  return std::string(reinterpret_cast<const char*>(buffer), static_cast<size_t>(len));
}

using Span = std::pair<size_t, size_t>;  // [begin, end) byte offsets

class Regex {
 public:
  // `what` names the pattern in errors.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern,
                                                        std::string_view what) {
    const std::string translated = TranslateOnigurumaPattern(pattern);
    pcre2_compile_context* context = pcre2_compile_context_create(nullptr);
    if (context == nullptr) return absl::ResourceExhaustedError("PCRE2: out of memory");
    pcre2_set_newline(context, PCRE2_NEWLINE_LF);
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    // Oniguruma's (Ruby syntax) ^ and $ are line anchors: PCRE2_MULTILINE.
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()),
                                     translated.size(), PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE,
                                     &error_code, &error_offset, context);
    pcre2_compile_context_free(context);
    if (code == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          AV(what), ": regex ", Show(json(std::string(pattern))), " does not compile (PCRE2): ",
          Pcre2ErrorMessage(error_code), " at offset ", error_offset));
    }
    // JIT when available; pcre2_match falls back to the interpreter otherwise.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    return std::unique_ptr<Regex>(new Regex(code));
  }

  // Appends the [begin, end) of every match in `subject` (valid UTF-8), in
  // order, non-overlapping, as Oniguruma's find_iter yields them: an empty
  // match right where the previous match ended is skipped.
  absl::Status FindAll(std::string_view subject, std::vector<Span>* matches) const {
    std::unique_ptr<pcre2_match_data, Pcre2MatchDataDeleter> data(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr));
    if (data == nullptr) return absl::ResourceExhaustedError("PCRE2: out of memory");
    const auto* text = reinterpret_cast<PCRE2_SPTR>(subject.data());
    const size_t n = subject.size();
    size_t start = 0;
    std::optional<size_t> last_match_end;
    uint32_t jit_option = 0;
    while (start <= n) {
      int rc = pcre2_match(code_.get(), text, n, start, PCRE2_NO_UTF_CHECK | jit_option, data.get(),
                           nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT && jit_option == 0) {
        jit_option = PCRE2_NO_JIT;  // the interpreter keeps its frames on the heap
        continue;
      }
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        return absl::InternalError(absl::StrCat("PCRE2 match failed at byte ", start, ": ",
                                                Pcre2ErrorMessage(rc)));
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
      const size_t begin = ovector[0];
      const size_t end = std::max<size_t>(ovector[1], begin);
      if (begin == end && last_match_end == end) {
        if (end >= n) break;
        start = end + std::max<size_t>(
                          1, ScanUtf8(reinterpret_cast<const unsigned char*>(subject.data()) + end,
                                      n - end)
                                 .len);
        continue;
      }
      matches->emplace_back(begin, end);
      last_match_end = end;
      start = end;
    }
    return absl::OkStatus();
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  std::unique_ptr<pcre2_code, Pcre2CodeDeleter> code_;
};

// HF tokenizers' SplitDelimiterBehavior.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitStep {
  std::unique_ptr<Regex> regex;  // null: `literal` is the pattern
  std::string literal;
  SplitBehavior behavior = SplitBehavior::kIsolated;
};

// GPT-2's pattern, which ByteLevel applies when use_regex is true.
constexpr std::string_view kByteLevelPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Splits `piece` (non-empty) by `step` as HF's NormalizedString::split does,
// appending the non-empty results to `out`.
absl::Status ApplySplit(const SplitStep& step, std::string_view piece,
                        std::vector<std::string_view>* out) {
  std::vector<Span> matches;
  if (step.regex != nullptr) {
    absl::Status status = step.regex->FindAll(piece, &matches);
    if (!status.ok()) {
      out->push_back(piece);  // leave the piece unsplit
      return status;
    }
  } else {
    for (size_t pos = piece.find(step.literal); pos != std::string_view::npos;
         pos = piece.find(step.literal, pos + step.literal.size())) {
      matches.emplace_back(pos, pos + step.literal.size());
    }
  }
  if (matches.empty()) {
    out->push_back(piece);
    return absl::OkStatus();
  }
  // Segments: the gaps and the matches, in order (HF's find_matches).
  struct Segment {
    size_t begin, end;
    bool is_match;
  };
  std::vector<Segment> segments;
  segments.reserve(2 * matches.size() + 1);
  size_t prev = 0;
  for (const auto& [begin, end] : matches) {
    if (prev != begin) segments.push_back({prev, begin, false});
    segments.push_back({begin, end, true});
    prev = end;
  }
  if (prev != piece.size()) segments.push_back({prev, piece.size(), false});

  std::vector<Span> kept;
  kept.reserve(segments.size());
  bool previous_match = false;
  switch (step.behavior) {
    case SplitBehavior::kIsolated:
      for (const Segment& s : segments) kept.emplace_back(s.begin, s.end);
      break;
    case SplitBehavior::kRemoved:
      for (const Segment& s : segments) {
        if (!s.is_match) kept.emplace_back(s.begin, s.end);
      }
      break;
    case SplitBehavior::kContiguous:
      for (const Segment& s : segments) {
        if (s.is_match == previous_match && !kept.empty()) {
          kept.back().second = s.end;
        } else {
          kept.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Segment& s : segments) {
        if (s.is_match && !previous_match && !kept.empty()) {
          kept.back().second = s.end;
        } else {
          kept.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        if (it->is_match && !previous_match && !kept.empty()) {
          kept.back().first = it->begin;
        } else {
          kept.emplace_back(it->begin, it->end);
        }
        previous_match = it->is_match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  for (const auto& [begin, end] : kept) {
    if (end > begin) out->push_back(piece.substr(begin, end - begin));
  }
  return absl::OkStatus();
}

// Reads a whole file. NOT_FOUND when it does not exist.
absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path.string(), ": not found"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::DataLossError(absl::StrCat(path.string(), ": cannot be opened"));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path.string(), ": read failed"));
  return std::move(contents).str();
}

absl::StatusOr<json> ParseJson(std::string_view text, std::string_view file) {
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    return absl::DataLossError(absl::StrCat(AV(file), ": not valid JSON: ", e.what()));
  }
}

// Reads an optional bool field (absent or null: `fallback`).
absl::StatusOr<bool> OptionalBool(const json& object, const char* key, bool fallback,
                                  std::string_view where) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(AV(where), ".", key, " must be a boolean, got ", Show(*it)));
  }
  return it->get<bool>();
}

}  // namespace

// ---------------------------------------------------------------------------

namespace tokenizer_internal {

// Everything a loaded Tokenizer holds.
struct State {
  // Token tables, indexed by id (size vocab_size).
  enum : uint8_t { kKnown = 1, kSpecial = 2 };
  std::vector<uint8_t> id_flags;
  std::vector<std::string> id_bytes;  // what Decode emits for the id

  absl::flat_hash_map<std::string, int32_t> vocab;         // BPE vocab (byte-level form)
  absl::flat_hash_map<std::string, int32_t> added_by_content;
  // Merges keyed by (left id << 32 | right id): {rank, merged id}.
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges;

  // Added tokens: a byte trie; the root's children in an array.
  std::array<int32_t, 256> trie_root{};              // child node, 0 = none
  absl::flat_hash_map<uint64_t, int32_t> trie_edges;  // (node << 8 | byte) -> child
  std::vector<int32_t> trie_token{-1};                // per node: token id or -1

  // Pre-tokenizer: the Split steps, then (if byte_level) ByteLevel.
  std::vector<SplitStep> splits;
  bool byte_level = false;
  bool add_prefix_space = false;
  std::unique_ptr<Regex> byte_level_regex;  // when use_regex

  // BPE model.
  std::array<int32_t, 256> byte_symbol{};  // byte-level: vocab id of each byte's char, or -1
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  bool ignore_merges = false;

  bool add_bos_token = false;
  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;

  mutable std::shared_mutex cache_mu;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache;  // guarded by cache_mu

  // Longest added token at text[pos...]: {id, length}; length 0 if none.
  std::pair<int32_t, size_t> MatchAdded(std::string_view text, size_t pos) const;
  // Steps 2-4 on text between added tokens; the first regex error goes to
  // `status` (the piece is then left unsplit).
  void EncodeSegment(std::string_view segment, std::vector<int32_t>* ids,
                     absl::Status* status) const;
  void EncodeText(std::string_view text, std::vector<int32_t>* ids, absl::Status* status) const;
  void BpePiece(std::string_view piece, std::vector<int32_t>* ids) const;
  void BpeUncached(std::string_view piece, std::vector<int32_t>* ids) const;
};

}  // namespace tokenizer_internal

using tokenizer_internal::State;

std::pair<int32_t, size_t> State::MatchAdded(std::string_view text, size_t pos) const {
  int32_t node = trie_root[static_cast<unsigned char>(text[pos])];
  int32_t best_id = -1;
  size_t best_len = 0;
  size_t i = pos + 1;
  while (node != 0) {
    if (trie_token[node] >= 0) {
      best_id = trie_token[node];
      best_len = i - pos;
    }
    if (i >= text.size()) break;
    auto it = trie_edges.find((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(text[i]));
    if (it == trie_edges.end()) break;
    node = it->second;
    ++i;
  }
  return {best_id, best_len};
}

void State::EncodeText(std::string_view text, std::vector<int32_t>* ids,
                                 absl::Status* status) const {
  size_t segment_start = 0;
  size_t i = 0;
  while (i < text.size()) {
    if (trie_root[static_cast<unsigned char>(text[i])] == 0) {
      ++i;
      continue;
    }
    const auto [id, len] = MatchAdded(text, i);
    if (len == 0) {
      ++i;
      continue;
    }
    EncodeSegment(text.substr(segment_start, i - segment_start), ids, status);
    ids->push_back(id);
    i += len;
    segment_start = i;
  }
  EncodeSegment(text.substr(segment_start), ids, status);
}

void State::EncodeSegment(std::string_view segment, std::vector<int32_t>* ids,
                                    absl::Status* status) const {
  if (segment.empty()) return;
  std::vector<std::string_view> pieces{segment};
  std::vector<std::string_view> next;
  auto note = [status](absl::Status s) {
    if (!s.ok() && status->ok()) *status = std::move(s);
  };
  for (const SplitStep& step : splits) {
    next.clear();
    for (std::string_view piece : pieces) note(ApplySplit(step, piece, &next));
    pieces.swap(next);
  }
  std::deque<std::string> prefixed;  // storage for pieces given a prefix space
  if (add_prefix_space) {
    for (std::string_view& piece : pieces) {
      if (piece.front() != ' ') piece = prefixed.emplace_back(absl::StrCat(" ", AV(piece)));
    }
  }
  if (byte_level_regex != nullptr) {
    next.clear();
    for (std::string_view piece : pieces) {
      std::vector<Span> matches;
      // Isolated: matches and gaps all become pieces.
      absl::Status s = byte_level_regex->FindAll(piece, &matches);
      if (!s.ok()) {
        note(std::move(s));
        next.push_back(piece);
        continue;
      }
      size_t prev = 0;
      for (const auto& [begin, end] : matches) {
        if (begin > prev) next.push_back(piece.substr(prev, begin - prev));
        if (end > begin) next.push_back(piece.substr(begin, end - begin));
        prev = end;
      }
      if (prev < piece.size()) next.push_back(piece.substr(prev));
    }
    pieces.swap(next);
  }
  for (std::string_view piece : pieces) BpePiece(piece, ids);
}

void State::BpePiece(std::string_view piece, std::vector<int32_t>* ids) const {
  const bool cacheable = piece.size() <= kMaxCachedPieceBytes;
  if (cacheable) {
    std::shared_lock lock(cache_mu);
    auto it = cache.find(AV(piece));
    if (it != cache.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids->size();
  BpeUncached(piece, ids);
  if (cacheable) {
    std::unique_lock lock(cache_mu);
    if (cache.size() < kMaxCacheEntries) {
      cache.try_emplace(std::string(piece), ids->begin() + static_cast<std::ptrdiff_t>(first),
                        ids->end());
    }
  }
}

void State::BpeUncached(std::string_view piece, std::vector<int32_t>* ids) const {
  const ByteTable& table = GetByteTable();
  if (ignore_merges) {
    std::string mapped;
    if (byte_level) {
      for (unsigned char b : piece) mapped += table.byte_to_utf8[b];
    } else {
      mapped = std::string(piece);
    }
    auto it = vocab.find(mapped);
    if (it != vocab.end()) {
      ids->push_back(it->second);
      return;
    }
  }

  // Initial symbols: one per character (per byte when byte-level). Unknown
  // characters become unk (fused if fuse_unk) or, without unk, are dropped,
  // as HF's BPE does.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  bool prev_unknown = false;
  auto add = [&](int32_t id) {
    if (id < 0) {
      if (!unk_id.has_value()) return;
      if (fuse_unk && prev_unknown) return;
      prev_unknown = true;
      id = *unk_id;
    } else {
      prev_unknown = false;
    }
    symbols.push_back({id, static_cast<int32_t>(symbols.size()) - 1,
                       static_cast<int32_t>(symbols.size()) + 1});
  };
  if (byte_level) {
    for (unsigned char b : piece) add(byte_symbol[b]);
  } else {
    const auto* p = reinterpret_cast<const unsigned char*>(piece.data());
    size_t i = 0;
    while (i < piece.size()) {
      const size_t len = std::max<size_t>(1, ScanUtf8(p + i, piece.size() - i).len);
      auto it = vocab.find(AV(piece.substr(i, len)));
      add(it == vocab.end() ? -1 : it->second);
      i += len;
    }
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;

  // Merge the lowest-ranked adjacent pair (leftmost on ties) until none is
  // left: a min-heap of candidate pairs, stale entries skipped on pop.
  struct Candidate {
    int32_t rank;
    int32_t pos;  // the left symbol
    int32_t left;
    int32_t right;
    int32_t merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto push_pair = [&](int32_t pos) {
    if (pos < 0) return;
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(symbols[pos].id)) << 32) |
                         static_cast<uint32_t>(symbols[next].id);
    auto it = merges.find(key);
    if (it == merges.end()) return;
    heap.push({it->second.first, pos, symbols[pos].id, symbols[next].id, it->second.second});
  };
  for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(symbols.size()); ++pos) push_pair(pos);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = symbols[c.pos];
    // A merged-away symbol has id -1; a changed symbol has another id (merged
    // tokens are longer, so an id never comes back).
    if (left.id != c.left || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    if (right.id != c.right) continue;
    left.id = c.merged;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.pos;
    right.id = -1;
    push_pair(left.prev);
    push_pair(c.pos);
  }
  for (int32_t pos = 0; pos >= 0; pos = symbols[pos].next) ids->push_back(symbols[pos].id);
}

// ---------------------------------------------------------------------------
// Loading.

namespace {

absl::Status ParsePreTokenizer(const json& pre, State* state);

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::filesystem::path& model_dir) {
  auto tokenizer_json = ReadFile(model_dir / "tokenizer.json");
  if (!tokenizer_json.ok()) return tokenizer_json.status();
  std::string config_json;
  const std::filesystem::path config_path = model_dir / "tokenizer_config.json";
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) {
    auto config = ReadFile(config_path);
    if (!config.ok()) return config.status();
    config_json = *std::move(config);
  }
  auto tokenizer = FromJson(*tokenizer_json, config_json);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat(model_dir.string(), ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

namespace {

absl::StatusOr<SplitBehavior> ParseBehavior(const json& step, std::string_view where) {
  auto it = step.find("behavior");
  if (it == step.end() || !it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(AV(where), ".behavior must be a string, got ",
                     it == step.end() ? std::string("nothing") : Show(*it)));
  }
  const std::string& b = it->get_ref<const std::string&>();
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  return absl::InvalidArgumentError(
      absl::StrCat(AV(where), ".behavior ", Show(*it), " is not supported"));
}

absl::Status ParseSplit(const json& step, std::string_view where, State* state) {
  SplitStep split;
  auto behavior = ParseBehavior(step, where);
  if (!behavior.ok()) return behavior.status();
  split.behavior = *behavior;
  auto invert = OptionalBool(step, "invert", false, where);
  if (!invert.ok()) return invert.status();
  if (*invert) {
    return absl::InvalidArgumentError(
        absl::StrCat(AV(where), ".invert is true; only false is supported"));
  }
  auto pattern = step.find("pattern");
  if (pattern == step.end() || !pattern->is_object() || pattern->size() != 1 ||
      !pattern->begin().value().is_string() ||
      (pattern->begin().key() != "Regex" && pattern->begin().key() != "String")) {
    return absl::InvalidArgumentError(absl::StrCat(
        AV(where), ".pattern must be {\"Regex\": ...} or {\"String\": ...}, got ",
        pattern == step.end() ? std::string("nothing") : Show(*pattern)));
  }
  const std::string& text = pattern->begin().value().get_ref<const std::string&>();
  if (text.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(AV(where), ".pattern is empty"));
  }
  if (pattern->begin().key() == "Regex") {
    auto regex = Regex::Compile(text, absl::StrCat(AV(where), ".pattern"));
    if (!regex.ok()) return regex.status();
    split.regex = *std::move(regex);
  } else {
    split.literal = text;  // matched literally (HF escapes it)
  }
  state->splits.push_back(std::move(split));
  return absl::OkStatus();
}

absl::Status ParseByteLevel(const json& step, std::string_view where, State* state) {
  // HF's defaults: add_prefix_space true, use_regex true.
  auto add_prefix_space = OptionalBool(step, "add_prefix_space", true, where);
  if (!add_prefix_space.ok()) return add_prefix_space.status();
  auto use_regex = OptionalBool(step, "use_regex", true, where);
  if (!use_regex.ok()) return use_regex.status();
  state->byte_level = true;
  state->add_prefix_space = *add_prefix_space;
  if (*use_regex) {
    auto regex = Regex::Compile(kByteLevelPattern, "ByteLevel regex");
    if (!regex.ok()) return regex.status();
    state->byte_level_regex = *std::move(regex);
  }
  return absl::OkStatus();
}

std::string TypeOf(const json& object) {
  auto it = object.find("type");
  if (it == object.end()) return "(missing)";
  return it->is_string() ? it->get<std::string>() : Show(*it);
}

absl::Status ParsePreTokenizer(const json& pre, State* state) {
  const std::string where = "tokenizer.json: pre_tokenizer";
  if (!pre.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, " ", Show(pre), " is not supported (expected a Sequence of Split and ByteLevel)"));
  }
  const std::string type = TypeOf(pre);
  if (type == "Split") return ParseSplit(pre, where, state);
  if (type == "ByteLevel") return ParseByteLevel(pre, where, state);
  if (type != "Sequence") {
    return absl::InvalidArgumentError(
        absl::StrCat(where, " type \"", type,
                     "\" is not supported (expected Sequence, Split or ByteLevel)"));
  }
  auto steps = pre.find("pretokenizers");
  if (steps == pre.end() || !steps->is_array() || steps->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".pretokenizers must be a non-empty array"));
  }
  for (size_t i = 0; i < steps->size(); ++i) {
    const json& step = (*steps)[i];
    const std::string step_where = absl::StrCat(where, ".pretokenizers[", i, "]");
    const std::string step_type = step.is_object() ? TypeOf(step) : Show(step);
    if (state->byte_level) {
      return absl::InvalidArgumentError(absl::StrCat(
          step_where, " (", step_type, ") follows ByteLevel; ByteLevel must come last"));
    }
    absl::Status status;
    if (step_type == "Split") {
      status = ParseSplit(step, step_where, state);
    } else if (step_type == "ByteLevel") {
      status = ParseByteLevel(step, step_where, state);
    } else {
      status = absl::InvalidArgumentError(absl::StrCat(
          step_where, " type \"", step_type, "\" is not supported (expected Split or ByteLevel)"));
    }
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

// Reads a token id from JSON: an integer in [0, kMaxTokenId].
absl::StatusOr<int32_t> ParseId(const json& value, std::string_view where) {
  if (!value.is_number_integer() || value.get<int64_t>() < 0 ||
      value.get<int64_t>() > kMaxTokenId) {
    return absl::InvalidArgumentError(absl::StrCat(
        AV(where), ": token id must be an integer in [0, ", kMaxTokenId, "], got ", Show(value)));
  }
  return static_cast<int32_t>(value.get<int64_t>());
}

absl::Status ParseModel(const json& model, State* state) {
  const std::string where = "tokenizer.json: model";
  if (!model.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, " must be an object"));
  }
  const std::string type = TypeOf(model);
  // An untyped model with vocab and merges is a BPE model for HF too.
  if (type != "BPE" && !(type == "(missing)" && model.contains("merges"))) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".type \"", type, "\" is not supported (only BPE)"));
  }
  auto byte_fallback = OptionalBool(model, "byte_fallback", false, where);
  if (!byte_fallback.ok()) return byte_fallback.status();
  if (*byte_fallback) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".byte_fallback is true; only false is supported"));
  }
  auto dropout = model.find("dropout");
  if (dropout != model.end() && !dropout->is_null() &&
      !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".dropout ", Show(*dropout), " is not supported (only null)"));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".", key, " ", Show(*it), " is not supported (only null)"));
    }
  }
  auto fuse_unk = OptionalBool(model, "fuse_unk", false, where);
  if (!fuse_unk.ok()) return fuse_unk.status();
  state->fuse_unk = *fuse_unk;
  auto ignore_merges = OptionalBool(model, "ignore_merges", false, where);
  if (!ignore_merges.ok()) return ignore_merges.status();
  state->ignore_merges = *ignore_merges;

  auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".vocab must be an object"));
  }
  state->vocab.reserve(vocab->size());
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    const json& value = it.value();
    if (value.is_number_integer() && value.get<int64_t>() >= 0 &&
        value.get<int64_t>() <= kMaxTokenId) {
      state->vocab[it.key()] = static_cast<int32_t>(value.get<int64_t>());
      continue;
    }
    // Not a valid id: ParseId words the error.
    auto id = ParseId(value, absl::StrCat(where, ".vocab[", Show(json(it.key())), "]"));
    if (!id.ok()) return id.status();
  }

  auto unk = model.find("unk_token");
  if (unk != model.end() && !unk->is_null()) {
    if (!unk->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".unk_token must be a string or null, got ", Show(*unk)));
    }
    auto it = state->vocab.find(unk->get<std::string>());
    if (it == state->vocab.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".unk_token ", Show(*unk), " is not in the vocab"));
    }
    state->unk_id = it->second;
  }

  auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".merges must be an array"));
  }
  state->merges.reserve(merges->size());
  for (size_t rank = 0; rank < merges->size(); ++rank) {
    const json& merge = (*merges)[rank];
    std::string a, b;
    if (merge.is_string()) {
      const std::string& s = merge.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space != std::string::npos && s.find(' ', space + 1) == std::string::npos) {
        a = s.substr(0, space);
        b = s.substr(space + 1);
      }
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      a = merge[0].get<std::string>();
      b = merge[1].get<std::string>();
    }
    if (a.empty() || b.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ".merges[", rank, "] must be \"a b\" or [\"a\", \"b\"], got ", Show(merge)));
    }
    auto ia = state->vocab.find(a), ib = state->vocab.find(b), iab = state->vocab.find(a + b);
    if (ia == state->vocab.end() || ib == state->vocab.end() || iab == state->vocab.end()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".merges[", rank, "] ", Show(merge),
                                                     ": a part or the merged token is not in the vocab"));
    }
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                         static_cast<uint32_t>(ib->second);
    // As HF: a repeated pair keeps its last rank.
    state->merges[key] = {static_cast<int32_t>(rank), iab->second};
  }
  return absl::OkStatus();
}

// The id a tokenizer_config.json token entry (a string, {"content": ...} or
// null) names.
absl::StatusOr<std::optional<int32_t>> ConfigTokenId(const json& config, const char* key,
                                                     const Tokenizer& tokenizer) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::optional<int32_t>();
  const json* content = &*it;
  if (it->is_object()) {
    auto c = it->find("content");
    if (c == it->end()) content = nullptr;
    else content = &*c;
  }
  if (content == nullptr || !content->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer_config.json: ", key,
                     " must be a string, {\"content\": string} or null, got ", Show(*it)));
  }
  std::optional<int32_t> id = tokenizer.TokenId(content->get<std::string>());
  if (!id.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: ", key, " ",
                                                   Show(*content), " is not a token"));
  }
  return id;
}

// A TemplateProcessing post_processor (alone or in a Sequence) whose single
// template starts with a special token: that token's content.
std::optional<std::string> TemplateBosToken(const json& post) {
  if (!post.is_object()) return std::nullopt;
  const std::string type = TypeOf(post);
  if (type == "Sequence") {
    auto processors = post.find("processors");
    if (processors == post.end() || !processors->is_array()) return std::nullopt;
    for (const json& p : *processors) {
      if (auto token = TemplateBosToken(p)) return token;
    }
    return std::nullopt;
  }
  if (type != "TemplateProcessing") return std::nullopt;
  auto single = post.find("single");
  if (single == post.end() || !single->is_array() || single->empty()) return std::nullopt;
  const json& first = (*single)[0];
  if (!first.is_object()) return std::nullopt;
  auto special = first.find("SpecialToken");
  if (special == first.end() || !special->is_object()) return std::nullopt;
  auto id = special->find("id");
  if (id == special->end() || !id->is_string()) return std::nullopt;
  return id->get<std::string>();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json) {
  auto root_or = ParseJson(tokenizer_json, "tokenizer.json");
  if (!root_or.ok()) return root_or.status();
  const json& root = *root_or;
  if (!root.is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: expected a JSON object");
  }
  auto state = std::make_unique<State>();
  try {
    // Normalizer: none. DeepSeek-V3's file has an empty Sequence, which is
    // the identity too.
    auto normalizer = root.find("normalizer");
    if (normalizer != root.end() && !normalizer->is_null()) {
      const bool empty_sequence = normalizer->is_object() && TypeOf(*normalizer) == "Sequence" &&
                                  normalizer->contains("normalizers") &&
                                  (*normalizer)["normalizers"].is_array() &&
                                  (*normalizer)["normalizers"].empty();
      if (!empty_sequence) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tokenizer.json: normalizer ", Show(*normalizer),
            " is not supported (only null or an empty Sequence)"));
      }
    }
    // Pre-tokenizer.
    auto pre = root.find("pre_tokenizer");
    absl::Status status = ParsePreTokenizer(pre == root.end() ? json() : *pre, state.get());
    if (!status.ok()) return status;
    // Model.
    auto model = root.find("model");
    if (model == root.end()) return absl::InvalidArgumentError("tokenizer.json: model is missing");
    status = ParseModel(*model, state.get());
    if (!status.ok()) return status;
    // Decoder: ByteLevel.
    auto decoder = root.find("decoder");
    if (decoder == root.end() || !decoder->is_object() || TypeOf(*decoder) != "ByteLevel") {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokenizer.json: decoder ",
          decoder == root.end() ? std::string("(missing)")
          : decoder->is_object() ? absl::StrCat("type \"", TypeOf(*decoder), "\"")
                                 : Show(*decoder),
          " is not supported (only ByteLevel)"));
    }

    // Added tokens.
    struct Added {
      int32_t id;
      std::string content;
      bool special;
    };
    std::vector<Added> added;
    auto added_tokens = root.find("added_tokens");
    if (added_tokens != root.end() && !added_tokens->is_null()) {
      if (!added_tokens->is_array()) {
        return absl::InvalidArgumentError("tokenizer.json: added_tokens must be an array");
      }
      for (size_t i = 0; i < added_tokens->size(); ++i) {
        const json& token = (*added_tokens)[i];
        const std::string where = absl::StrCat("tokenizer.json: added_tokens[", i, "]");
        if (!token.is_object() || !token.contains("id") || !token.contains("content") ||
            !token["content"].is_string() || token["content"].get<std::string>().empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, " must have an id and a non-empty content, got ", Show(token)));
        }
        auto id = ParseId(token["id"], where);
        if (!id.ok()) return id.status();
        for (const char* key : {"lstrip", "rstrip", "single_word"}) {
          auto flag = OptionalBool(token, key, false, where);
          if (!flag.ok()) return flag.status();
          if (*flag) {
            return absl::InvalidArgumentError(absl::StrCat(
                where, " (", Show(token["content"]), "): ", key, " true is not supported"));
          }
        }
        auto special = OptionalBool(token, "special", false, where);
        if (!special.ok()) return special.status();
        added.push_back({*id, token["content"].get<std::string>(), *special});
      }
    }

    // Per-id tables.
    int64_t vocab_size = 0;
    for (const auto& [token, id] : state->vocab) vocab_size = std::max<int64_t>(vocab_size, id + 1);
    for (const Added& a : added) vocab_size = std::max<int64_t>(vocab_size, a.id + 1);
    state->id_flags.assign(static_cast<size_t>(vocab_size), 0);
    state->id_bytes.assign(static_cast<size_t>(vocab_size), std::string());
    const ByteTable& table = GetByteTable();
    auto set_token = [&](int32_t id, const std::string& token) {
      state->id_flags[id] |= State::kKnown;
      std::string bytes;
      bool all_in_table = true;
      for (char32_t cp : CodePoints(token)) {
        if (cp >= kByteTableEnd || table.cp_to_byte[cp] < 0) {
          all_in_table = false;
          break;
        }
        bytes.push_back(static_cast<char>(table.cp_to_byte[cp]));
      }
      state->id_bytes[id] = all_in_table ? std::move(bytes) : token;
    };
    for (const auto& [token, id] : state->vocab) set_token(id, token);
    for (const Added& a : added) {
      set_token(a.id, a.content);
      if (a.special) state->id_flags[a.id] |= State::kSpecial;
      state->added_by_content[a.content] = a.id;
      // Into the trie.
      int32_t node = 0;
      for (size_t i = 0; i < a.content.size(); ++i) {
        const unsigned char byte = static_cast<unsigned char>(a.content[i]);
        int32_t* child;
        if (node == 0) {
          child = &state->trie_root[byte];
        } else {
          child = &state->trie_edges[(static_cast<uint64_t>(node) << 8) | byte];
        }
        if (*child == 0) {
          *child = static_cast<int32_t>(state->trie_token.size());
          state->trie_token.push_back(-1);
        }
        node = *child;
      }
      state->trie_token[node] = a.id;
    }
    for (int b = 0; b < 256; ++b) {
      auto it = state->vocab.find(table.byte_to_utf8[b]);
      state->byte_symbol[b] = it == state->vocab.end() ? -1 : it->second;
    }

    std::unique_ptr<Tokenizer> tokenizer(new Tokenizer(std::move(state)));
    State& im = *tokenizer->state_;

    // tokenizer_config.json: BOS / EOS.
    std::optional<bool> add_bos;
    if (!tokenizer_config_json.empty()) {
      auto config_or = ParseJson(tokenizer_config_json, "tokenizer_config.json");
      if (!config_or.ok()) return config_or.status();
      const json& config = *config_or;
      if (!config.is_object()) {
        return absl::InvalidArgumentError("tokenizer_config.json: expected a JSON object");
      }
      auto bos = ConfigTokenId(config, "bos_token", *tokenizer);
      if (!bos.ok()) return bos.status();
      im.bos_id = *bos;
      auto eos = ConfigTokenId(config, "eos_token", *tokenizer);
      if (!eos.ok()) return eos.status();
      im.eos_id = *eos;
      if (config.contains("add_bos_token") && !config["add_bos_token"].is_null()) {
        auto flag = OptionalBool(config, "add_bos_token", false, "tokenizer_config.json");
        if (!flag.ok()) return flag.status();
        add_bos = *flag;
      }
    }
    if (!add_bos.has_value()) {
      auto post = root.find("post_processor");
      std::optional<std::string> token;
      if (post != root.end()) token = TemplateBosToken(*post);
      std::optional<int32_t> id = token ? tokenizer->TokenId(*token) : std::nullopt;
      add_bos = id.has_value();
      if (id.has_value() && !im.bos_id.has_value()) im.bos_id = id;
    }
    im.add_bos_token = *add_bos;
    if (im.add_bos_token && !im.bos_id.has_value()) {
      return absl::InvalidArgumentError(
          "tokenizer_config.json: add_bos_token is true but there is no bos_token");
    }
    return tokenizer;
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", e.what()));
  }
}

// ---------------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<tokenizer_internal::State> state)
    : state_(std::move(state)) {}
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids;
  absl::Status ignored;
  if (FirstInvalidUtf8(text).has_value()) {
    std::string valid;
    valid.reserve(text.size() + 8);
    AppendUtf8Lossy(text, /*flush=*/true, &valid);
    state_->EncodeText(valid, &ids, &ignored);
  } else {
    state_->EncodeText(text, &ids, &ignored);
  }
  return ids;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::EncodeChecked(std::string_view text) const {
  if (std::optional<size_t> bad = FirstInvalidUtf8(text)) {
    return absl::InvalidArgumentError(absl::StrCat("text is not valid UTF-8 at byte ", *bad));
  }
  std::vector<int32_t> ids;
  absl::Status status;
  state_->EncodeText(text, &ids, &status);
  if (!status.ok()) return status;
  return ids;
}

void Tokenizer::AppendTokenBytes(int32_t id, bool skip_special_tokens, std::string* out) const {
  if (id < 0 || static_cast<size_t>(id) >= state_->id_flags.size()) return;
  const uint8_t flags = state_->id_flags[id];
  if ((flags & State::kKnown) == 0) return;
  if (skip_special_tokens && (flags & State::kSpecial) != 0) return;
  out->append(state_->id_bytes[id]);
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) AppendTokenBytes(id, skip_special_tokens, &bytes);
  if (!FirstInvalidUtf8(bytes).has_value()) return bytes;
  std::string text;
  text.reserve(bytes.size() + 16);
  AppendUtf8Lossy(bytes, /*flush=*/true, &text);
  return text;
}

absl::Status Tokenizer::ValidateIds(absl::Span<const int32_t> ids) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || static_cast<size_t>(id) >= state_->id_flags.size() ||
        (state_->id_flags[id] & State::kKnown) == 0) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " (at position ", i,
                                                     ") is not in the vocabulary (vocab size ",
                                                     vocab_size(), ")"));
    }
  }
  return absl::OkStatus();
}

int64_t Tokenizer::vocab_size() const { return static_cast<int64_t>(state_->id_flags.size()); }
bool Tokenizer::add_bos_token() const { return state_->add_bos_token; }
std::optional<int32_t> Tokenizer::bos_token_id() const { return state_->bos_id; }
std::optional<int32_t> Tokenizer::eos_token_id() const { return state_->eos_id; }

std::optional<int32_t> Tokenizer::TokenId(std::string_view token) const {
  auto added = state_->added_by_content.find(AV(token));
  if (added != state_->added_by_content.end()) return added->second;
  auto it = state_->vocab.find(AV(token));
  if (it != state_->vocab.end()) return it->second;
  return std::nullopt;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < state_->id_flags.size() &&
         (state_->id_flags[id] & State::kSpecial) != 0;
}

// ---------------------------------------------------------------------------

StreamingDetokenizer::StreamingDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string StreamingDetokenizer::Push(int32_t id) {
  tokenizer_.AppendTokenBytes(id, skip_special_tokens_, &pending_);
  std::string text;
  const size_t consumed = AppendUtf8Lossy(pending_, /*flush=*/false, &text);
  pending_.erase(0, consumed);
  return text;
}

std::string StreamingDetokenizer::Finish() {
  std::string text;
  AppendUtf8Lossy(pending_, /*flush=*/true, &text);
  pending_.clear();
  return text;
}

}  // namespace dmoe
