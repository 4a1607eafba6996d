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

#include <algorithm>
#include <cstring>

#include "dist/comm.h"
#include "fsdp/buffer_pool.h"
#include "fsdp/expert_parallel.h"
#include "fsdp/tensor_comm.h"
#include "core/error.h"
#include "model/transformer.h"
#include "model/vision.h"
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
    u->reduce_grad(g, offsets);  // releases g
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

// The backward of a recomputed block: `forward` runs again with grad on a fresh leaf of the saved
// input, `g` is back-propagated through it; returns the input's gradient.
template <class F>
at::Tensor recompute_backward(const at::Tensor& saved_x, const at::Tensor& g, F&& forward) {
  at::Tensor x = saved_x.detach().requires_grad_(true);
  at::Tensor out;
  {
    at::AutoGradMode on(true);
    out = forward(x);
  }
  torch::autograd::backward({out}, {g});
  return x.grad();
}

// A layer whose forward keeps nothing but its input; backward gathers the layer's units,
// recomputes the layer with grad and back-propagates through it (reentrant checkpointing).
struct CheckpointFn : public torch::autograd::Function<CheckpointFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t provider, int64_t layer, int64_t model,
                            const at::Tensor& anchor, const at::Tensor& cos, const at::Tensor& sin, std::vector<int64_t> cu,
                            int64_t sp, int64_t moe) {
    auto* fm = reinterpret_cast<FsdpModel*>(provider);
    ctx->save_for_backward({x, cos, sin, anchor});
    ctx->saved_data["provider"] = provider;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["model"] = model;
    ctx->saved_data["cu"] = cu;
    ctx->saved_data["sp"] = sp;
    ctx->saved_data["moe"] = moe;
    const LayerContext lc{cos, sin, std::move(cu), reinterpret_cast<const SeqParallelAttention*>(sp),
                          reinterpret_cast<MoeAux*>(moe)};
    return reinterpret_cast<const Transformer*>(model)->layer_forward(fm->layer_params_of(static_cast<int>(layer), nullptr),
                                                                      x, lc);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto* fm = reinterpret_cast<FsdpModel*>(ctx->saved_data["provider"].toInt());
    const int layer = static_cast<int>(ctx->saved_data["layer"].toInt());
    const auto* model = reinterpret_cast<const Transformer*>(ctx->saved_data["model"].toInt());
    auto saved = ctx->get_saved_variables();
    const LayerContext lc{saved[1], saved[2], ctx->saved_data["cu"].toIntVector(),
                          reinterpret_cast<const SeqParallelAttention*>(ctx->saved_data["sp"].toInt()),
                          reinterpret_cast<MoeAux*>(ctx->saved_data["moe"].toInt())};
    fm->unshard_layer(layer);
    variable_list r(10);
    r[0] = recompute_backward(saved[0], g[0], [&](const at::Tensor& x) {
      return model->layer_forward(fm->layer_params_of(layer, &saved[3]), x, lc);
    });
    return r;
  }
};

// The same for a block of the vision tower: forward keeps the block's input, backward gathers
// its unit, recomputes the block with grad and back-propagates through it.
struct VisionCheckpointFn : public torch::autograd::Function<VisionCheckpointFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t provider, int64_t block, int64_t tower,
                            const at::Tensor& anchor, const at::Tensor& cos, const at::Tensor& sin,
                            std::vector<int64_t> full_cu, std::vector<int64_t> window_cu) {
    auto* fm = reinterpret_cast<FsdpModel*>(provider);
    ctx->save_for_backward({x, cos, sin, anchor});
    ctx->saved_data["provider"] = provider;
    ctx->saved_data["block"] = block;
    ctx->saved_data["tower"] = tower;
    ctx->saved_data["full_cu"] = full_cu;
    ctx->saved_data["window_cu"] = window_cu;
    const VisionContext vc{cos, sin, std::move(full_cu), std::move(window_cu)};
    const int i = static_cast<int>(block);
    return reinterpret_cast<const VisionTower*>(tower)->block_forward(fm->vision_block_params_of(i, nullptr), i, x, vc);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto* fm = reinterpret_cast<FsdpModel*>(ctx->saved_data["provider"].toInt());
    const int i = static_cast<int>(ctx->saved_data["block"].toInt());
    const auto* tower = reinterpret_cast<const VisionTower*>(ctx->saved_data["tower"].toInt());
    auto saved = ctx->get_saved_variables();
    const VisionContext vc{saved[1], saved[2], ctx->saved_data["full_cu"].toIntVector(),
                           ctx->saved_data["window_cu"].toIntVector()};
    fm->vision_block_unit(i)->unshard();
    variable_list r(9);
    r[0] = recompute_backward(saved[0], g[0], [&](const at::Tensor& x) {
      return tower->block_forward(fm->vision_block_params_of(i, &saved[3]), i, x, vc);
    });
    return r;
  }
};

