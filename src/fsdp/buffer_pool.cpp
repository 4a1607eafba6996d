// buffer_pool.cpp — see buffer_pool.h.
#include "fsdp/buffer_pool.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>
#include <unistd.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <list>
#include <map>
#include <unordered_map>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"

namespace verl {

namespace {

constexpr size_t kPerSize = 2;
constexpr size_t kMinBytes = size_t(1) << 20;  // smaller blocks stay with malloc, which reuses them

struct Pool {
  std::mutex mu;
  std::map<size_t, std::vector<c10::DataPtr>> free;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: buffers may be returned during static destruction
  return *p;
}

// install_host_block_cache: see buffer_pool.h.
class HostBlockCache final : public c10::Allocator {
 public:
  // fixed_cap: the idle bytes kept, or SIZE_MAX for the default (an eighth of the bytes in use
  // in blocks, at least 64 MiB).
  HostBlockCache(c10::Allocator* base, size_t fixed_cap) : base_(base), fixed_cap_(fixed_cap) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return base_->allocate(n);
    size_t bytes = class_bytes(n);
    void* p = take(bytes, &bytes);
    if (!p) p = map(bytes);
    if (!p) {
      release_all();
      p = map(bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p, "verlcpp: out of host memory allocating ", n, " bytes");
    {
      std::lock_guard<std::mutex> g(mu_);
      live_[p] = bytes;
      live_bytes_ += bytes;
    }
    return {p, p, &HostBlockCache::free_ptr, c10::Device(c10::kCPU)};
  }
  // raw_allocate / raw_deallocate (oneDNN's scratch space): the pointer is the context.
  c10::DeleterFnPtr raw_deleter() const override { return &HostBlockCache::free_ptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }
  static void free_ptr(void* p);

  // A block of ours goes back to the cache, the least recently freed blocks beyond the cap back
  // to the kernel; anything else came from the base allocator (raw_deallocate of a small buffer).
  void give(void* p) {
    std::vector<Idle> drop;
    bool ours = false;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto live = live_.find(p);
      if (live != live_.end()) {
        ours = true;
        const size_t bytes = live->second;
        live_.erase(live);
        live_bytes_ -= bytes;
        idle_.push_back({p, bytes});
        by_size_[bytes].push_back(std::prev(idle_.end()));
        idle_bytes_ += bytes;
        const size_t cap = fixed_cap_ != SIZE_MAX ? fixed_cap_ : std::max(kMinCap, live_bytes_ / 8);
        while (idle_bytes_ > cap) {
          const Idle old = idle_.front();
          auto& v = by_size_[old.bytes];
          v.erase(v.begin());  // its class's oldest entry is the list's front
          idle_.pop_front();
          idle_bytes_ -= old.bytes;
          drop.push_back(old);
        }
      }
    }
    if (!ours) {
      c10::DeleterFnPtr d = base_->raw_deleter();
      TORCH_CHECK(d, "verlcpp: a raw CPU buffer of the previous allocator has no raw deleter");
      d(p);
    }
    for (const Idle& d : drop) ::munmap(d.p, d.bytes);
  }

 private:
  struct Idle {
    void* p;
    size_t bytes;
  };
  static constexpr size_t kPage = 4096;
  static constexpr size_t kMinCap = size_t(64) << 20;

  // The smallest multiple of `step` holding n, `step` a power of two (>= a page) with
  // 8 * step <= n < 16 * step: at most 1/8 more than asked, and only in address space.
  static size_t class_bytes(size_t n) {
    size_t step = kPage;
    while ((step << 4) <= n) step <<= 1;
    return (n + step - 1) / step * step;
  }

  static void* map(size_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }

  void* take(size_t bytes, size_t* got) {
    std::lock_guard<std::mutex> g(mu_);
    // Its own class, else the next larger idle class up to a quarter bigger.
    for (auto it = by_size_.lower_bound(bytes); it != by_size_.end() && it->first <= bytes + bytes / 4; ++it) {
      if (it->second.empty()) continue;
      auto lit = it->second.back();  // the most recently freed of its class
      it->second.pop_back();
      void* p = lit->p;
      *got = lit->bytes;
      idle_.erase(lit);
      idle_bytes_ -= *got;
      return p;
    }
    return nullptr;
  }

