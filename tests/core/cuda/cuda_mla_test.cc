// The latent-cache write and the absorbed MLA attention kernel against a
// float64 reference over the same bf16 cache, for many context lengths
// (page and tile crossings), batch compositions, head counts, split counts
// and prefill-style causal queries. Without a GPU every test skips.
//
// Tolerance: the kernel feeds the softmax weights to the tensor cores as
// bf16 (relative rounding 2^-9 each), so ||out - ref|| / ||ref|| lands near
// 2e-3; the bound is 8e-3 (2x bf16's 2^-8 ulp). The LSE is float32 from exact
// bf16 products: within 2e-3 absolute. The float32 reference kernel: 1e-4.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/dtype.h"
#include "tests/core/cuda/cuda_test_util.h"

namespace dmoe::cuda {
namespace {

using testing::CudaTest;
using testing::Download;
using testing::Poisoned;
using testing::RelL2;
using testing::Upload;

constexpr int64_t kRank = 512, kRope = 64, kWidth = kRank + kRope, kPage = 64;

struct Query {
  int32_t seq;
  int32_t pos;
};

// One test world: sequences of the given lengths in a shuffled page pool,
// written through LatentCacheWrite, and queries over them.
class MlaWorld {
 public:
  MlaWorld(const std::vector<int64_t>& lengths, uint32_t seed) : rng_(seed), lengths_(lengths) {
    for (int64_t L : lengths) max_pages_ = std::max(max_pages_, (L + kPage - 1) / kPage);
    max_pages_ += 1;  // a spare column: block-table rows are longer than needed
    const int64_t num_seqs = lengths.size();
    shape_.num_pages = num_seqs * max_pages_ + 3;
    std::vector<int32_t> pages(shape_.num_pages);
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), rng_);
    block_tables_.assign(num_seqs * max_pages_, -1);
    size_t next = 0;
    for (int64_t s = 0; s < num_seqs; ++s)
      for (int64_t p = 0; p < (lengths[s] + kPage - 1) / kPage; ++p) block_tables_[s * max_pages_ + p] = pages[next++];
    // Every token's entry through the write kernel, from float32 rows [c | pad | k_pe].
    std::vector<int32_t> slots;
    std::vector<float> rows;
    const int64_t ld = kWidth + 16;
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    host_cache_.assign(shape_.layer_elements(), 0xFFFF);  // bf16 NaN: never-written rows
    for (int64_t s = 0; s < num_seqs; ++s) {
      for (int64_t pos = 0; pos < lengths[s]; ++pos) {
        const int32_t slot = block_tables_[s * max_pages_ + pos / kPage] * kPage + pos % kPage;
        slots.push_back(slot);
        const size_t base = rows.size();
        rows.resize(base + ld);
        for (int64_t i = 0; i < ld; ++i) rows[base + i] = u(rng_);
        for (int64_t i = 0; i < kRank; ++i) host_cache_[slot * kWidth + i] = FloatToBf16(rows[base + i]);
        for (int64_t i = 0; i < kRope; ++i)
          host_cache_[slot * kWidth + kRank + i] = FloatToBf16(rows[base + kRank + 16 + i]);
      }
    }
    cache_ = Poisoned<uint16_t>(shape_.layer_elements());
    DeviceBuffer drows = Upload(rows), dslots = Upload(slots);
    LatentCacheWriteParams w;
    w.shape = shape_;
    w.cache = cache_.as<uint16_t>();
    w.c = drows.as<float>();
    w.c_ld = ld;
    w.k_pe = drows.as<float>() + kRank + 16;
    w.k_pe_ld = ld;
    w.slot = dslots.as<int32_t>();
    w.n = slots.size();
    EXPECT_TRUE(LatentCacheWrite(w, nullptr).ok());
    EXPECT_TRUE(Download<uint16_t>(cache_, host_cache_.size()) == host_cache_) << "latent cache write";
    dtables_ = Upload(block_tables_);
  }

  const std::vector<int64_t>& lengths() const { return lengths_; }
  // false: the mma.sync kernel even where the wgmma kernel would run.
  bool allow_wgmma = true;

