// fsdp_engine.h — the model engine an RL trainer drives, as verl's FSDP engine behaves:
// a language-model (policy / SFT) or value-model engine over an FSDP-sharded transformer,
// with micro-batching (fixed or token-balanced), forward_backward_batch with a loss, AdamW on
// the local fp32 shards with global grad-norm clipping, the LR schedule, per-tensor export,
// and sharded checkpoints in verl's folder layout (merged by `verlcpp merge --backend fsdp`).
// With ulysses_sequence_parallel_size = sp > 1 the world splits into groups of sp consecutive
// ranks (verl's ("dp", "sp") mesh): the ranks of a group are given the same data, and each
// runs its slice of every micro-batch (fsdp/ulysses.h); FSDP still shards over the whole world.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "batch/batch.h"
#include "engine/engine_config.h"
#include "engine/forward_step.h"
#include "engine/losses.h"
#include "engine/optim.h"
#include "fsdp/fsdp_model.h"
#include "fsdp/ulysses.h"

namespace verl {

class Comm;
struct SaveTarget;  // engine/checkpoint.cpp

// Per-token outputs of one micro-batch's packed row (autograd-connected in training).
// log_probs [nnz] fp32: position t scores token t+1 (0 at a sequence's last token); entropy
// [nnz] (when asked); values [nnz] (value model).
struct MicroOutputs : TokenOutputs {
  std::vector<int64_t> cu_seqlens;
};

struct LossResult {
  at::Tensor loss;                         // scalar to back-propagate
  std::map<std::string, double> metrics;   // summed over micro-batches by the engine
};
// micro: the micro-batch (its sequences, aligned per-token data); g: global normalisation.
using LossFn = std::function<LossResult(const Batch& micro, const MicroOutputs& out, const GlobalBatchInfo& g)>;

struct StepMetrics {
  std::map<std::string, double> metrics;  // loss and the loss's metrics (summed over micro-batches)
  int64_t tokens = 0;                     // tokens of this rank's data (under sp: on the group's first rank, else 0)
  int num_micro_batches = 0;
};

class FsdpEngine {
 public:
  FsdpEngine(const EngineConfig& cfg, Comm& world);
  // With sequence-parallel groups the caller made (inside Python: verl's ("dp", "sp") device mesh
  // as torch.distributed groups); empty groups: made here by splitting `world`, as above.
  // FsdpEngine keeps them (check_ulysses_groups checks their layout).
  FsdpEngine(const EngineConfig& cfg, Comm& world, UlyssesGroups groups);
  ~FsdpEngine();

  const ModelConfig& model_config() const { return model_->config(); }
  FsdpModel& model() { return *model_; }
  bool is_value_model() const { return model_config().head == Head::TokenClassification; }
  Comm& world() { return world_; }
  // Data parallelism: world / sp groups; this rank's group index (the part of the data it is given).
  int dp_size() const;
  int dp_rank() const;
  int sp_size() const { return cfg_.ulysses_sequence_parallel_size; }
  // sp > 1: this rank's sequence-parallel exchange (null at sp = 1).
  const Ulysses* ulysses() const { return ulysses_.get(); }
  void train_mode() { training_ = true; }
  void eval_mode() { training_ = false; }

  // This rank's part of a global batch (sequence "input_ids" + aligned per-token data) →
  // micro-batches → forward (+ backward through `loss` unless forward_only). `needs_entropy`
  // asks the forward for entropy. Gradients accumulate until optimizer_step().
  StepMetrics forward_backward_batch(const Batch& batch, const LossFn& loss, bool forward_only, bool needs_entropy);
  // forward_backward_batch + optimizer_step + lr_scheduler_step (verl's train_batch).
  struct TrainStepResult {
    StepMetrics metrics;
    OptimizerStepResult opt;
    double lr = 0;  // the lr this step used
  };
  TrainStepResult train_batch(const Batch& batch, const LossFn& loss, bool needs_entropy);
  // Forward only: per-sample log-probs (+ entropy) or values, in the batch's sample order
  // (micro-batched as configured, fixed or token-balanced).
  SampleOutputs infer_batch(const Batch& batch, bool calculate_entropy);
  // verl's engine.to(device, model, optimizer): moves the model's shards and gradients and / or
  // the optimizer state between the host ("cpu") and the engine's device (offload and reload
  // around rollouts); the forward computes wherever the model is.
  void to(const std::string& device, bool model = true, bool optimizer = true);
  OptimizerStepResult optimizer_step();
  double lr_scheduler_step();
  double lr() const;
  int64_t global_step() const { return global_step_; }
  void set_global_step(int64_t s) { global_step_ = s; }

  // Every parameter as a full fp32 tensor, one at a time, with its HF name (a collective).
  void get_per_tensor_param(const std::function<void(const std::string&, const at::Tensor&)>& fn);

  // <dir>/global_step_N/<role>/ in verl's layout; written atomically (engine/checkpoint.cpp,
  // a collective). `extra` is stored in the extra state (data position etc.) and returned by
  // load_checkpoint, which checks every file's rank / world size / step record.
  void save_checkpoint(const std::string& dir, const std::string& role, int64_t step, int max_ckpt_to_keep,
                       const nlohmann::json& extra);
  // The same into exactly `folder`, with no latest-step file and no pruning: verl's
  // BaseEngine.save_checkpoint(local_path), where the trainer keeps those itself.
  void save_checkpoint_folder(const std::string& folder, int64_t step, const nlohmann::json& extra);
  // A folder written by either save (global_step_N/<role>, or any folder save_checkpoint_folder wrote).
  nlohmann::json load_checkpoint(const std::string& ckpt_dir);

  // One micro-batch's forward on its packed row (autograd-connected in grad mode): what verl's
  // forward_step runs before handing the outputs to a loss (the Python binding's path).
  TokenOutputs forward_micro(const ModelInputs& in, bool needs_entropy) { return forward(in, needs_entropy); }
  // Zeroes the accumulated (reduced) gradients, as optimizer.zero_grad() does.
  void zero_grad();

 private:
  EngineConfig cfg_;
  Comm& world_;
  std::unique_ptr<FsdpModel> model_;
  UlyssesGroups groups_;              // sp > 1: this rank's sp group and its dp group
  std::unique_ptr<Ulysses> ulysses_;  // sp > 1: the exchange over groups_.sp
  std::unique_ptr<AdamW> opt_;
  std::unique_ptr<LrScheduler> sched_;
  bool training_ = true;
  int64_t global_step_ = 0;
  MicroBatchOptions micro_batching();
  TokenOutputs forward(const ModelInputs& in, bool needs_entropy);
  void save(const SaveTarget& target, int max_ckpt_to_keep, const nlohmann::json& extra);
};

// Pads per-token data of a micro-batch into [B, Tmax] (and a [B, Tmax] mask of real tokens).
at::Tensor pad_jagged(const at::Tensor& flat, const std::vector<int64_t>& cu, int64_t tmax);

}  // namespace verl
