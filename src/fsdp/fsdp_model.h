// fsdp_model.h — the transformer of model/ sharded FSDP-style from outside: one FlatUnit
// per decoder layer plus a root unit (embeddings, final norm, head). The model code stays
// single-device and this class owns no forward: it is the ParamProvider of the model's one
// forward (model/transformer.h): it gathers a unit just before its forward, frees it after
// (reshard_after_forward), gathers it again in backward and reduce-scatters its gradient as
// soon as the unit's backward is done — through two identity autograd functions around each
// unit (see fsdp_model.cpp). Optional per-unit gradient checkpointing recomputes a layer's
// forward in its backward (reentrant).
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fsdp/flat_unit.h"
#include "model/moe.h"
#include "model/transformer.h"

namespace verl {

class Comm;
struct VisionBlock;

struct FsdpOptions {
  at::ScalarType compute_dtype = at::kFloat;  // bf16: mixed precision (fp32 master + fp32 grad reduction)
  // Where shards, gradients, optimizer state and activations live: the CPU or one CUDA device.
  c10::Device device = c10::Device(c10::kCPU);
  bool reshard_after_forward = true;
  bool gradient_checkpointing = false;
  bool forward_prefetch = false;  // accepted: collectives are blocking here, so it changes nothing yet
  int fsdp_size = -1;             // < world: hybrid sharding (shard inside groups of fsdp_size)
  // MoE: the experts of each sparse layer split over groups of this many consecutive ranks and
  // FSDP-sharded inside their expert-data group (fsdp/expert_parallel.h); a divisor of the
  // world and of num_experts, without hybrid sharding.
  int expert_parallel_size = 1;
  // Vision-language models: the vision tower's units get no gradient and no optimizer state
  // (verl's freeze_vision_tower).
  bool freeze_vision = false;
};

class FsdpModel : public ParamProvider {
 public:
  // Builds the units and loads this rank's shards from a local HF folder.
  FsdpModel(const std::string& config_dir, const std::string& weights_dir, Comm& world, const FsdpOptions& opt);
  ~FsdpModel() override;

  const ModelConfig& config() const { return arch_.config(); }
  const Transformer& arch() const { return arch_; }
  const FsdpOptions& options() const { return opt_; }
  Comm& shard_comm() { return *shard_; }
  c10::Device device() const { return opt_.device; }
  // Every unit's shard and gradient to `d` (the forward then computes there).
  void to(c10::Device d);
  std::vector<FlatUnit*> units();
  // The units the optimizer steps (all but a frozen vision tower's).
  std::vector<FlatUnit*> trainable_units();

  // The model's forward over one packed row with this rank's sharded parameters. With grad
  // mode on, calling backward on (a function of) the outputs reduce-scatters every unit's
  // gradient into its shard; without, every unit is resharded before returning.
  TokenOutputs forward(const PackedRow& row, bool with_entropy) { return arch_.forward(*this, row, with_entropy); }

  // ParamProvider: the root unit gathered (kept until its backward in training), each layer
  // gathered just before its forward, with the backward hooks of fsdp_model.cpp.
  RootParams root() override;
  at::Tensor run_layer(const Transformer& model, int i, const at::Tensor& h, const LayerContext& ctx) override;
  void end_forward() override;
  // Vision-language models: the tower's units (one for the patch embedding and merger, one per
  // block), gathered and hooked as the layers' (without gradient when frozen).
  VisionRootParams vision_root() override;
  at::Tensor run_vision_block(const VisionTower& tower, int i, const at::Tensor& h, const VisionContext& ctx) override;
  void end_vision() override;

  // Every unit of the checkpoint's unit table, this rank's or not: under expert parallelism
  // every expert group's unit of each sparse layer ("layer<i>.experts<j>"), with the world
  // ranks that hold its shards in order (`ranks`; empty: the shard group of ranks 0..N-1).
  struct UnitInfo {
    std::string name;
    int64_t numel = 0, shard_numel = 0;
    std::vector<FlatParam> params;
    std::vector<int> ranks;
  };
  std::vector<UnitInfo> unit_table() const;
  static std::string expert_unit_name(int layer, int ep_rank);
  int expert_parallel_size() const { return ep_ ? ep_->size() : 1; }

  // For the autograd functions of fsdp_model.cpp: gather / free a layer's units (its experts'
  // too), and its parameters from the gathered units (`anchor`: through UnshardFn).
  void unshard_layer(int i);
  void reshard_layer(int i);
  DecoderLayer layer_params_of(int i, const at::Tensor* anchor);
  // The same for block i of the vision tower (its unit must be gathered).
  VisionBlock vision_block_params_of(int i, const at::Tensor* anchor);
  FlatUnit* vision_block_unit(int i) { return vision_.at(i + 1).get(); }

  void zero_grad();
  // Every parameter as a full fp32 tensor, one at a time, in HF names (a collective).
  void for_each_param(const std::function<void(const std::string& name, const at::Tensor& full)>& fn);
  // The same in groups, one gathered unit at a time (verl's get_per_tensor_param generator): group 0
  // is the root, 1..L the layers, then the V units of a vision tower, then L groups: each layer's
  // expert unit under expert parallelism (every expert of the layer, gathered over the ep group;
  // empty for dense layers and at ep = 1). A collective: every rank calls it for the same groups in
  // the same order.
  int num_param_groups() const { return 1 + 2 * static_cast<int>(layers_.size()) + static_cast<int>(vision_.size()); }
  void for_each_param_in_group(int g, const std::function<void(const std::string& name, const at::Tensor& full)>& fn);
  int64_t num_parameters() const;

 private:
  Transformer arch_;
  FsdpOptions opt_;
  std::unique_ptr<Comm> shard_, replicate_;
  std::unique_ptr<FlatUnit> root_;
  std::vector<std::unique_ptr<FlatUnit>> layers_;
  // Expert parallelism: the ep and expert-data groups, and per layer this rank's expert unit
  // (null for dense layers and at ep = 1, where the experts stay in the layer's unit).
  std::unique_ptr<Comm> ep_comm_, edp_comm_;
  std::unique_ptr<ExpertParallel> ep_;
  std::vector<std::unique_ptr<FlatUnit>> experts_;
  std::vector<std::unique_ptr<FlatUnit>> vision_;  // vision-language: the tower's root, then its blocks
  bool vision_grad() const;
  std::vector<SlotView> gathered(FlatUnit* u);  // the unit's slots, through UnshardFn in grad mode
  // The flat layout of expert group `ep_rank`'s unit of a sparse layer (its own experts).
  std::vector<FlatParam> expert_layout(int layer, int ep_rank) const;
};

}  // namespace verl
