// tensor_comm.cpp — see tensor_comm.h.
#include "fsdp/tensor_comm.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "core/error.h"
#include "model/torch_dtype.h"

namespace verl {

namespace {

void check_contiguous(const at::Tensor& t, const char* what) {
  if (!t.is_contiguous()) fail("internal: ", what, " of a collective is not contiguous");
}

// How a tensor reaches the comm: as it is (host tensor, or device tensor for a device comm),
// or through a host copy.
bool staged(const Comm& c, const at::Tensor& t) { return !t.is_cpu() && !c.device_buffers(); }

// Writes `src` into `dst`'s memory as a communicator would: through an alias with a version
// counter of its own, so neither dst nor the views autograd saved of its storage see an
// in-place change (FSDP refills a unit's gathered buffer under the views of an earlier forward;
// see fsdp/fsdp_model.cpp).
void raw_copy(const at::Tensor& dst, const at::Tensor& src) {
  at::NoGradGuard no_grad;
  at::Tensor alias = at::empty({0}, dst.options());
  alias.set_(dst.storage(), dst.storage_offset(), dst.sizes(), dst.strides());
  alias.copy_(src.reshape(dst.sizes()));
}

// Runs `op` over raw pointers of (send, recv), staging device tensors through the host when the
// comm takes host buffers only; `recv_in`: whether op reads recv too (in-place all-reduce).
template <class Op>
void run(Comm& c, const at::Tensor& send, const at::Tensor& recv, bool recv_in, Op op) {
  check_contiguous(send, "input");
  check_contiguous(recv, "output");
  if (!staged(c, recv) && !staged(c, send)) {
    sync_device(send);
    if (!recv.is_same(send)) sync_device(recv);
    op(send.data_ptr(), recv.data_ptr());
    return;
  }
  const at::Tensor hs = send.cpu();
  const at::Tensor hr = recv.is_same(send) ? hs : (recv_in ? recv.cpu() : at::empty(recv.sizes(), recv.options().device(at::kCPU)));
  op(hs.data_ptr(), hr.data_ptr());
  raw_copy(recv, hr);
}

}  // namespace

void sync_device(const at::Tensor& t) {
  if (!t.defined() || t.is_cpu()) return;
  const c10::Device d = t.device();
  c10::impl::VirtualGuardImpl impl(d.type());
  impl.getStream(d).synchronize();
}

void all_gather_into(Comm& c, const at::Tensor& send, const at::Tensor& recv) {
  if (recv.numel() != send.numel() * c.size()) fail("internal: all_gather of ", send.numel(), " into ", recv.numel());
  if (c.size() == 1) {
    if (!recv.is_same(send)) raw_copy(recv, send);
    return;
  }
  run(c, send, recv, false, [&](const void* s, void* r) {
    c.all_gather(s, r, static_cast<size_t>(send.numel()), to_dtype(send.scalar_type()));
  });
}

void reduce_scatter_into(Comm& c, const at::Tensor& send, const at::Tensor& recv, ReduceOp op) {
  if (send.numel() != recv.numel() * c.size()) fail("internal: reduce_scatter of ", send.numel(), " into ", recv.numel());
  if (c.size() == 1) {
    if (!recv.is_same(send)) raw_copy(recv, send);
    return;
  }
  run(c, send, recv, false, [&](const void* s, void* r) {
    c.reduce_scatter(s, r, static_cast<size_t>(recv.numel()), to_dtype(send.scalar_type()), op);
  });
}

void all_reduce_(Comm& c, const at::Tensor& t, ReduceOp op) {
  if (c.size() == 1) return;
  run(c, t, t, true, [&](const void*, void* r) {
    c.all_reduce(r, static_cast<size_t>(t.numel()), to_dtype(t.scalar_type()), op);
  });
}

void all_to_all_into(Comm& c, const at::Tensor& send, const at::Tensor& recv) {
  if (send.numel() != recv.numel() || send.numel() % c.size())
    fail("internal: all_to_all of ", send.numel(), " into ", recv.numel(), " over ", c.size(), " ranks");
  if (c.size() == 1) {
    if (!recv.is_same(send)) raw_copy(recv, send);
    return;
  }
  run(c, send, recv, false, [&](const void* s, void* r) {
    c.all_to_all(s, r, static_cast<size_t>(send.numel() / c.size()), to_dtype(send.scalar_type()));
  });
}

}  // namespace verl
