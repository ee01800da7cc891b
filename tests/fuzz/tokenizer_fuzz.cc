// Fuzzes the tokenizer (tiny-v3's tokenizer.json, the bundled one) on any
// bytes: Encode and EncodeChecked agree, valid UTF-8 round-trips through
// Decode, and streaming detokenization equals Decode with valid UTF-8 pieces.
// The same bytes read as token ids exercise Decode and ValidateIds.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/synthetic_checkpoint.h"
#include "core/tokenizer.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

const dmoe::Tokenizer& Tiny() {
  static const dmoe::Tokenizer* t = [] {
    auto loaded = dmoe::Tokenizer::FromJson(dmoe::BundledTokenizerJson(), dmoe::BundledTokenizerConfigJson());
    FUZZ_CHECK(loaded.ok());
    return loaded->release();
  }();
  return *t;
}

// Strict UTF-8 (no surrogates, no overlongs, at most U+10FFFF).
bool ValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n = 0;
    uint32_t cp = 0;
    if (c < 0x80) { ++i; continue; }
    if (c >= 0xC2 && c <= 0xDF) { n = 1; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { n = 2; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { n = 3; cp = c & 0x07; }
    else return false;
    if (i + n >= s.size()) return false;  // truncated sequence
    for (int k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

void CheckStreaming(const dmoe::Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  dmoe::StreamingDetokenizer stream(tok, skip_special);
  std::string streamed;
  for (int32_t id : ids) {
    const std::string piece = stream.Push(id);
    FUZZ_CHECK(ValidUtf8(piece));
    streamed += piece;
  }
  const std::string tail = stream.Finish();
  FUZZ_CHECK(ValidUtf8(tail));
  streamed += tail;
  FUZZ_CHECK(streamed == tok.Decode(ids, skip_special));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const dmoe::Tokenizer& tok = Tiny();
  const std::string text(reinterpret_cast<const char*>(data), size);

  const std::vector<int32_t> ids = tok.Encode(text);
  for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < tok.vocab_size());
  FUZZ_CHECK(tok.ValidateIds(ids).ok());
  const std::string decoded = tok.Decode(ids);
  FUZZ_CHECK(ValidUtf8(decoded));
  absl::StatusOr<std::vector<int32_t>> checked = tok.EncodeChecked(text);
  if (ValidUtf8(text)) {
    FUZZ_CHECK(checked.ok());
    FUZZ_CHECK(*checked == ids);
    FUZZ_CHECK(decoded == text);  // byte-level BPE loses nothing
  } else {
    FUZZ_CHECK(!checked.ok() && checked.status().code() == absl::StatusCode::kInvalidArgument);
  }
  CheckStreaming(tok, ids, /*skip_special=*/false);

  // The bytes as token ids, including ones outside the vocabulary.
  std::vector<int32_t> raw(size / 4);
  if (!raw.empty()) std::memcpy(raw.data(), data, raw.size() * 4);
  for (int32_t& id : raw) {
    // Mostly ids near the vocabulary, some anywhere.
    if ((id & 0x70000000) != 0x70000000) id = static_cast<int32_t>(static_cast<uint32_t>(id) % 600u);
  }
  const absl::Status valid = tok.ValidateIds(raw);
  bool all_known = true;
  for (int32_t id : raw) all_known = all_known && id >= 0 && id < tok.vocab_size();
  if (!all_known) FUZZ_CHECK(!valid.ok());
  for (bool skip : {false, true}) {
    FUZZ_CHECK(ValidUtf8(tok.Decode(raw, skip)));
    CheckStreaming(tok, raw, skip);
  }
  return 0;
}
