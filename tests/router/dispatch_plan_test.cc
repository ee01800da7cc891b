// DispatchPlan: which tokens go to which expert node with which slots, and
// the fixed-order combine of the nodes' partial sums; checked on a hand-made
// routing, against an independent reference, and with core's LocalExperts on
// the tiny-v3 golden model sharded over expert nodes.
#include "router/dispatch_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "core/mlp.h"
#include "core/model_weights.h"
#include "router/expert_placement.h"
#include "tests/test_util.h"

namespace dmoe::router {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

ExpertPlacement Contiguous(int64_t E, int64_t M) {
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(E, M);
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

// 8 experts on 4 nodes: {0,1} {2,3} {4,5} {6,7}; 4 tokens, top_k 3.
class HandMadeRouting : public ::testing::Test {
 protected:
  const ExpertPlacement placement_ = Contiguous(8, 4);
  const std::vector<int32_t> topk_idx_ = {
      1, 0, 5,   // token 0: two experts on node 0, one on node 2
      4, 2, 5,   // token 1: node 2, node 1, node 2
      0, 3, -1,  // token 2: node 0, node 1, a skipped slot
      2, 4, 1,   // token 3: nodes 1, 2, 0
  };
  const std::vector<float> topk_weights_ = {0.5f, 0.3f, 0.2f, 0.6f, 0.25f, 0.15f,
                                            0.7f, 0.3f, 9.0f, 0.4f, 0.35f, 0.25f};
};

TEST_F(HandMadeRouting, EachNodeGetsItsTokensOnceInOrderWithItsSlots) {
  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(placement_, topk_idx_, topk_weights_, 4, 3);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->num_nodes(), 4);
  EXPECT_EQ(plan->num_tokens(), 4);
  EXPECT_EQ(plan->top_k(), 3);

  // Node 0: token 0 once with both of its experts (slot order kept).
  EXPECT_THAT(plan->tokens(0), ElementsAre(0, 2, 3));
  EXPECT_THAT(plan->topk_idx(0), ElementsAre(1, 0, -1, /**/ 0, -1, -1, /**/ -1, -1, 1));
  EXPECT_THAT(plan->topk_weights(0), ElementsAre(0.5f, 0.3f, 0.0f, 0.7f, 0.0f, 0.0f, 0.0f, 0.0f, 0.25f));

  EXPECT_THAT(plan->tokens(1), ElementsAre(1, 2, 3));
  EXPECT_THAT(plan->topk_idx(1), ElementsAre(-1, 2, -1, /**/ -1, 3, -1, /**/ 2, -1, -1));
  EXPECT_THAT(plan->topk_weights(1), ElementsAre(0.0f, 0.25f, 0.0f, 0.0f, 0.3f, 0.0f, 0.4f, 0.0f, 0.0f));

  // Node 2: token 1 once with experts 4 and 5.
  EXPECT_THAT(plan->tokens(2), ElementsAre(0, 1, 3));
  EXPECT_THAT(plan->topk_idx(2), ElementsAre(-1, -1, 5, /**/ 4, -1, 5, /**/ -1, 4, -1));
  EXPECT_THAT(plan->topk_weights(2), ElementsAre(0.0f, 0.0f, 0.2f, 0.6f, 0.0f, 0.15f, 0.0f, 0.35f, 0.0f));

  // Node 3 hosts experts 6 and 7, which nobody chose: nothing to send.
  EXPECT_THAT(plan->tokens(3), IsEmpty());
  EXPECT_THAT(plan->topk_idx(3), IsEmpty());
  EXPECT_THAT(plan->topk_weights(3), IsEmpty());
}

TEST_F(HandMadeRouting, GatherHiddenTakesTheNodesRows) {
  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(placement_, topk_idx_, topk_weights_, 4, 3);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const std::vector<float> x = {0, 1, 10, 11, 20, 21, 30, 31};  // [4, 2]
  EXPECT_THAT(plan->GatherHidden(0, x, 2), ElementsAre(0, 1, 20, 21, 30, 31));
  EXPECT_THAT(plan->GatherHidden(2, x, 2), ElementsAre(0, 1, 10, 11, 30, 31));
  EXPECT_THAT(plan->GatherHidden(3, x, 2), IsEmpty());
}

TEST_F(HandMadeRouting, BuildRejectsBadInput) {
  std::vector<int32_t> bad = topk_idx_;
  bad[7] = 8;
  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(placement_, bad, topk_weights_, 4, 3);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(), HasSubstr("topk_idx[7] = 8 >= n_routed_experts 8"));

