// expert_parallel.cpp — see expert_parallel.h.
#include "fsdp/expert_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "core/error.h"
#include "dist/comm.h"
#include "fsdp/tensor_comm.h"
#include "model/torch_dtype.h"

namespace verl {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor raw_all_to_all(Comm& c, const at::Tensor& x) {
  const int64_t P = c.size();
  if (x.dim() < 1 || x.size(0) % P) fail("internal: expert all-to-all of ", x.size(0), " rows over ", P, " ranks");
  const at::Tensor send = x.contiguous();
  at::Tensor recv = at::empty_like(send);
  all_to_all_into(c, send, recv);
  return recv;
}

// Equal blocks: the all-to-all is its own adjoint.
struct AllToAllFn : public torch::autograd::Function<AllToAllFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return raw_all_to_all(*reinterpret_cast<Comm*>(comm), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {raw_all_to_all(*reinterpret_cast<Comm*>(ctx->saved_data["comm"].toInt()), g[0]), at::Tensor()};
  }
};

}  // namespace

ExpertGroups make_expert_groups(Comm& world, int ep) {
  const int W = world.size(), r = world.rank();
  if (ep < 1 || W % ep) fail("expert_parallel_size = ", ep, ": must be >= 1 and divide the world size (", W, ")");
  ExpertGroups g;
  g.ep = world.split(r / ep, r);
  g.data = world.split(r % ep, r);
  return g;
}

int ExpertGroup::size() const { return comm_.size(); }
int ExpertGroup::rank() const { return comm_.rank(); }

at::Tensor ExpertGroup::all_to_all(const at::Tensor& send) const {
  if (at::isFloatingType(send.scalar_type())) return AllToAllFn::apply(send, reinterpret_cast<int64_t>(&comm_));
  return raw_all_to_all(comm_, send);
}

int64_t ExpertGroup::max(int64_t v) const {
  comm_.all_reduce(&v, 1, DType::I64, ReduceOp::Max);
  return v;
}

}  // namespace verl