// The constant input of every UnshardFn: requires grad, so autograd records the functions.
const at::Tensor& anchor() {
  static const at::Tensor a = at::empty({0}, at::kFloat).requires_grad_(true);  // never read: any device
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

  const ModelConfig& c = config();
  const int ep = opt.expert_parallel_size;
  if (ep < 1) fail("expert_parallel_size = ", ep, ": must be >= 1");
  if (ep > 1) {
    if (c.num_experts <= 0)
      fail("expert_parallel_size = ", ep, ": ", c.architecture, " has no experts (a mixture-of-experts model is needed)");
    if (c.num_experts % ep)
      fail("expert_parallel_size = ", ep, " does not divide num_experts = ", c.num_experts);
    if (fs != W) fail("expert_parallel_size > 1 with hybrid sharding (fsdp_size ", opt.fsdp_size, " < ", W, ") is not supported");
    ExpertGroups g = make_expert_groups(world, ep);
    ep_comm_ = std::move(g.ep);
    edp_comm_ = std::move(g.data);
    ep_ = std::make_unique<ExpertGroup>(*ep_comm_);
  }

  WeightSet w(weights_dir);
  const auto specs = w.unit_specs(c);  // checks every key of the folder
  // Each rank reads only its shard's part of each tensor, straight from the mapped files: no
  // rank ever holds a whole tensor, let alone the model (VeOmni's init_device=meta).
  auto load = [&](FlatUnit& u) {
    for (const auto& p : u.params()) {
      int64_t first = 0;
      at::Tensor part;
      if (!u.shard_part(p, &first, &part)) part = at::empty({0}, at::kFloat);  // none here: checked all the same
      w.load_slice(p.name, p.shape, first, part);
    }
  };
  root_ = std::make_unique<FlatUnit>("root", specs[0], shard_.get(), replicate_.get(), opt.compute_dtype, opt.device);
  load(*root_);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string name = "layer" + std::to_string(i);
    const bool split = ep_ && c.is_moe_layer(i);
    layers_.push_back(std::make_unique<FlatUnit>(name, split ? layer_dense_weight_specs(c, i) : specs[i + 1], shard_.get(),
                                                 replicate_.get(), opt.compute_dtype, opt.device));
    load(*layers_.back());
    experts_.emplace_back();
    if (!split) continue;
    // This rank's experts, sharded over its expert-data group (see fsdp/expert_parallel.h).
    const int el = c.num_experts / ep, j = ep_->rank();
    auto u = std::make_unique<FlatUnit>(expert_unit_name(i, j), expert_weight_specs(c, i, j * el, el), edp_comm_.get(),
                                        nullptr, opt.compute_dtype, opt.device);
    u->set_grad_scale(1.0 / ep);
    load(*u);
    experts_.back() = std::move(u);
  }
  // Vision-language: the tower's units follow the layers in the specs (model/vision.h).
  for (size_t k = c.num_layers + 1; k < specs.size(); ++k) {
    const size_t b = k - c.num_layers - 1;
    vision_.push_back(std::make_unique<FlatUnit>(b == 0 ? std::string("vision") : "vision_block" + std::to_string(b - 1),
                                                 specs[k], shard_.get(), replicate_.get(), opt.compute_dtype));
    load(*vision_.back());
  }
}

