// ExpertPlacement: balanced contiguous shards, and validation of explicit
// maps and of the cluster-config JSON fragment.
#include "router/expert_placement.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dmoe::router {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Every expert on exactly one node, shards ascending, NodeOf and ExpertsOf agree.
void ExpectConsistent(const ExpertPlacement& p) {
  std::vector<int> seen(p.num_experts(), 0);
  for (int32_t node = 0; node < p.num_nodes(); ++node) {
    const absl::Span<const int32_t> shard = p.ExpertsOf(node);
    EXPECT_FALSE(shard.empty()) << "node " << node;
    for (size_t i = 0; i < shard.size(); ++i) {
      if (i > 0) EXPECT_LT(shard[i - 1], shard[i]) << "node " << node;
      EXPECT_EQ(p.NodeOf(shard[i]), node);
      ++seen[shard[i]];
    }
  }
  for (int64_t e = 0; e < p.num_experts(); ++e) EXPECT_EQ(seen[e], 1) << "expert " << e;
}

class ContiguousTest : public ::testing::TestWithParam<int> {};

TEST_P(ContiguousTest, BalancedShardsCoverEveryExpertOnce) {
  const int64_t E = 16, M = GetParam();
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(E, M);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_experts(), E);
  EXPECT_EQ(p->num_nodes(), M);
  ExpectConsistent(*p);
  size_t smallest = E, largest = 0;
  for (int32_t node = 0; node < M; ++node) {
    const absl::Span<const int32_t> shard = p->ExpertsOf(node);
    smallest = std::min(smallest, shard.size());
    largest = std::max(largest, shard.size());
    // node i hosts [floor(i*E/M), floor((i+1)*E/M)).
    ASSERT_EQ(static_cast<int64_t>(shard.size()), (node + 1) * E / M - node * E / M);
    EXPECT_EQ(shard.front(), node * E / M);
  }
  EXPECT_LE(largest - smallest, 1u);
}

INSTANTIATE_TEST_SUITE_P(E16, ContiguousTest, ::testing::Values(1, 2, 3, 5, 16));

TEST(ExpertPlacementTest, ContiguousFiveNodesExactShards) {
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(16, 5);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_THAT(p->ExpertsOf(0), ElementsAre(0, 1, 2));
  EXPECT_THAT(p->ExpertsOf(1), ElementsAre(3, 4, 5));
  EXPECT_THAT(p->ExpertsOf(2), ElementsAre(6, 7, 8));
  EXPECT_THAT(p->ExpertsOf(3), ElementsAre(9, 10, 11));
  EXPECT_THAT(p->ExpertsOf(4), ElementsAre(12, 13, 14, 15));  // floor(4*16/5) = 12
}

TEST(ExpertPlacementTest, ContiguousRejectsMoreNodesThanExperts) {
  for (auto [E, M] : std::vector<std::pair<int64_t, int64_t>>{{16, 17}, {16, 0}, {16, -1}, {0, 1}}) {
    absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(E, M);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << E << " " << M;
  }
}

TEST(ExpertPlacementTest, FromMapKeepsTheMap) {
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromMap(6, 3, {2, 0, 1, 0, 2, 1});
  ASSERT_TRUE(p.ok()) << p.status();
  ExpectConsistent(*p);
  EXPECT_THAT(p->ExpertsOf(0), ElementsAre(1, 3));
  EXPECT_THAT(p->ExpertsOf(1), ElementsAre(2, 5));
  EXPECT_THAT(p->ExpertsOf(2), ElementsAre(0, 4));
  EXPECT_EQ(p->NodeOf(4), 2);
}

