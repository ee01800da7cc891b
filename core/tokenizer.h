// The byte-level BPE tokenizer of DeepSeek checkpoints (MODEL_SPEC.md 5).
//
// Reads HF tokenizers' `tokenizer.json` as DeepSeek ships it: added tokens,
// no normalizer (null, or the empty Sequence of DeepSeek-V3's file), a
// pre-tokenizer made of regex `Split` steps and a final `ByteLevel`, a `BPE`
// model and a `ByteLevel` decoder. Anything else is rejected at load time
// with an error naming the field and its value. Split regexes run on PCRE2,
// rewritten where Oniguruma (HF's engine) differs (\uHHHH, \s, \w, \h).
//
// Thread safety: a loaded Tokenizer is immutable apart from an internal,
// mutex-guarded cache of BPE results; all its const methods may be called
// from any number of threads at once. A StreamingDetokenizer is a small
// per-sequence object: one thread at a time, and the Tokenizer it was made
// from must outlive it.
#ifndef DMOE_CORE_TOKENIZER_H_
#define DMOE_CORE_TOKENIZER_H_

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace dmoe {

namespace tokenizer_internal {
struct State;
}  // namespace tokenizer_internal

class Tokenizer {
 public:
  // Loads `model_dir`/tokenizer.json, and `model_dir`/tokenizer_config.json
  // when present (for add_bos_token / bos_token / eos_token). NOT_FOUND when
  // tokenizer.json is missing; see FromJson for the other errors.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::filesystem::path& model_dir);
  // Builds a tokenizer from the two files' contents; `tokenizer_config_json`
  // may be empty. DATA_LOSS for text that is not JSON, INVALID_ARGUMENT for
  // unsupported or inconsistent contents.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view tokenizer_json,
                                                             std::string_view tokenizer_config_json);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text`, without BOS. Works on any bytes: invalid UTF-8 is
  // first replaced by U+FFFD (one per maximal invalid subpart, as Decode
  // does); use EncodeChecked to reject it instead.
  std::vector<int32_t> Encode(std::string_view text) const;
  // As Encode, but INVALID_ARGUMENT "text is not valid UTF-8 at byte N" for
  // invalid UTF-8, and INTERNAL if the regex engine fails on the text (where
  // Encode leaves the affected piece unsplit).
  absl::StatusOr<std::vector<int32_t>> EncodeChecked(std::string_view text) const;

  // The text of `ids`: each token's bytes (byte-level tokens) or its own
  // UTF-8 (added tokens such as "<｜begin▁of▁sentence｜>"), concatenated and
  // decoded with U+FFFD replacing each maximal invalid UTF-8 subpart. Ids that
  // are not tokens (see ValidateIds) are skipped; with `skip_special_tokens`,
  // so are special added tokens.
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens = false) const;
  // INVALID_ARGUMENT naming the first id that is not a token (outside
  // [0, vocab_size()) or an unassigned id below it) and the vocab size.
  absl::Status ValidateIds(absl::Span<const int32_t> ids) const;

  // Max id + 1 over the BPE vocab and the added tokens.
  int64_t vocab_size() const;
  // tokenizer_config.json's add_bos_token (when absent: whether a
  // TemplateProcessing post_processor starts with a special token).
  bool add_bos_token() const;
  // tokenizer_config.json's bos_token / eos_token (a string or
  // {"content": ...}) resolved to its id; nullopt when not given.
  std::optional<int32_t> bos_token_id() const;
  std::optional<int32_t> eos_token_id() const;
  // The id of an added token's content or of a vocab entry in its byte-level
  // form (e.g. "Ġthe"); nullopt if there is none.
  std::optional<int32_t> TokenId(std::string_view token) const;
  // Whether `id` is an added token marked "special".
  bool IsSpecial(int32_t id) const;

 private:
  friend class StreamingDetokenizer;

  explicit Tokenizer(std::unique_ptr<tokenizer_internal::State> state);
  // Appends the raw bytes of `id` (nothing for unknown or skipped ids).
  void AppendTokenBytes(int32_t id, bool skip_special_tokens, std::string* out) const;

  std::unique_ptr<tokenizer_internal::State> state_;
};

// Incremental detokenization for streaming generated text. Push each
// generated id in order; each call returns the newly completed text. Bytes of
// a UTF-8 character that is still incomplete are held back until a later
// token completes it; bytes that can never become valid come out as U+FFFD
// exactly where Decode would put them. The concatenation of all Push results
// and Finish() equals Decode(all ids, skip_special_tokens), and every
// returned string is valid UTF-8.
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens = false);

  // The text completed by `id` (possibly empty).
  std::string Push(int32_t id);
  // Flushes held-back bytes (an incomplete character becomes U+FFFD) and
  // resets the detokenizer for a new sequence.
  std::string Finish();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;  // trailing bytes of an incomplete UTF-8 character
};

}  // namespace dmoe

#endif  // DMOE_CORE_TOKENIZER_H_
