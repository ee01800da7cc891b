// gRPC message-size limits: explicit bounds instead of gRPC's 4 MiB default
// or no limit at all.
#ifndef DMOE_PROTO_MESSAGE_LIMITS_H_
#define DMOE_PROTO_MESSAGE_LIMITS_H_

#include <cstdint>

namespace dmoe {

// The client API (dmoe.v1.Generation): the largest request dmoe-scheduler
// accepts unless --max-request-bytes says otherwise. A longer one is
// answered RESOURCE_EXHAUSTED before it is parsed. 4 MiB holds any prompt
// that fits a 163840-position context as token ids or text.
inline constexpr int64_t kDefaultMaxRequestBytes = int64_t{4} << 20;

// The largest control-plane message (StepRequest, StepResult, the
// coordinator's RPCs) for a model of `num_layers` layers and
// `n_routed_experts` experts, in a step of at most `step_tokens` tokens over
// at most `sequences` sequences: worst-case encoded sizes of every field,
// doubled, capped at INT32_MAX (gRPC's limit). With no tokens and sequences,
// the coordinator's messages (expert load reports, registrations).
int ControlMessageLimit(int64_t num_layers, int64_t n_routed_experts, int64_t step_tokens, int64_t sequences);

}  // namespace dmoe

#endif  // DMOE_PROTO_MESSAGE_LIMITS_H_