  // Runs the kernel (or the reference kernel) and compares with float64.
  void Check(const std::vector<Query>& queries, int64_t H, float scale, float q_scale, int num_splits,
             bool reference_kernel, const std::string& what, int head_block = 0, bool query_blocks = false) {
    const int64_t nq = queries.size();
    std::vector<uint16_t> q_lat(nq * H * kRank), q_pe(nq * H * kRope);
    std::uniform_real_distribution<float> u(-q_scale, q_scale);
    for (auto& v : q_lat) v = FloatToBf16(u(rng_));
    for (auto& v : q_pe) v = FloatToBf16(u(rng_));
    std::vector<int32_t> qseq(nq), qpos(nq);
    int64_t max_ctx = 0;
    for (int64_t i = 0; i < nq; ++i) {
      qseq[i] = queries[i].seq;
      qpos[i] = queries[i].pos;
      max_ctx = std::max<int64_t>(max_ctx, queries[i].pos + 1);
    }
    std::vector<double> ref(nq * H * kRank, 0.0), ref_lse(nq * H, -INFINITY);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t ctx = qpos[i] + 1;
      for (int64_t h = 0; h < H; ++h) {
        const uint16_t* ql = &q_lat[(i * H + h) * kRank];
        const uint16_t* qp = &q_pe[(i * H + h) * kRope];
        std::vector<double> s(ctx);
        double mx = -INFINITY;
        for (int64_t j = 0; j < ctx; ++j) {
          const uint16_t* e = Entry(qseq[i], j);
          double d = 0;
          for (int64_t t = 0; t < kRank; ++t) d += double{Bf16ToFloat(ql[t])} * Bf16ToFloat(e[t]);
          for (int64_t t = 0; t < kRope; ++t) d += double{Bf16ToFloat(qp[t])} * Bf16ToFloat(e[kRank + t]);
          s[j] = d * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < ctx; ++j) sum += (s[j] = std::exp(s[j] - mx));
        double* o = &ref[(i * H + h) * kRank];
        for (int64_t j = 0; j < ctx; ++j) {
          const uint16_t* e = Entry(qseq[i], j);
          for (int64_t t = 0; t < kRank; ++t) o[t] += s[j] / sum * Bf16ToFloat(e[t]);
        }
        if (ctx > 0) ref_lse[i * H + h] = mx + std::log(sum);
      }
    }
    DeviceBuffer dql = Upload(q_lat), dqp = Upload(q_pe), dqs = Upload(qseq), dqpos = Upload(qpos);
    DeviceBuffer out = Poisoned<float>(nq * H * kRank), lse = Poisoned<float>(nq * H);
    MlaAttentionParams p;
    p.shape = shape_;
    p.cache = cache_.as<uint16_t>();
    p.q_lat = dql.as<uint16_t>();
    p.q_pe = dqp.as<uint16_t>();
    p.num_queries = nq;
    p.num_heads = H;
    p.query_seq = dqs.as<int32_t>();
    p.query_pos = dqpos.as<int32_t>();
    p.block_tables = dtables_.as<int32_t>();
    p.max_pages_per_seq = max_pages_;
    p.max_context_len = max_ctx;
    p.scale = scale;
    p.out = out.as<float>();
    p.lse = lse.as<float>();
    p.num_splits = num_splits;
    p.head_block = head_block;
    p.allow_wgmma = allow_wgmma;
    // Prefill blocks: runs of one sequence's queries (MlaQueryBlocks).
    const std::vector<int32_t> blocks = query_blocks ? MlaQueryBlocks(qseq, H) : std::vector<int32_t>{};
    ASSERT_TRUE(!query_blocks || !blocks.empty()) << what;
    DeviceBuffer dblocks = Upload(blocks.empty() ? std::vector<int32_t>{0} : blocks);
    if (query_blocks) {
      p.query_blocks = dblocks.as<int32_t>();
      p.num_query_blocks = static_cast<int64_t>(blocks.size()) - 1;
    }
    const int splits =
        MlaAttentionNumSplits(query_blocks ? p.num_query_blocks : nq, H, max_ctx, num_splits, head_block);
    const size_t ws_bytes = MlaAttentionWorkspaceBytes(nq, H, kRank, splits);
    DeviceBuffer ws = Poisoned<char>(std::max<size_t>(ws_bytes, 16));
    p.workspace = ws.data();
    p.workspace_bytes = ws_bytes;
    ASSERT_TRUE((reference_kernel ? MlaAttentionReference(p, nullptr) : MlaAttention(p, nullptr)).ok()) << what;
    ASSERT_TRUE(StreamSynchronize(nullptr).ok()) << what;
    const auto got = Download<float>(out, nq * H * kRank);
    const auto got_lse = Download<float>(lse, nq * H);
    const bool wgmma = MlaAttentionUsesWgmma(p);
    if (!reference_kernel && allow_wgmma && H > 32 && head_block != 16) {
      EXPECT_EQ(wgmma, WgmmaAvailable()) << what << ": blocks of 64 heads take the wgmma kernel where it exists";
    }
    const std::string label = what + " splits=" + std::to_string(MlaAttentionSplits(p)) + " head_block=" + std::to_string(head_block) +
                              (query_blocks ? " query blocks" : "") + (reference_kernel ? " (reference kernel)" : "") +
                              (wgmma && !reference_kernel ? " (wgmma)" : "");
    EXPECT_LT(RelL2(got, ref), reference_kernel ? 1e-4 : 8e-3) << label;
    for (int64_t i = 0; i < nq * H; ++i) {
      if (std::isinf(ref_lse[i])) {
        ASSERT_TRUE(std::isinf(got_lse[i]) && got_lse[i] < 0) << label << " row " << i;
        for (int64_t t = 0; t < kRank; ++t) ASSERT_EQ(got[i * kRank + t], 0.f) << label << " row " << i;
      } else {
        ASSERT_NEAR(got_lse[i], ref_lse[i], 2e-3) << label << " row " << i;
      }
    }
  }

 private:
  const uint16_t* Entry(int32_t seq, int64_t pos) const {
    const int64_t page = block_tables_[seq * max_pages_ + pos / kPage];
    return &host_cache_[(page * kPage + pos % kPage) * kWidth];
  }

  std::mt19937 rng_;
  std::vector<int64_t> lengths_;
  LatentCacheShape shape_;
  int64_t max_pages_ = 0;
  std::vector<int32_t> block_tables_;
  std::vector<uint16_t> host_cache_;
  DeviceBuffer cache_, dtables_;
};

