#include "core/latent_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <vector>

namespace dmoe {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;

LatentCacheOptions SmallOptions(int64_t num_pages = 8, int64_t page_size = 4) {
  LatentCacheOptions options;
  options.num_layers = 3;
  options.kv_lora_rank = 5;
  options.qk_rope_head_dim = 2;
  options.page_size = page_size;
  options.num_pages = num_pages;
  return options;
}

std::unique_ptr<LatentCache> MakeCache(const LatentCacheOptions& options) {
  auto cache = LatentCache::Create(options);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? std::move(cache).value() : nullptr;
}

TEST(LatentCacheTest, CreateReportsGeometry) {
  auto cache = MakeCache(SmallOptions());
  ASSERT_NE(cache, nullptr);
  EXPECT_EQ(cache->entry_width(), 7);
  EXPECT_EQ(cache->pages_total(), 8);
  EXPECT_EQ(cache->pages_free(), 8);
  EXPECT_EQ(cache->options().page_size, 4);
  EXPECT_FALSE(cache->Contains(1));
  EXPECT_EQ(cache->SequenceLength(1), 0);
  EXPECT_THAT(cache->BlockTable(1), IsEmpty());
}

TEST(LatentCacheTest, CreateRejectsNonPositiveSizes) {
  struct Case {
    const char* field;
    int64_t LatentCacheOptions::*member;
  };
  const Case cases[] = {
      {"num_layers", &LatentCacheOptions::num_layers},
      {"kv_lora_rank", &LatentCacheOptions::kv_lora_rank},
      {"qk_rope_head_dim", &LatentCacheOptions::qk_rope_head_dim},
      {"page_size", &LatentCacheOptions::page_size},
      {"num_pages", &LatentCacheOptions::num_pages},
  };
  for (const Case& c : cases) {
    for (int64_t bad : {int64_t{0}, int64_t{-1}, int64_t{-64}}) {
      LatentCacheOptions options = SmallOptions();
      options.*c.member = bad;
      auto cache = LatentCache::Create(options);
      ASSERT_FALSE(cache.ok()) << c.field << "=" << bad;
      EXPECT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(std::string(cache.status().message()), HasSubstr(c.field));
    }
  }
}

TEST(LatentCacheTest, CreateRejectsOverflowingPool) {
  LatentCacheOptions options = SmallOptions();
  options.num_pages = int64_t{1} << 40;
  options.num_layers = int64_t{1} << 20;
  auto cache = LatentCache::Create(options);
  ASSERT_FALSE(cache.ok());
  EXPECT_EQ(cache.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LatentCacheTest, PagesNeededAtPageBoundaries) {
  auto cache = MakeCache(SmallOptions(/*num_pages=*/8, /*page_size=*/4));
  ASSERT_NE(cache, nullptr);
  // Unknown sequence.
  EXPECT_EQ(cache->PagesNeeded(1, 0), 0);
  EXPECT_EQ(cache->PagesNeeded(1, 1), 1);
  EXPECT_EQ(cache->PagesNeeded(1, 4), 1);
  EXPECT_EQ(cache->PagesNeeded(1, 5), 2);
  EXPECT_EQ(cache->PagesNeeded(1, 8), 2);
  EXPECT_EQ(cache->PagesNeeded(1, 9), 3);
  EXPECT_EQ(cache->PagesNeeded(1, -3), 0);

  // Exactly one full page held: the next token needs a new page.
  ASSERT_TRUE(cache->Extend(1, 4).ok());
  EXPECT_EQ(cache->BlockTable(1).size(), 1u);
  EXPECT_EQ(cache->PagesNeeded(1, 0), 0);
  EXPECT_EQ(cache->PagesNeeded(1, 1), 1);
  EXPECT_EQ(cache->PagesNeeded(1, 4), 1);
  EXPECT_EQ(cache->PagesNeeded(1, 5), 2);

  // page_size + 1 tokens: two pages, three slots left in the second.
  ASSERT_TRUE(cache->Extend(1, 1).ok());
  EXPECT_EQ(cache->SequenceLength(1), 5);
  EXPECT_EQ(cache->BlockTable(1).size(), 2u);
  EXPECT_EQ(cache->PagesNeeded(1, 3), 0);
  EXPECT_EQ(cache->PagesNeeded(1, 4), 1);
  EXPECT_EQ(cache->pages_free(), 6);

  // Huge requests saturate rather than overflow.
  EXPECT_GT(cache->PagesNeeded(1, INT64_MAX), cache->pages_total());
}

TEST(LatentCacheTest, ExtendZeroCreatesEmptySequence) {
  auto cache = MakeCache(SmallOptions());
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->Extend(7, 0).ok());
  EXPECT_TRUE(cache->Contains(7));
  EXPECT_EQ(cache->SequenceLength(7), 0);
  EXPECT_THAT(cache->BlockTable(7), IsEmpty());
  EXPECT_EQ(cache->pages_free(), 8);
}

TEST(LatentCacheTest, ExtendRejectsNegativeTokens) {
  auto cache = MakeCache(SmallOptions());
  ASSERT_NE(cache, nullptr);
  absl::Status status = cache->Extend(1, -1);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(cache->Contains(1));
}

TEST(LatentCacheTest, PagesFreeAccounting) {
  auto cache = MakeCache(SmallOptions(/*num_pages=*/8, /*page_size=*/4));
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->Extend(1, 3).ok());  // 1 page
  EXPECT_EQ(cache->pages_free(), 7);
  ASSERT_TRUE(cache->Extend(1, 1).ok());  // still 1 page (4 tokens)
  EXPECT_EQ(cache->pages_free(), 7);
  ASSERT_TRUE(cache->Extend(2, 9).ok());  // 3 pages
  EXPECT_EQ(cache->pages_free(), 4);
  ASSERT_TRUE(cache->Extend(1, 1).ok());  // 5 tokens: 2 pages
  EXPECT_EQ(cache->pages_free(), 3);
  cache->Free(2);
  EXPECT_EQ(cache->pages_free(), 6);
  cache->Free(1);
  EXPECT_EQ(cache->pages_free(), 8);
}

