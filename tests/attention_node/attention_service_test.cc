// The attention node's step service, driven directly with the proto
// messages (and once through its gRPC adapter on 127.0.0.1:0), over
// in-process expert workers holding shards of tests/golden/tiny-v3.
#include "attention_node/attention_service.h"
#include "core/node/cluster_join.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

#include "core/config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/attention_node/sharded_cluster.h"
#include "tests/core/model_test_util.h"
#include "tests/test_util.h"

namespace dmoe::attention {
namespace {

using ::dmoe::testing::GoldenModelDir;
using ::dmoe::testing::ShardedCluster;
using ::testing::HasSubstr;

constexpr int64_t kVocab = 512;
constexpr int64_t kLayers = 4;
constexpr int64_t kExperts = 16;

v1::StepSequence Seq(int64_t id, std::vector<int32_t> tokens, bool sample) {
  v1::StepSequence s;
  s.set_sequence_id(id);
  s.mutable_tokens()->Add(tokens.begin(), tokens.end());
  s.set_sample(sample);
  return s;
}

v1::StepSequence Sampled(int64_t id, std::vector<int32_t> tokens, float temperature, uint64_t seed,
                         int64_t sample_index) {
  v1::StepSequence s = Seq(id, std::move(tokens), true);
  s.set_temperature(temperature);
  s.set_seed(seed);
  s.set_sample_index(sample_index);
  return s;
}

v1::StepRequest Step(int64_t step_id, std::vector<v1::StepSequence> sequences) {
  v1::StepRequest r;
  r.set_step_id(step_id);
  for (auto& s : sequences) *r.add_sequences() = std::move(s);
  return r;
}

// The sampled token of `seq` in `result` (-1 if none).
int32_t TokenOf(const v1::StepResult& result, int64_t seq) {
  for (const auto& t : result.tokens()) {
    if (t.sequence_id() == seq) return t.token_id();
  }
  return -1;
}

class AttentionServiceTest : public ::testing::Test {
 protected:
  void Start(int expert_nodes, AttentionServiceOptions options = {32, 16, 0}) {
    cluster_ = std::make_unique<ShardedCluster>(expert_nodes);
    auto service = AttentionService::Create(cluster_->attention_weights(), cluster_->remote(), options);
    ASSERT_TRUE(service.ok()) << service.status();
    service_ = std::move(*service);
  }
  absl::StatusOr<v1::StepResult> Run(const v1::StepRequest& request) { return service_->RunStep(request); }

  // Greedy decode of `seq` from `first` for `count` tokens (one step each).
  std::vector<int32_t> Decode(int64_t seq, int32_t first, int count, int64_t* step_id) {
    std::vector<int32_t> out{first};
    while (static_cast<int>(out.size()) < count) {
      auto r = Run(Step(++*step_id, {Seq(seq, {out.back()}, true)}));
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) break;
      out.push_back(TokenOf(*r, seq));
    }
    return out;
  }

