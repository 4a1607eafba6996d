// thread_comm.h — a Comm whose ranks are threads of one test process: every collective posts
// this rank's buffer, waits for all ranks, computes its part from the others' buffers and
// waits again before anyone may reuse them. Lets the engine tests run FsdpEngine at world
// size 2 (and split groups) in-process, next to the single-device reference.
#pragma once
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "dist/comm.h"
#include "core/error.h"

namespace verl::test {

struct ThreadGroup {
  explicit ThreadGroup(int n) : n(n), bufs(n), colors(n) {}
  int n;
  std::mutex m;
  std::condition_variable cv;
  int arrived = 0;
  int64_t gen = 0;
  std::vector<const void*> bufs;
  std::vector<std::pair<int, int>> colors;  // split: (color, key) per rank
  std::map<int, std::shared_ptr<ThreadGroup>> children;
  void barrier() {
    std::unique_lock<std::mutex> lk(m);
    const int64_t g = gen;
    if (++arrived == n) {
      arrived = 0;
      ++gen;
      cv.notify_all();
    } else {
      cv.wait(lk, [&] { return gen != g; });
    }
  }
};

class ThreadComm final : public Comm {
 public:
  ThreadComm(std::shared_ptr<ThreadGroup> g, int rank) : g_(std::move(g)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->n; }
  std::string name() const override { return "threads"; }

  void all_gather(const void* send, void* recv, size_t count, DType dt) override {
    exchange(send, [&] {
      const size_t b = count * dtype_size(dt);
      for (int r = 0; r < g_->n; ++r) std::memcpy(static_cast<char*>(recv) + r * b, g_->bufs[r], b);
    });
  }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dt, ReduceOp op) override {
    exchange(send, [&] { reduce(recv, count, dt, op, static_cast<size_t>(rank_) * count); });
  }
  void all_reduce(void* buf, size_t count, DType dt, ReduceOp op) override {
    std::vector<char> tmp(count * dtype_size(dt));
    exchange(buf, [&] { reduce(tmp.data(), count, dt, op, 0); });
    std::memcpy(buf, tmp.data(), tmp.size());
    g_->barrier();
  }
  void broadcast(void* buf, size_t count, DType dt, int root) override {
    exchange(buf, [&] {
      if (rank_ != root) std::memcpy(buf, g_->bufs[root], count * dtype_size(dt));
    });
  }
  void all_to_all(const void* send, void* recv, size_t count, DType dt) override {
    exchange(send, [&] {
      const size_t b = count * dtype_size(dt);
      for (int r = 0; r < g_->n; ++r)
        std::memcpy(static_cast<char*>(recv) + r * b, static_cast<const char*>(g_->bufs[r]) + rank_ * b, b);
    });
  }
  void barrier() override { g_->barrier(); }
  std::unique_ptr<Comm> split(int color, int key) override {
    g_->colors[rank_] = {color, key};
    g_->barrier();
    std::vector<std::pair<int, int>> members;  // (key, rank) of my color
    for (int r = 0; r < g_->n; ++r)
      if (g_->colors[r].first == color) members.push_back({g_->colors[r].second, r});
    std::sort(members.begin(), members.end());
    int me = 0;
    while (members[me].second != rank_) ++me;
    std::shared_ptr<ThreadGroup> child;
    {
      std::lock_guard<std::mutex> lk(g_->m);
      auto& c = g_->children[color];
      if (!c) c = std::make_shared<ThreadGroup>(static_cast<int>(members.size()));
      child = c;
    }
    g_->barrier();
    if (rank_ == 0) g_->children.clear();
    return std::make_unique<ThreadComm>(child, me);
  }

  // Runs fn(rank, comm) on `n` threads, one rank each; rethrows the first failure.
  static void run(int n, const std::function<void(Comm&)>& fn) {
    auto g = std::make_shared<ThreadGroup>(n);
    std::vector<std::thread> ts;
    std::vector<std::exception_ptr> errs(n);
    for (int r = 0; r < n; ++r)
      ts.emplace_back([&, r] {
        ThreadComm c(g, r);
        try {
          fn(c);
        } catch (...) {
          errs[r] = std::current_exception();
        }
      });
    for (auto& t : ts) t.join();
    for (auto& e : errs)
      if (e) std::rethrow_exception(e);
  }

 private:
  std::shared_ptr<ThreadGroup> g_;
  int rank_;

  template <class F>
  void exchange(const void* mine, F&& compute) {
    g_->bufs[rank_] = mine;
    g_->barrier();
    compute();
    g_->barrier();
  }
  template <class T>
  void reduce_as(void* out, size_t count, ReduceOp op, size_t off) {
    T* o = static_cast<T*>(out);
    for (size_t i = 0; i < count; ++i) {
      T acc = static_cast<const T*>(g_->bufs[0])[off + i];
      for (int r = 1; r < g_->n; ++r) {
        const T v = static_cast<const T*>(g_->bufs[r])[off + i];
        acc = op == ReduceOp::Max ? std::max(acc, v) : op == ReduceOp::Min ? std::min(acc, v) : acc + v;
      }
      if (op == ReduceOp::Avg) acc = acc / static_cast<T>(g_->n);
      o[i] = acc;
    }
  }
  void reduce(void* out, size_t count, DType dt, ReduceOp op, size_t off) {
    switch (dt) {
      case DType::F32: return reduce_as<float>(out, count, op, off);
      case DType::F64: return reduce_as<double>(out, count, op, off);
      case DType::I64: return reduce_as<int64_t>(out, count, op, off);
      default: fail("ThreadComm: no reduction for ", dtype_st_name(dt));
    }
  }
};

}  // namespace verl::test
