#include "core/cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace dmoe::cpu {
namespace {

thread_local bool in_parallel_region = false;

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads) {
    for (int i = 1; i < num_threads; ++i) {
      workers_.emplace_back([this] { WorkerLoop(); });
    }
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs task(i) for i in [0, num_tasks) across the pool and the caller.
  void Run(int num_tasks, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &task;
      num_tasks_ = num_tasks;
      next_.store(0);
      pending_ = num_tasks;
      ++generation_;
    }
    wake_.notify_all();
    Drain();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void Drain() {
    in_parallel_region = true;
    int finished = 0;
    for (;;) {
      int i = next_.fetch_add(1);
      if (i >= num_tasks_) break;
      (*task_)(i);
      ++finished;
    }
    in_parallel_region = false;
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      pending_ -= finished;
      if (pending_ == 0) done_.notify_all();
    }
  }

  void WorkerLoop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (task_ == nullptr) continue;
      }
      Drain();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int num_tasks_ = 0;
  std::atomic<int> next_{0};
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

ThreadPool& Pool() {
  static ThreadPool* pool = new ThreadPool(NumThreads());
  return *pool;
}

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

void ParallelFor(int64_t n, int64_t grain,
                 const std::function<void(int64_t, int64_t)>& fn) {
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
  Pool().Run(static_cast<int>(chunks), [&](int c) {
    const int64_t begin = c * per;
    fn(begin, std::min(n, begin + per));
  });
}

}  // namespace dmoe::cpu
