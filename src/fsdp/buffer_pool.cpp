// buffer_pool.cpp — see buffer_pool.h.
#include "fsdp/buffer_pool.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <map>
#include <mutex>
#include <vector>

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

}  // namespace

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