TEST(ExpertPlacementTest, FromMapErrorsNameTheProblem) {
  struct Case {
    int64_t E, M;
    std::vector<int32_t> map;
    std::string message;
  };
  const std::vector<Case> cases = {
      {4, 2, {0, 0, 1}, "has 3 entries, n_routed_experts is 4"},
      {4, 2, {0, 0, 2, 1}, "expert_to_node[2] = 2 is outside [0, num_expert_nodes = 2)"},
      {4, 2, {0, -1, 1, 1}, "expert_to_node[1] = -1"},
      {4, 3, {0, 0, 2, 2}, "node 1 of 3 hosts no expert"},
      {4, 5, {0, 1, 2, 3}, "num_expert_nodes 5 must be in [1, n_routed_experts = 4]"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromMap(c.E, c.M, c.map);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(p.status().message(), HasSubstr(c.message));
  }
}

TEST(ExpertPlacementTest, FromJsonExpertToNode) {
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromJson(R"({"expert_to_node": [0, 0, 1, 1, 2, 2]})", 6);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->num_nodes(), 3);
  EXPECT_THAT(p->ExpertsOf(2), ElementsAre(4, 5));

  p = ExpertPlacement::FromJson(R"({"expert_to_node": [1, 0, 1, 0], "num_expert_nodes": 2})", 4);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_THAT(p->ExpertsOf(0), ElementsAre(1, 3));
}

TEST(ExpertPlacementTest, FromJsonExpertShardsAndRoundTrip) {
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromJson(R"({"expert_shards": [[3, 0], [1], [2, 4]]})", 5);
  ASSERT_TRUE(p.ok()) << p.status();
  ExpectConsistent(*p);
  EXPECT_THAT(p->ExpertsOf(0), ElementsAre(0, 3));
  EXPECT_THAT(p->expert_to_node(), ElementsAre(0, 1, 2, 0, 2));
  EXPECT_EQ(p->ToJson(), R"({"expert_shards":[[0,3],[1],[2,4]]})");

  absl::StatusOr<ExpertPlacement> again = ExpertPlacement::FromJson(p->ToJson(), 5);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_THAT(again->expert_to_node(), ElementsAre(0, 1, 2, 0, 2));
}

TEST(ExpertPlacementTest, FromJsonErrorsNameFieldAndIndex) {
  struct Case {
    std::string json;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"not json", "not a JSON object"},
      {"[0, 1]", "not a JSON object"},
      {"{}", "exactly one of expert_to_node and expert_shards"},
      {R"({"expert_to_node": [0,0,1,1], "expert_shards": [[0,1],[2,3]]})", "exactly one of"},
      {R"({"expert_to_node": {"a": 1}})", "expert_to_node must be an array"},
      {R"({"expert_to_node": [0, 0, 1]})", "expert_to_node has 3 entries, n_routed_experts is 4"},
      {R"({"expert_to_node": [0, 0, "1", 1]})", "expert_to_node[2] = \"1\" is not a node id"},
      {R"({"expert_to_node": [0, 0, 1.5, 1]})", "expert_to_node[2] = 1.5"},
      {R"({"expert_to_node": [0, -3, 1, 1]})", "expert_to_node[1] = -3"},
      {R"({"expert_to_node": [0, 0, 2, 2]})", "node 1 of 3 hosts no expert"},
      {R"({"expert_to_node": [0, 0, 1, 1], "num_expert_nodes": 3})", "node 2 of 3 hosts no expert"},
      {R"({"expert_to_node": [0, 0, 1, 2], "num_expert_nodes": 2})", "expert_to_node[3] = 2 is outside"},
      {R"({"expert_to_node": [0, 0, 1, 1], "num_expert_nodes": "2"})", "num_expert_nodes = \"2\""},
      {R"({"expert_shards": [[0, 1], [2, 3]], "num_expert_nodes": 2})", "num_expert_nodes goes with"},
      {R"({"expert_shards": [[0, 1], 2]})", "expert_shards[1] must be an array"},
      {R"({"expert_shards": [[0, 1], [], [2, 3]]})", "expert_shards[1] is empty"},
      {R"({"expert_shards": [[0, 1], [2, 4]]})", "expert_shards[1][1] = 4 is not an expert id in [0, 4)"},
      {R"({"expert_shards": [[0, 1], [2, -1]]})", "expert_shards[1][1] = -1"},
      {R"({"expert_shards": [[0, 1], [1, 2, 3]]})", "expert_shards[1][0]: expert 1 is already in expert_shards[0]"},
      {R"({"expert_shards": [[0, 1], [3]]})", "expert 2 is in no shard"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromJson(c.json, 4);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_THAT(p.status().message(), HasSubstr(c.message)) << c.json;
  }
}

}  // namespace
}  // namespace dmoe::router
