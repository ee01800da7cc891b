// Wire format of the MoE data plane: the dispatch an attention node sends to
// an expert node (one node's rows of a DispatchPlan) and the partial sums the
// expert node sends back.
//
// Layout, all little-endian, no padding:
//   offset  type     field
//   0       u8[4]    magic "dMoE"
//   4       u8       version (1)
//   5       u8       kind: 1 = dispatch, 2 = partial sums
//   6       u16      reserved, 0
//   8       i64      layer
//   16      u64      step_id      (opaque to the router: step and micro-batch)
//   24      i64      num_tokens   (>= 0)
//   32      i64      hidden_size  (>= 1)
//   dispatch only:
//   40      i64      top_k        (>= 1)
//   48      f32      hidden       [num_tokens, hidden_size]
//           i32      topk_idx     [num_tokens, top_k], -1 = slot not for this node
//           f32      topk_weights [num_tokens, top_k]
//   partial sums only:
//   40      f32      partial_sums [num_tokens, hidden_size]
// The message is exactly as long as its counts say. Decoding copies out of
// the buffer (any alignment is fine) and never reads past it: a short or
// over-long buffer is DATA_LOSS, a bad magic, version, kind or value is
// INVALID_ARGUMENT, each naming the field.
//
// Free functions over value types; thread-safe.
#ifndef DMOE_ROUTER_DISPATCH_WIRE_H_
#define DMOE_ROUTER_DISPATCH_WIRE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace dmoe::router {

struct DispatchMessage {
  int64_t layer = 0;
  uint64_t step_id = 0;
  int64_t num_tokens = 0;
  int64_t hidden_size = 0;
  int64_t top_k = 0;
  std::vector<float> hidden;        // [num_tokens, hidden_size]
  std::vector<int32_t> topk_idx;    // [num_tokens, top_k], -1 = masked slot
  std::vector<float> topk_weights;  // [num_tokens, top_k]
};

struct PartialSumsMessage {
  int64_t layer = 0;
  uint64_t step_id = 0;
  int64_t num_tokens = 0;
  int64_t hidden_size = 0;
  std::vector<float> partial_sums;  // [num_tokens, hidden_size]
};

// hidden: [num_tokens, hidden_size] (DispatchPlan::GatherHidden);
// topk_idx, topk_weights: [num_tokens, top_k] (DispatchPlan::topk_idx/topk_weights).
// INVALID_ARGUMENT when the sizes disagree, layer < 0, hidden_size < 1,
// top_k < 1 or an expert index < -1.
absl::StatusOr<std::vector<uint8_t>> EncodeDispatch(int64_t layer, uint64_t step_id, int64_t hidden_size,
                                                    int64_t top_k, absl::Span<const float> hidden,
                                                    absl::Span<const int32_t> topk_idx,
                                                    absl::Span<const float> topk_weights);
absl::StatusOr<DispatchMessage> DecodeDispatch(absl::Span<const uint8_t> bytes);

// partial_sums: [num_tokens, hidden_size], rows in the order the dispatch
// listed its tokens. INVALID_ARGUMENT when the size is not a multiple of
// hidden_size, layer < 0 or hidden_size < 1.
absl::StatusOr<std::vector<uint8_t>> EncodePartialSums(int64_t layer, uint64_t step_id, int64_t hidden_size,
                                                       absl::Span<const float> partial_sums);
absl::StatusOr<PartialSumsMessage> DecodePartialSums(absl::Span<const uint8_t> bytes);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_DISPATCH_WIRE_H_
