// Wire format of dispatches and partial sums: exact bytes, round trips,
// and clean failures for every truncation, corrupted counts and bad values.
#include "router/dispatch_wire.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "router/data_plane_tags.h"
#include "router/dispatch_plan.h"
#include "router/expert_placement.h"

namespace dmoe::router {
namespace {

using ::testing::AnyOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

// Offsets of the header fields (dispatch_wire.h).
constexpr size_t kNumTokensOffset = 24;
constexpr size_t kHiddenSizeOffset = 32;
constexpr size_t kTopkOffset = 40;
constexpr size_t kDispatchPayloadOffset = 48;

void PutI64(std::vector<uint8_t>& bytes, size_t offset, int64_t v) {
  for (int i = 0; i < 8; ++i) bytes[offset + i] = static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i));
}

std::vector<uint32_t> Bits(const std::vector<float>& v) {
  std::vector<uint32_t> bits(v.size());
  std::memcpy(bits.data(), v.data(), v.size() * 4);
  return bits;
}

// 3 tokens, hidden 4, top_k 2; the hidden states include values whose bits
// must survive (NaN payload, -0, a denormal, infinity).
struct Sample {
  std::vector<float> hidden = {1.0f, -2.5f, 3.25f, 0.0f, -0.0f, std::numeric_limits<float>::denorm_min(),
                               std::numeric_limits<float>::infinity(), std::nanf("0x2a"), 1e-30f, 7.0f,
                               -8.0f, 9.5f};
  std::vector<int32_t> topk_idx = {3, -1, -1, 5, 4, 3};
  std::vector<float> topk_weights = {0.75f, 0.0f, 0.0f, 1.25f, 0.5f, 0.25f};

  std::vector<uint8_t> Encode() const {
    absl::StatusOr<std::vector<uint8_t>> bytes =
        EncodeDispatch(/*layer=*/7, /*step_id=*/0xfedcba9876543210ull, /*hidden_size=*/4, /*top_k=*/2, hidden,
                       topk_idx, topk_weights);
    EXPECT_TRUE(bytes.ok()) << bytes.status();
    return bytes.ok() ? *bytes : std::vector<uint8_t>{};
  }
};

TEST(DispatchWireTest, PartialSumsExactBytes) {
  absl::StatusOr<std::vector<uint8_t>> bytes = EncodePartialSums(3, 0x0102030405060708ull, 1, {1.0f});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_THAT(*bytes, ElementsAre('d', 'M', 'o', 'E', 1, 2, 0, 0,    // magic, version, kind, reserved
                                  3, 0, 0, 0, 0, 0, 0, 0,            // layer
                                  8, 7, 6, 5, 4, 3, 2, 1,            // step_id
                                  1, 0, 0, 0, 0, 0, 0, 0,            // num_tokens
                                  1, 0, 0, 0, 0, 0, 0, 0,            // hidden_size
                                  0x00, 0x00, 0x80, 0x3f));          // 1.0f
}

TEST(DispatchWireTest, DispatchRoundTripKeepsEveryBit) {
  const Sample s;
  const std::vector<uint8_t> bytes = s.Encode();
  EXPECT_EQ(bytes.size(), kDispatchPayloadOffset + 4 * (12 + 6 + 6));
  // Decoding must not depend on the buffer's alignment.
  std::vector<uint8_t> shifted = {0};
  shifted.insert(shifted.end(), bytes.begin(), bytes.end());
  absl::StatusOr<DispatchMessage> m = DecodeDispatch(absl::MakeConstSpan(shifted).subspan(1));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->layer, 7);
  EXPECT_EQ(m->step_id, 0xfedcba9876543210ull);
  EXPECT_EQ(m->num_tokens, 3);
  EXPECT_EQ(m->hidden_size, 4);
  EXPECT_EQ(m->top_k, 2);
  EXPECT_THAT(Bits(m->hidden), ElementsAreArray(Bits(s.hidden)));
  EXPECT_THAT(m->topk_idx, ElementsAreArray(s.topk_idx));
  EXPECT_THAT(Bits(m->topk_weights), ElementsAreArray(Bits(s.topk_weights)));
}

