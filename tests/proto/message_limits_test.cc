// The control plane's message limits hold the largest messages a step of a
// given size can produce: every field at its widest encoding.
#include "proto/message_limits.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>

#include "dmoe/v1/control.pb.h"

namespace dmoe {
namespace {

constexpr int64_t kWidestInt64 = -1;  // 10 varint bytes
constexpr int32_t kWidestInt32 = -1;  // sign-extended: 10 bytes too
constexpr int kTopLogprobs = 20;

struct Shape {
  int64_t layers, experts, step_tokens, sequences;
};

v1::StepRequest WidestStep(const Shape& s) {
  v1::StepRequest r;
  r.set_step_id(kWidestInt64);
  // Tokens spread over the sequences, the rest on the first one.
  for (int64_t i = 0; i < s.sequences; ++i) {
    v1::StepSequence* q = r.add_sequences();
    q->set_sequence_id(kWidestInt64);
    const int64_t tokens = i == 0 ? s.step_tokens - (s.sequences - 1) : 1;
    for (int64_t t = 0; t < tokens; ++t) q->add_tokens(std::numeric_limits<int32_t>::max());  // ids are >= 0
    q->set_sample(true);
    q->set_temperature(1.5f);
    q->set_top_p(0.5f);
    q->set_top_k(kWidestInt32);
    q->set_min_p(0.5f);
    q->set_seed(std::numeric_limits<uint64_t>::max());
    q->set_sample_index(kWidestInt64);
    q->set_top_logprobs(kWidestInt32);
    r.add_free_sequences(kWidestInt64);
  }
  for (int64_t i = 0; i < s.layers * s.experts; ++i) r.add_serving_bias(1.5f);
  r.set_has_serving_bias(true);
  r.set_participating_attention_nodes(kWidestInt32);
  return r;
}

v1::StepResult WidestResult(const Shape& s) {
  v1::StepResult r;
  r.set_step_id(kWidestInt64);
  for (int64_t i = 0; i < s.sequences; ++i) {
    v1::SampledTokenResult* t = r.add_tokens();
    t->set_sequence_id(kWidestInt64);
    t->set_token_id(kWidestInt32);
    t->set_logprob(-1.5f);
    for (int k = 0; k < kTopLogprobs; ++k) {
      t->add_top_token_ids(kWidestInt32);
      t->add_top_logprobs(-1.5f);
    }
  }
  r.set_pages_free(kWidestInt64);
  r.mutable_times()->set_attention_seconds(1.5);
  r.mutable_times()->set_expert_wait_seconds(1.5);
  r.mutable_times()->set_other_seconds(1.5);
  r.set_routing_decisions(kWidestInt64);
  r.set_routing_decisions_changed(kWidestInt64);
  for (int64_t i = 0; i < s.layers * s.experts; ++i) r.add_expert_tokens(kWidestInt64);
  return r;
}

TEST(ControlMessageLimit, HoldsTheWidestStepOfItsSize) {
  for (const Shape& s : {Shape{4, 16, 512, 64}, Shape{4, 16, 512, 512}, Shape{61, 256, 512, 4096},
                         Shape{27, 64, 8192, 16384}, Shape{1, 1, 1, 1}}) {
    const int limit = ControlMessageLimit(s.layers, s.experts, s.step_tokens, s.sequences);
    EXPECT_LE(WidestStep(s).ByteSizeLong(), static_cast<size_t>(limit)) << s.step_tokens << " tokens";
    EXPECT_LE(WidestResult(s).ByteSizeLong(), static_cast<size_t>(limit)) << s.sequences << " sequences";
    // Bounded: within a small factor of what it must hold.
    EXPECT_LE(static_cast<size_t>(limit), 4 * std::max(WidestStep(s).ByteSizeLong(), WidestResult(s).ByteSizeLong()) +
                                              (size_t{256} << 10));
  }
}

TEST(ControlMessageLimit, HoldsTheCoordinatorsExpertLoadReport) {
  v1::ExpertLoadReport report;
  report.set_node_id(kWidestInt32);
  report.set_steps(kWidestInt64);
  for (int i = 0; i < 61 * 256; ++i) report.add_tokens(kWidestInt64);
  EXPECT_LE(report.ByteSizeLong(), static_cast<size_t>(ControlMessageLimit(61, 256, 0, 0)));
}

TEST(ControlMessageLimit, CapsAtGrpcsLimit) {
  EXPECT_EQ(ControlMessageLimit(1 << 24, 1 << 24, int64_t{1} << 40, int64_t{1} << 40),
            std::numeric_limits<int32_t>::max());
  EXPECT_GT(ControlMessageLimit(0, 0, 0, 0), 0);
}

}  // namespace
}  // namespace dmoe
