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
#include "model/transformer.h"

namespace verl {

class Comm;

struct FsdpOptions {
  at::ScalarType compute_dtype = at::kFloat;  // bf16: mixed precision (fp32 master + fp32 grad reduction)
  bool reshard_after_forward = true;
  bool gradient_checkpointing = false;
  bool forward_prefetch = false;  // accepted: collectives are blocking here, so it changes nothing yet
  int fsdp_size = -1;             // < world: hybrid sharding (shard inside groups of fsdp_size)
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
  std::vector<FlatUnit*> units();

  // The model's forward over one packed row with this rank's sharded parameters. With grad
  // mode on, calling backward on (a function of) the outputs reduce-scatters every unit's
  // gradient into its shard; without, every unit is resharded before returning.
  TokenOutputs forward(const PackedRow& row, bool with_entropy) { return arch_.forward(*this, row, with_entropy); }

  // ParamProvider: the root unit gathered (kept until its backward in training), each layer
  // gathered just before its forward, with the backward hooks of fsdp_model.cpp.
  RootParams root() override;
  at::Tensor run_layer(const Transformer& model, int i, const at::Tensor& h, const LayerContext& ctx) override;
  void end_forward() override;

  void zero_grad();
  // Every parameter as a full fp32 tensor, one at a time, in HF names (a collective).
  void for_each_param(const std::function<void(const std::string& name, const at::Tensor& full)>& fn);
  int64_t num_parameters() const;

 private:
  Transformer arch_;
  FsdpOptions opt_;
  std::unique_ptr<Comm> shard_, replicate_;
  std::unique_ptr<FlatUnit> root_;
  std::vector<std::unique_ptr<FlatUnit>> layers_;
  std::vector<SlotView> gathered(FlatUnit* u);  // the unit's slots, through UnshardFn in grad mode
};

}  // namespace verl
