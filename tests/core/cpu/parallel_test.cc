// ParallelFor under stress: many short calls of changing sizes, from one and
// from several threads, nested calls; every index must be visited exactly
// once per call and every call must see only its own ranges. Also run under
// ThreadSanitizer (scripts/sanitize.sh tsan).
#include "core/cpu/parallel.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <thread>
#include <vector>

namespace dmoe::cpu {
namespace {

// More workers than this machine's cores, so that calls overlap workers that
// are still finishing the previous call (where the old pool's race was).
// NumThreads() reads it on first use, after this initializer.
// With 32 threads on two cores, the old pool (a shared task counter) hung or
// double-ran a task within a few thousand calls.
const bool kManyWorkers = [] { return setenv("DMOE_NUM_THREADS", "32", /*overwrite=*/0) == 0; }();

// Runs `body` on a thread and fails the whole test binary if it has not
// finished by the deadline: a deadlocked pool cannot be joined, and a test
// must end with a failure instead of hanging.
void WithinDeadline(const std::function<void()> &body) {
  std::promise<void> done;
  std::future<void> finished = done.get_future();
  std::thread runner([&] {
    body();
    done.set_value();
  });
  if (finished.wait_for(std::chrono::seconds(120)) != std::future_status::ready) {
    std::fprintf(stderr, "ParallelFor did not finish within 120 s: the pool is deadlocked\n");
    std::_Exit(1);
  }
  runner.join();
}

// Runs one ParallelFor over [0, n) with the given grain and checks that each
// index was covered exactly once, by ranges inside [0, n). Returns false
// (with a gtest failure) otherwise.
bool CheckedParallelFor(int64_t n, int64_t grain, int64_t call) {
  std::vector<std::atomic<int>> visits(static_cast<size_t>(n));
  for (auto &v : visits) v.store(0, std::memory_order_relaxed);
  std::atomic<int64_t> out_of_range{0};
  ParallelFor(n, grain, [&](int64_t begin, int64_t end) {
    if (begin < 0 || end > n || begin >= end) {
      out_of_range.fetch_add(1);
      return;
    }
    for (int64_t i = begin; i < end; ++i) visits[i].fetch_add(1, std::memory_order_relaxed);
  });
  bool ok = out_of_range.load() == 0;
  EXPECT_EQ(out_of_range.load(), 0) << "call " << call << " (n=" << n << ", grain=" << grain << ")";
  for (int64_t i = 0; i < n && ok; ++i) {
    const int v = visits[i].load();
    if (v != 1) {
      ADD_FAILURE() << "call " << call << " (n=" << n << ", grain=" << grain << "): index " << i << " visited " << v
                    << " times";
      ok = false;
    }
  }
  return ok;
}

// Sizes that change every call, so a task index of one call would be out of
// range (or a double visit) in the next one.
int64_t SizeOf(int64_t call) { return 1 + (call * 7919) % 97; }

TEST(ParallelForTest, ThreadCountIsPositive) {
  ASSERT_TRUE(kManyWorkers);
  EXPECT_GE(NumThreads(), 1);
}

TEST(ParallelForTest, EmptyAndNegativeRangesCallNothing) {
  int calls = 0;
  ParallelFor(0, 1, [&](int64_t, int64_t) { ++calls; });
  ParallelFor(-5, 1, [&](int64_t, int64_t) { ++calls; });
  EXPECT_EQ(calls, 0);
}

TEST(ParallelForTest, ManyShortCallsOfChangingSizes) {
  WithinDeadline([] {
    for (int64_t call = 0; call < 50000; ++call) {
      if (!CheckedParallelFor(SizeOf(call), 1 + call % 3, call)) return;
    }
  });
}

TEST(ParallelForTest, ResultsOfEveryCallAreExact) {
  // A reduction whose answer is known: sum of i*i over [0, n) per call.
  WithinDeadline([] {
    for (int64_t call = 0; call < 5000; ++call) {
      const int64_t n = 1 + (call * 31) % 513;
      std::vector<int64_t> partial(n, -1);
      ParallelFor(n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) partial[i] = i * i;
      });
      int64_t sum = 0;
      for (int64_t v : partial) sum += v;
      ASSERT_EQ(sum, (n - 1) * n * (2 * n - 1) / 6) << "call " << call << " n=" << n;
    }
  });
}

constexpr int kCallers = 4;
constexpr int kCallsEach = 3000;

TEST(ParallelForTest, ConcurrentCallersEachSeeTheirOwnRanges) {
  std::atomic<int> failures{0};
  WithinDeadline([&] {
    std::vector<std::thread> callers;
    for (int t = 0; t < kCallers; ++t) {
      callers.emplace_back([t, &failures] {
        for (int64_t call = 0; call < kCallsEach; ++call) {
          if (!CheckedParallelFor(SizeOf(call * kCallers + t), 1, call)) {
            failures.fetch_add(1);
            return;
          }
        }
      });
    }
    for (auto &c : callers) c.join();
  });
  EXPECT_EQ(failures.load(), 0);
}

TEST(ParallelForTest, NestedCallsRunInlineAndComplete) {
  for (int64_t call = 0; call < 500; ++call) {
    const int64_t outer = 1 + call % 17, inner = 1 + call % 23;
    std::vector<std::atomic<int>> visits(static_cast<size_t>(outer * inner));
    for (auto &v : visits) v.store(0);
    ParallelFor(outer, 1, [&](int64_t ob, int64_t oe) {
      for (int64_t o = ob; o < oe; ++o) {
        ParallelFor(inner, 1, [&](int64_t ib, int64_t ie) {
          for (int64_t i = ib; i < ie; ++i) visits[o * inner + i].fetch_add(1);
        });
      }
    });
    for (size_t i = 0; i < visits.size(); ++i) ASSERT_EQ(visits[i].load(), 1) << "call " << call << " cell " << i;
  }
}

}  // namespace
}  // namespace dmoe::cpu
