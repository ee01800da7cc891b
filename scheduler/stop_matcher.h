// Per-request text streaming with stop strings.
//
// Feed each sampled token id in order. Push returns the text that is safe
// to stream now:
//   - it never splits a UTF-8 character (a StreamingDetokenizer holds the
//     bytes of an incomplete character back until a later token completes
//     it);
//   - it never ends with text that could still become a stop string: the
//     longest suffix of the decoded text that is a proper prefix of some
//     stop string is held back until later text rules the match out (or
//     completes it);
//   - once a stop string appears in the decoded text, wherever the token
//     boundaries fall, the text up to the earliest match is released and the
//     match and everything after it are dropped; stopped() is then true.
// Finish() releases what was held back when generation ended for another
// reason. The concatenation of every returned string is the decoded text
// cut before the earliest stop string (all of it if none matched).
//
// Stop strings are matched on bytes; they should be valid UTF-8 (proto3
// strings are), otherwise a match is cut back to a character boundary.
//
// Not thread-safe (one request, one thread). The Tokenizer must outlive it.
#ifndef DMOE_SCHEDULER_STOP_MATCHER_H_
#define DMOE_SCHEDULER_STOP_MATCHER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "core/tokenizer.h"

namespace dmoe::scheduler {

class StopMatcher {
 public:
  struct Delta {
    std::string text;      // safe to stream now (possibly empty)
    bool stopped = false;  // a stop string matched; nothing more will come
  };

  // Empty stop strings are ignored. With `skip_special_tokens` (vLLM's
  // default) special added tokens such as EOS contribute no text.
  StopMatcher(const Tokenizer& tokenizer, std::vector<std::string> stop, bool skip_special_tokens = true);

  // Appends one generated token. After a stop: returns an empty Delta.
  Delta Push(int32_t token);
  // Ends the text: releases the held-back text (an incomplete UTF-8
  // character becomes U+FFFD, as Tokenizer::Decode does), still cut before a
  // stop string that this completes. Empty after a stop.
  std::string Finish();

  bool stopped() const { return stopped_; }
  // The stop string that matched; empty while none has.
  const std::string& matched_stop() const { return matched_stop_; }
  // Bytes of decoded text currently held back.
  int64_t held_back_bytes() const { return static_cast<int64_t>(pending_.size()); }

 private:
  // Moves what is safe out of pending_ (all of it when `final`).
  std::string Release(bool final);

  StreamingDetokenizer detokenizer_;
  std::vector<std::string> stop_;
  std::string pending_;  // decoded, not yet released
  bool stopped_ = false;
  std::string matched_stop_;
};

}  // namespace dmoe::scheduler

#endif  // DMOE_SCHEDULER_STOP_MATCHER_H_