  void release_all() {
    std::list<Idle> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      drop.swap(idle_);
      by_size_.clear();
      idle_bytes_ = 0;
    }
    for (const Idle& d : drop) ::munmap(d.p, d.bytes);
  }

  c10::Allocator* base_;
  const size_t fixed_cap_;
  std::mutex mu_;
  std::list<Idle> idle_;  // least recently freed first
  std::map<size_t, std::vector<std::list<Idle>::iterator>> by_size_;
  std::unordered_map<void*, size_t> live_;  // our blocks in use -> their bytes
  size_t idle_bytes_ = 0, live_bytes_ = 0;
};

std::atomic<HostBlockCache*> g_cache{nullptr};

void HostBlockCache::free_ptr(void* p) { g_cache.load()->give(p); }

std::atomic<bool> g_installed{false};

bool host_block_cache_installed() { return g_installed.load(); }

}  // namespace

void install_host_block_cache() {
  static std::once_flag once;
  std::call_once(once, [] {
    size_t cap = SIZE_MAX;
    const char* env = std::getenv("VERLCPP_HOST_CACHE_MIB");
    if (env && std::string(env) == "off") return;  // glibc's malloc, as without the engine
    if (const char* s = env) {
      char* end = nullptr;
      const long long v = std::strtoll(s, &end, 10);
      if (!end || end == s || *end || v < 0 || v > (1LL << 30))
        fail("VERLCPP_HOST_CACHE_MIB='", s, "': expected a whole number of MiB >= 0, or off");
      cap = static_cast<size_t>(v) << 20;
    }
    // Never destroyed: tensors freed during static destruction still come back to it.
    auto* c = new HostBlockCache(c10::GetCPUAllocator(), cap);
    g_cache.store(c);
    // A fork (a data-loader worker) must not copy the lock while another thread holds it.
    ::pthread_atfork([] { g_cache.load()->lock(); }, [] { g_cache.load()->unlock(); },
                     [] { g_cache.load()->unlock(); });
    c10::SetCPUAllocator(c, /*priority=*/1);
    // Not when an allocator of higher priority was set before (then the pool stays in use).
    g_installed.store(c10::GetCPUAllocator() == c);
  });
}

c10::DataPtr pool_take(size_t nbytes) {
  if (nbytes >= kMinBytes) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free.find(nbytes);
    if (it != p.free.end() && !it->second.empty()) {
      c10::DataPtr d = std::move(it->second.back());
      it->second.pop_back();
      return d;
    }
  }
  return c10::GetCPUAllocator()->allocate(nbytes);
}

void pool_give(c10::DataPtr d, size_t nbytes) {
  if (!d || nbytes < kMinBytes) return;
  if (host_block_cache_installed()) return;  // the cache keeps freed blocks by size class
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  auto& v = p.free[nbytes];
  if (v.size() < kPerSize) v.push_back(std::move(d));
}

at::Tensor pool_tensor(int64_t numel, at::ScalarType dtype, c10::Device device) {
  if (!device.is_cpu()) return at::empty({numel}, at::TensorOptions().dtype(dtype).device(device));
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  c10::Storage st(c10::Storage::use_byte_size_t(), nbytes, pool_take(nbytes), c10::GetCPUAllocator(), /*resizable=*/false);
  return at::empty({0}, at::TensorOptions().dtype(dtype)).set_(st, 0, {numel}, {1});
}

void pool_give_tensor(at::Tensor t) {
  if (!t.defined() || !t.device().is_cpu() || t.storage().use_count() != 1) return;
  c10::Storage st = t.storage();
  t.reset();
  if (st.use_count() != 1) return;
  const size_t nbytes = st.nbytes();
  pool_give(st.set_data_ptr(c10::GetCPUAllocator()->allocate(0)), nbytes);
  st.set_nbytes(0);
}

at::Tensor offload_copy(const at::Tensor& t, c10::Device device) {
  if (t.device() == device) return t;
  if (!device.is_cpu() || t.is_cpu()) return t.to(device);
  at::Tensor host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
  host.copy_(t);
  return host;
}

}  // namespace verl