  std::unique_ptr<ShardedCluster> cluster_;  // outlives service_
  std::unique_ptr<AttentionService> service_;
};

TEST_F(AttentionServiceTest, ChunkedPrefillThenBatchedDecodeReproducesGolden) {
  const auto cases = testing::LoadGoldenCases(GoldenModelDir());
  for (const auto& [nodes, ping_pong] : {std::pair<int, int64_t>{1, 0}, {3, 1}}) {
    SCOPED_TRACE(::testing::Message() << nodes << " expert nodes, ping_pong_min_tokens " << ping_pong);
    Start(nodes, {32, 16, ping_pong});
    // Step 1: the first half of every prompt longer than one token (no sample).
    // Step 2: the rest of every prompt, sampled.
    std::vector<v1::StepSequence> first, second;
    for (size_t i = 0; i < cases.size(); ++i) {
      const auto& p = cases[i].prompt_ids;
      const size_t half = p.size() / 2;
      if (half > 0) first.push_back(Seq(i, {p.begin(), p.begin() + half}, false));
      second.push_back(Seq(i, {p.begin() + half, p.end()}, true));
    }
    auto r1 = Run(Step(1, first));
    ASSERT_TRUE(r1.ok()) << r1.status();
    EXPECT_EQ(r1->step_id(), 1);
    EXPECT_EQ(r1->tokens_size(), 0) << "no sequence asked for a sample";
    auto r2 = Run(Step(2, second));
    ASSERT_TRUE(r2.ok()) << r2.status();
    ASSERT_EQ(r2->tokens_size(), static_cast<int>(cases.size()));
    EXPECT_GT(r2->times().expert_wait_seconds(), 0.0);
    EXPECT_GE(r2->times().attention_seconds(), 0.0);
    std::vector<std::vector<int32_t>> generated(cases.size());
    for (size_t i = 0; i < cases.size(); ++i) generated[i].push_back(TokenOf(*r2, i));
    for (int64_t step = 3; generated[0].size() < cases[0].greedy_ids.size(); ++step) {
      std::vector<v1::StepSequence> decode;
      for (size_t i = 0; i < cases.size(); ++i) decode.push_back(Seq(i, {generated[i].back()}, true));
      auto r = Run(Step(step, decode));
      ASSERT_TRUE(r.ok()) << r.status();
      for (size_t i = 0; i < cases.size(); ++i) generated[i].push_back(TokenOf(*r, i));
      EXPECT_EQ(r->pages_free(), service_->GetCacheStatus().pages_free());
    }
    for (size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(generated[i], cases[i].greedy_ids) << "case " << i;
    const v1::CacheStatus status = service_->GetCacheStatus();
    EXPECT_THAT(status.sequence_ids(), ::testing::ElementsAre(0, 1, 2, 3));
    EXPECT_EQ(status.pages_total(), 32);
    EXPECT_EQ(status.page_size(), 16);
    service_.reset();
  }
}

TEST_F(AttentionServiceTest, SeededSamplingIsReproducibleAndResumesAtSampleIndex) {
  Start(2);
  const std::vector<int32_t> prompt = testing::LoadGoldenCases(GoldenModelDir())[1].prompt_ids;
  constexpr int kTokens = 8;
  constexpr float kTemperature = 1.5f;
  // Sequences 1 and 2 share the seed and run in the same steps; 3 has another seed.
  std::vector<int32_t> a, b, c;
  int64_t step = 0;
  for (int n = 0; n < kTokens; ++n) {
    auto tokens = [&](const std::vector<int32_t>& out) { return n == 0 ? prompt : std::vector<int32_t>{out.back()}; };
    v1::StepSequence s1 = Sampled(1, tokens(a), kTemperature, 42, n);
    v1::StepSequence s2 = Sampled(2, tokens(b), kTemperature, 42, n);
    v1::StepSequence s3 = Sampled(3, tokens(c), kTemperature, 43, n);
    s1.set_top_logprobs(3);
    auto r = Run(Step(++step, {s1, s2, s3}));
    ASSERT_TRUE(r.ok()) << r.status();
    a.push_back(TokenOf(*r, 1));
    b.push_back(TokenOf(*r, 2));
    c.push_back(TokenOf(*r, 3));
    const auto& t = r->tokens(0);
    ASSERT_EQ(t.top_token_ids_size(), 3);
    EXPECT_LE(t.logprob(), 0.0f);
    EXPECT_GE(t.top_logprobs(0), t.top_logprobs(2));
  }
  EXPECT_EQ(a, b) << "same seed, same tokens";
  EXPECT_NE(a, c) << "another seed, other tokens";

  // A preempted request recomputed: prompt plus its first 4 tokens in one
  // prefill, sampling resumes at sample_index 4 and draws the same tokens.
  std::vector<int32_t> recompute = prompt;
  recompute.insert(recompute.end(), a.begin(), a.begin() + 4);
  std::vector<int32_t> resumed;
  for (int n = 4; n < kTokens; ++n) {
    auto r =
        Run(Step(++step, {Sampled(4, n == 4 ? recompute : std::vector<int32_t>{resumed.back()}, kTemperature, 42, n)}));
    ASSERT_TRUE(r.ok()) << r.status();
    resumed.push_back(TokenOf(*r, 4));
  }
  EXPECT_EQ(resumed, std::vector<int32_t>(a.begin() + 4, a.end()));

  // The same for sequence 1 itself after it is freed and recomputed.
  v1::StepRequest again = Step(++step, {Sampled(1, recompute, kTemperature, 42, 4)});
  again.add_free_sequences(1);
  auto r = Run(again);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(TokenOf(*r, 1), a[4]);
}

TEST_F(AttentionServiceTest, FreeGivesPagesBack) {
  Start(1);
  const auto cases = testing::LoadGoldenCases(GoldenModelDir());
  auto r = Run(Step(1, {Seq(7, cases[3].prompt_ids, true), Seq(8, cases[2].prompt_ids, true)}));
  ASSERT_TRUE(r.ok()) << r.status();
  // 80 tokens: 5 pages of 16; 19 tokens: 2 pages.
  EXPECT_EQ(r->pages_free(), 32 - 5 - 2);
  EXPECT_THAT(service_->GetCacheStatus().sequence_ids(), ::testing::ElementsAre(7, 8));

  v1::FreeRequest free;
  free.add_sequence_ids(7);
  free.add_sequence_ids(12345);  // unknown: ignored
  const v1::CacheStatus after = service_->Free(free);
  EXPECT_EQ(after.pages_free(), 32 - 2);
  EXPECT_THAT(after.sequence_ids(), ::testing::ElementsAre(8));

  // free_sequences of a step are freed before it runs (even an empty one).
  v1::StepRequest only_free = Step(2, {});
  only_free.add_free_sequences(8);
  auto r2 = Run(only_free);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->pages_free(), 32);
  EXPECT_TRUE(service_->GetCacheStatus().sequence_ids().empty());

  // A freed id starts a new sequence from position 0.
  auto r3 = Run(Step(3, {Seq(7, cases[1].prompt_ids, true)}));
  ASSERT_TRUE(r3.ok()) << r3.status();
  EXPECT_EQ(TokenOf(*r3, 7), cases[1].greedy_ids[0]);
}

TEST_F(AttentionServiceTest, BadInputIsInvalidArgumentAndTheNodeKeepsServing) {
  Start(2);
  const auto cases = testing::LoadGoldenCases(GoldenModelDir());
  auto ok = Run(Step(1, {Seq(1, cases[1].prompt_ids, true)}));
  ASSERT_TRUE(ok.ok()) << ok.status();
  const int64_t pages_free = ok->pages_free();

  struct Bad {
    const char* name;
    v1::StepRequest request;
    const char* message;
  };
  std::vector<Bad> bad;
  bad.push_back({"token outside the vocabulary", Step(2, {Seq(1, {5}, true), Seq(2, {3, 99999}, true)}), "99999"});
  bad.push_back({"empty chunk", Step(3, {Seq(2, {}, true)}), "step 3: "});
  bad.push_back({"repeated sequence", Step(4, {Seq(2, {3}, false), Seq(2, {4}, false)}), "step 4: "});
  bad.push_back({"negative temperature", Step(5, {Sampled(2, {3}, -1.0f, 0, 0)}), "temperature"});
  bad.push_back({"sample_index past the context", Step(6, {Sampled(2, {3}, 1.0f, 0, 1 << 30)}), "sample_index"});
  v1::StepSequence top_k = Seq(2, {3}, true);
  top_k.set_top_k(-2);
  bad.push_back({"negative top_k", Step(7, {top_k}), "top_k"});
  v1::StepRequest bias = Step(8, {Seq(2, {3}, true)});
  bias.set_has_serving_bias(true);
  bias.add_serving_bias(1.0f);
  bad.push_back({"serving bias of the wrong size", bias, "serving_bias has 1 values"});
  for (const Bad& b : bad) {
    auto r = Run(b.request);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << b.name << ": " << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(b.message)) << b.name;
    const v1::CacheStatus status = service_->GetCacheStatus();
    EXPECT_EQ(status.pages_free(), pages_free) << b.name << " changed the cache";
    EXPECT_THAT(status.sequence_ids(), ::testing::ElementsAre(1)) << b.name;
  }
  // Sequence 1 continues as if nothing happened.
  int64_t step = 100;
  EXPECT_EQ(Decode(1, TokenOf(*ok, 1), 16, &step), cases[1].greedy_ids);
}