TEST(LatentCacheTest, ExtendFailsAtomicallyWhenShort) {
  auto cache = MakeCache(SmallOptions(/*num_pages=*/4, /*page_size=*/4));
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->Extend(1, 6).ok());  // 2 pages, 2 free
  const std::vector<int64_t> table_before = cache->BlockTable(1);

  // Needs 3 more pages (6 + 11 = 17 tokens = 5 pages), only 2 free.
  absl::Status status = cache->Extend(1, 11);
  ASSERT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(status.message()), HasSubstr("sequence 1"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("needs 3"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("only 2"));
  EXPECT_EQ(cache->pages_free(), 2);
  EXPECT_EQ(cache->SequenceLength(1), 6);
  EXPECT_EQ(cache->BlockTable(1), table_before);

  // A new sequence that does not fit is not created.
  status = cache->Extend(42, 100);
  ASSERT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(status.message()), HasSubstr("sequence 42"));
  EXPECT_FALSE(cache->Contains(42));
  EXPECT_EQ(cache->pages_free(), 2);

  // Requests that fit in what is free still succeed: 12 tokens = 3 pages.
  EXPECT_TRUE(cache->Extend(1, 6).ok());
  EXPECT_EQ(cache->pages_free(), 1);
  EXPECT_TRUE(cache->Extend(1, 4).ok());
  EXPECT_EQ(cache->pages_free(), 0);
  EXPECT_EQ(cache->SequenceLength(1), 16);
  EXPECT_EQ(cache->Extend(1, 1).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(cache->Extend(1, 0).ok());
}

TEST(LatentCacheTest, FreeReturnsPagesForReuse) {
  auto cache = MakeCache(SmallOptions(/*num_pages=*/4, /*page_size=*/4));
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->Extend(1, 16).ok());
  EXPECT_EQ(cache->pages_free(), 0);
  const std::vector<int64_t> pages = cache->BlockTable(1);
  EXPECT_EQ(std::set<int64_t>(pages.begin(), pages.end()), (std::set<int64_t>{0, 1, 2, 3}));
  EXPECT_FALSE(cache->Extend(2, 1).ok());

  cache->Free(1);
  EXPECT_FALSE(cache->Contains(1));
  EXPECT_EQ(cache->SequenceLength(1), 0);
  EXPECT_THAT(cache->BlockTable(1), IsEmpty());
  EXPECT_EQ(cache->pages_free(), 4);
  cache->Free(1);  // unknown: no-op
  EXPECT_EQ(cache->pages_free(), 4);

  ASSERT_TRUE(cache->Extend(2, 16).ok());
  const std::vector<int64_t>& reused = cache->BlockTable(2);
  EXPECT_EQ(std::set<int64_t>(reused.begin(), reused.end()), (std::set<int64_t>{0, 1, 2, 3}));
}

