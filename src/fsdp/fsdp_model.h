// fsdp_model.h — the transformer of model/ sharded FSDP-style from outside: one FlatUnit
// per decoder layer plus a root unit (embeddings, final norm, head). The model code stays
// single-device; this wrapper gathers a unit just before its forward, frees it after
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
#include "model/config.h"

namespace verl {

class Comm;

struct FsdpOptions {
  at::ScalarType compute_dtype = at::kFloat;  // bf16: mixed precision (fp32 master + fp32 grad reduction)
  bool reshard_after_forward = true;
  bool gradient_checkpointing = false;
  bool forward_prefetch = false;  // accepted: collectives are blocking here, so it changes nothing yet
  int fsdp_size = -1;             // < world: hybrid sharding (shard inside groups of fsdp_size)
};

// What the head needs during forward: valid only inside the callback of forward().
struct HeadParams {
  at::Tensor lm_head;            // [vocab, hidden] (the embedding when tied); undefined for value models
  at::Tensor score_w, score_b;   // value head
};

class FsdpModel {
 public:
  // Builds the units and loads this rank's shards from a local HF folder.
  FsdpModel(const std::string& config_dir, const std::string& weights_dir, Comm& world, const FsdpOptions& opt);
  ~FsdpModel();

  const ModelConfig& config() const { return cfg_; }
  const FsdpOptions& options() const { return opt_; }
  Comm& shard_comm() { return *shard_; }
  std::vector<FlatUnit*> units();

  // Forward over one packed row; `head` turns the final hidden states into whatever the
  // caller needs (log-probs, values, a loss) while the root unit's parameters are present.
  // With grad mode on, calling backward on (a function of) the result reduce-scatters every
  // unit's gradient into its shard; without, every unit is resharded before returning.
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& position_ids, const std::vector<int64_t>& cu_seqlens,
                     const std::function<at::Tensor(const at::Tensor& hidden, const HeadParams& head)>& head);

  void zero_grad();
  // Every parameter as a full fp32 tensor, one at a time, in HF names (a collective).
  void for_each_param(const std::function<void(const std::string& name, const at::Tensor& full)>& fn);
  int64_t num_parameters() const;

 private:
  ModelConfig cfg_;
  FsdpOptions opt_;
  std::unique_ptr<Comm> shard_, replicate_;
  std::unique_ptr<FlatUnit> root_;
  std::vector<std::unique_ptr<FlatUnit>> layers_;
  at::Tensor inv_freq_;
};

}  // namespace verl