std::vector<Query> DecodeQueries(const std::vector<int64_t>& lengths) {
  std::vector<Query> q;
  for (size_t s = 0; s < lengths.size(); ++s)
    q.push_back({static_cast<int32_t>(s), static_cast<int32_t>(lengths[s] - 1)});
  return q;
}

class CudaMlaTest : public CudaTest {};

constexpr float kScaleV3 = 0.135234f;  // 192^-0.5 * m(40, 1)^2 (MODEL_SPEC.md 3.4)

// Blocks of 64 heads: the wgmma kernel (where the GPU has it) and the
// mma.sync kernel, each against float64.
TEST_F(CudaMlaTest, DecodeEveryLengthAcrossPagesAndTiles) {
  for (int64_t L : {1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 1000, 4097}) {
    MlaWorld world({L}, static_cast<uint32_t>(L));
    for (bool wgmma : {true, false}) {
      world.allow_wgmma = wgmma;
      const std::string what = "L=" + std::to_string(L);
      world.Check(DecodeQueries(world.lengths()), 128, kScaleV3, 1.0f, 0, false, what + " auto");
      world.Check(DecodeQueries(world.lengths()), 128, kScaleV3, 1.0f, 1, false, what);
    }
  }
}

TEST_F(CudaMlaTest, DecodeMixedBatchAndSplitCounts) {
  MlaWorld world({4097, 1, 65, 200, 64, 1000, 63, 2, 130}, 7);
  const auto q = DecodeQueries(world.lengths());
  for (bool wgmma : {true, false}) {
    world.allow_wgmma = wgmma;
    for (int splits : {0, 1, 3, 7, 40, 100}) world.Check(q, 128, kScaleV3, 1.0f, splits, false, "mixed");
    world.Check(q, 128, kScaleV3, 2.0f, 0, false, "mixed, peaked scores");
  }
  world.Check(q, 128, kScaleV3, 1.0f, 0, true, "mixed");
}

TEST_F(CudaMlaTest, HeadCountsNotAMultipleOfTheHeadBlock) {
  MlaWorld world({1, 65, 1000, 64}, 9);
  const auto q = DecodeQueries(world.lengths());
  for (bool wgmma : {true, false}) {
    world.allow_wgmma = wgmma;
    for (int64_t H : {16, 20, 64, 80}) {
      world.Check(q, H, 0.1f, 1.0f, 0, false, "H=" + std::to_string(H));
      world.Check(q, H, 0.1f, 1.0f, 2, false, "H=" + std::to_string(H));
    }
  }
}