TEST(LatentCacheTest, AllocationIsDeterministic) {
  auto a = MakeCache(SmallOptions());
  auto b = MakeCache(SmallOptions());
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  for (LatentCache* cache : {a.get(), b.get()}) {
    ASSERT_TRUE(cache->Extend(1, 9).ok());
    ASSERT_TRUE(cache->Extend(2, 5).ok());
    cache->Free(1);
    ASSERT_TRUE(cache->Extend(3, 13).ok());
  }
  EXPECT_EQ(a->BlockTable(2), b->BlockTable(2));
  EXPECT_EQ(a->BlockTable(3), b->BlockTable(3));
}

TEST(LatentCacheTest, Truncate) {
  auto cache = MakeCache(SmallOptions(/*num_pages=*/8, /*page_size=*/4));
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->Extend(1, 10).ok());  // 3 pages
  const std::vector<int64_t> table = cache->BlockTable(1);
  EXPECT_EQ(cache->pages_free(), 5);

  cache->Truncate(1, 12);  // longer than the sequence: no-op
  EXPECT_EQ(cache->SequenceLength(1), 10);
  cache->Truncate(1, 9);  // still 3 pages
  EXPECT_EQ(cache->SequenceLength(1), 9);
  EXPECT_EQ(cache->pages_free(), 5);
  cache->Truncate(1, 8);  // exactly 2 pages
  EXPECT_EQ(cache->SequenceLength(1), 8);
  EXPECT_EQ(cache->pages_free(), 6);
  EXPECT_EQ(cache->BlockTable(1), std::vector<int64_t>(table.begin(), table.begin() + 2));
  cache->Truncate(1, 1);
  EXPECT_EQ(cache->pages_free(), 7);
  EXPECT_EQ(cache->BlockTable(1), std::vector<int64_t>(table.begin(), table.begin() + 1));
  cache->Truncate(1, 0);
  EXPECT_TRUE(cache->Contains(1));
  EXPECT_EQ(cache->SequenceLength(1), 0);
  EXPECT_THAT(cache->BlockTable(1), IsEmpty());
  EXPECT_EQ(cache->pages_free(), 8);
  cache->Truncate(99, 0);  // unknown: no-op
  EXPECT_FALSE(cache->Contains(99));

  // The sequence grows again from its truncated length.
  ASSERT_TRUE(cache->Extend(1, 5).ok());
  EXPECT_EQ(cache->SequenceLength(1), 5);
  EXPECT_EQ(cache->BlockTable(1).size(), 2u);
}

TEST(LatentCacheTest, TruncateKeepsSurvivingEntries) {
  auto cache = MakeCache(SmallOptions(/*num_pages=*/8, /*page_size=*/4));
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->Extend(1, 10).ok());
  for (int64_t pos = 0; pos < 10; ++pos) cache->Entry(1, 2, pos)[0] = static_cast<float>(pos);
  cache->Truncate(1, 6);
  for (int64_t pos = 0; pos < 6; ++pos) EXPECT_EQ(cache->Entry(1, 2, pos)[0], pos);
}

TEST(LatentCacheTest, UnwrittenEntriesAreNaN) {
  auto cache = MakeCache(SmallOptions());
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->Extend(1, 5).ok());
  for (int64_t layer = 0; layer < 3; ++layer) {
    for (int64_t pos = 0; pos < 5; ++pos) {
      const float* entry = std::as_const(*cache).Entry(1, layer, pos);
      for (int64_t i = 0; i < cache->entry_width(); ++i) EXPECT_TRUE(std::isnan(entry[i]));
    }
  }
}