TEST(DispatchWireTest, PartialSumsRoundTrip) {
  const std::vector<float> sums = {0.5f, -1.5f, 2.0f, 4.0f, -0.0f, 6.0f};
  absl::StatusOr<std::vector<uint8_t>> bytes = EncodePartialSums(2, 99, 3, sums);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<PartialSumsMessage> m = DecodePartialSums(*bytes);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->layer, 2);
  EXPECT_EQ(m->step_id, 99u);
  EXPECT_EQ(m->num_tokens, 2);
  EXPECT_EQ(m->hidden_size, 3);
  EXPECT_THAT(Bits(m->partial_sums), ElementsAreArray(Bits(sums)));
}

TEST(DispatchWireTest, EmptyMessagesRoundTrip) {
  absl::StatusOr<std::vector<uint8_t>> bytes = EncodeDispatch(0, 0, 16, 4, {}, {}, {});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<DispatchMessage> m = DecodeDispatch(*bytes);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->num_tokens, 0);
  bytes = EncodePartialSums(0, 0, 16, {});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_TRUE(DecodePartialSums(*bytes).ok());
}

TEST(DispatchWireTest, EveryTruncationAndAnExtraByteFailCleanly) {
  const std::vector<uint8_t> dispatch = Sample().Encode();
  for (size_t len = 0; len < dispatch.size(); ++len) {
    absl::StatusOr<DispatchMessage> m = DecodeDispatch(absl::MakeConstSpan(dispatch.data(), len));
    ASSERT_EQ(m.status().code(), absl::StatusCode::kDataLoss) << "prefix " << len << ": " << m.status();
  }
  std::vector<uint8_t> longer = dispatch;
  longer.push_back(0);
  EXPECT_THAT(DecodeDispatch(longer).status().message(), HasSubstr("1 unexpected bytes after topk_weights"));

  absl::StatusOr<std::vector<uint8_t>> sums = EncodePartialSums(1, 2, 3, {1, 2, 3, 4, 5, 6});
  ASSERT_TRUE(sums.ok());
  for (size_t len = 0; len < sums->size(); ++len) {
    absl::StatusOr<PartialSumsMessage> m = DecodePartialSums(absl::MakeConstSpan(sums->data(), len));
    ASSERT_EQ(m.status().code(), absl::StatusCode::kDataLoss) << "prefix " << len << ": " << m.status();
  }
  sums->push_back(0);
  EXPECT_EQ(DecodePartialSums(*sums).status().code(), absl::StatusCode::kDataLoss);
}

TEST(DispatchWireTest, CorruptedCountsFailNamingTheField) {
  const std::vector<uint8_t> good = Sample().Encode();
  struct Case {
    size_t offset;
    int64_t value;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {kNumTokensOffset, 4, absl::StatusCode::kDataLoss, "topk_weights needs 4 x 2"},
      {kNumTokensOffset, 2, absl::StatusCode::kDataLoss, "unexpected bytes after topk_weights"},
      {kNumTokensOffset, std::numeric_limits<int64_t>::max(), absl::StatusCode::kDataLoss, "hidden needs"},
      {kNumTokensOffset, -1, absl::StatusCode::kInvalidArgument, "num_tokens -1 < 0"},
      {kHiddenSizeOffset, 0, absl::StatusCode::kInvalidArgument, "hidden_size 0 < 1"},
      {kHiddenSizeOffset, int64_t{1} << 61, absl::StatusCode::kDataLoss, "hidden needs 3 x 2305843009213693952"},
      {kHiddenSizeOffset, 5, absl::StatusCode::kDataLoss, "topk_weights needs 3 x 2"},
      {kTopkOffset, 0, absl::StatusCode::kInvalidArgument, "top_k 0 < 1"},
      {kTopkOffset, std::numeric_limits<int64_t>::max(), absl::StatusCode::kDataLoss, "topk_idx needs"},
      {8, -2, absl::StatusCode::kInvalidArgument, "layer -2 < 0"},
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> bad = good;
    PutI64(bad, c.offset, c.value);
    absl::StatusOr<DispatchMessage> m = DecodeDispatch(bad);
    EXPECT_EQ(m.status().code(), c.code) << c.message << ": " << m.status();
    EXPECT_THAT(m.status().message(), HasSubstr(c.message));
  }
}

