// optim.cpp — AdamW (torch's _single_tensor_adam with decoupled weight decay, the same ops on
// the same host-double scalars), clip_grad_norm_ with a cross-rank sum of squared norms, verl's
// optimizer_step, and the LambdaLR schedules of verl.utils.torch_functional.
#include "engine/optim.h"
#include "fsdp/buffer_pool.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <set>

#include "core/error.h"

namespace verl {

AdamW::AdamW(std::vector<at::Tensor> params, AdamWOptions o, std::vector<std::string> names)
    : params_(std::move(params)), names_(std::move(names)), o_(o) {
  if (names_.empty())
    for (size_t i = 0; i < params_.size(); ++i) names_.push_back(std::to_string(i));
  if (names_.size() != params_.size())
    fail("AdamW: ", names_.size(), " names for ", params_.size(), " parameters");
  std::set<std::string> seen(names_.begin(), names_.end());
  if (seen.size() != names_.size()) fail("AdamW: parameter names are not unique");
  if (!(o_.lr >= 0)) fail("AdamW: invalid learning rate ", o_.lr);
  if (!(o_.eps >= 0)) fail("AdamW: invalid epsilon ", o_.eps);
  if (!(o_.beta1 >= 0 && o_.beta1 < 1)) fail("AdamW: invalid beta1 ", o_.beta1);
  if (!(o_.beta2 >= 0 && o_.beta2 < 1)) fail("AdamW: invalid beta2 ", o_.beta2);
  if (!(o_.weight_decay >= 0)) fail("AdamW: invalid weight_decay ", o_.weight_decay);
  for (size_t i = 0; i < params_.size(); ++i)
    if (!params_[i].defined()) fail("AdamW: parameter '", names_[i], "' is undefined");
  state_.resize(params_.size());
}

void AdamW::reserve_state() {
  for (size_t i = 0; i < params_.size(); ++i) {
    ParamState& st = state_[i];
    if (st.exp_avg.defined()) continue;
    st.exp_avg = at::zeros_like(params_[i], at::MemoryFormat::Preserve);
    st.exp_avg_sq = at::zeros_like(params_[i], at::MemoryFormat::Preserve);
  }
}

void AdamW::step() {
  c10::NoGradGuard no_grad;
  const double lr = o_.lr, beta1 = o_.beta1, beta2 = o_.beta2, eps = o_.eps, wd = o_.weight_decay;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor param = params_[i];
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    if (grad.is_sparse()) fail("AdamW: parameter '", names_[i], "' has a sparse gradient");
    ParamState& st = state_[i];
    if (!st.step.defined()) {
      st.step = at::scalar_tensor(0.0, at::TensorOptions().dtype(at::kFloat));
      if (!st.exp_avg.defined()) {  // else reserved by reserve_state(), still zero
        st.exp_avg = at::zeros_like(param, at::MemoryFormat::Preserve);
        st.exp_avg_sq = at::zeros_like(param, at::MemoryFormat::Preserve);
      }
    }
    st.step.add_(1);
    if (wd != 0) param.mul_(1 - lr * wd);
    st.exp_avg.lerp_(grad, 1 - beta1);
    st.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    const double step = st.step.item<double>();
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
    at::Tensor denom = st.exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps);  // one temporary
    param.addcdiv_(st.exp_avg, denom, -step_size);
  }
}

void AdamW::to(c10::Device d) {
  for (ParamState& st : state_)
    for (at::Tensor* t : {&st.exp_avg, &st.exp_avg_sq})
      if (t->defined()) *t = offload_copy(*t, d);
}

void AdamW::zero_grad(bool set_to_none) {
  for (auto& p : params_) {
    at::Tensor& g = p.mutable_grad();
    if (!g.defined()) continue;
    if (set_to_none) {
      g.reset();
    } else {
      if (g.grad_fn()) g = g.detach();
      else g.requires_grad_(false);
      g.zero_();
    }
  }
}

std::map<std::string, at::Tensor> AdamW::state_dict() const {
  std::map<std::string, at::Tensor> sd;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!state_[i].step.defined()) continue;
    sd[names_[i] + ".exp_avg"] = state_[i].exp_avg;
    sd[names_[i] + ".exp_avg_sq"] = state_[i].exp_avg_sq;
    sd[names_[i] + ".step"] = state_[i].step;
  }
  return sd;
}

