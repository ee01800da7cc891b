#include "bench/memory_bandwidth.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "core/cpu/parallel.h"

namespace dmoe::bench {
namespace {

// Sums 64-bit words of [p, p + bytes) (bytes a multiple of 4 KiB) as 4
// interleaved sequential streams: one stream per thread does not keep enough
// misses in flight to reach the memory bandwidth on every machine; GEMM
// kernels read several weight rows at once too. The sum keeps the loads.
#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t ReadSumAvx2(const char* p, int64_t bytes) {
  const int64_t quarter = bytes / 4;
  const char* s0 = p;
  const char* s1 = p + quarter;
  const char* s2 = p + 2 * quarter;
  const char* s3 = p + 3 * quarter;
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i + 64 <= quarter; i += 64) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(s0 + i)));
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(s0 + i + 32)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(s1 + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(s1 + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(s2 + i)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(s2 + i + 32)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(s3 + i)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(s3 + i + 32)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  uint64_t out[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), s);
  return out[0] + out[1] + out[2] + out[3];
}
#endif

uint64_t ReadSum(const char* p, int64_t bytes) {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) return ReadSumAvx2(p, bytes);
#endif
  const int64_t quarter = bytes / 4;
  uint64_t s[4] = {};
  for (int64_t i = 0; i + 8 <= quarter; i += 8) {
    for (int q = 0; q < 4; ++q) {
      uint64_t v;
      std::memcpy(&v, p + q * quarter + i, 8);
      s[q] += v;
    }
  }
  return s[0] + s[1] + s[2] + s[3];
}

}  // namespace

uint64_t ReadPass(const char* p, int64_t bytes) {
  const int threads = cpu::NumThreads();
  const int64_t per = (bytes / threads + 4095) / 4096 * 4096;
  std::vector<uint64_t> sums(threads, 0);
  cpu::ParallelFor(threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t lo = std::min(bytes, t * per), hi = std::min(bytes, (t + 1) * per);
      if (hi > lo) sums[t] = ReadSum(p + lo, hi - lo);
    }
  });
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  return total;
}

double MeasureReadBandwidth(int64_t bytes, double seconds) {
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  static std::unique_ptr<char, Free> buffer;
  static int64_t buffer_bytes = 0;
  bytes = (bytes + 4095) / 4096 * 4096;
  if (buffer_bytes != bytes) {
    buffer.reset(static_cast<char*>(std::aligned_alloc(4096, bytes)));
    std::memset(buffer.get(), 1, bytes);  // touched once: resident
    buffer_bytes = bytes;
  }
  volatile uint64_t sink = 0;
  int64_t passes = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    sink = sink + ReadPass(buffer.get(), bytes);
    ++passes;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  return static_cast<double>(passes) * static_cast<double>(bytes) / elapsed;
}

}  // namespace dmoe::bench