  plan = DispatchPlan::Build(placement_, topk_idx_, topk_weights_, 5, 3);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(plan.status().message(), HasSubstr("expected num_tokens 5 * top_k 3"));

  plan = DispatchPlan::Build(placement_, topk_idx_, absl::MakeConstSpan(topk_weights_).subspan(1), 4, 3);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);

  plan = DispatchPlan::Build(placement_, topk_idx_, topk_weights_, 4, 0);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(HandMadeRouting, CombineRejectsSizeMismatchNamingTheNode) {
  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(placement_, topk_idx_, topk_weights_, 4, 3);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const std::vector<float> three_rows(3 * 2, 1.0f), two_rows(2 * 2, 1.0f);
  std::vector<float> out(4 * 2);
  std::vector<absl::Span<const float>> parts = {three_rows, three_rows, two_rows, {}};
  absl::Status st = plan->Combine(parts, 2, absl::MakeSpan(out));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("node 2 returned 4 values, expected 6"));

  parts = {three_rows, three_rows, three_rows};
  EXPECT_THAT(plan->Combine(parts, 2, absl::MakeSpan(out)).message(), HasSubstr("partial sums of 3 nodes"));

  parts = {three_rows, three_rows, three_rows, {}};
  EXPECT_TRUE(plan->Combine(parts, 2, absl::MakeSpan(out)).ok());
  EXPECT_THAT(out, ElementsAre(2, 2, 2, 2, 2, 2, 3, 3));  // token 2 is on nodes 0 and 1 only
  std::vector<float> short_out(7);
  EXPECT_THAT(plan->Combine(parts, 2, absl::MakeSpan(short_out)).message(), HasSubstr("out has 7 values"));
}

// A stand-in for an expert MLP: y_e(x)[d] = tanh(a_e * x[d] + b_e * d).
void FakeExpert(int32_t e, const float* x, int64_t D, float* y) {
  for (int64_t d = 0; d < D; ++d) y[d] = std::tanh((0.3f + 0.1f * e) * x[d] + 0.01f * e * d);
}

// What an expert node returns for its rows: slots in order, masked ones skipped.
std::vector<float> FakeExpertNode(const DispatchPlan& plan, int32_t node, const std::vector<float>& x, int64_t D) {
  const std::vector<float> rows = plan.GatherHidden(node, x, D);
  const int64_t n = static_cast<int64_t>(plan.tokens(node).size()), k = plan.top_k();
  std::vector<float> out(n * D, 0.0f), y(D);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t s = 0; s < k; ++s) {
      const int32_t e = plan.topk_idx(node)[j * k + s];
      if (e < 0) continue;
      FakeExpert(e, rows.data() + j * D, D, y.data());
      for (int64_t d = 0; d < D; ++d) out[j * D + d] += plan.topk_weights(node)[j * k + s] * y[d];
    }
  }
  return out;
}

struct RandomRouting {
  int64_t n, k;
  std::vector<int32_t> topk_idx;
  std::vector<float> topk_weights;
};