TEST(DispatchWireTest, BadHeaderAndValuesAreInvalidArgument) {
  const std::vector<uint8_t> good = Sample().Encode();
  std::vector<uint8_t> bad = good;
  bad[0] = 'x';
  EXPECT_THAT(DecodeDispatch(bad).status().message(), HasSubstr("bad magic"));
  bad = good;
  bad[4] = 2;
  EXPECT_THAT(DecodeDispatch(bad).status().message(), HasSubstr("version 2 is not 1"));
  bad = good;
  bad[6] = 1;
  EXPECT_THAT(DecodeDispatch(bad).status().message(), HasSubstr("reserved 1 is not 0"));
  // A dispatch is not a reply, nor the other way round.
  EXPECT_THAT(DecodePartialSums(good).status().message(), HasSubstr("kind 1 is not 2"));
  absl::StatusOr<std::vector<uint8_t>> sums = EncodePartialSums(0, 0, 2, {1, 2});
  ASSERT_TRUE(sums.ok());
  EXPECT_EQ(DecodeDispatch(*sums).status().code(), absl::StatusCode::kInvalidArgument);
  // topk_idx[1] = -5: only -1 may mark a masked slot.
  bad = good;
  const int32_t minus_five = -5;
  std::memcpy(bad.data() + kDispatchPayloadOffset + 4 * 12 + 4, &minus_five, 4);
  absl::StatusOr<DispatchMessage> m = DecodeDispatch(bad);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(), HasSubstr("topk_idx[1] = -5 < -1"));
}

TEST(DispatchWireTest, RandomCorruptionNeverCrashes) {
  const std::vector<uint8_t> good = Sample().Encode();
  std::mt19937 rng(1);
  int failures = 0;
  for (int trial = 0; trial < 5000; ++trial) {
    std::vector<uint8_t> bad = good;
    const int flips = 1 + rng() % 4;
    for (int f = 0; f < flips; ++f) bad[rng() % bad.size()] ^= static_cast<uint8_t>(1 + rng() % 255);
    bad.resize(rng() % 4 == 0 ? rng() % (bad.size() + 1) : bad.size());
    absl::StatusOr<DispatchMessage> m = DecodeDispatch(bad);
    if (!m.ok()) {
      ++failures;
      EXPECT_THAT(m.status().code(), AnyOf(absl::StatusCode::kDataLoss, absl::StatusCode::kInvalidArgument));
      EXPECT_FALSE(m.status().message().empty());
    } else {
      EXPECT_EQ(m->hidden.size(), static_cast<size_t>(m->num_tokens * m->hidden_size));
      EXPECT_EQ(m->topk_idx.size(), static_cast<size_t>(m->num_tokens * m->top_k));
    }
  }
  EXPECT_GT(failures, 0);
}

TEST(DispatchWireTest, EncodeRejectsInconsistentSizes) {
  const Sample s;
  absl::StatusOr<std::vector<uint8_t>> bytes = EncodeDispatch(0, 0, 5, 2, s.hidden, s.topk_idx, s.topk_weights);
  EXPECT_THAT(bytes.status().message(), HasSubstr("hidden has 12 values, not a multiple of hidden_size 5"));
  bytes = EncodeDispatch(0, 0, 4, 3, s.hidden, s.topk_idx, s.topk_weights);
  EXPECT_THAT(bytes.status().message(), HasSubstr("expected num_tokens 3 * top_k 3"));
  bytes = EncodeDispatch(-1, 0, 4, 2, s.hidden, s.topk_idx, s.topk_weights);
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> bad_idx = s.topk_idx;
  bad_idx[2] = -3;
  bytes = EncodeDispatch(0, 0, 4, 2, s.hidden, bad_idx, s.topk_weights);
  EXPECT_THAT(bytes.status().message(), HasSubstr("topk_idx[2] = -3 < -1"));
  EXPECT_EQ(EncodePartialSums(0, 0, 4, {1, 2, 3}).status().code(), absl::StatusCode::kInvalidArgument);
}