void AdamW::load_state_dict(const std::map<std::string, at::Tensor>& sd) {
  std::vector<ParamState> fresh(params_.size());
  std::set<std::string> used;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string keys[3] = {names_[i] + ".exp_avg", names_[i] + ".exp_avg_sq", names_[i] + ".step"};
    int found = 0;
    for (const auto& k : keys) found += sd.count(k) ? 1 : 0;
    if (found == 0) {  // no state: keeps the reserved moments (reserve_state), zeroed
      if (state_[i].exp_avg.defined()) {
        fresh[i].exp_avg = state_[i].exp_avg;
        fresh[i].exp_avg_sq = state_[i].exp_avg_sq;
      }
      continue;
    }
    for (const auto& k : keys)
      if (!sd.count(k)) fail("AdamW state: '", k, "' is missing (the parameter's other state is present)");
    const at::Tensor& p = params_[i];
    for (int j = 0; j < 2; ++j) {
      const at::Tensor& t = sd.at(keys[j]);
      if (!t.sizes().equals(p.sizes()))
        fail("AdamW state: '", keys[j], "' has shape ", t.sizes(), ", expected ", p.sizes());
    }
    const at::Tensor& s = sd.at(keys[2]);
    if (s.numel() != 1) fail("AdamW state: '", keys[2], "' must be a scalar, has shape ", s.sizes());
    c10::NoGradGuard no_grad;
    fresh[i].exp_avg = sd.at(keys[0]).to(p.options(), /*non_blocking=*/false, /*copy=*/true).contiguous();
    fresh[i].exp_avg_sq = sd.at(keys[1]).to(p.options(), false, true).contiguous();
    fresh[i].step = s.reshape({}).to(at::TensorOptions().dtype(at::kFloat).device(at::kCPU), false, true);
    for (const auto& k : keys) used.insert(k);
  }
  for (const auto& [k, v] : sd)
    if (!used.count(k)) fail("AdamW state: unexpected key '", k, "' (no parameter of that name)");
  for (ParamState& st : fresh)
    if (!st.step.defined() && st.exp_avg.defined()) {
      st.exp_avg.zero_();
      st.exp_avg_sq.zero_();
    }
  state_ = std::move(fresh);
}

namespace {

std::vector<at::Tensor> grads_of(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> g;
  for (const auto& p : params)
    if (p.grad().defined()) g.push_back(p.grad());
  return g;
}

}  // namespace

double total_grad_norm(const std::vector<at::Tensor>& params, const AllReduceSum& all_reduce) {
  c10::NoGradGuard no_grad;
  std::vector<at::Tensor> grads = grads_of(params);
  double local = 0.0;
  if (!grads.empty()) {
    // torch.nn.utils._get_total_norm: per-tensor norms (grouped by device and dtype there; the
    // order of the stacked norms does not change a 2-norm of ≤ a few thousand values much, and
    // with one device and dtype it is the same order), then the norm of the stack.
    std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
    const auto dev = grads[0].device();
    for (auto& n : norms) n = n.to(dev);
    local = at::linalg_vector_norm(at::stack(norms), 2).item<float>();
  }
  if (!all_reduce) return local;
  double sq = local * local;  // exact: a float squared fits a double
  all_reduce(&sq, 1);
  return static_cast<float>(std::sqrt(sq));
}

void clip_grads_with_norm(const std::vector<at::Tensor>& params, double max_norm, double total_norm) {
  c10::NoGradGuard no_grad;
  std::vector<at::Tensor> grads = grads_of(params);
  if (grads.empty()) return;
  at::Tensor total = at::scalar_tensor(total_norm, at::TensorOptions().dtype(at::kFloat));
  // Python `max_norm / t` is t.reciprocal() * max_norm.
  at::Tensor clip_coef = (total + 1e-6).reciprocal() * max_norm;
  at::Tensor clamped = at::clamp(clip_coef, std::nullopt, 1.0);
  for (auto& g : grads) g.mul_(clamped.to(g.device()));
}

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, const AllReduceSum& all_reduce) {
  double norm = total_grad_norm(params, all_reduce);
  clip_grads_with_norm(params, max_norm, norm);
  return norm;
}

