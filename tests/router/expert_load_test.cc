// ExpertLoadTracker and the imbalance / fidelity measures.
#include "router/expert_load.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "router/expert_placement.h"

namespace dmoe::router {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// 3 layers, layer 0 dense; 4 experts.
ModelConfig SmallMoeConfig() {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(
      R"({"model_type": "deepseek_v3", "n_routed_experts": 4, "n_group": 2, "topk_group": 1,
          "num_experts_per_tok": 2, "num_hidden_layers": 3, "first_k_dense_replace": 1})");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

TEST(ExpertLoadTrackerTest, AccumulatesPerMoeLayer) {
  absl::StatusOr<ExpertLoadTracker> t = ExpertLoadTracker::Create(SmallMoeConfig());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->num_layers(), 3);
  EXPECT_EQ(t->num_experts(), 4);
  EXPECT_FALSE(t->is_moe_layer(0));
  EXPECT_TRUE(t->is_moe_layer(2));
  EXPECT_THAT(t->num_tokens_per_expert(0), IsEmpty());
  EXPECT_THAT(t->num_tokens_per_expert(1), ElementsAre(0, 0, 0, 0));

  // Two expert nodes report their own experts of one step.
  ASSERT_TRUE(t->Add(1, std::vector<int64_t>{3, 1, 0, 0}).ok());
  ASSERT_TRUE(t->Add(1, std::vector<int64_t>{0, 0, 2, 5}).ok());
  t->EndStep();
  ASSERT_TRUE(t->Add(1, std::vector<int64_t>{1, 1, 1, 1}).ok());
  ASSERT_TRUE(t->Add(2, std::vector<int64_t>{0, 4, 0, 0}).ok());
  t->EndStep();
  EXPECT_EQ(t->num_steps(), 2);
  EXPECT_THAT(t->num_tokens_per_expert(1), ElementsAre(4, 2, 3, 6));
  EXPECT_THAT(t->num_tokens_per_expert(2), ElementsAre(0, 4, 0, 0));
  EXPECT_THAT(t->TotalPerExpert(), ElementsAre(4, 6, 3, 6));

  t->Reset();
  EXPECT_EQ(t->num_steps(), 0);
  EXPECT_THAT(t->num_tokens_per_expert(1), ElementsAre(0, 0, 0, 0));
}

TEST(ExpertLoadTrackerTest, RejectsBadReportsAndAddsNothing) {
  absl::StatusOr<ExpertLoadTracker> t = ExpertLoadTracker::Create(SmallMoeConfig());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(t->Add(0, std::vector<int64_t>{1, 1, 1, 1}).message(), HasSubstr("layer 0 is not an MoE layer"));
  EXPECT_THAT(t->Add(3, std::vector<int64_t>{1, 1, 1, 1}).message(), HasSubstr("layer 3 is not an MoE layer"));
  EXPECT_THAT(t->Add(-1, std::vector<int64_t>{1, 1, 1, 1}).message(), HasSubstr("layer -1"));
  EXPECT_THAT(t->Add(1, std::vector<int64_t>{1, 1, 1}).message(), HasSubstr("report has 3 experts, the model 4"));
  absl::Status st = t->Add(1, std::vector<int64_t>{5, 5, -1, 5});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("num_tokens_per_expert[2] = -1 < 0"));
  EXPECT_THAT(t->num_tokens_per_expert(1), ElementsAre(0, 0, 0, 0));
}

TEST(ExpertLoadTrackerTest, ModelWithoutMoeIsRejected) {
  absl::StatusOr<ModelConfig> dense =
      ModelConfig::FromJson(R"({"model_type": "deepseek_v3", "num_experts_per_tok": null})");
  ASSERT_TRUE(dense.ok()) << dense.status();
  EXPECT_EQ(ExpertLoadTracker::Create(*dense).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LoadMetricsTest, MaxOverMean) {
  EXPECT_DOUBLE_EQ(MaxOverMean({}), 1.0);
  EXPECT_DOUBLE_EQ(MaxOverMean(std::vector<int64_t>{0, 0, 0}), 1.0);
  EXPECT_DOUBLE_EQ(MaxOverMean(std::vector<int64_t>{5, 5, 5, 5}), 1.0);
  EXPECT_DOUBLE_EQ(MaxOverMean(std::vector<int64_t>{8, 0, 0, 0}), 4.0);
  EXPECT_DOUBLE_EQ(MaxOverMean(std::vector<int64_t>{3, 1}), 1.5);
}

TEST(LoadMetricsTest, LoadPerNodeSumsEachShard) {
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::FromMap(5, 2, {1, 0, 1, 0, 1});
  ASSERT_TRUE(p.ok()) << p.status();
  absl::StatusOr<std::vector<int64_t>> per_node = LoadPerNode(*p, std::vector<int64_t>{1, 2, 3, 4, 5});
  ASSERT_TRUE(per_node.ok()) << per_node.status();
  EXPECT_THAT(*per_node, ElementsAre(6, 9));
  EXPECT_THAT(LoadPerNode(*p, std::vector<int64_t>{1, 2}).status().message(),
              HasSubstr("has 2 experts, the placement 5"));
}

TEST(LoadMetricsTest, CompareRoutingCountsSetDifferencesPerToken) {
  // top_k 3, 3 tokens.
  const std::vector<int32_t> reference = {0, 1, 2, /**/ 3, 4, 5, /**/ 6, -1, 7};
  // token 0 reordered (no change), token 1 one expert swapped, token 2 its
  // skipped slot filled (not a reference decision) and expert 7 dropped.
  const std::vector<int32_t> balanced = {2, 0, 1, /**/ 3, 9, 5, /**/ 6, 8, -1};
  absl::StatusOr<RoutingChange> change = CompareRouting(reference, balanced, 3);
  ASSERT_TRUE(change.ok()) << change.status();
  EXPECT_EQ(change->total_decisions, 8);
  EXPECT_EQ(change->changed_decisions, 2);
  EXPECT_DOUBLE_EQ(change->share(), 0.25);

  change = CompareRouting(reference, reference, 3);
  ASSERT_TRUE(change.ok());
  EXPECT_EQ(change->changed_decisions, 0);
  EXPECT_DOUBLE_EQ(RoutingChange{}.share(), 0.0);

  EXPECT_EQ(CompareRouting(reference, absl::MakeConstSpan(balanced).subspan(3), 3).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CompareRouting(reference, balanced, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dmoe::router
