// A small persistent thread pool for the CPU kernels, used where the process has no
// OpenMP runtime to share and in children after fork() (NOTE: [sharing torch's
// OpenMP team] in parallel.cpp). We never bring an OpenMP runtime of our own: its
// workers would spin against torch's. These workers sleep on a condition variable
// between steps; waking them costs microseconds, a step costs milliseconds.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fusedopt::cpu {

class ThreadPool {
 public:
  // The process-wide pool, recreated in a child after fork().
  static ThreadPool& instance();

  // Runs task(i) for every i in [0, num_tasks) on up to `num_threads` threads, the
  // caller included, and returns when all are done. A call that finds the pool busy
  // (another Python thread stepping) runs its tasks on the calling thread.
  void parallel_for(int64_t num_tasks, int num_threads, const std::function<void(int64_t)>& task);

  ~ThreadPool();

 private:
  ThreadPool() = default;
  void ensure_workers(int count);
  void worker_loop(int worker_index);
  void run_tasks();

  std::mutex busy_;  // held for the duration of one parallel_for
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable finished_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  int participating_workers_ = 0;
  int running_workers_ = 0;
  bool stopping_ = false;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
};

}  // namespace fusedopt::cpu
