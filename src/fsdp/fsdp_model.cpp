// fsdp_model.cpp — FSDP wrapping of the transformer (see fsdp_model.h).
//
// Backward hooks without module hooks, as DESIGN.md suggests: each unit's parameters reach
// the model through UnshardFn (input: a constant anchor that requires grad; outputs: the
// unit's slot tensors, views of the gathered flat buffer), whose backward runs once every
// gradient of the unit's parameters has arrived — it writes them into one fp32 flat gradient
// (one copy each, instead of the zero-filled full-size buffer per view and the sums that
// autograd's narrow backward would make), reduce-scatters it and frees the buffer. Each layer's
// output passes through PreBackwardFn, an identity whose backward runs before the layer's
// backward and gathers the parameters again. Autograd saved views of the flat buffer during
// forward; they point at the same storage object, which unshard() refills.
#include "fsdp/fsdp_model.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstring>

#include "dist/comm.h"
#include "fsdp/buffer_pool.h"
#include "core/error.h"
#include "model/transformer.h"
#include "model/weights.h"

namespace verl {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

FlatUnit* unit_of(AutogradContext* ctx) { return reinterpret_cast<FlatUnit*>(ctx->saved_data["unit"].toInt()); }

struct UnshardFn : public torch::autograd::Function<UnshardFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& anchor, int64_t unit) {
    auto* u = reinterpret_cast<FlatUnit*>(unit);
    ctx->saved_data["unit"] = unit;
    std::vector<int64_t> offsets;
    variable_list out;
    for (const SlotView& s : slot_views(u->params(), u->full())) {
      offsets.push_back(s.offset);
      out.push_back(s.view);
    }
    ctx->saved_data["offsets"] = offsets;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    FlatUnit* u = unit_of(ctx);
    const std::vector<int64_t> offsets = ctx->saved_data["offsets"].toIntVector();
    at::Tensor flat = pool_tensor(u->padded_numel(), at::kFloat);
    flat.zero_();
    for (size_t i = 0; i < g.size(); ++i)
      if (g[i].defined()) flat.narrow(0, offsets[i], g[i].numel()).view(g[i].sizes()).copy_(g[i]);
    g.clear();
    u->reduce_grad(flat);
    pool_give_tensor(std::move(flat));
    u->reshard();
    return {at::Tensor(), at::Tensor()};
  }
};

struct PreBackwardFn : public torch::autograd::Function<PreBackwardFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t unit) {
    ctx->saved_data["unit"] = unit;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    unit_of(ctx)->unshard();
    return {g[0], at::Tensor()};
  }
};

// The slot tensors of a gathered unit as outputs of UnshardFn over `anchor`.
std::vector<SlotView> unshard_slots(FlatUnit* u, const at::Tensor& anchor) {
  std::vector<SlotView> slots = slot_views(u->params(), u->full());
  const variable_list out = UnshardFn::apply(anchor, reinterpret_cast<int64_t>(u));
  for (size_t i = 0; i < slots.size(); ++i) slots[i].view = out[i];
  return slots;
}

