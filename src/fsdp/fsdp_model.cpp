// fsdp_model.cpp — FSDP wrapping of the transformer (see fsdp_model.h).
//
// Backward hooks without module hooks, as DESIGN.md suggests: each unit's parameters reach
// the model through UnshardFn (input: a constant anchor that requires grad; output: the
// gathered flat buffer), whose backward runs once every gradient of the unit's parameters
// has been summed — it reduce-scatters that flat gradient and frees the buffer. Each layer's
// output passes through PreBackwardFn, an identity whose backward runs before the layer's
// backward and gathers the parameters again. Autograd saved views of the flat buffer during
// forward; they point at the same storage object, which unshard() refills.
#include "fsdp/fsdp_model.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstring>

#include "dist/comm.h"
#include "io/error.h"
#include "model/transformer.h"
#include "model/weights.h"

namespace verl {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

std::vector<FlatParam> flat_params(const std::vector<WeightSpec>& specs) {
  std::vector<FlatParam> p;
  for (const auto& w : specs) p.push_back({w.name, w.shape});
  return p;
}

// Views of one flat buffer as a DecoderLayer (fused [q;k;v] and [gate;up] are contiguous).
DecoderLayer layer_views(const FlatUnit& u, const at::Tensor& flat) {
  const auto& ps = u.params();
  auto get = [&](const char* suffix) -> const FlatParam* {
    for (const auto& p : ps)
      if (p.name.size() > std::strlen(suffix) && p.name.compare(p.name.size() - std::strlen(suffix), std::string::npos, suffix) == 0)
        return &p;
    return nullptr;
  };
  auto v = [&](const char* s) { const FlatParam* p = get(s); return p ? u.view_of(flat, *p) : at::Tensor(); };
  auto fused = [&](const char* a, const char* c, int64_t cols) {
    const FlatParam* pa = get(a);
    const FlatParam* pc = get(c);
    if (!pa) return at::Tensor();
    const int64_t n = pc->offset + pc->numel - pa->offset;
    at::Tensor t = flat.narrow(0, pa->offset, n);
    return cols > 0 ? t.view({n / cols, cols}) : t;
  };
  DecoderLayer l;
  const int64_t H = ps[0].shape[0];
  l.input_norm = v(".input_layernorm.weight");
  l.post_norm = v(".post_attention_layernorm.weight");
  l.qkv_w = fused(".q_proj.weight", ".v_proj.weight", H);
  l.qkv_b = fused(".q_proj.bias", ".v_proj.bias", 0);
  l.o_w = v(".o_proj.weight");
  l.o_b = v(".o_proj.bias");
  l.q_norm = v(".q_norm.weight");
  l.k_norm = v(".k_norm.weight");
  l.gate_up_w = fused(".gate_proj.weight", ".up_proj.weight", H);
  l.gate_up_b = fused(".gate_proj.bias", ".up_proj.bias", 0);
  l.down_w = v(".down_proj.weight");
  l.down_b = v(".down_proj.bias");
  return l;
}

FlatUnit* unit_of(AutogradContext* ctx) { return reinterpret_cast<FlatUnit*>(ctx->saved_data["unit"].toInt()); }

struct UnshardFn : public torch::autograd::Function<UnshardFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& anchor, int64_t unit) {
    ctx->saved_data["unit"] = unit;
    return reinterpret_cast<FlatUnit*>(unit)->full().detach();
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    FlatUnit* u = unit_of(ctx);
    u->reduce_grad(g[0]);
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

// A layer whose forward keeps nothing but its input; backward gathers the unit, recomputes
// the layer with grad and back-propagates through it (reentrant checkpointing).
struct CheckpointFn : public torch::autograd::Function<CheckpointFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t unit, int64_t cfg, const at::Tensor& anchor,
                            const at::Tensor& cos, const at::Tensor& sin, std::vector<int64_t> cu) {
    auto* u = reinterpret_cast<FlatUnit*>(unit);
    ctx->save_for_backward({x, cos, sin, anchor});
    ctx->saved_data["unit"] = unit;
    ctx->saved_data["cfg"] = cfg;
    ctx->saved_data["cu"] = cu;
    return decoder_layer_forward(*reinterpret_cast<const ModelConfig*>(cfg), layer_views(*u, u->full()), x, cos, sin, cu);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    FlatUnit* u = unit_of(ctx);
    const auto* cfg = reinterpret_cast<const ModelConfig*>(ctx->saved_data["cfg"].toInt());
    auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> cu = ctx->saved_data["cu"].toIntVector();
    u->unshard();
    at::Tensor x = saved[0].detach().requires_grad_(true);
    at::Tensor out;
    {
      at::AutoGradMode on(true);
      at::Tensor flat = UnshardFn::apply(saved[3], reinterpret_cast<int64_t>(u));
      out = decoder_layer_forward(*cfg, layer_views(*u, flat), x, saved[1], saved[2], cu);
    }
    torch::autograd::backward({out}, {g[0]});
    return {x.grad(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

FsdpModel::FsdpModel(const std::string& config_dir, const std::string& weights_dir, Comm& world, const FsdpOptions& opt)
    : opt_(opt) {
  cfg_ = load_model_config(config_dir);
  const int W = world.size();
  const int fs = opt.fsdp_size <= 0 || opt.fsdp_size > W ? W : opt.fsdp_size;
  if (W % fs != 0) fail("fsdp_size ", opt.fsdp_size, " does not divide the world size ", W);
  // Shard groups are consecutive ranks; replica groups take one rank of each shard group.
  shard_ = world.split(world.rank() / fs, world.rank());
  if (fs < W) replicate_ = world.split(world.rank() % fs, world.rank());

  WeightSet w(weights_dir);
  const bool score_bias = cfg_.head == Head::TokenClassification && w.has("score.bias");
  root_ = std::make_unique<FlatUnit>("root", flat_params(root_weight_specs(cfg_, score_bias)), shard_.get(),
                                     replicate_.get(), opt.compute_dtype);
  for (int i = 0; i < cfg_.num_layers; ++i)
    layers_.push_back(std::make_unique<FlatUnit>("layer" + std::to_string(i), flat_params(layer_weight_specs(cfg_, i)),
                                                 shard_.get(), replicate_.get(), opt.compute_dtype));
  std::vector<WeightSpec> want;
  for (FlatUnit* u : units())
    for (const auto& p : u->params()) want.push_back({p.name, p.shape});
  w.check(want, cfg_);
  for (FlatUnit* u : units())
    for (const auto& p : u->params()) u->load_param(p, w.load(p.name, p.shape, at::kFloat));
  inv_freq_ = rope_inv_freq(cfg_);
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

at::Tensor FsdpModel::forward(const at::Tensor& input_ids, const at::Tensor& position_ids, const std::vector<int64_t>& cu,
                              const std::function<at::Tensor(const at::Tensor&, const HeadParams&)>& head) {
  const bool grad = at::GradMode::is_enabled();
  const int64_t n = input_ids.size(0);
  if (cu.empty() || cu.front() != 0 || cu.back() != n)
    fail("packed row: cu_seqlens must start at 0 and end at the row length ", n);
  if (n > 0) {
    const int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
    if (lo < 0 || hi >= cfg_.vocab_size)
      fail("input_ids: token id ", lo < 0 ? lo : hi, " is outside the vocabulary [0, ", cfg_.vocab_size, ")");
  }
  static const at::Tensor anchor = at::empty({0}, at::kFloat).requires_grad_(true);
  auto gathered = [&](FlatUnit* u) {
    u->unshard();
    return grad ? UnshardFn::apply(anchor, reinterpret_cast<int64_t>(u)) : u->full();
  };

  at::Tensor rflat = gathered(root_.get());
  auto rv = [&](const std::string& name) {
    const FlatParam* p = root_->find(name);
    return p ? root_->view_of(rflat, *p) : at::Tensor();
  };
  at::Tensor embed = rv("model.embed_tokens.weight");
  at::Tensor h = at::embedding(embed, input_ids);
  at::Tensor cos, sin;
  rope_cos_sin(inv_freq_, position_ids, opt_.compute_dtype, &cos, &sin);

  for (auto& up : layers_) {
    FlatUnit* u = up.get();
    if (grad && opt_.gradient_checkpointing) {
      u->unshard();
      h = CheckpointFn::apply(h, reinterpret_cast<int64_t>(u), reinterpret_cast<int64_t>(&cfg_), anchor, cos, sin, cu);
    } else {
      at::Tensor flat = gathered(u);
      h = decoder_layer_forward(cfg_, layer_views(*u, flat), h, cos, sin, cu);
      if (grad) h = PreBackwardFn::apply(h, reinterpret_cast<int64_t>(u));
    }
    if (!grad || opt_.reshard_after_forward || opt_.gradient_checkpointing) u->reshard();
  }
  h = rms_norm(h, rv("model.norm.weight"), cfg_.rms_norm_eps);
  HeadParams hp;
  hp.lm_head = cfg_.head == Head::CausalLM ? (cfg_.tie_word_embeddings ? embed : rv("lm_head.weight")) : at::Tensor();
  hp.score_w = rv("score.weight");
  hp.score_b = rv("score.bias");
  at::Tensor out = head(h, hp);
  if (!grad) root_->reshard();
  return out;
}

void FsdpModel::for_each_param(const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  for (FlatUnit* u : units()) {
    at::Tensor full = u->gather_full_fp32();
    for (const auto& p : u->params()) fn(p.name, u->view_of(full, p));
  }
}

}  // namespace verl
