// thread_pool.h — a fixed set of worker threads running parallel_for loops; the first
// exception thrown by any task is re-thrown on the caller's thread.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace verl {

class ThreadPool {
 public:
  explicit ThreadPool(size_t threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  size_t size() const { return workers_.size() + 1; }  // the caller helps
  // Runs fn(i) for i in [0, n), spread over the workers and the calling thread.
  void parallel_for(size_t n, const std::function<void(size_t)>& fn);

 private:
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t next_ = 0, n_ = 0, active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  void work(std::unique_lock<std::mutex>& lk);
};

}  // namespace verl