OptimizerStepResult optimizer_step(AdamW& opt, double clip_grad, const AllReduceSum& all_reduce) {
  OptimizerStepResult r;
  // clip_grad 0: no clipping (HF Trainer's max_grad_norm = 0); torch would zero every gradient.
  r.grad_norm = clip_grad > 0 ? clip_grad_norm(opt.params(), clip_grad, all_reduce)
                              : total_grad_norm(opt.params(), all_reduce);
  if (!std::isfinite(r.grad_norm)) {
    opt.zero_grad(/*set_to_none=*/true);
    r.stepped = false;
  } else {
    opt.step();
    r.stepped = true;
  }
  return r;
}

int64_t resolve_warmup_steps(const LrScheduleOptions& o) {
  if (o.lr_warmup_steps > 0) return o.lr_warmup_steps;
  // int(ratio * total): Python truncates toward zero.
  return static_cast<int64_t>(o.lr_warmup_steps_ratio * static_cast<double>(o.total_training_steps));
}

double lr_multiplier(const LrScheduleOptions& o, int64_t w, int64_t step) {
  const std::string& t = o.lr_scheduler_type;
  auto pymax = [](double a, double b) { return b > a ? b : a; };
  if (t == "constant") {
    if (step < w) return static_cast<double>(step) / pymax(1.0, static_cast<double>(w));
    return 1.0;
  }
  const double m = o.min_lr_ratio, init = o.init_lr_ratio;
  const int64_t total = o.total_training_steps;
  if (t == "cosine") {
    const double coef = (1 - m) * 0.5, intercept = (1 + m) * 0.5;
    if (!o.zero_indexed_step) step += 1;
    if (step < w) return init + (1.0 - init) * (static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, w)));
    const double progress = static_cast<double>(step - w) / static_cast<double>(std::max<int64_t>(1, total - w));
    const double x = std::cos(M_PI * o.num_cycles * 2.0 * progress);
    return pymax(m, x * coef + intercept);
  }
  if (t == "linear") {
    if (step < w) return init + (1.0 - init) * (static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, w)));
    const double r = static_cast<double>(total - step) / static_cast<double>(std::max<int64_t>(1, total - w));
    return pymax(m, m + (1 - m) * r);
  }
  fail("lr_scheduler_type: unknown value '", t, "' (expected constant, cosine or linear)");
}

LrScheduler::LrScheduler(double base_lr, LrScheduleOptions o) : o_(std::move(o)), base_lr_(base_lr) {
  const auto& t = o_.lr_scheduler_type;
  if (t != "constant" && t != "cosine" && t != "linear")
    fail("lr_scheduler_type: unknown value '", t, "' (expected constant, cosine or linear)");
  if (!(o_.min_lr_ratio >= 0 && o_.min_lr_ratio <= 1)) fail("min_lr_ratio must be in [0, 1], got ", o_.min_lr_ratio);
  if (!(o_.init_lr_ratio >= 0 && o_.init_lr_ratio <= 1)) fail("init_lr_ratio must be in [0, 1], got ", o_.init_lr_ratio);
  if (t != "constant" && o_.total_training_steps <= 0)
    fail("lr_scheduler_type ", t, " needs total_training_steps > 0, got ", o_.total_training_steps);
  warmup_ = resolve_warmup_steps(o_);
  last_epoch_ = 0;
  lr_ = base_lr_ * lr_multiplier(o_, warmup_, last_epoch_);
}

double LrScheduler::step() {
  ++last_epoch_;
  lr_ = base_lr_ * lr_multiplier(o_, warmup_, last_epoch_);
  return lr_;
}

std::map<std::string, at::Tensor> LrScheduler::state_dict() const {
  return {{"last_epoch", at::scalar_tensor(last_epoch_, at::TensorOptions().dtype(at::kLong))},
          {"base_lr", at::scalar_tensor(base_lr_, at::TensorOptions().dtype(at::kDouble))}};
}

void LrScheduler::load_state_dict(const std::map<std::string, at::Tensor>& sd) {
  for (const char* k : {"last_epoch", "base_lr"})
    if (!sd.count(k)) fail("LR scheduler state: '", k, "' is missing");
  for (const auto& [k, v] : sd)
    if (k != "last_epoch" && k != "base_lr") fail("LR scheduler state: unexpected key '", k, "'");
  last_epoch_ = sd.at("last_epoch").item<int64_t>();
  base_lr_ = sd.at("base_lr").item<double>();
  lr_ = base_lr_ * lr_multiplier(o_, warmup_, last_epoch_);
}

}  // namespace verl