std::string FsdpModel::expert_unit_name(int layer, int ep_rank) {
  return "layer" + std::to_string(layer) + ".experts" + std::to_string(ep_rank);
}

std::vector<FsdpModel::UnitInfo> FsdpModel::unit_table() const {
  std::vector<UnitInfo> t;
  auto add = [&](const FlatUnit& u) { t.push_back({u.name(), u.numel(), u.shard_numel(), u.params(), {}}); };
  add(*root_);
  for (const auto& l : layers_) add(*l);
  for (const auto& v : vision_) add(*v);
  const ModelConfig& c = config();
  for (int i = 0; i < c.num_layers; ++i) {
    if (!experts_[i]) continue;
    // Every expert group's unit: the same layout with its own experts, held by the ranks with
    // that place in their group (in world-rank order).
    const int ep = ep_->size(), W = ep * edp_comm_->size();
    for (int j = 0; j < ep; ++j) {
      UnitInfo u{expert_unit_name(i, j), experts_[i]->numel(), experts_[i]->shard_numel(), expert_layout(i, j), {}};
      for (int r = j; r < W; r += ep) u.ranks.push_back(r);
      t.push_back(std::move(u));
    }
  }
  return t;
}

std::vector<FlatParam> FsdpModel::expert_layout(int layer, int ep_rank) const {
  const ModelConfig& c = config();
  const int el = c.num_experts / ep_->size();
  int64_t n = 0;
  return flat_layout(expert_weight_specs(c, layer, ep_rank * el, el), &n);
}

void FsdpModel::unshard_layer(int i) {
  layers_.at(i)->unshard();
  if (experts_[i]) experts_[i]->unshard();
}

void FsdpModel::reshard_layer(int i) {
  layers_.at(i)->reshard();
  if (experts_[i]) experts_[i]->reshard();
}

DecoderLayer FsdpModel::layer_params_of(int i, const at::Tensor* anchor) {
  auto slots_of = [&](FlatUnit* u) {
    return anchor ? unshard_slots(u, *anchor) : slot_views(u->params(), u->full());
  };
  std::vector<SlotView> slots = slots_of(layers_.at(i).get());
  if (FlatUnit* e = experts_[i].get()) {
    const std::vector<SlotView> es = slots_of(e);
    slots.insert(slots.end(), es.begin(), es.end());
  }
  DecoderLayer l = layer_params(slots);
  if (experts_[i]) l.ep = ep_.get();
  return l;
}

VisionBlock FsdpModel::vision_block_params_of(int i, const at::Tensor* anchor) {
  FlatUnit* u = vision_block_unit(i);
  return vision_block_params(anchor ? unshard_slots(u, *anchor) : slot_views(u->params(), u->full()));
}

FsdpModel::~FsdpModel() = default;

std::vector<FlatUnit*> FsdpModel::units() {
  std::vector<FlatUnit*> r{root_.get()};
  for (auto& l : layers_) r.push_back(l.get());
  for (auto& v : vision_) r.push_back(v.get());
  for (auto& e : experts_)
    if (e) r.push_back(e.get());
  return r;
}

std::vector<FlatUnit*> FsdpModel::trainable_units() {
  std::vector<FlatUnit*> r;
  for (FlatUnit* u : units()) {
    const bool vision = std::find_if(vision_.begin(), vision_.end(), [&](const auto& v) { return v.get() == u; }) != vision_.end();
    if (!(vision && opt_.freeze_vision)) r.push_back(u);
  }
  return r;
}

int64_t FsdpModel::num_parameters() const {
  int64_t n = root_->numel();
  for (const auto& l : layers_) n += l->numel();
  for (const auto& v : vision_) n += v->numel();
  for (const auto& e : experts_)
    if (e) n += e->numel() * ep_->size();  // every expert group's share
  return n;
}