// Distinct experts per token, about 1 slot in 10 skipped.
RandomRouting MakeRandomRouting(int64_t n, int64_t k, int64_t E, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> w(0.05f, 1.0f);
  RandomRouting r{n, k, {}, {}};
  std::vector<int32_t> experts(E);
  for (int64_t t = 0; t < n; ++t) {
    std::iota(experts.begin(), experts.end(), 0);
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int64_t s = 0; s < k; ++s) {
      r.topk_idx.push_back(rng() % 10 == 0 ? -1 : experts[s]);
      r.topk_weights.push_back(w(rng));
    }
  }
  return r;
}

TEST(DispatchPlanTest, CombineMatchesIndependentSumsBitwiseInNodeOrder) {
  const int64_t E = 16, n = 37, k = 4, D = 24;
  // A scattered placement: node order differs from expert order.
  absl::StatusOr<ExpertPlacement> placement =
      ExpertPlacement::FromMap(E, 5, {3, 0, 4, 1, 2, 0, 3, 1, 4, 2, 0, 1, 3, 4, 2, 0});
  ASSERT_TRUE(placement.ok()) << placement.status();
  const RandomRouting r = MakeRandomRouting(n, k, E, 7);
  std::vector<float> x(n * D);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);

  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(*placement, r.topk_idx, r.topk_weights, n, k);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<std::vector<float>> partial(plan->num_nodes());
  std::vector<absl::Span<const float>> views;
  // Replies computed in reverse node order: arrival order must not matter.
  for (int32_t node = plan->num_nodes() - 1; node >= 0; --node) partial[node] = FakeExpertNode(*plan, node, x, D);
  for (const std::vector<float>& p : partial) views.push_back(p);
  std::vector<float> out(n * D, -1.0f);
  ASSERT_TRUE(plan->Combine(views, D, absl::MakeSpan(out)).ok());

  // Reference straight from topk_idx and the placement: per token, per node
  // in node order, that node's slots in slot order.
  std::vector<float> y(D);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> total(D, 0.0f), direct(D, 0.0);
    for (int32_t node = 0; node < placement->num_nodes(); ++node) {
      std::vector<float> node_sum(D, 0.0f);
      for (int64_t s = 0; s < k; ++s) {
        const int32_t e = r.topk_idx[t * k + s];
        if (e < 0 || placement->NodeOf(e) != node) continue;
        FakeExpert(e, x.data() + t * D, D, y.data());
        for (int64_t d = 0; d < D; ++d) node_sum[d] += r.topk_weights[t * k + s] * y[d];
      }
      for (int64_t d = 0; d < D; ++d) total[d] += node_sum[d];
    }
    // The plain sum over slots, order aside: equal to rounding.
    for (int64_t s = 0; s < k; ++s) {
      const int32_t e = r.topk_idx[t * k + s];
      if (e < 0) continue;
      FakeExpert(e, x.data() + t * D, D, y.data());
      for (int64_t d = 0; d < D; ++d) direct[d] += r.topk_weights[t * k + s] * y[d];
    }
    for (int64_t d = 0; d < D; ++d) {
      ASSERT_EQ(std::memcmp(&out[t * D + d], &total[d], sizeof(float)), 0)
          << "token " << t << " d " << d << ": " << out[t * D + d] << " vs " << total[d];
      ASSERT_NEAR(out[t * D + d], direct[d], 1e-5f) << "token " << t << " d " << d;
    }
  }
}

TEST(DispatchPlanTest, TokensRoutedNowhereCombineToZero) {
  const ExpertPlacement placement = Contiguous(4, 2);
  const std::vector<int32_t> idx = {-1, -1, 0, 3};
  const std::vector<float> w = {1, 1, 1, 1};
  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(placement, idx, w, 2, 2);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->tokens(0), ElementsAre(1));
  EXPECT_THAT(plan->tokens(1), ElementsAre(1));
  const std::vector<float> p0 = {1.5f}, p1 = {2.0f};
  std::vector<absl::Span<const float>> parts = {p0, p1};
  std::vector<float> out(2, 7.0f);
  ASSERT_TRUE(plan->Combine(parts, 1, absl::MakeSpan(out)).ok());
  EXPECT_THAT(out, ElementsAre(0.0f, 3.5f));
}