// 16-head blocks (V2-Lite's H = 16 without padding to 64): the same checks.
TEST_F(CudaMlaTest, SixteenHeadBlocks) {
  for (int64_t L : {1, 33, 64, 65, 1000, 4097}) {
    MlaWorld world({L}, static_cast<uint32_t>(100 + L));
    world.Check(DecodeQueries(world.lengths()), 16, 0.1f, 1.0f, 0, false, "L=" + std::to_string(L), 16);
  }
  MlaWorld world({4097, 1, 65, 200, 64, 1000, 63, 2, 130}, 11);
  const auto q = DecodeQueries(world.lengths());
  for (int64_t H : {16, 20, 128})
    for (int splits : {0, 1, 5}) world.Check(q, H, kScaleV3, 1.0f, splits, false, "H=" + std::to_string(H), 16);
  MlaWorld prefill({300, 70}, 12);
  std::vector<Query> pq;
  for (int32_t pos = 0; pos < 300; pos += 5) pq.push_back({0, pos});
  pq.push_back({1, 69});
  pq.push_back({1, -1});
  prefill.Check(pq, 16, 0.1f, 1.0f, 0, false, "prefill", 16);
}

TEST_F(CudaMlaTest, PrefillCausalQueriesAndPadding) {
  MlaWorld world({300, 70}, 10);
  std::vector<Query> q;
  for (int32_t pos = 0; pos < 300; pos += 7) q.push_back({0, pos});
  q.push_back({0, 299});
  q.push_back({1, 69});
  q.push_back({1, -1});  // padding: output 0, LSE -inf
  q.push_back({1, 0});
  world.Check(q, 16, 0.1f, 1.0f, 0, false, "prefill H=16");
  world.Check(q, 128, kScaleV3, 1.0f, 4, false, "prefill H=128");
  world.allow_wgmma = false;
  world.Check(q, 128, kScaleV3, 1.0f, 4, false, "prefill H=128");
  world.allow_wgmma = true;
  world.Check(q, 16, 0.1f, 1.0f, 0, true, "prefill H=16");
}

// Prefill in blocks of several queries of one sequence (64 rows = queries x
// heads): causal per query inside a block, runs cut at sequence changes and
// at 64 / H queries, a padding query, page crossings, split-KV.
TEST_F(CudaMlaTest, PrefillQueryBlocksOfOneSequence) {
  MlaWorld world({300, 70, 129, 1}, 13);
  std::vector<Query> q;
  for (int32_t pos = 0; pos < 300; ++pos) q.push_back({0, pos});  // a whole prompt
  for (int32_t pos = 0; pos < 70; pos += 3) q.push_back({1, pos});
  q.push_back({1, -1});  // padding: output 0, LSE -inf
  for (int32_t pos = 100; pos < 129; ++pos) q.push_back({2, pos});  // a chunk after cached positions
  q.push_back({3, 0});
  EXPECT_EQ(MlaQueryBlocks({0, 0, 0, 0, 0, 1, 1, 2}, 16), (std::vector<int32_t>{0, 4, 5, 7, 8}));
  EXPECT_TRUE(MlaQueryBlocks({0, 0}, 64).empty());
  for (int64_t H : {16, 20, 32}) {
    for (int splits : {0, 1, 3}) {
      world.Check(q, H, 0.1f, 1.0f, splits, false, "H=" + std::to_string(H), 0, /*query_blocks=*/true);
    }
  }
  world.Check(q, 16, 0.1f, 2.0f, 0, false, "peaked scores", 0, /*query_blocks=*/true);
}

TEST_F(CudaMlaTest, RejectsUnsupportedShapes) {
  MlaAttentionParams p;
  p.shape.kv_lora_rank = 256;
  p.num_heads = 16;
  p.num_queries = 1;
  p.max_pages_per_seq = 1;
  EXPECT_EQ(MlaAttention(p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.shape.kv_lora_rank = 512;
  p.shape.page_size = 48;
  EXPECT_EQ(MlaAttention(p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.shape.page_size = 64;
  p.max_context_len = 65;  // more than one page
  EXPECT_EQ(MlaAttention(p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.max_context_len = 64;
  p.head_block = 32;
  EXPECT_EQ(MlaAttention(p, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dmoe::cuda