void FsdpModel::to(c10::Device d) {
  for (FlatUnit* u : units()) u->to(d);
  opt_.device = d;
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
  FlatUnit* e = experts_.at(i).get();
  const bool grad = at::GradMode::is_enabled();
  at::Tensor out;
  unshard_layer(i);
  if (grad && opt_.gradient_checkpointing) {
    out = CheckpointFn::apply(h, reinterpret_cast<int64_t>(this), i, reinterpret_cast<int64_t>(&model), anchor(), ctx.cos,
                              ctx.sin, ctx.cu_seqlens, reinterpret_cast<int64_t>(ctx.sp), reinterpret_cast<int64_t>(ctx.moe));
  } else {
    out = model.layer_forward(layer_params_of(i, grad ? &anchor() : nullptr), h, ctx);
    if (grad) {
      out = PreBackwardFn::apply(out, reinterpret_cast<int64_t>(u));
      if (e) out = PreBackwardFn::apply(out, reinterpret_cast<int64_t>(e));
    }
  }
  if (!grad || opt_.reshard_after_forward || opt_.gradient_checkpointing) reshard_layer(i);
  return out;
}

// In training the root stays gathered until its UnshardFn's backward (the embedding's gradient
// is the last to arrive); without grad it is freed as soon as the head is done.
void FsdpModel::end_forward() {
  if (!at::GradMode::is_enabled()) root_->reshard();
}

bool FsdpModel::vision_grad() const { return at::GradMode::is_enabled() && !opt_.freeze_vision; }

// The tower's root unit stays gathered until the merger has run (end_vision) and, with
// gradients, until its UnshardFn's backward (the patch embedding's gradient is its last).
VisionRootParams FsdpModel::vision_root() {
  if (vision_.empty()) fail("internal: ", config().architecture, " has no vision tower");
  FlatUnit* u = vision_[0].get();
  u->unshard();
  return vision_root_params(vision_grad() ? unshard_slots(u, anchor()) : slot_views(u->params(), u->full()));
}

at::Tensor FsdpModel::run_vision_block(const VisionTower& tower, int i, const at::Tensor& h, const VisionContext& ctx) {
  FlatUnit* u = vision_block_unit(i);
  const bool grad = vision_grad();
  u->unshard();
  at::Tensor out;
  if (grad && opt_.gradient_checkpointing) {  // as the decoder layers: recomputed in backward
    out = VisionCheckpointFn::apply(h, reinterpret_cast<int64_t>(this), i, reinterpret_cast<int64_t>(&tower), anchor(),
                                    ctx.cos, ctx.sin, ctx.full_cu, ctx.window_cu);
  } else {
    out = tower.block_forward(vision_block_params_of(i, grad ? &anchor() : nullptr), i, h, ctx);
    if (grad) out = PreBackwardFn::apply(out, reinterpret_cast<int64_t>(u));
  }
  if (!grad || opt_.reshard_after_forward || opt_.gradient_checkpointing) u->reshard();
  return out;
}

void FsdpModel::end_vision() {
  if (!vision_grad()) vision_[0]->reshard();
}

void FsdpModel::for_each_param(const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  for (int g = 0; g < num_param_groups(); ++g) for_each_param_in_group(g, fn);
}

void FsdpModel::for_each_param_in_group(int g, const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  const int L = static_cast<int>(layers_.size()), V = static_cast<int>(vision_.size());
  if (g < 0 || g >= num_param_groups()) fail("parameter group ", g, " out of range (", num_param_groups(), " groups)");
  if (g < 1 + L + V) {
    FlatUnit* u = g == 0 ? root_.get() : g <= L ? layers_[g - 1].get() : vision_[g - 1 - L].get();
    at::Tensor full = u->gather_full_fp32();
    for (const auto& p : u->params()) fn(p.name, param_view(full, p));
    return;
  }
  // Expert units: gathered inside the expert-data group, then every expert group's over ep.
  const int i = g - 1 - L - V;
  if (static_cast<size_t>(i) >= experts_.size() || !experts_[i]) return;
  const at::Tensor mine = experts_[i]->gather_full_fp32();
  const int ep = ep_->size();
  at::Tensor all = at::empty({ep * mine.numel()}, mine.options());
  all_gather_into(*ep_comm_, mine, all);
  for (int j = 0; j < ep; ++j)
    for (const auto& p : expert_layout(i, j)) fn(p.name, param_view(all.narrow(0, j * mine.numel(), mine.numel()), p));
}

}  // namespace verl
