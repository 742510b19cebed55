#include "thread_pool.h"

#include <unistd.h>

namespace fusedopt::cpu {

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose: worker threads must not be joined during static destruction.
  static ThreadPool* pool = nullptr;
  static pid_t owner = 0;
  static std::mutex creation;
  std::lock_guard<std::mutex> lock(creation);
  if (pool == nullptr || owner != getpid()) {
    // After fork() the parent's workers do not exist in the child: start afresh
    // (the parent's pool object is abandoned, its threads were never copied).
    pool = new ThreadPool();
    owner = getpid();
  }
  return *pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::ensure_workers(int count) {
  while (static_cast<int>(workers_.size()) < count) {
    const int index = static_cast<int>(workers_.size());
    workers_.emplace_back([this, index] { worker_loop(index); });
  }
}

void ThreadPool::run_tasks() {
  for (int64_t i = next_task_.fetch_add(1); i < num_tasks_; i = next_task_.fetch_add(1)) {
    (*task_)(i);
  }
}

void ThreadPool::worker_loop(int worker_index) {
  uint64_t seen_generation = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    wake_.wait(lock, [&] { return stopping_ || generation_ != seen_generation; });
    if (stopping_) return;
    seen_generation = generation_;
    if (worker_index >= participating_workers_) continue;
    lock.unlock();
    run_tasks();
    lock.lock();
    if (--running_workers_ == 0) finished_.notify_one();
  }
}

void ThreadPool::parallel_for(int64_t num_tasks, int num_threads,
                              const std::function<void(int64_t)>& task) {
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  const int64_t threads = num_threads < num_tasks ? num_threads : num_tasks;
  if (!busy.owns_lock() || threads <= 1) {
    for (int64_t i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  const int helpers = static_cast<int>(threads) - 1;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ensure_workers(helpers);
    task_ = &task;
    num_tasks_ = num_tasks;
    next_task_.store(0);
    participating_workers_ = helpers;
    running_workers_ = helpers;
    ++generation_;
  }
  wake_.notify_all();
  run_tasks();
  std::unique_lock<std::mutex> lock(mutex_);
  finished_.wait(lock, [&] { return running_workers_ == 0; });
  task_ = nullptr;
}

}  // namespace fusedopt::cpu