TEST_F(AttentionServiceTest, CacheFullIsResourceExhaustedAndChangesNothing) {
  Start(1, {4, 16, 0});
  const auto cases = testing::LoadGoldenCases(GoldenModelDir());
  auto ok = Run(Step(1, {Seq(1, cases[2].prompt_ids, true)}));  // 19 tokens: 2 pages
  ASSERT_TRUE(ok.ok()) << ok.status();
  auto full = Run(Step(2, {Seq(1, {ok->tokens(0).token_id()}, true), Seq(2, cases[3].prompt_ids, true)}));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  EXPECT_THAT(full.status().message(), HasSubstr("step 2: "));
  EXPECT_EQ(service_->GetCacheStatus().pages_free(), 2);
  EXPECT_THAT(service_->GetCacheStatus().sequence_ids(), ::testing::ElementsAre(1));
  int64_t step = 2;
  EXPECT_EQ(Decode(1, ok->tokens(0).token_id(), 16, &step), cases[2].greedy_ids);
}

TEST_F(AttentionServiceTest, ServingBiasSteersRoutingUntilCleared) {
  Start(2);
  const auto config = ModelConfig::Load(GoldenModelDir());
  ASSERT_TRUE(config.ok());
  const auto cases = testing::LoadGoldenCases(GoldenModelDir());
  constexpr int kFavoured = 5;  // on expert node 0 of 2
  v1::StepRequest biased = Step(1, {Seq(1, cases[2].prompt_ids, true)});
  biased.set_has_serving_bias(true);
  for (int64_t i = 0; i < kLayers * kExperts; ++i) biased.add_serving_bias(i % kExperts == kFavoured ? 100.0f : 0.0f);
  ASSERT_TRUE(Run(biased).ok());
  auto load = cluster_->worker(0).TakeLoad(nullptr);
  const int64_t tokens = static_cast<int64_t>(cases[2].prompt_ids.size());
  for (int64_t l = 0; l < kLayers; ++l) {
    EXPECT_EQ(load[l * kExperts + kFavoured], config->is_moe_layer(l) ? tokens : 0) << "layer " << l;
  }
  // The bias stays for later steps until a step clears it (empty bias).
  ASSERT_TRUE(Run(Step(2, {Seq(2, cases[1].prompt_ids, true)})).ok());
  load = cluster_->worker(0).TakeLoad(nullptr);
  EXPECT_EQ(load[1 * kExperts + kFavoured], static_cast<int64_t>(cases[1].prompt_ids.size()));
  v1::StepRequest cleared = Step(3, {Seq(3, cases[3].prompt_ids, true)});
  cleared.set_has_serving_bias(true);
  auto r = Run(cleared);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(TokenOf(*r, 3), cases[3].greedy_ids[0]) << "without bias the model's own routing";
  load = cluster_->worker(0).TakeLoad(nullptr);
  EXPECT_LT(load[1 * kExperts + kFavoured], static_cast<int64_t>(cases[3].prompt_ids.size()));
}