// A layer whose forward keeps nothing but its input; backward gathers the unit, recomputes
// the layer with grad and back-propagates through it (reentrant checkpointing).
struct CheckpointFn : public torch::autograd::Function<CheckpointFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t unit, int64_t model, const at::Tensor& anchor,
                            const at::Tensor& cos, const at::Tensor& sin, std::vector<int64_t> cu, int64_t sp, int64_t moe) {
    auto* u = reinterpret_cast<FlatUnit*>(unit);
    ctx->save_for_backward({x, cos, sin, anchor});
    ctx->saved_data["unit"] = unit;
    ctx->saved_data["model"] = model;
    ctx->saved_data["cu"] = cu;
    ctx->saved_data["sp"] = sp;
    ctx->saved_data["moe"] = moe;
    const LayerContext lc{cos, sin, std::move(cu), reinterpret_cast<const SeqParallelAttention*>(sp),
                          reinterpret_cast<MoeAux*>(moe)};
    return reinterpret_cast<const Transformer*>(model)->layer_forward(layer_views(u->params(), u->full()), x, lc);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    FlatUnit* u = unit_of(ctx);
    const auto* model = reinterpret_cast<const Transformer*>(ctx->saved_data["model"].toInt());
    auto saved = ctx->get_saved_variables();
    const LayerContext lc{saved[1], saved[2], ctx->saved_data["cu"].toIntVector(),
                          reinterpret_cast<const SeqParallelAttention*>(ctx->saved_data["sp"].toInt()),
                          reinterpret_cast<MoeAux*>(ctx->saved_data["moe"].toInt())};
    u->unshard();
    at::Tensor x = saved[0].detach().requires_grad_(true);
    at::Tensor out;
    {
      at::AutoGradMode on(true);
      out = model->layer_forward(layer_params(unshard_slots(u, saved[3])), x, lc);
    }
    torch::autograd::backward({out}, {g[0]});
    return {x.grad(),     at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The constant input of every UnshardFn: requires grad, so autograd records the functions.
const at::Tensor& anchor() {
  static const at::Tensor a = at::empty({0}, at::kFloat).requires_grad_(true);
  return a;
}

}  // namespace

FsdpModel::FsdpModel(const std::string& config_dir, const std::string& weights_dir, Comm& world, const FsdpOptions& opt)
    : arch_(load_model_config(config_dir), opt.compute_dtype), opt_(opt) {
  const int W = world.size();
  const int fs = opt.fsdp_size <= 0 || opt.fsdp_size > W ? W : opt.fsdp_size;
  if (W % fs != 0) fail("fsdp_size ", opt.fsdp_size, " does not divide the world size ", W);
  // Shard groups are consecutive ranks; replica groups take one rank of each shard group.
  shard_ = world.split(world.rank() / fs, world.rank());
  if (fs < W) replicate_ = world.split(world.rank() % fs, world.rank());

  WeightSet w(weights_dir);
  const auto specs = w.unit_specs(config());
  for (size_t i = 0; i < specs.size(); ++i) {
    auto u = std::make_unique<FlatUnit>(i == 0 ? "root" : "layer" + std::to_string(i - 1), specs[i], shard_.get(),
                                        replicate_.get(), opt.compute_dtype);
    for (const auto& p : u->params()) u->load_param(p, w.load(p.name, p.shape, at::kFloat));
    if (i == 0) root_ = std::move(u);
    else layers_.push_back(std::move(u));
  }
}

FsdpModel::~FsdpModel() = default;

std::vector<FlatUnit*> FsdpModel::units() {
  std::vector<FlatUnit*> r{root_.get()};
  for (auto& l : layers_) r.push_back(l.get());
  return r;
}

int64_t FsdpModel::num_parameters() const {
  int64_t n = root_->numel();
  for (const auto& l : layers_) n += l->numel();
  return n;
}

void FsdpModel::zero_grad() {
  for (FlatUnit* u : units()) u->zero_grad();
}

std::vector<SlotView> FsdpModel::gathered(FlatUnit* u) {
  u->unshard();
  return at::GradMode::is_enabled() ? unshard_slots(u, anchor()) : slot_views(u->params(), u->full());
}

RootParams FsdpModel::root() { return root_params(config(), gathered(root_.get())); }

at::Tensor FsdpModel::run_layer(const Transformer& model, int i, const at::Tensor& h, const LayerContext& ctx) {
  FlatUnit* u = layers_.at(i).get();
  const bool grad = at::GradMode::is_enabled();
  at::Tensor out;
  if (grad && opt_.gradient_checkpointing) {
    u->unshard();
    out = CheckpointFn::apply(h, reinterpret_cast<int64_t>(u), reinterpret_cast<int64_t>(&model), anchor(), ctx.cos,
                              ctx.sin, ctx.cu_seqlens, reinterpret_cast<int64_t>(ctx.sp), reinterpret_cast<int64_t>(ctx.moe));
  } else {
    out = model.layer_forward(layer_params(gathered(u)), h, ctx);
    if (grad) out = PreBackwardFn::apply(out, reinterpret_cast<int64_t>(u));
  }
  if (!grad || opt_.reshard_after_forward || opt_.gradient_checkpointing) u->reshard();
  return out;
}

// In training the root stays gathered until its UnshardFn's backward (the embedding's gradient
// is the last to arrive); without grad it is freed as soon as the head is done.
void FsdpModel::end_forward() {
  if (!at::GradMode::is_enabled()) root_->reshard();
}

void FsdpModel::for_each_param(const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  for (FlatUnit* u : units()) {
    at::Tensor full = u->gather_full_fp32();
    for (const auto& p : u->params()) fn(p.name, param_view(full, p));
  }
}

}  // namespace verl
