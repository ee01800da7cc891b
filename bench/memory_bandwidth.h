// Measured memory read bandwidth of this machine, the denominator of every
// roofline in bench/ (the host is shared: measure it beside each result).
#ifndef DMOE_BENCH_MEMORY_BANDWIDTH_H_
#define DMOE_BENCH_MEMORY_BANDWIDTH_H_

#include <cstdint>

namespace dmoe::bench {

// One read of [p, p + bytes) (4 KiB aligned, bytes a multiple of 4 KiB),
// split across NumThreads() threads; returns a sum so the loads stay.
uint64_t ReadPass(const char* p, int64_t bytes);

// Bytes per second read by NumThreads() threads summing a buffer of
// `bytes` (far larger than the last-level cache) for about `seconds`.
double MeasureReadBandwidth(int64_t bytes = 512ll << 20, double seconds = 0.3);

}  // namespace dmoe::bench

#endif  // DMOE_BENCH_MEMORY_BANDWIDTH_H_
