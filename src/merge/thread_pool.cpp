// thread_pool.cpp — see thread_pool.h.
#include "merge/thread_pool.h"

namespace verl {

ThreadPool::ThreadPool(size_t threads) {
  for (size_t i = 1; i < threads; ++i)
    workers_.emplace_back([this] {
      std::unique_lock<std::mutex> lk(mu_);
      uint64_t seen = 0;
      while (true) {
        cv_.wait(lk, [&] { return stop_ || (generation_ != seen && next_ < n_); });
        if (stop_) return;
        seen = generation_;
        work(lk);
      }
    });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::work(std::unique_lock<std::mutex>& lk) {
  while (next_ < n_) {
    size_t i = next_++;
    ++active_;
    const auto* fn = fn_;
    lk.unlock();
    try {
      (*fn)(i);
    } catch (...) {
      lk.lock();
      if (!error_) error_ = std::current_exception();
      next_ = n_;  // stop handing out work
      --active_;
      continue;
    }
    lk.lock();
    --active_;
  }
  if (active_ == 0) done_cv_.notify_all();
}

void ThreadPool::parallel_for(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (workers_.empty() || n == 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::unique_lock<std::mutex> lk(mu_);
  fn_ = &fn;
  next_ = 0;
  n_ = n;
  error_ = nullptr;
  ++generation_;
  cv_.notify_all();
  work(lk);
  done_cv_.wait(lk, [&] { return next_ >= n_ && active_ == 0; });
  fn_ = nullptr;
  n_ = 0;
  if (error_) std::rethrow_exception(error_);
}

}  // namespace verl