// Writes a value unique to (sequence, layer, position, element) into every
// entry of several interleaved sequences, then reads all of them back.
TEST(LatentCacheTest, EntriesNeverAlias) {
  const LatentCacheOptions options = SmallOptions(/*num_pages=*/16, /*page_size=*/4);
  auto cache = MakeCache(options);
  ASSERT_NE(cache, nullptr);
  const int64_t width = cache->entry_width();
  auto value = [&](SequenceId seq, int64_t layer, int64_t pos, int64_t i) {
    return static_cast<float>(((seq * 8 + layer) * 64 + pos) * width + i);
  };
  // Interleave growth so the sequences' pages alternate in the pool.
  const std::vector<std::pair<SequenceId, int64_t>> steps = {{1, 3}, {2, 5}, {3, 1}, {1, 4}, {2, 2},
                                                             {3, 9}, {1, 6}, {2, 1}, {3, 3}};
  for (auto [seq, n] : steps) ASSERT_TRUE(cache->Extend(seq, n).ok());
  EXPECT_EQ(cache->SequenceLength(1), 13);
  EXPECT_EQ(cache->SequenceLength(2), 8);
  EXPECT_EQ(cache->SequenceLength(3), 13);

  std::set<int64_t> all_pages;
  for (SequenceId seq : {1, 2, 3}) {
    for (int64_t page : cache->BlockTable(seq)) {
      EXPECT_TRUE(all_pages.insert(page).second) << "page " << page << " shared";
      EXPECT_GE(page, 0);
      EXPECT_LT(page, options.num_pages);
    }
  }
  EXPECT_EQ(static_cast<int64_t>(all_pages.size()) + cache->pages_free(), options.num_pages);

  for (SequenceId seq : {1, 2, 3}) {
    for (int64_t layer = 0; layer < options.num_layers; ++layer) {
      for (int64_t pos = 0; pos < cache->SequenceLength(seq); ++pos) {
        float* entry = cache->Entry(seq, layer, pos);
        for (int64_t i = 0; i < width; ++i) entry[i] = value(seq, layer, pos, i);
      }
    }
  }
  for (SequenceId seq : {1, 2, 3}) {
    for (int64_t layer = 0; layer < options.num_layers; ++layer) {
      for (int64_t pos = 0; pos < cache->SequenceLength(seq); ++pos) {
        const float* entry = std::as_const(*cache).Entry(seq, layer, pos);
        EXPECT_EQ(entry, cache->Entry(seq, layer, pos));
        for (int64_t i = 0; i < width; ++i) {
          ASSERT_EQ(entry[i], value(seq, layer, pos, i))
              << "seq " << seq << " layer " << layer << " pos " << pos << " i " << i;
        }
      }
    }
  }
}

TEST(LatentCacheDeathTest, EntryOutOfRangeAborts) {
  auto cache = MakeCache(SmallOptions());
  ASSERT_NE(cache, nullptr);
  ASSERT_TRUE(cache->Extend(1, 5).ok());
  EXPECT_DEATH(cache->Entry(1, 0, 5), "position 5");
  EXPECT_DEATH(cache->Entry(1, 0, -1), "position -1");
  EXPECT_DEATH(cache->Entry(1, 3, 0), "layer 3");
  EXPECT_DEATH(cache->Entry(2, 0, 0), "unknown sequence 2");
  EXPECT_DEATH(cache->Truncate(1, -1), "negative length");
}

