// test_host_cache.cpp — install_host_block_cache (src/fsdp/buffer_pool.*), the CPU allocator the
// Python engine installs in verl's process: torch tensors of every size keep their values, a
// freed block is reused by the next request of its size class, oneDNN's raw buffers (bf16
// matmuls) go through it, the pool keeps nothing behind it, a forked child can allocate, a
// bad VERLCPP_HOST_CACHE_MIB is refused and `off` leaves torch's allocator. Each GoogleTest case runs in its own process (one CTest
// test per case), so installing the allocator here does not leak into other tests.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

#include "core/error.h"
#include "fsdp/buffer_pool.h"

namespace verl::test {
namespace {

// sum of 0 .. n-1 in double: n (n - 1) / 2.
double arange_sum(int64_t n) { return 0.5 * static_cast<double>(n) * static_cast<double>(n - 1); }

TEST(HostBlockCache, TensorsKeepTheirValuesAndBlocksAreReused) {
  c10::Allocator* before = c10::GetCPUAllocator();
  install_host_block_cache();
  ASSERT_NE(c10::GetCPUAllocator(), before);
  install_host_block_cache();  // a second call does nothing
  // Sizes below, at and above the 1 MiB threshold and across size classes; values checked in
  // double against the closed form while other blocks are alive and after they are freed.
  std::vector<at::Tensor> alive;
  for (int64_t n : {1000L, 262144L, 262145L, 3000000L, 5000001L, 40000000L}) {
    at::Tensor t = at::arange(n, at::TensorOptions().dtype(at::kDouble));
    alive.push_back(t);
    EXPECT_EQ(t.sum().item<double>(), arange_sum(n)) << n;
  }
  for (const at::Tensor& t : alive) EXPECT_EQ(t.sum().item<double>(), arange_sum(t.numel())) << t.numel();
  // A freed block comes back for the next request of its class (most recently freed first).
  at::Tensor a = at::empty({3 << 20}, at::kFloat);
  void* p = a.data_ptr();
  a.reset();
  at::Tensor b = at::empty({(3 << 20) - 1000}, at::kFloat);
  EXPECT_EQ(b.data_ptr(), p);
  b.fill_(2.5f);
  EXPECT_EQ(b.sum().item<double>(), 2.5 * b.numel());
}

TEST(HostBlockCache, RawBuffersAndBf16MatmulsGoThroughIt) {
  install_host_block_cache();
  c10::Allocator* a = c10::GetCPUAllocator();
  for (size_t n : {size_t(100), size_t(8) << 20}) {
    void* p = a->raw_allocate(n);
    ASSERT_NE(p, nullptr);
    std::memset(p, 7, n);
    a->raw_deallocate(p);
  }
  // bf16 matmuls (oneDNN asks raw_allocate for its scratch space) against an fp32 reference.
  at::manual_seed(0);
  at::Tensor x = at::randn({512, 1024}), w = at::randn({1024, 768});
  at::Tensor want = at::mm(x.to(at::kBFloat16).to(at::kFloat), w.to(at::kBFloat16).to(at::kFloat));
  at::Tensor got = at::mm(x.to(at::kBFloat16), w.to(at::kBFloat16)).to(at::kFloat);
  EXPECT_LT((got - want).abs().max().item<double>() / want.abs().max().item<double>(), 1e-2);
}

TEST(HostBlockCache, PoolKeepsNothingBehindIt) {
  install_host_block_cache();
  at::Tensor t = pool_tensor(4 << 20, at::kFloat);
  void* p = t.data_ptr();
  pool_give_tensor(std::move(t));  // the cache, not the pool, keeps the block now
  at::Tensor u = at::empty({4 << 20}, at::kFloat);
  EXPECT_EQ(u.data_ptr(), p);
}

TEST(HostBlockCache, ForkedChildAllocates) {
  install_host_block_cache();
  at::Tensor t = at::ones({2 << 20}, at::kFloat);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // no torch parallel regions here: OpenMP itself does not survive a fork
    at::Tensor c = at::empty({5 << 20}, at::kFloat);
    float* d = c.data_ptr<float>();
    for (int64_t i = 0; i < c.numel(); ++i) d[i] = 1.0f;
    double sum = 0;
    for (int64_t i = 0; i < c.numel(); ++i) sum += d[i];
    const float* e = t.data_ptr<float>();
    for (int64_t i = 0; i < t.numel(); ++i) sum += e[i];
    c.reset();
    ::_exit(sum == 7.0 * (1 << 20) ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(HostBlockCache, BadCapIsRefused) {
  c10::Allocator* before = c10::GetCPUAllocator();
  ::setenv("VERLCPP_HOST_CACHE_MIB", "lots", 1);
  try {
    install_host_block_cache();
    FAIL() << "VERLCPP_HOST_CACHE_MIB=lots was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("VERLCPP_HOST_CACHE_MIB='lots'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(c10::GetCPUAllocator(), before);  // nothing installed
  ::setenv("VERLCPP_HOST_CACHE_MIB", "0", 1);  // no caching: blocks mapped and unmapped
  install_host_block_cache();
  EXPECT_NE(c10::GetCPUAllocator(), before);
  at::Tensor t = at::arange(3000000, at::TensorOptions().dtype(at::kDouble));
  EXPECT_EQ(t.sum().item<double>(), arange_sum(3000000));
  ::unsetenv("VERLCPP_HOST_CACHE_MIB");
}

TEST(HostBlockCache, OffLeavesTorchsAllocator) {
  c10::Allocator* before = c10::GetCPUAllocator();
  ::setenv("VERLCPP_HOST_CACHE_MIB", "off", 1);
  install_host_block_cache();
  ::unsetenv("VERLCPP_HOST_CACHE_MIB");
  install_host_block_cache();  // decided once per process
  EXPECT_EQ(c10::GetCPUAllocator(), before);
}

}  // namespace
}  // namespace verl::test