// Attention node -> expert nodes -> attention node through the wire format
// gives the same combine as handing the partial sums over directly.
TEST(DispatchWireTest, PlanThroughTheWire) {
  absl::StatusOr<ExpertPlacement> placement = ExpertPlacement::Contiguous(8, 3);
  ASSERT_TRUE(placement.ok());
  const int64_t n = 5, k = 2, D = 3, layer = 4;
  const std::vector<int32_t> idx = {0, 7, 3, 4, 6, 5, 1, 2, 2, 6};
  const std::vector<float> w = {0.6f, 0.4f, 0.5f, 0.5f, 0.9f, 0.1f, 0.3f, 0.7f, 0.2f, 0.8f};
  std::vector<float> x(n * D);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.25f * static_cast<float>(i) - 1.0f;
  absl::StatusOr<DispatchPlan> plan = DispatchPlan::Build(*placement, idx, w, n, k);
  ASSERT_TRUE(plan.ok()) << plan.status();

  std::vector<std::vector<float>> replies(plan->num_nodes());
  for (int32_t node = 0; node < plan->num_nodes(); ++node) {
    absl::StatusOr<std::vector<uint8_t>> sent =
        EncodeDispatch(layer, 11, D, k, plan->GatherHidden(node, x, D), plan->topk_idx(node), plan->topk_weights(node));
    ASSERT_TRUE(sent.ok()) << sent.status();
    absl::StatusOr<DispatchMessage> got = DecodeDispatch(*sent);
    ASSERT_TRUE(got.ok()) << got.status();
    // The expert node: partial = sum over its slots of w * (x * (e + 1)).
    std::vector<float> partial(got->num_tokens * D, 0.0f);
    for (int64_t j = 0; j < got->num_tokens; ++j) {
      for (int64_t s = 0; s < k; ++s) {
        const int32_t e = got->topk_idx[j * k + s];
        if (e < 0) continue;
        EXPECT_EQ(placement->NodeOf(e), node);
        for (int64_t d = 0; d < D; ++d) {
          partial[j * D + d] += got->topk_weights[j * k + s] * got->hidden[j * D + d] * static_cast<float>(e + 1);
        }
      }
    }
    absl::StatusOr<std::vector<uint8_t>> reply = EncodePartialSums(got->layer, got->step_id, D, partial);
    ASSERT_TRUE(reply.ok()) << reply.status();
    absl::StatusOr<PartialSumsMessage> back = DecodePartialSums(*reply);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->layer, layer);
    EXPECT_EQ(back->step_id, 11u);
    replies[node] = back->partial_sums;
  }
  std::vector<absl::Span<const float>> views(replies.begin(), replies.end());
  std::vector<float> out(n * D);
  ASSERT_TRUE(plan->Combine(views, D, absl::MakeSpan(out)).ok());
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t d = 0; d < D; ++d) {
      double expected = 0;
      for (int64_t s = 0; s < k; ++s) expected += w[t * k + s] * x[t * D + d] * (idx[t * k + s] + 1);
      EXPECT_NEAR(out[t * D + d], expected, 1e-5) << "token " << t << " d " << d;
    }
  }
}

// The layer comes back out of every tag of the data plane (the NCCL nodes' per-layer times).
TEST(DataPlaneTagsTest, TagLayerReadsTheLayerOfDispatchesAndReplies) {
  for (int64_t layer : {0, 1, 26, 60, 16383}) {
    for (int micro_batch : {0, 1}) {
      const uint64_t tag = DispatchTag(0xfffffffful, layer, micro_batch);
      EXPECT_EQ(TagLayer(tag), layer);
      EXPECT_EQ(TagLayer(ReplyTag(tag)), layer);
      EXPECT_LE(ReplyTag(tag), kAllTagBits);
    }
  }
}

}  // namespace
}  // namespace dmoe::router
