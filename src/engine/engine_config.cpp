// engine_config.cpp — validate() of an EngineConfig (see engine_config.h).
#include "engine/engine_config.h"

#include <cmath>

#include "core/error.h"

namespace verl {

namespace {

void finite_at_least(const char* name, double v, double lo, const char* what = "") {
  if (!std::isfinite(v) || v < lo) fail(name, " must be a finite number >= ", lo, what, ", got ", v);
}

void in_unit_interval(const char* name, double v, bool upper_open) {
  if (!(v >= 0 && (upper_open ? v < 1 : v <= 1)))
    fail(name, " must be in [0, 1", upper_open ? ")" : "]", ", got ", v);
}

void validate_optimizer(const EngineConfig& c) {
  finite_at_least("lr", c.adamw.lr, 0);
  finite_at_least("weight_decay", c.adamw.weight_decay, 0);
  if (!std::isfinite(c.adamw.eps) || c.adamw.eps <= 0) fail("eps must be a finite number > 0, got ", c.adamw.eps);
  in_unit_interval("betas[0]", c.adamw.beta1, true);
  in_unit_interval("betas[1]", c.adamw.beta2, true);
  finite_at_least("grad_clip", c.grad_clip, 0, " (0: no clipping)");
  const LrScheduleOptions& s = c.lr_schedule;
  const std::string& t = s.lr_scheduler_type;
  if (t != "constant" && t != "cosine" && t != "linear")
    fail("lr_scheduler_type must be constant, cosine or linear, got '", t, "'");
  if (t != "constant" && s.total_training_steps <= 0)
    fail("lr_scheduler_type ", t, " needs total_training_steps > 0, got ", s.total_training_steps);
  in_unit_interval("lr_warmup_steps_ratio", s.lr_warmup_steps_ratio, false);
  in_unit_interval("min_lr_ratio", s.min_lr_ratio, false);
  finite_at_least("num_cycles", s.num_cycles, 0);
}

}  // namespace

void check_basic_modules(const ModelConfig& m, const std::vector<std::string>& names) {
  // transformers' decoder-layer class of the family: Qwen3MoeForCausalLM -> Qwen3MoeDecoderLayer
  std::string layer;
  for (const char* head : {"ForCausalLM", "ForTokenClassification", "ForSequenceClassification"}) {
    const std::string h = head;
    if (m.architecture.size() > h.size() && m.architecture.compare(m.architecture.size() - h.size(), h.size(), h) == 0)
      layer = m.architecture.substr(0, m.architecture.size() - h.size()) + "DecoderLayer";
  }
  for (const auto& n : names) {
    if (!layer.empty() && n == layer) continue;
    fail("FSDP wrap unit '", n, "' (basic_modules / wrap_policy.transformer_layer_cls_to_wrap) is not implemented: "
         "the units are each decoder layer (",
         layer.empty() ? m.architecture + "'s" : layer,
         "), a sparse layer's experts under expert parallelism, and the root (embedding, final norm, head)");
  }
}

void check_param_dtype(const std::string& d) {
  if (d == "fp16" || d == "float16")
    fail("param_dtype ", d, " is not implemented: use fp32, or bf16 (mixed precision with fp32 master weights)");
  if (d != "fp32" && d != "float32" && d != "bf16" && d != "bfloat16")
    fail("param_dtype must be fp32 or bf16, got '", d, "'");
}

void validate(const EngineConfig& c, int world_size) {
  if (c.model_path.empty()) fail("model_path is empty (the model's local HF folder)");
  check_param_dtype(c.param_dtype);
  const int f = c.fsdp.fsdp_size;
  if (f != -1 && (f < 1 || f > world_size || world_size % f != 0))
    fail("fsdp_size = ", f, ": must be -1 (shard over all ranks) or a divisor of the world size (", world_size,
         world_size == 1 ? " rank)" : " ranks)");
  const int ep = c.fsdp.expert_parallel_size;
  if (ep < 1 || world_size % ep != 0)
    fail("expert_parallel_size = ", ep, ": must be >= 1 and divide the world size (", world_size,
         world_size == 1 ? " rank)" : " ranks)");
  if (ep > 1 && f != -1 && f != world_size)
    fail("expert_parallel_size = ", ep, " with fsdp_size = ", f, " (hybrid sharding) is not supported");
  const int sp = c.ulysses_sequence_parallel_size;
  if (sp < 1 || world_size % sp != 0)
    fail("ulysses_sequence_parallel_size = ", sp, ": must be >= 1 and divide the world size (", world_size,
         world_size == 1 ? " rank)" : " ranks)");
  if (c.micro_batch_size_per_gpu < 1)
    fail("micro_batch_size_per_gpu must be >= 1, got ", c.micro_batch_size_per_gpu);
  if (c.use_dynamic_bsz && c.max_token_len_per_gpu < 1)
    fail("max_token_len_per_gpu must be >= 1 with use_dynamic_bsz, got ", c.max_token_len_per_gpu);
  if (!std::isfinite(c.temperature) || c.temperature <= 0) fail("temperature must be a finite number > 0, got ", c.temperature);
  if (!c.forward_only) validate_optimizer(c);
}

}  // namespace verl