TEST(AttentionServiceFailure, SilentExpertNodeIsUnavailableAndPagesComeBack) {
  testing::SilentExpertNode silent(kExperts, 128, absl::Milliseconds(200));
  auto weights = ModelWeights::Load(GoldenModelDir(), WeightSelection::NonExpertOnly());
  ASSERT_TRUE(weights.ok());
  auto service = AttentionService::Create(*weights, silent.remote(), {4, 16, 0});
  ASSERT_TRUE(service.ok());
  auto r = (*service)->RunStep(Step(7, {Seq(1, {5, 6, 7}, true)}));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("step 7: transport node 1 did not answer layer 1"));
  EXPECT_EQ((*service)->GetCacheStatus().pages_free(), 4);
  EXPECT_TRUE((*service)->GetCacheStatus().sequence_ids().empty());
}

TEST_F(AttentionServiceTest, GrpcAdapterMapsStatusesAndWaitsForTheService) {
  Start(1);
  AttentionNodeGrpcService adapter;
  auto server = node::StartNodeServer("127.0.0.1", 0, {&adapter});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::AttentionNode::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port), grpc::InsecureChannelCredentials()));
  const auto cases = testing::LoadGoldenCases(GoldenModelDir());
  auto call = [&](const v1::StepRequest& request, v1::StepResult* result) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return stub->RunStep(&context, request, result);
  };
  v1::StepResult result;
  grpc::Status s = call(Step(1, {Seq(1, cases[0].prompt_ids, true)}), &result);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  adapter.SetService(service_.get());
  s = call(Step(2, {Seq(1, {kVocab}, true)}), &result);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("step 2: "));
  s = call(Step(3, {Seq(1, cases[0].prompt_ids, true)}), &result);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(TokenOf(result, 1), cases[0].greedy_ids[0]);

  grpc::ClientContext context;
  v1::FreeRequest free;
  free.add_sequence_ids(1);
  v1::CacheStatus status;
  ASSERT_TRUE(stub->Free(&context, free, &status).ok());
  EXPECT_EQ(status.pages_free(), 32);
  server->server->Shutdown();
  adapter.SetService(nullptr);
}

TEST(ExpertNodesFromCluster, MapsTransportIdsToExpertNodeIndices) {
  v1::GetClusterResponse cluster;
  for (int id : {0, 1, 3, 2}) {  // 2 attention nodes, expert nodes 2 and 3 (listed out of order)
    v1::ClusterNode* n = cluster.add_nodes();
    n->set_node_id(id);
    n->set_kind(id < 2 ? v1::NODE_KIND_ATTENTION : v1::NODE_KIND_EXPERT);
  }
  for (int e = 0; e < 4; ++e) cluster.add_expert_to_node(e % 2 == 0 ? 3 : 2);
  auto nodes = node::ExpertNodesFromCluster(cluster, 4);
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  EXPECT_THAT(nodes->node_ids, ::testing::ElementsAre(2, 3));
  EXPECT_THAT(nodes->placement.expert_to_node(), ::testing::ElementsAre(1, 0, 1, 0));

  cluster.set_expert_to_node(1, 1);  // an attention node
  EXPECT_EQ(node::ExpertNodesFromCluster(cluster, 4).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(node::ExpertNodesFromCluster(cluster, 5).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace dmoe::attention
