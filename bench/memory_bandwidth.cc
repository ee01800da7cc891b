#include "bench/memory_bandwidth.h"

#include <immintrin.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "core/cpu/parallel.h"

namespace dmoe::bench {
namespace {

// A sum the compiler cannot drop; vectorized by -O3.
float SumRange(const float* p, int64_t n) {
  float acc[16] = {};
  for (int64_t i = 0; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) acc[k] += p[i + k];
  }
  float s = 0;
  for (float a : acc) s += a;
  return s;
}

}  // namespace

double MeasureReadBandwidth(int64_t bytes, double seconds) {
  static std::vector<float>* buffer = nullptr;
  const int64_t n = bytes / 4;
  if (buffer == nullptr || static_cast<int64_t>(buffer->size()) != n) {
    delete buffer;
    buffer = new std::vector<float>(n, 1.0f);  // touched once: resident
  }
  const float* p = buffer->data();
  volatile float sink = 0;
  int64_t passes = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    std::vector<float> partial(cpu::NumThreads() * 4, 0.f);
    cpu::ParallelFor(n, 1 << 16, [&](int64_t b, int64_t e) { sink = sink + SumRange(p + b, e - b); });
    ++passes;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  return static_cast<double>(passes) * static_cast<double>(n) * 4.0 / elapsed;
}

}  // namespace dmoe::bench