// Random Extend/Free/Truncate over several sequences against a trivial
// model (a map from sequence to length), in the spirit of LevelDB's ModelDB.
TEST(LatentCacheTest, RandomOpsMatchModel) {
  constexpr int64_t kPages = 24;
  constexpr int64_t kPageSize = 5;
  const LatentCacheOptions options = SmallOptions(kPages, kPageSize);
  auto cache = MakeCache(options);
  ASSERT_NE(cache, nullptr);
  std::map<SequenceId, int64_t> model;  // sequence -> length
  auto model_pages = [&](int64_t length) { return (length + kPageSize - 1) / kPageSize; };
  auto model_used = [&] {
    int64_t used = 0;
    for (auto [seq, length] : model) used += model_pages(length);
    return used;
  };

  std::mt19937_64 rng(20240531);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  int64_t extends_failed = 0;
  for (int step = 0; step < 5000; ++step) {
    const SequenceId seq = uniform(0, 7);
    const int64_t op = uniform(0, 9);
    const int64_t length = model.count(seq) ? model[seq] : 0;
    if (op < 6) {
      const int64_t n = uniform(0, 3 * kPageSize);
      const int64_t need = model_pages(length + n) - model_pages(length);
      EXPECT_EQ(cache->PagesNeeded(seq, n), need);
      const bool fits = need <= kPages - model_used();
      absl::Status status = cache->Extend(seq, n);
      ASSERT_EQ(status.ok(), fits) << "step " << step << ": " << status;
      if (fits) {
        model[seq] = length + n;
      } else {
        ASSERT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
        ++extends_failed;
      }
    } else if (op < 8) {
      const int64_t to = uniform(0, length + 2);
      cache->Truncate(seq, to);
      if (model.count(seq) && to < length) model[seq] = to;
    } else {
      cache->Free(seq);
      model.erase(seq);
    }

    ASSERT_EQ(cache->pages_free(), kPages - model_used()) << "step " << step;
    std::set<int64_t> pages;
    for (SequenceId s = 0; s < 8; ++s) {
      ASSERT_EQ(cache->Contains(s), model.count(s) == 1) << "step " << step;
      const int64_t expected = model.count(s) ? model[s] : 0;
      ASSERT_EQ(cache->SequenceLength(s), expected) << "step " << step;
      ASSERT_EQ(static_cast<int64_t>(cache->BlockTable(s).size()), model_pages(expected));
      for (int64_t page : cache->BlockTable(s)) ASSERT_TRUE(pages.insert(page).second);
    }
  }
  // The op mix must exercise both outcomes of Extend.
  EXPECT_GT(extends_failed, 0);
}

// Entry values survive arbitrary interleavings of other sequences' ops.
TEST(LatentCacheTest, RandomOpsPreserveContents) {
  constexpr int64_t kPageSize = 3;
  const LatentCacheOptions options = SmallOptions(/*num_pages=*/20, kPageSize);
  auto cache = MakeCache(options);
  ASSERT_NE(cache, nullptr);
  // Expected first element of each (sequence, layer, position) entry.
  std::map<SequenceId, std::vector<std::vector<float>>> model;
  std::mt19937_64 rng(7);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  float next_value = 1.0f;
  for (int step = 0; step < 2000; ++step) {
    const SequenceId seq = uniform(0, 4);
    const int64_t op = uniform(0, 9);
    if (op < 6) {
      const int64_t n = uniform(1, 4);
      if (!cache->Extend(seq, n).ok()) continue;
      auto& layers = model[seq];
      layers.resize(static_cast<size_t>(options.num_layers));
      for (int64_t layer = 0; layer < options.num_layers; ++layer) {
        for (int64_t k = 0; k < n; ++k) {
          const int64_t pos = static_cast<int64_t>(layers[layer].size());
          cache->Entry(seq, layer, pos)[0] = next_value;
          cache->Entry(seq, layer, pos)[cache->entry_width() - 1] = -next_value;
          layers[layer].push_back(next_value);
          next_value += 1.0f;
        }
      }
    } else if (op < 8) {
      if (!model.count(seq)) continue;
      const int64_t to = uniform(0, cache->SequenceLength(seq));
      cache->Truncate(seq, to);
      for (auto& values : model[seq]) values.resize(static_cast<size_t>(to));
    } else {
      cache->Free(seq);
      model.erase(seq);
    }
    for (const auto& [s, layers] : model) {
      for (int64_t layer = 0; layer < options.num_layers; ++layer) {
        for (size_t pos = 0; pos < layers[layer].size(); ++pos) {
          const float* entry = cache->Entry(s, layer, static_cast<int64_t>(pos));
          ASSERT_EQ(entry[0], layers[layer][pos]) << "step " << step;
          ASSERT_EQ(entry[cache->entry_width() - 1], -layers[layer][pos]) << "step " << step;
        }
      }
    }
  }
}

}  // namespace
}  // namespace dmoe
