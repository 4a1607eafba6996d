// ulysses.cpp — see ulysses.h. The all-to-all moves tensors through fsdp/tensor_comm.h
// (block j of the send buffer goes to rank j): the layouts below put each destination's block
// contiguous, as verl's all_to_all_tensor does with tensor_split + cat.
#include "fsdp/ulysses.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

#include "core/error.h"
#include "dist/comm.h"
#include "fsdp/tensor_comm.h"
#include "model/torch_dtype.h"

namespace verl {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Comm& comm_of(AutogradContext* ctx) { return *reinterpret_cast<Comm*>(ctx->saved_data["comm"].toInt()); }

void check_3d(const at::Tensor& x, const char* what) {
  if (x.dim() != 3) fail("ulysses ", what, ": expected a [seq, heads, head_dim] tensor, got ", x.dim(), " dims");
}

// [s/sp, h, d] → [s, h/sp, d]: heads chunk j goes to rank j; rank r's sequence slice lands at r.
at::Tensor seq_to_heads(Comm& c, const at::Tensor& x) {
  check_3d(x, "gather_seq_scatter_heads");
  const int64_t sp = c.size(), s = x.size(0), h = x.size(1), d = x.size(2);
  if (h % sp) fail("ulysses: ", h, " heads cannot be split over ", sp, " sequence-parallel ranks");
  at::Tensor send = x.reshape({s, sp, h / sp, d}).permute({1, 0, 2, 3}).contiguous();
  at::Tensor recv = at::empty_like(send);
  all_to_all_into(c, send, recv);
  return recv.view({sp * s, h / sp, d});
}

// [s, h/sp, d] → [s/sp, h, d]: sequence chunk j goes to rank j; rank r's heads land at r.
at::Tensor heads_to_seq(Comm& c, const at::Tensor& x) {
  check_3d(x, "gather_heads_scatter_seq");
  const int64_t sp = c.size(), s = x.size(0), hl = x.size(1), d = x.size(2);
  if (s % sp) fail("ulysses: a row of ", s, " tokens cannot be split over ", sp, " sequence-parallel ranks");
  at::Tensor send = x.contiguous();
  at::Tensor recv = at::empty_like(send);
  all_to_all_into(c, send, recv);
  return recv.view({sp, s / sp, hl, d}).permute({1, 0, 2, 3}).reshape({s / sp, sp * hl, d});
}

// verl's SeqAllToAll, one function per direction: each one's backward is the other.
struct SeqToHeadsFn : public torch::autograd::Function<SeqToHeadsFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return seq_to_heads(*reinterpret_cast<Comm*>(comm), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {heads_to_seq(comm_of(ctx), g[0]), at::Tensor()};
  }
};

struct HeadsToSeqFn : public torch::autograd::Function<HeadsToSeqFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return heads_to_seq(*reinterpret_cast<Comm*>(comm), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {seq_to_heads(comm_of(ctx), g[0]), at::Tensor()};
  }
};

// All-gather along dim 0.
at::Tensor gather_seq(Comm& c, const at::Tensor& x) {
  at::Tensor send = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] *= c.size();
  at::Tensor recv = at::empty(shape, send.options());
  all_gather_into(c, send, recv);
  return recv;
}

// verl's Gather with grad_scaler=True: backward takes this rank's slice, × sp.
struct GatherFn : public torch::autograd::Function<GatherFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["part"] = x.size(0);
    return gather_seq(*reinterpret_cast<Comm*>(comm), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    Comm& c = comm_of(ctx);
    const int64_t part = ctx->saved_data["part"].toInt();
    return {(g[0].narrow(0, c.rank() * part, part) * static_cast<double>(c.size())).contiguous(), at::Tensor()};
  }
};

bool recording(const at::Tensor& x) { return at::GradMode::is_enabled() && x.requires_grad(); }

}  // namespace

void check_ulysses(const ModelConfig& c, int sp) {
  if (sp < 1) fail("ulysses_sequence_parallel_size must be >= 1, got ", sp);
  if (sp == 1) return;
  if (c.num_heads % sp != 0)
    fail("ulysses_sequence_parallel_size = ", sp, ": the model's num_attention_heads (", c.num_heads,
         ") must be divisible by it");
  if (c.num_kv_heads % sp != 0 && sp % c.num_kv_heads != 0)
    fail("ulysses_sequence_parallel_size = ", sp, ": the model's num_key_value_heads (", c.num_kv_heads,
         ") must be divisible by it or divide it");
}

