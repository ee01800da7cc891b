// A small fixed thread pool for the CPU backend.
#ifndef DMOE_CORE_CPU_PARALLEL_H_
#define DMOE_CORE_CPU_PARALLEL_H_

#include <cstdint>
#include <functional>

namespace dmoe::cpu {

// Number of worker threads the CPU backend uses: DMOE_NUM_THREADS if set,
// else std::thread::hardware_concurrency().
int NumThreads();

// Splits [0, n) into contiguous ranges of at least `grain` items and calls
// fn(begin, end) on them from the pool; the calling thread takes part.
// Returns when every range is done. Thread-safe: calls from several threads
// take the pool one at a time (each call's ranges are its own, whatever the
// interleaving); nested calls from inside fn run inline.
void ParallelFor(int64_t n, int64_t grain,
                 const std::function<void(int64_t, int64_t)>& fn);

}  // namespace dmoe::cpu

#endif  // DMOE_CORE_CPU_PARALLEL_H_
