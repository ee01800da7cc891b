// Transport tags of the MoE data plane (transport::kTagBits = 48 bits):
//   bit  47     direction: 0 dispatch (attention -> expert), 1 partial sums (back)
//   bit  46     micro-batch (0 or 1) of the step
//   bits 32..45 MoE layer (< 16384)
//   bits  0..31 step id (wraps; only in-flight steps must differ)
// A reply carries its dispatch's tag with the direction bit set, so an
// attention node receives exactly the replies of one (step, layer, micro-batch).
#ifndef DMOE_ROUTER_DATA_PLANE_TAGS_H_
#define DMOE_ROUTER_DATA_PLANE_TAGS_H_

#include <cstdint>

namespace dmoe::router {

inline constexpr uint64_t kReplyBit = uint64_t{1} << 47;
inline constexpr uint64_t kMicroBatchBit = uint64_t{1} << 46;
inline constexpr uint64_t kAllTagBits = (uint64_t{1} << 48) - 1;

inline uint64_t DispatchTag(uint64_t step_id, int64_t layer, int micro_batch) {
  return (step_id & 0xffffffffu) | ((static_cast<uint64_t>(layer) & 0x3fff) << 32) |
         (micro_batch ? kMicroBatchBit : 0);
}
inline uint64_t ReplyTag(uint64_t dispatch_tag) { return dispatch_tag | kReplyBit; }
inline int64_t TagLayer(uint64_t tag) { return static_cast<int64_t>((tag >> 32) & 0x3fff); }
inline bool IsReplyTag(uint64_t tag) { return (tag & kReplyBit) != 0; }

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_DATA_PLANE_TAGS_H_
