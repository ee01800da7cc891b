#include "core/cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#ifdef DMOE_PARALLEL_OPENMP
#include <omp.h>
#endif

namespace dmoe::cpu {
namespace {

thread_local bool in_parallel_region = false;

// Marks the calling thread as running pool tasks, so nested ParallelFor calls
// run inline instead of waiting on the pool they occupy.
class ParallelRegion {
 public:
  ParallelRegion() : outer_(in_parallel_region) { in_parallel_region = true; }
  ~ParallelRegion() { in_parallel_region = outer_; }

 private:
  const bool outer_;
};

#ifndef DMOE_PARALLEL_OPENMP
// One Run's state. It lives on the caller's stack and every counter a task
// index comes from is its own, so no worker can take a task of another run:
// a worker holds a `Job` only between joining it (under the pool's lock,
// while it is the current job) and leaving it, and Run returns only after
// every task has finished and every worker that joined has left.
struct Job {
  const std::function<void(int)>* task = nullptr;
  int num_tasks = 0;
  std::atomic<int> next{0};  // the next task index to hand out
  int finished = 0;          // tasks done (pool lock)
  int workers = 0;           // workers inside this job (pool lock)
};

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads) {
    for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // Runs task(i) for i in [0, num_tasks) across the pool and the caller.
  void Run(int num_tasks, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one job at a time
    Job job;
    job.task = &task;
    job.num_tasks = num_tasks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = &job;
      ++generation_;
    }
    wake_.notify_all();
    const int mine = Drain(job);
    std::unique_lock<std::mutex> lock(mu_);
    current_ = nullptr;  // no worker joins from here on
    job.finished += mine;
    done_.wait(lock, [&] { return job.finished == job.num_tasks && job.workers == 0; });
  }

 private:
  // Runs tasks of `job` until its indices are used up; returns how many.
  static int Drain(Job& job) {
    ParallelRegion region;
    int finished = 0;
    for (int i = job.next.fetch_add(1); i < job.num_tasks; i = job.next.fetch_add(1)) {
      (*job.task)(i);
      ++finished;
    }
    return finished;
  }

  void WorkerLoop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      Job* job = current_;
      if (job == nullptr) continue;  // that job is over already
      ++job->workers;
      lock.unlock();
      const int finished = Drain(*job);
      lock.lock();
      job->finished += finished;
      --job->workers;
      if (job->workers == 0 && job->finished == job->num_tasks) done_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  Job* current_ = nullptr;   // guarded by mu_
  uint64_t generation_ = 0;  // guarded by mu_
  bool stop_ = false;        // guarded by mu_
};

ThreadPool& Pool() {
  static ThreadPool* pool = new ThreadPool(NumThreads());
  return *pool;
}
#endif  // DMOE_PARALLEL_OPENMP

}  // namespace

int NumThreads() {
  static const int n = [] {
    if (const char* env = std::getenv("DMOE_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) return v;
    }
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int threads = NumThreads();
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, threads * 4);
  if (chunks <= 1 || threads == 1 || in_parallel_region) {
    fn(0, n);
    return;
  }
  const int64_t per = (n + chunks - 1) / chunks;
  chunks = (n + per - 1) / per;
  auto run_chunk = [&](int64_t c) {
    const int64_t begin = c * per;
    fn(begin, std::min(n, begin + per));
  };
#ifdef DMOE_PARALLEL_OPENMP
  // The measured alternative (bench: decode_bench built with
  // -DDMOE_PARALLEL=openmp); not the default, see docs/performance.md.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    ParallelRegion region;
    run_chunk(c);
  }
#else
  Pool().Run(static_cast<int>(chunks), [&](int c) { run_chunk(c); });
#endif
}

}  // namespace dmoe::cpu
