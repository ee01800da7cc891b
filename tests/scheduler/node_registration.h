// Registering fake node processes with a Coordinator, as a node's main does
// (core/node/cluster_join.cc): both registration phases, then NodeReady.
#ifndef DMOE_TESTS_SCHEDULER_NODE_REGISTRATION_H_
#define DMOE_TESTS_SCHEDULER_NODE_REGISTRATION_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "scheduler/coordinator.h"

namespace dmoe::scheduler::testing {

// Both registration phases of one node process (16 cache pages of 64
// tokens), the second with its transport address; its node id, or -1 (and
// a test failure) when the first is refused.
inline int32_t RegisterNode(Coordinator& coordinator, v1::NodeKind kind, const std::string& address,
                            uint64_t incarnation, const std::string& transport) {
  v1::RegisterNodeRequest r;
  r.set_kind(kind);
  r.set_grpc_address(address);
  r.set_incarnation(incarnation);
  r.set_cache_pages(16);
  r.set_page_size(64);
  absl::StatusOr<v1::RegisterNodeResponse> first = coordinator.RegisterNode(r);
  EXPECT_TRUE(first.ok()) << first.status();
  if (!first.ok()) return -1;
  r.set_node_id(first->node_id());
  r.set_transport_address(transport);
  absl::StatusOr<v1::RegisterNodeResponse> second = coordinator.RegisterNode(r);
  EXPECT_TRUE(second.ok()) << second.status();
  return first->node_id();
}

// NodeReady for node `id` at the coordinator's epoch (every peer's address applied).
inline void MarkNodeReady(Coordinator& coordinator, int32_t id, uint64_t incarnation) {
  v1::NodeReadyRequest ready;
  ready.set_node_id(id);
  ready.set_incarnation(incarnation);
  ready.set_cluster_epoch(coordinator.epoch());
  EXPECT_TRUE(coordinator.NodeReady(ready).ok());
}

}  // namespace dmoe::scheduler::testing

#endif  // DMOE_TESTS_SCHEDULER_NODE_REGISTRATION_H_
