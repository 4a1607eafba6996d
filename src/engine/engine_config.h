// engine_config.h — what an FsdpEngine is built from (model folder, dtype, sharding,
// micro-batching, optimizer and LR schedule), and validate(): the checks every caller of the
// engine needs before any model work — the verlcpp CLI, and the Python binding that builds an
// engine from verl's FSDPEngineConfig. verl checks the same things in its config dataclasses
// (verl/workers/config/engine.py, optimizer.py) and in FSDPEngine.__init__.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "engine/optim.h"
#include "fsdp/fsdp_model.h"

namespace verl {

struct EngineConfig {
  std::string model_path;        // local HF folder (config, weights, tokenizer)
  std::string hf_config_path;    // default: model_path
  std::string param_dtype = "fp32";  // compute dtype: fp32 | bf16 (mixed precision, fp32 master)
  std::string device = "cpu";        // cpu | cuda | cuda:N (model/transformer.h parse_engine_device)
  FsdpOptions fsdp;
  bool forward_only = false;
  // micro-batching
  int micro_batch_size_per_gpu = 1;
  bool use_dynamic_bsz = false;
  int64_t max_token_len_per_gpu = 16384;
  // Ulysses sequence parallelism (fsdp/ulysses.h): groups of this many consecutive ranks share
  // each micro-batch, one slice of the packed row per rank; data parallelism is world / sp.
  int ulysses_sequence_parallel_size = 1;
  // optimizer + schedule
  AdamWOptions adamw;
  double grad_clip = 1.0;        // global gradient-norm clip; 0: no clipping (as HF's Trainer)
  LrScheduleOptions lr_schedule;
  double temperature = 1.0;
  // VeOmni's basic_modules: extra FSDP wrap units by class name, added to the model's own
  // no-split units. Only those classes are units here (see check_basic_modules).
  std::vector<std::string> basic_modules;
};

// Throws an Error naming the field (by its EngineConfig / verl name) and what was expected:
// param_dtype fp32 or bf16 (fp16 is not implemented), fsdp_size -1 or a divisor of
// `world_size`, micro_batch_size_per_gpu >= 1, max_token_len_per_gpu >= 1 with
// use_dynamic_bsz, ulysses_sequence_parallel_size >= 1 dividing `world_size`, grad_clip finite >= 0, lr finite >= 0, betas in [0, 1), eps > 0,
// weight_decay >= 0, the LR schedule's type and ratios, temperature > 0.
void validate(const EngineConfig& c, int world_size);
// basic_modules against the model (VeOmni takes the union with the model's _no_split_modules,
// transformers' decoder-layer class <Family>DecoderLayer; verl's FSDP2 wraps its
// wrap_policy.transformer_layer_cls_to_wrap instead): that class is already a unit (each decoder
// layer is one), so naming it changes nothing; any other class would be a unit inside a layer or
// the root, which this engine does not make: an Error naming it.
void check_basic_modules(const ModelConfig& model, const std::vector<std::string>& basic_modules);
// The param_dtype part of validate(): fp32 / float32 / bf16 / bfloat16; fp16 is refused as not implemented.
void check_param_dtype(const std::string& dtype);

}  // namespace verl
