// flat_unit.cpp — sharding math and collectives of one FSDP unit (see flat_unit.h).
#include "fsdp/flat_unit.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>

#include "dist/comm.h"
#include "fsdp/buffer_pool.h"
#include "core/error.h"
#include "model/torch_dtype.h"

namespace verl {


FlatUnit::FlatUnit(std::string name, const std::vector<WeightSpec>& specs, Comm* shard, Comm* replicate,
                   at::ScalarType compute_dtype)
    : name_(std::move(name)), comm_(shard), replicate_(replicate), dtype_(compute_dtype) {
  params_ = flat_layout(specs, &numel_);
  const int64_t n = comm_->size();
  shard_ = (numel_ + n - 1) / n;
  padded_ = shard_ * n;
  shard_t_ = at::zeros({shard_}, at::kFloat);
  grad_t_ = at::zeros({shard_}, at::kFloat);
  full_ = at::empty({padded_}, at::TensorOptions().dtype(dtype_));
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
  st.set_data_ptr_noswap(pool_take(nbytes));
  st.set_nbytes(nbytes);
  if (dtype_ == at::kFloat) {
    comm_->all_gather(shard_t_.data_ptr(), full_.data_ptr(), static_cast<size_t>(shard_), DType::F32);
  } else {
    at::Tensor local = pool_tensor(shard_, dtype_);
    local.copy_(shard_t_);
    comm_->all_gather(local.data_ptr(), full_.data_ptr(), static_cast<size_t>(shard_), to_dtype(dtype_));
    pool_give_tensor(std::move(local));
  }
  unsharded_ = true;
}

void FlatUnit::reshard() {
  c10::Storage st = full_.storage();
  const size_t nbytes = st.nbytes();
  at::Allocator* alloc = st.allocator() ? st.allocator() : c10::GetCPUAllocator();
  pool_give(st.set_data_ptr(alloc->allocate(0)), nbytes);
  st.set_nbytes(0);
  unsharded_ = false;
}

void FlatUnit::reduce_grad(const at::Tensor& full_grad) {
  if (!full_grad.defined()) return;
  at::Tensor g = full_grad.reshape({-1}).to(at::kFloat);
  if (g.numel() != padded_) {
    if (g.numel() != numel_) fail("fsdp unit ", name_, ": gradient of ", g.numel(), " elements, expected ", numel_);
    g = at::constant_pad_nd(g, {0, padded_ - numel_});
  }
  g = g.contiguous();
  at::Tensor out = pool_tensor(shard_, at::kFloat);
  comm_->reduce_scatter(g.data_ptr(), out.data_ptr(), static_cast<size_t>(shard_), DType::F32, ReduceOp::Avg);
  if (replicate_ && replicate_->size() > 1)
    replicate_->all_reduce(out.data_ptr(), static_cast<size_t>(shard_), DType::F32, ReduceOp::Avg);
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
  at::Tensor full = at::empty({padded_}, at::kFloat);
  comm_->all_gather(src.data_ptr(), full.data_ptr(), static_cast<size_t>(shard_), DType::F32);
  return full;
}

}  // namespace verl
