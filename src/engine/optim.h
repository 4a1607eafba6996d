// optim.h — optimizer and learning-rate schedule of the engine: AdamW on this rank's local
// fp32 shards, bit-compatible with torch.optim.AdamW's single-tensor path; global gradient-norm
// clipping whose squared local norms are summed across ranks by a caller-supplied all-reduce
// (torch-only here, no MPI); verl's FSDPEngine.optimizer_step (skip + zero grads when the norm
// is not finite); verl's LR schedules (warmup, then constant / cosine / linear) as LambdaLR runs
// them. Optimizer and scheduler state are plain named tensors for checkpoints.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace verl {

// In-place sum over all data-parallel ranks of `count` doubles (MPI_Allreduce SUM, or the
// engine's Comm). Empty: a single process.
using AllReduceSum = std::function<void(double* data, int64_t count)>;

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // decoupled (AdamW); verl's and torch's default
};

class AdamW {
 public:
  struct ParamState {
    at::Tensor exp_avg, exp_avg_sq;  // like the parameter
    at::Tensor step;                 // float32 scalar on the host, as torch keeps it
  };

  // `params`: leaf tensors (local shards) whose .grad() holds the reduced gradient.
  // `names`: state_dict keys (default "0", "1", …); must be unique.
  explicit AdamW(std::vector<at::Tensor> params, AdamWOptions o = {}, std::vector<std::string> names = {});

  // Allocates the zero moments of every parameter now (not at its first step), so that this
  // long-lived state sits with the parameters and not among the first step's transient buffers
  // (glibc's heap cannot give such holes back: ~300 MiB per rank of the bf16 verl benchmark).
  // A parameter still has no state (state_dict) until its first step.
  void reserve_state();
  // torch.optim.AdamW.step(): a parameter without a gradient is skipped (and gets no state).
  void step();
  // torch.optim.Optimizer.zero_grad(set_to_none): drop (or zero) every parameter's gradient.
  void zero_grad(bool set_to_none = true);
  // Moves exp_avg / exp_avg_sq to `d` (verl's offload_fsdp_optimizer / load_fsdp_optimizer);
  // the step counters stay on the host.
  void to(c10::Device d);

  double lr() const { return o_.lr; }
  void set_lr(double lr) { o_.lr = lr; }
  const AdamWOptions& options() const { return o_; }
  const std::vector<at::Tensor>& params() const { return params_; }
  const std::vector<std::string>& names() const { return names_; }
  const std::vector<ParamState>& state() const { return state_; }

  // "<name>.exp_avg", "<name>.exp_avg_sq", "<name>.step" for every parameter that has state.
  // The tensors are the live state (no copies): save them before the next step.
  std::map<std::string, at::Tensor> state_dict() const;
  // Replaces all state; validates names and shapes (an Error names the key), copies the
  // values onto each parameter's device and dtype.
  void load_state_dict(const std::map<std::string, at::Tensor>& sd);

 private:
  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<ParamState> state_;
  AdamWOptions o_;
};

// ‖g‖₂ of all gradients of all ranks: this rank's norm as torch's clip_grad_norm_ computes it
// (per-tensor _foreach_norm, then the norm of the stacked norms, float32), squared, summed over
// ranks in double, square-rooted and rounded to float32. With one rank it equals torch's value
// bit for bit. Parameters without a gradient are ignored.
double total_grad_norm(const std::vector<at::Tensor>& params, const AllReduceSum& all_reduce = {});
// torch.nn.utils._clip_grads_with_norm_: grads *= min(max_norm / (total_norm + 1e-6), 1).
void clip_grads_with_norm(const std::vector<at::Tensor>& params, double max_norm, double total_norm);
// clip_grad_norm_: both; returns the total norm (before clipping).
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm, const AllReduceSum& all_reduce = {});

// verl's FSDPEngine.optimizer_step: clip to `clip_grad` (0: no clipping, as HF's Trainer; torch's
// clip_grad_norm_(max_norm=0) would zero every gradient); if the norm is not finite, zero the
// gradients (set to none) and skip the update (the optimizer's step count does not advance);
// else AdamW.step(). grad_norm is the norm before clipping (inf / nan when skipped).
struct OptimizerStepResult {
  double grad_norm = 0;
  bool stepped = false;
};
OptimizerStepResult optimizer_step(AdamW& opt, double clip_grad, const AllReduceSum& all_reduce = {});

// verl's LR schedule options (optim config names). Warmup steps: lr_warmup_steps when > 0,
// else int(lr_warmup_steps_ratio × total_training_steps) (FSDPEngine._build_lr_scheduler).
struct LrScheduleOptions {
  std::string lr_scheduler_type = "constant";  // constant | cosine | linear
  int64_t total_training_steps = -1;
  int64_t lr_warmup_steps = -1;
  double lr_warmup_steps_ratio = 0.0;
  double min_lr_ratio = 0.0;     // cosine, linear: floor of the decay (verl: None → 0)
  double num_cycles = 0.5;       // cosine
  bool zero_indexed_step = true; // cosine: false counts steps from 1 (torchtitan)
  double init_lr_ratio = 0.0;    // cosine, linear: warmup starts here (verl's default 0)
};
int64_t resolve_warmup_steps(const LrScheduleOptions& o);
// The LambdaLR multiplier at scheduler step `step` (0 at construction):
//   constant: get_constant_schedule_with_warmup; cosine: get_cosine_schedule_with_warmup;
//   linear: transformers' get_linear_schedule_with_warmup (warmup, then linear decay to 0 at
//   total_training_steps), floored at / decaying to min_lr_ratio:
//   max(m, m + (1 − m)·(total − step) / max(1, total − warmup)).
double lr_multiplier(const LrScheduleOptions& o, int64_t warmup_steps, int64_t step);

// torch.optim.lr_scheduler.LambdaLR around one of the multipliers: constructed at step 0 with
// lr = base_lr·λ(0); step() advances and returns the new lr (verl's lr_scheduler_step).
// Apply it with AdamW::set_lr(lr()) after construction and after each step().
class LrScheduler {
 public:
  LrScheduler(double base_lr, LrScheduleOptions o);
  double lr() const { return lr_; }
  double step();
  int64_t last_epoch() const { return last_epoch_; }
  int64_t warmup_steps() const { return warmup_; }
  double base_lr() const { return base_lr_; }
  const LrScheduleOptions& options() const { return o_; }

  // "last_epoch" (int64 scalar), "base_lr" (float64 scalar).
  std::map<std::string, at::Tensor> state_dict() const;
  void load_state_dict(const std::map<std::string, at::Tensor>& sd);

 private:
  LrScheduleOptions o_;
  double base_lr_;
  int64_t warmup_ = 0;
  int64_t last_epoch_ = 0;
  double lr_ = 0;
};

}  // namespace verl
