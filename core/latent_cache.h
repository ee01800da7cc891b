// The paged MLA latent cache (MODEL_SPEC.md 3.5).
//
// Per token per layer an entry holds exactly the normalized latent c
// (kv_lora_rank floats) followed by the roped key k_pe (qk_rope_head_dim
// floats): 576 values for DeepSeek-V2/V3. Entries live in fixed-size pages
// (default 64 tokens, as FlashMLA uses) handed out by a free-list allocator;
// each sequence has a block table (its pages in position order).
//
// Not thread-safe: one owner (the engine's step loop, or an attention node)
// calls it. Entry pointers stay valid until the sequence is freed.
//
// The pool starts filled with quiet NaN, so reading an entry that was never
// written poisons the attention output instead of silently using zeros
// (pages freed and handed out again keep their previous owner's values).
// Allocation is deterministic (LIFO free list; a fresh cache hands out pages
// 0, 1, 2, ...). A GPU compute backend creates the cache without a host pool
// (host_pool = false) and attaches its device pool, laid out by the same
// page indices; the block tables stay here.
#ifndef DMOE_CORE_LATENT_CACHE_H_
#define DMOE_CORE_LATENT_CACHE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dmoe {

struct LatentCacheOptions {
  int64_t num_layers = 0;
  int64_t kv_lora_rank = 0;       // r
  int64_t qk_rope_head_dim = 0;   // dr
  int64_t page_size = 64;         // tokens per page
  int64_t num_pages = 0;          // pool size
  // false: no host pool; the entries live in storage a compute backend
  // attaches (a device pool), and Entry() may not be called.
  bool host_pool = true;
};

using SequenceId = int64_t;

class LatentCache {
 public:
  // INVALID_ARGUMENT on a non-positive size (the message names the field) or
  // a pool too large to address.
  static absl::StatusOr<std::unique_ptr<LatentCache>> Create(const LatentCacheOptions& options);

  const LatentCacheOptions& options() const { return options_; }
  int64_t entry_width() const { return options_.kv_lora_rank + options_.qk_rope_head_dim; }

  int64_t pages_total() const { return options_.num_pages; }
  int64_t pages_free() const { return static_cast<int64_t>(free_pages_.size()); }
  // Tokens whose entries the sequence holds (0 for an unknown sequence).
  int64_t SequenceLength(SequenceId seq) const;
  // Pages the sequence must get before it can hold `new_tokens` more tokens
  // (0 for new_tokens <= 0).
  int64_t PagesNeeded(SequenceId seq, int64_t new_tokens) const;
  // Grows the sequence (creating it if new) by `new_tokens` positions.
  // RESOURCE_EXHAUSTED, with nothing allocated, when the free pages do not
  // suffice (the message names the sequence and pages needed vs free).
  // INVALID_ARGUMENT on negative `new_tokens`. Extend(seq, 0) creates an
  // empty sequence.
  absl::Status Extend(SequenceId seq, int64_t new_tokens);
  // Shrinks the sequence to `length` tokens, returning pages no longer needed.
  // No-op for an unknown sequence or length >= SequenceLength(seq); the
  // sequence stays known even at length 0. REQUIRES: length >= 0.
  void Truncate(SequenceId seq, int64_t length);
  // Returns all the sequence's pages to the free list. Unknown ids: no-op.
  void Free(SequenceId seq);
  bool Contains(SequenceId seq) const { return sequences_.contains(seq); }

  // REQUIRES: pos < SequenceLength(seq). [entry_width()] floats.
  // Aborts (internal invariant) on an unknown sequence or out-of-range
  // layer/pos.
  float* Entry(SequenceId seq, int64_t layer, int64_t pos);
  const float* Entry(SequenceId seq, int64_t layer, int64_t pos) const;
  // The sequence's pages in position order (empty for an unknown sequence).
  const std::vector<int64_t>& BlockTable(SequenceId seq) const;

  bool has_host_pool() const { return options_.host_pool; }
  // Entry storage owned by a compute backend (e.g. a GPU pool laid out by
  // page index), kept alive with the cache; `owner` identifies the backend
  // that may read it.
  void AttachStorage(std::shared_ptr<void> storage, const void* owner) {
    storage_ = std::move(storage);
    storage_owner_ = owner;
  }
  void* storage() const { return storage_.get(); }
  const void* storage_owner() const { return storage_owner_; }

 private:
  explicit LatentCache(const LatentCacheOptions& options);
  struct Sequence {
    int64_t length = 0;
    std::vector<int64_t> block_table;
  };

  LatentCacheOptions options_;
  std::vector<float> pool_;  // [num_pages][num_layers][page_size][entry_width]
  std::vector<int64_t> free_pages_;
  absl::flat_hash_map<SequenceId, Sequence> sequences_;
  std::shared_ptr<void> storage_;
  const void* storage_owner_ = nullptr;
};

}  // namespace dmoe

#endif  // DMOE_CORE_LATENT_CACHE_H_
