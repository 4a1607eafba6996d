// fsdp_engine.cpp — the engine over the FSDP-sharded model (see fsdp_engine.h).
//
// Checkpoints (save_checkpoint / load_checkpoint) are in checkpoint.cpp.
#include "engine/fsdp_engine.h"
#include "engine/engine_config.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>

#include "dist/comm.h"
#include "engine/forward_step.h"
#include "core/error.h"
#include "io/file.h"
#include "model/moe.h"

namespace verl {

namespace fs = std::filesystem;

at::Tensor pad_jagged(const at::Tensor& flat, const std::vector<int64_t>& cu, int64_t tmax) {
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  std::vector<at::Tensor> rows;
  rows.reserve(B);
  for (int64_t i = 0; i < B; ++i) {
    at::Tensor r = flat.narrow(0, cu[i], cu[i + 1] - cu[i]);
    rows.push_back(at::constant_pad_nd(r, {0, tmax - r.size(0)}));
  }
  return at::stack(rows);
}

namespace {

// oneDNN (bf16 matmuls on the CPU) keeps a compiled primitive per distinct shape, in two
// caches of 1024 entries (its own and ideep's, LRU_CACHE_CAPACITY). Packed sequences give a
// new row count almost every micro-batch, so in bf16 the process grew by ~60 MB a step
// (measured: heap in use 1134 -> 1434 MiB over 6 steps of bench/train), towards about a GB.
// 128 entries hold every shape of a micro-batch's forward and backward, so the hits that
// matter stay. Set before the first bf16 matmul; a value the user set wins.
void bound_onednn_caches() {
  ::setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128", /*overwrite=*/0);
  ::setenv("LRU_CACHE_CAPACITY", "128", 0);
}

}  // namespace

FsdpEngine::FsdpEngine(const EngineConfig& cfg, Comm& world) : FsdpEngine(cfg, world, UlyssesGroups{}) {}

FsdpEngine::FsdpEngine(const EngineConfig& cfg, Comm& world, UlyssesGroups groups) : cfg_(cfg), world_(world) {
  validate(cfg, world.size());
  bound_onednn_caches();
  FsdpOptions fo = cfg.fsdp;
  fo.compute_dtype = parse_engine_dtype(cfg.param_dtype);
  fo.device = parse_engine_device(cfg.device);
  const std::string cfg_dir = cfg.hf_config_path.empty() ? cfg.model_path : cfg.hf_config_path;
  if (!cfg.basic_modules.empty()) check_basic_modules(load_model_config(cfg_dir), cfg.basic_modules);
  if (cfg.ulysses_sequence_parallel_size > 1) {
    check_ulysses(load_model_config(cfg_dir), cfg.ulysses_sequence_parallel_size);
    if (groups.sp || groups.dp) {
      check_ulysses_groups(world, cfg.ulysses_sequence_parallel_size, groups);
      groups_ = std::move(groups);
    } else {
      groups_ = make_ulysses_groups(world, cfg.ulysses_sequence_parallel_size);
    }
    ulysses_ = std::make_unique<Ulysses>(*groups_.sp);
  } else {
    check_ulysses_groups(world, cfg.ulysses_sequence_parallel_size, groups);  // refuses groups at sp = 1
  }
  model_ = std::make_unique<FsdpModel>(cfg_dir, cfg.model_path, world, fo);
  if (!cfg.forward_only) {
    std::vector<at::Tensor> params;
    std::vector<std::string> names;
    for (FlatUnit* u : model_->trainable_units()) {  // a frozen vision tower has no optimizer state
      params.push_back(u->shard());
      names.push_back(u->name());
    }
    opt_ = std::make_unique<AdamW>(params, cfg.adamw, names);
    opt_->reserve_state();
    sched_ = std::make_unique<LrScheduler>(cfg.adamw.lr, cfg.lr_schedule);
    opt_->set_lr(sched_->lr());
  }
}

FsdpEngine::~FsdpEngine() = default;

int FsdpEngine::dp_size() const { return world_.size() / sp_size(); }
int FsdpEngine::dp_rank() const { return world_.rank() / sp_size(); }

double FsdpEngine::lr() const { return opt_ ? opt_->lr() : 0.0; }

TokenOutputs FsdpEngine::forward(const ModelInputs& in, bool needs_entropy) {
  return model_forward(model_->arch(), *model_, in, needs_entropy);
}

StepMetrics FsdpEngine::forward_backward_batch(const Batch& batch, const LossFn& loss, bool forward_only,
                                               bool needs_entropy) {
  if (!forward_only && !opt_) fail("this engine was built forward_only: it cannot run backward");
  auto seq = batch.sequences.find("input_ids");
  if (seq == batch.sequences.end()) fail("batch: no 'input_ids' sequences");
  const std::vector<int64_t> lens = seq->second.lengths();
  const int B = static_cast<int>(lens.size());

  // Global normalisation: loss tokens, sequences and all tokens of the whole batch (all dp ranks;
  // the ranks of an sp group hold the same data, so the sum runs over the dp group). All tokens
  // weigh the MoE load-balancing loss below.
  double stats[3] = {0, static_cast<double>(B), 0};
  for (auto l : lens) stats[2] += static_cast<double>(l);
  if (auto m = batch.sequences.find("loss_mask"); m != batch.sequences.end())
    stats[0] = m->second.values.to(at::kDouble).sum().item<double>();
  else
    stats[0] = stats[2];
  (groups_.dp ? *groups_.dp : world_).all_reduce(stats, 3, DType::F64, ReduceOp::Sum);
  GlobalBatchInfo g;
  g.dp_size = dp_size();
  g.batch_num_tokens = stats[0];
  g.global_batch_size = stats[1];

  const Partitions parts = plan_micro_batches(lens, micro_batching());

  StepMetrics sm;
  sm.num_micro_batches = static_cast<int>(parts.size());
  if (!ulysses_ || ulysses_->rank() == 0)
    for (auto l : lens) sm.tokens += l;
  const bool grad = !forward_only && training_;
  at::AutoGradMode mode(grad);
  // MoE load-balancing loss (model/moe.h), when config.json asks (output_router_logits): each
  // micro-batch's aux × router_aux_loss_coef, weighted by its share of the batch's tokens (× dp,
  // as the main loss: gradients are averaged over dp), i.e. transformers' lm_loss + coef · aux
  // for a batch of one micro-batch on one rank.
  const ModelConfig& mc = model_->config();
  const bool aux_on = mc.num_experts > 0 && mc.output_router_logits;
  if (aux_on && ulysses_)
    fail("output_router_logits (the MoE load-balancing loss) is not supported with ulysses_sequence_parallel_size > 1");
  const double batch_tokens = stats[2];
  for (const auto& idx : parts) {
    const Batch micro = model_->device().is_cpu() ? batch.select(idx) : batch.select(idx).to(model_->device());
    ModelInputs in = prepare_model_inputs(micro, cfg_.temperature, ulysses_.get());
    MoeAux aux;
    double aux_weight = 0;
    if (aux_on) {
      aux_weight = static_cast<double>(in.total_nnz) / batch_tokens * dp_size();
      aux.grad_scale = mc.router_aux_loss_coef * aux_weight;
      in.moe = &aux;
    }
    MicroOutputs out;
    static_cast<TokenOutputs&>(out) = forward(in, needs_entropy);
    aux.counting = false;  // a recomputed forward (gradient checkpointing) must not count again
    out.cu_seqlens = in.cu_seqlens;
    const LossResult lr = loss(micro, out, g);
    if (grad && lr.loss.defined() && lr.loss.requires_grad()) torch::autograd::backward({lr.loss});
    double aux_term = 0;
    if (aux_on) {
      aux_term = mc.router_aux_loss_coef * aux.value() * aux_weight;
      sm.metrics["moe_aux_loss"] += aux.value() * aux_weight;
    }
    if (lr.loss.defined()) sm.metrics["loss"] += lr.loss.item<double>() + aux_term;
    for (const auto& [k, v] : lr.metrics) sm.metrics[k] += v;
  }
  return sm;
}

MicroBatchOptions FsdpEngine::micro_batching() {
  MicroBatchOptions o;
  o.micro_batch_size = std::max(1, cfg_.micro_batch_size_per_gpu);
  if (cfg_.use_dynamic_bsz) {
    o.max_token_len = cfg_.max_token_len_per_gpu * sp_size();  // verl: max_token_len_per_gpu × sp
    o.dp_max = [this](std::vector<int64_t>& v) {
      if (!v.empty()) world_.all_reduce(v.data(), v.size(), DType::I64, ReduceOp::Max);
    };
  }
  return o;
}

FsdpEngine::TrainStepResult FsdpEngine::train_batch(const Batch& batch, const LossFn& loss, bool needs_entropy) {
  TrainStepResult r;
  r.metrics = forward_backward_batch(batch, loss, false, needs_entropy);
  r.opt = optimizer_step();
  r.lr = lr();
  lr_scheduler_step();
  return r;
}

SampleOutputs FsdpEngine::infer_batch(const Batch& batch, bool calculate_entropy) {
  at::NoGradGuard no_grad;
  InferOptions o;
  o.calculate_entropy = calculate_entropy;
  o.temperature = cfg_.temperature;
  o.micro = micro_batching();
  o.ulysses = ulysses_.get();
  return verl::infer_batch([&](const ModelInputs& in) { return forward(in, calculate_entropy); }, batch, o);
}

void FsdpEngine::to(const std::string& device, bool model, bool optimizer) {
  const c10::Device d = parse_engine_device(device);
  const c10::Device home = parse_engine_device(cfg_.device);
  if (d != home && !d.is_cpu())
    fail("engine.to('", device, "'): this engine was built on ", home.str(), "; it moves between there and cpu only");
  if (model) model_->to(d);
  if (optimizer && opt_) opt_->to(d);
}

OptimizerStepResult FsdpEngine::optimizer_step() {
  if (!opt_) fail("this engine was built forward_only: no optimizer");
  // The optimizer reads (and clipping scales) the reduced gradients in place; they are zeroed
  // right after the step, so no copy is needed.
  for (FlatUnit* u : model_->units()) u->shard().mutable_grad() = u->grad();
  Comm& sc = model_->shard_comm();
  OptimizerStepResult r = verl::optimizer_step(*opt_, cfg_.grad_clip, [&sc](double* d, int64_t n) {
    sc.all_reduce(d, static_cast<size_t>(n), DType::F64, ReduceOp::Sum);
  });
  model_->zero_grad();
  opt_->zero_grad(true);
  return r;
}

void FsdpEngine::zero_grad() {
  model_->zero_grad();
  if (opt_) opt_->zero_grad(true);
}

double FsdpEngine::lr_scheduler_step() {
  if (!sched_) fail("this engine was built forward_only: no LR scheduler");
  const double lr = sched_->step();
  opt_->set_lr(lr);
  return lr;
}

void FsdpEngine::get_per_tensor_param(const std::function<void(const std::string&, const at::Tensor&)>& fn) {
  model_->for_each_param(fn);
}

}  // namespace verl
