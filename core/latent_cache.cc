#include "core/latent_cache.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace dmoe {
namespace {

// Broken internal invariants (a caller indexing past what it allocated) are
// bugs, not recoverable errors: print where and why, then abort.
[[noreturn]] void CheckFailed(const char* file, int line, const std::string& message) {
  std::fprintf(stderr, "%s:%d: LatentCache check failed: %s\n", file, line, message.c_str());
  std::fflush(stderr);
  std::abort();
}

#define DMOE_LC_CHECK(cond, message)                         \
  do {                                                       \
    if (!(cond)) CheckFailed(__FILE__, __LINE__, (message)); \
  } while (0)

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b.
int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

}  // namespace

absl::StatusOr<std::unique_ptr<LatentCache>> LatentCache::Create(
    const LatentCacheOptions& options) {
  const std::pair<const char*, int64_t> sizes[] = {
      {"num_layers", options.num_layers},
      {"kv_lora_rank", options.kv_lora_rank},
      {"qk_rope_head_dim", options.qk_rope_head_dim},
      {"page_size", options.page_size},
      {"num_pages", options.num_pages},
  };
  for (const auto& [name, value] : sizes) {
    if (value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("LatentCacheOptions.", std::string(name), " must be positive, got ", value));
    }
  }
  // The pool holds num_pages * num_layers * page_size * entry_width floats;
  // reject sizes whose product overflows or that no vector could hold.
  const int64_t max_floats = static_cast<int64_t>(
      std::min<size_t>(std::vector<float>().max_size(), std::numeric_limits<int64_t>::max()));
  int64_t total = 1;
  for (int64_t factor : {options.num_pages, options.num_layers, options.page_size,
                         options.kv_lora_rank + options.qk_rope_head_dim}) {
    if (total > max_floats / factor) {
      return absl::InvalidArgumentError(
          absl::StrCat("LatentCacheOptions: pool of num_pages=", options.num_pages,
                       " x num_layers=", options.num_layers, " x page_size=", options.page_size,
                       " x entry_width=", options.kv_lora_rank + options.qk_rope_head_dim,
                       " floats is too large"));
    }
    total *= factor;
  }
  return std::unique_ptr<LatentCache>(new LatentCache(options));
}

LatentCache::LatentCache(const LatentCacheOptions& options)
    : options_(options),
      // Every float starts as a quiet NaN: attention that reads an entry
      // nobody wrote (an off-by-one in a position, a missed layer) then
      // yields NaN logits, which tests catch at once, instead of silently
      // attending to zeros, which look like a plausible (and wrong) key.
      // Pages that are freed and handed out again keep the previous owner's
      // values; the poisoning covers never-written storage only.
      pool_(options.host_pool ? static_cast<size_t>(options.num_pages * options.num_layers * options.page_size *
                                                    (options.kv_lora_rank + options.qk_rope_head_dim))
                              : 0,
            std::numeric_limits<float>::quiet_NaN()) {
  // LIFO free list: pop_back hands out page 0 first, then 1, 2, ...
  free_pages_.reserve(static_cast<size_t>(options.num_pages));
  for (int64_t page = options.num_pages - 1; page >= 0; --page) free_pages_.push_back(page);
}

int64_t LatentCache::SequenceLength(SequenceId seq) const {
  auto it = sequences_.find(seq);
  return it == sequences_.end() ? 0 : it->second.length;
}

int64_t LatentCache::PagesNeeded(SequenceId seq, int64_t new_tokens) const {
  if (new_tokens <= 0) return 0;
  int64_t length = 0;
  int64_t held = 0;
  if (auto it = sequences_.find(seq); it != sequences_.end()) {
    length = it->second.length;
    held = static_cast<int64_t>(it->second.block_table.size());
  }
  // Saturate instead of overflowing: such a request can never be satisfied.
  if (new_tokens > std::numeric_limits<int64_t>::max() - length) {
    return std::numeric_limits<int64_t>::max();
  }
  const int64_t needed = CeilDiv(length + new_tokens, options_.page_size) - held;
  return needed > 0 ? needed : 0;
}

absl::Status LatentCache::Extend(SequenceId seq, int64_t new_tokens) {
  if (new_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LatentCache::Extend: new_tokens must be >= 0, got ", new_tokens, " (sequence ", seq, ")"));
  }
  const int64_t needed = PagesNeeded(seq, new_tokens);
  if (needed > pages_free()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "LatentCache::Extend: sequence ", seq, " needs ", needed, " more page(s) for ", new_tokens,
        " token(s) but only ", pages_free(), " of ", pages_total(), " are free"));
  }
  // Nothing can fail past this point, so the update is all-or-nothing.
  Sequence& sequence = sequences_[seq];
  for (int64_t i = 0; i < needed; ++i) {
    sequence.block_table.push_back(free_pages_.back());
    free_pages_.pop_back();
  }
  sequence.length += new_tokens;
  return absl::OkStatus();
}

void LatentCache::Truncate(SequenceId seq, int64_t length) {
  DMOE_LC_CHECK(length >= 0,
                absl::StrCat("Truncate to negative length ", length, " (sequence ", seq, ")"));
  auto it = sequences_.find(seq);
  if (it == sequences_.end() || length >= it->second.length) return;
  Sequence& sequence = it->second;
  const int64_t keep = CeilDiv(length, options_.page_size);
  // Give back the tail pages last-first, so that the LIFO list hands them out
  // again in their original order.
  while (static_cast<int64_t>(sequence.block_table.size()) > keep) {
    free_pages_.push_back(sequence.block_table.back());
    sequence.block_table.pop_back();
  }
  sequence.length = length;
}

void LatentCache::Free(SequenceId seq) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return;
  const std::vector<int64_t>& table = it->second.block_table;
  for (auto page = table.rbegin(); page != table.rend(); ++page) free_pages_.push_back(*page);
  sequences_.erase(it);
}

const float* LatentCache::Entry(SequenceId seq, int64_t layer, int64_t pos) const {
  DMOE_LC_CHECK(options_.host_pool, "Entry of a cache without a host pool (its entries live on a device)");
  auto it = sequences_.find(seq);
  DMOE_LC_CHECK(it != sequences_.end(), absl::StrCat("Entry of unknown sequence ", seq));
  const Sequence& sequence = it->second;
  DMOE_LC_CHECK(layer >= 0 && layer < options_.num_layers,
                absl::StrCat("Entry layer ", layer, " outside [0, ", options_.num_layers,
                             ") (sequence ", seq, ")"));
  DMOE_LC_CHECK(pos >= 0 && pos < sequence.length,
                absl::StrCat("Entry position ", pos, " outside [0, ", sequence.length,
                             ") (sequence ", seq, ")"));
  const int64_t page = sequence.block_table[static_cast<size_t>(pos / options_.page_size)];
  const int64_t slot = pos % options_.page_size;
  const int64_t offset =
      ((page * options_.num_layers + layer) * options_.page_size + slot) * entry_width();
  return pool_.data() + offset;
}

float* LatentCache::Entry(SequenceId seq, int64_t layer, int64_t pos) {
  return const_cast<float*>(std::as_const(*this).Entry(seq, layer, pos));
}

const std::vector<int64_t>& LatentCache::BlockTable(SequenceId seq) const {
  // Leaked on purpose: never destroyed, so safe to return during shutdown.
  static const std::vector<int64_t>* const kEmpty = new std::vector<int64_t>();
  auto it = sequences_.find(seq);
  return it == sequences_.end() ? *kEmpty : it->second.block_table;
}

}  // namespace dmoe
