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

void FlatUnit::reduce_grad(std::vector<at::Tensor>& grads, const std::vector<int64_t>& offsets) {
  if (grads.size() != offsets.size()) fail("fsdp unit ", name_, ": ", grads.size(), " gradients for ", offsets.size(), " slots");
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) continue;
    if (offsets[i] < 0 || offsets[i] + grads[i].numel() > numel_)
      fail("fsdp unit ", name_, ": a gradient of ", grads[i].numel(), " elements at ", offsets[i], " overruns ", numel_);
    grads[i] = grads[i].reshape({-1});  // a view (a copy only if not contiguous), read chunk by chunk
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
  // [begin, begin + len) of the flat (padded) gradient into dst (zero where no gradient).
  auto fill = [&](int64_t begin, int64_t len, at::Tensor dst) {
    dst.zero_();
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined()) continue;
      const int64_t off = offsets[i], lo = std::max(begin, off), hi = std::min(begin + len, off + grads[i].numel());
      if (lo < hi) dst.narrow(0, lo - begin, hi - lo).copy_(grads[i].narrow(0, lo - off, hi - lo));
    }
  };
  auto reduce = [&](const at::Tensor& in, at::Tensor out, int64_t at_) {
    reduce_scatter_into(*comm_, in, out, ReduceOp::Avg);
    if (replicate_) all_reduce_(*replicate_, out, ReduceOp::Avg);
    if (grad_scale_ != 1.0) out.mul_(grad_scale_);
    grad_t_.narrow(0, at_, out.numel()).add_(out);
  };
  if (!device_.is_cpu()) {  // one flat buffer: the device's caching allocator pools it
    at::Tensor flat = at::empty({padded_}, f32);
    fill(0, padded_, flat);
    grads.clear();
    reduce(flat, at::empty({shard_}, f32), 0);
    return;
  }
  const int64_t n = comm_->size(), chunk = std::min<int64_t>(shard_, int64_t(1) << 20);
  at::Tensor in = pool_tensor(n * chunk, at::kFloat), out = pool_tensor(chunk, at::kFloat);
  for (int64_t c = 0; c < shard_; c += chunk) {
    const int64_t len = std::min(chunk, shard_ - c);
    at::Tensor src = in.narrow(0, 0, n * len);
    for (int64_t r = 0; r < n; ++r) fill(r * shard_ + c, len, src.narrow(0, r * len, len));
    reduce(src, out.narrow(0, 0, len), c);
  }
  grads.clear();
  pool_give_tensor(std::move(in));
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
