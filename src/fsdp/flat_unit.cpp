// flat_unit.cpp — sharding math and collectives of one FSDP unit (see flat_unit.h).
#include "fsdp/flat_unit.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>

#include "dist/comm.h"
#include "fsdp/buffer_pool.h"
#include "fsdp/tensor_comm.h"
#include "core/error.h"
#include "model/torch_dtype.h"

namespace verl {


FlatUnit::FlatUnit(std::string name, const std::vector<WeightSpec>& specs, Comm* shard, Comm* replicate,
                   at::ScalarType compute_dtype, c10::Device device)
    : name_(std::move(name)), comm_(shard), replicate_(replicate), dtype_(compute_dtype), device_(device) {
  params_ = flat_layout(specs, &numel_);
  const int64_t n = comm_->size();
  shard_ = (numel_ + n - 1) / n;
  padded_ = shard_ * n;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
  shard_t_ = at::zeros({shard_}, f32);
  grad_t_ = at::zeros({shard_}, f32);
  full_ = at::empty({padded_}, f32.dtype(dtype_));
  reshard();
}

const FlatParam* FlatUnit::find(const std::string& name) const {
  for (const auto& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

int64_t FlatUnit::shard_begin() const { return comm_->rank() * shard_; }

void FlatUnit::unshard() {
  if (unsharded_) return;
  c10::Storage st = full_.storage();
  const size_t nbytes = static_cast<size_t>(padded_) * full_.element_size();
  // Host buffers come from the pool; device ones from the device's (caching) allocator, which
  // allocates on the current device: this unit's, under the guard.
  const c10::DeviceGuard on(device_);
  st.set_data_ptr_noswap(device_.is_cpu() ? pool_take(nbytes) : st.allocator()->allocate(nbytes));
  st.set_nbytes(nbytes);
  if (dtype_ == at::kFloat) {
    all_gather_into(*comm_, shard_t_, full_);
  } else {
    at::Tensor local = pool_tensor(shard_, dtype_, device_);
    local.copy_(shard_t_);
    all_gather_into(*comm_, local, full_);
    pool_give_tensor(std::move(local));
  }
  unsharded_ = true;
}

void FlatUnit::reshard() {
  c10::Storage st = full_.storage();
  const size_t nbytes = st.nbytes();
  at::Allocator* alloc = st.allocator() ? st.allocator() : c10::GetCPUAllocator();
  c10::DataPtr old = st.set_data_ptr(alloc->allocate(0));
  if (device_.is_cpu()) pool_give(std::move(old), nbytes);  // a device buffer goes back to its allocator
  st.set_nbytes(0);
  unsharded_ = false;
}

void FlatUnit::to(c10::Device d) {
  if (d == device_) return;
  if (unsharded_) fail("fsdp unit ", name_, ": moved to ", d.str(), " while its parameters are gathered");
  shard_t_.set_data(offload_copy(shard_t_, d));
  grad_t_.set_data(offload_copy(grad_t_, d));
  full_ = at::empty({padded_}, at::TensorOptions().dtype(dtype_).device(d));
  device_ = d;
  reshard();
}

void FlatUnit::reduce_grad(const at::Tensor& full_grad) {
  if (!full_grad.defined()) return;
  at::Tensor g = full_grad.reshape({-1}).to(at::kFloat);
  if (g.numel() != padded_) {
    if (g.numel() != numel_) fail("fsdp unit ", name_, ": gradient of ", g.numel(), " elements, expected ", numel_);
    g = at::constant_pad_nd(g, {0, padded_ - numel_});
  }
  g = g.to(device_).contiguous();
  at::Tensor out = pool_tensor(shard_, at::kFloat, device_);
  reduce_scatter_into(*comm_, g, out, ReduceOp::Avg);
  if (replicate_) all_reduce_(*replicate_, out, ReduceOp::Avg);
  if (grad_scale_ != 1.0) out.mul_(grad_scale_);
  grad_t_.add_(out);
  pool_give_tensor(std::move(out));
}

void FlatUnit::zero_grad() { grad_t_.zero_(); }

bool FlatUnit::shard_part(const FlatParam& p, int64_t* first, at::Tensor* part) {
  const int64_t b = shard_begin(), e = b + shard_;
  const int64_t lo = std::max(b, p.offset), hi = std::min(e, p.offset + p.numel);
  if (lo >= hi) return false;
  *first = lo - p.offset;
  *part = shard_t_.narrow(0, lo - b, hi - lo);
  return true;
}

at::Tensor FlatUnit::gather(const at::Tensor& shard) const {
  if (shard.numel() != shard_ || shard.scalar_type() != at::kFloat)
    fail("fsdp unit ", name_, ": gather of a tensor that is not an fp32 shard of ", shard_, " elements");
  at::Tensor src = shard.contiguous();
  at::Tensor full = at::empty({padded_}, src.options());
  all_gather_into(*comm_, src, full);
  return full;
}

}  // namespace verl