TEST(DispatchPlanTest, EmptyBatch) {
  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(Contiguous(4, 2), {}, {}, 0, 2);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->tokens(0), IsEmpty());
  std::vector<absl::Span<const float>> parts(2);
  std::vector<float> out;
  EXPECT_TRUE(plan->Combine(parts, 8, absl::MakeSpan(out)).ok());
}

TEST(DispatchPlanTest, NumTokensPerExpert) {
  const std::vector<int32_t> idx = {1, 0, 5, 4, 2, 5, 0, 3, -1, 2, 4, 1};
  absl::StatusOr<std::vector<int64_t>> counts = NumTokensPerExpert(idx, 8);
  ASSERT_TRUE(counts.ok()) << counts.status();
  EXPECT_THAT(*counts, ElementsAre(2, 2, 2, 1, 2, 2, 0, 0));
  counts = NumTokensPerExpert(idx, 5);
  EXPECT_EQ(counts.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(counts.status().message(), HasSubstr("topk_idx[2] = 5 >= n_routed_experts 5"));
}

// The masked per-node slots are what core's ExpertBackend takes: expert nodes
// that load only their expert_shard reproduce the single-process MoE output.
TEST(DispatchPlanTest, ShardedLocalExpertsMatchSingleProcess) {
  absl::StatusOr<std::shared_ptr<const ModelWeights>> all = ModelWeights::Load(testing::GoldenModelDir());
  ASSERT_TRUE(all.ok()) << all.status();
  const ModelConfig& c = (*all)->config;
  const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok, D = c.hidden_size, n = 19;
  const int64_t layer = c.first_k_dense_replace;
  const ExpertPlacement placement = Contiguous(E, 3);

  const RandomRouting r = MakeRandomRouting(n, k, E, 3);
  std::vector<float> x(n * D);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  std::vector<float> expected(n * D);
  LocalExperts single(**all);
  ASSERT_TRUE(single.RunRoutedExperts(layer, x.data(), n, k, r.topk_idx.data(), r.topk_weights.data(),
                                      expected.data()).ok());

  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(placement, r.topk_idx, r.topk_weights, n, k);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<std::vector<float>> partial(placement.num_nodes());
  std::vector<absl::Span<const float>> views;
  for (int32_t node = 0; node < placement.num_nodes(); ++node) {
    WeightSelection shard_only{/*non_expert=*/false, [&](int64_t, int64_t e) {
                                 return placement.NodeOf(static_cast<int32_t>(e)) == node;
                               }};
    absl::StatusOr<std::shared_ptr<const ModelWeights>> shard =
        ModelWeights::Load(testing::GoldenModelDir(), shard_only);
    ASSERT_TRUE(shard.ok()) << shard.status();
    LocalExperts experts(**shard);
    const int64_t rows = static_cast<int64_t>(plan->tokens(node).size());
    const std::vector<float> node_x = plan->GatherHidden(node, x, D);
    partial[node].resize(rows * D);
    ASSERT_TRUE(experts.RunRoutedExperts(layer, node_x.data(), rows, k, plan->topk_idx(node).data(),
                                         plan->topk_weights(node).data(), partial[node].data()).ok())
        << "node " << node;
    views.push_back(partial[node]);
  }
  std::vector<float> out(n * D);
  ASSERT_TRUE(plan->Combine(views, D, absl::MakeSpan(out)).ok());
  float max_abs = 0.0f;
  for (float v : expected) max_abs = std::max(max_abs, std::fabs(v));
  for (int64_t i = 0; i < n * D; ++i) ASSERT_NEAR(out[i], expected[i], 1e-5f * max_abs) << "value " << i;
}

}  // namespace
}  // namespace dmoe::router
