#include "scheduler/stop_matcher.h"

#include <algorithm>
#include <string_view>
#include <utility>

namespace dmoe::scheduler {
namespace {

bool IsContinuationByte(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// Moves `end` back to the start of the UTF-8 character it falls in.
size_t CharBoundaryAtOrBefore(std::string_view text, size_t end) {
  while (end > 0 && end < text.size() && IsContinuationByte(text[end])) --end;
  return end;
}

}  // namespace

StopMatcher::StopMatcher(const Tokenizer& tokenizer, std::vector<std::string> stop, bool skip_special_tokens)
    : detokenizer_(tokenizer, skip_special_tokens) {
  for (std::string& s : stop) {
    if (!s.empty()) stop_.push_back(std::move(s));
  }
}

StopMatcher::Delta StopMatcher::Push(int32_t token) {
  Delta delta;
  if (stopped_) return delta;
  pending_ += detokenizer_.Push(token);
  delta.text = Release(/*final=*/false);
  delta.stopped = stopped_;
  return delta;
}

std::string StopMatcher::Finish() {
  if (stopped_) return {};
  pending_ += detokenizer_.Finish();
  return Release(/*final=*/true);
}

std::string StopMatcher::Release(bool final) {
  // Released text never holds a whole stop string nor ends with the start
  // of one, so a match can only begin inside pending_.
  size_t match = std::string_view::npos;
  for (const std::string& s : stop_) {
    const size_t pos = pending_.find(s);
    if (pos < match) {
      match = pos;
      matched_stop_ = s;
    }
  }
  if (match != std::string_view::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, CharBoundaryAtOrBefore(pending_, match));
    pending_.clear();
    return out;
  }
  size_t hold = 0;
  if (!final) {
    // The longest suffix of pending_ that is a proper prefix of a stop string.
    const std::string_view text = pending_;
    for (const std::string& s : stop_) {
      for (size_t k = std::min(s.size() - 1, text.size()); k > hold; --k) {
        if (text.substr(text.size() - k) == std::string_view(s).substr(0, k)) {
          hold = k;
          break;
        }
      }
    }
  }
  const size_t end = CharBoundaryAtOrBefore(pending_, pending_.size() - hold);
  std::string out = pending_.substr(0, end);
  pending_.erase(0, end);
  return out;
}

}  // namespace dmoe::scheduler