UlyssesGroups make_ulysses_groups(Comm& world, int sp) {
  UlyssesGroups g;
  if (sp <= 1) return g;
  if (world.size() % sp != 0)
    fail("ulysses_sequence_parallel_size = ", sp, " must divide the world size (", world.size(), " ranks)");
  const int r = world.rank();
  g.sp = world.split(r / sp, r % sp);
  g.dp = world.split(r % sp, r / sp);
  return g;
}

void check_ulysses_groups(Comm& world, int sp, const UlyssesGroups& g) {
  if (sp <= 1) {
    if (g.sp || g.dp) fail("ulysses_sequence_parallel_size = ", sp, ": sequence-parallel groups were given but sp <= 1");
    return;
  }
  if (!g.sp || !g.dp) fail("ulysses_sequence_parallel_size = ", sp, ": both the sp and the dp group are needed");
  if (world.size() % sp != 0)
    fail("ulysses_sequence_parallel_size = ", sp, " must divide the world size (", world.size(), " ranks)");
  const int r = world.rank(), dp = world.size() / sp;
  if (g.sp->size() != sp || g.dp->size() != dp)
    fail("ulysses: the given sp / dp groups have ", g.sp->size(), " / ", g.dp->size(), " ranks; expected ", sp, " / ", dp,
         " (ulysses_sequence_parallel_size = ", sp, " over ", world.size(), " ranks)");
  // Every member's world rank, in group order: sp group g = [g·sp, (g+1)·sp), dp group = ranks ≡ r mod sp.
  auto members = [&](Comm& c) {
    std::vector<int64_t> all(static_cast<size_t>(c.size()));
    const int64_t mine = r;
    c.all_gather(&mine, all.data(), 1, DType::I64);
    return all;
  };
  const std::vector<int64_t> s = members(*g.sp), d = members(*g.dp);
  for (int i = 0; i < sp; ++i)
    if (s[i] != (r / sp) * sp + i)
      fail("ulysses: world rank ", r, "'s sp group is not ranks [", (r / sp) * sp, ", ", (r / sp + 1) * sp,
           ") in order (member ", i, " is world rank ", s[i], "); expected verl's (\"dp\", \"sp\") mesh layout");
  for (int i = 0; i < dp; ++i)
    if (d[i] != i * sp + r % sp)
      fail("ulysses: world rank ", r, "'s dp group is not the ranks ", r % sp, " + k·", sp, " in order (member ", i,
           " is world rank ", d[i], "); expected verl's (\"dp\", \"sp\") mesh layout");
}

int Ulysses::size() const { return comm_.size(); }
int Ulysses::rank() const { return comm_.rank(); }

at::Tensor Ulysses::gather_seq_scatter_heads(const at::Tensor& x) const {
  return recording(x) ? SeqToHeadsFn::apply(x, reinterpret_cast<int64_t>(&comm_)) : seq_to_heads(comm_, x);
}

at::Tensor Ulysses::gather_heads_scatter_seq(const at::Tensor& x) const {
  return recording(x) ? HeadsToSeqFn::apply(x, reinterpret_cast<int64_t>(&comm_)) : heads_to_seq(comm_, x);
}

void Ulysses::to_heads(at::Tensor& q, at::Tensor& k, at::Tensor& v) const {
  const int64_t sp = size(), kv = k.size(1);
  if (kv < sp) {  // verl: repeats = max(sp // n_kv, 1), repeat_kv along the heads
    k = k.repeat_interleave(sp / kv, 1);
    v = v.repeat_interleave(sp / kv, 1);
  }
  q = gather_seq_scatter_heads(q);
  k = gather_seq_scatter_heads(k);
  v = gather_seq_scatter_heads(v);
}

at::Tensor Ulysses::to_sequence(const at::Tensor& out) const { return gather_heads_scatter_seq(out); }

at::Tensor Ulysses::gather_and_unpad(const at::Tensor& x, int64_t pad) const {
  at::Tensor full = recording(x) ? GatherFn::apply(x, reinterpret_cast<int64_t>(&comm_)) : gather_seq(comm_, x);
  return pad > 0 ? full.narrow(0, 0, full.size(0) - pad) : full;
}

}  // namespace verl
