// flat_unit.h — one FSDP unit (a decoder layer, or the root: embeddings, final norm, head):
// its parameters flattened into one buffer padded to a multiple of the shard-group size N;
// rank r owns elements [r·S, (r+1)·S) as an fp32 master shard with an fp32 gradient.
//
// unshard() all-gathers the shards (cast to the compute dtype first, as FSDP2's mixed
// precision does) into the full buffer, whose storage is freed again by reshard() — the
// parameter views handed to the model keep pointing at the same storage object, so tensors
// that autograd saved during forward see the data again once backward re-gathers it.
// reduce_grad() reduce-scatters the full gradient (mean over the shard group, then over
// replica groups for hybrid sharding) and accumulates this rank's slice.
// Every buffer lives on the unit's device (the CPU, or a CUDA device: shards, gradients and
// the gathered parameters on the GPU, collectives through fsdp/tensor_comm.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/weights.h"

namespace verl {

class Comm;

class FlatUnit {
 public:
  // `specs`: the unit's parameters in flat order. `shard` groups ranks that split the unit; `replicate` (may be null) groups ranks that
  // hold the same shard (hybrid sharding: gradients are averaged across it).
  FlatUnit(std::string name, const std::vector<WeightSpec>& specs, Comm* shard, Comm* replicate, at::ScalarType compute_dtype,
           c10::Device device = c10::Device(c10::kCPU));

  const std::string& name() const { return name_; }
  c10::Device device() const { return device_; }
  // Moves the master shard and its gradient to `d` in place (the tensors keep their identity,
  // so the optimizer's handles follow: verl's offload_fsdp_model_to_cpu / load_fsdp_model_to_gpu).
  // The unit must be resharded.
  void to(c10::Device d);
  const std::vector<FlatParam>& params() const { return params_; }
  const FlatParam* find(const std::string& name) const;
  int64_t numel() const { return numel_; }        // unpadded
  int64_t padded_numel() const { return padded_; }
  int64_t shard_numel() const { return shard_; }  // S
  int64_t shard_begin() const;                    // this rank's first flat element

  at::Tensor& shard() { return shard_t_; }        // fp32 master [S]
  at::Tensor& grad() { return grad_t_; }          // fp32 [S]

  // Full parameters in the compute dtype, gathered from every shard (no-op if already).
  void unshard();
  // Frees the full buffer's memory (the storage object stays: views remain valid handles).
  void reshard();
  bool is_unsharded() const { return unsharded_; }
  // The full flat buffer [padded] (valid while unsharded); param_view() cuts parameters out.
  const at::Tensor& full() const { return full_; }

  // Accumulates this rank's slice of the mean (over every data-parallel rank) of the unit's
  // full gradient, given per parameter (`grads[i]` at flat offset `offsets[i]`; undefined: zero;
  // any floating dtype); releases `grads`. On the host the flat gradient is never built: the
  // reduce-scatter runs chunk by chunk over [ranks × chunk] gathered from the parameters'
  // gradients (the same sums, element by element), so a unit's backward holds ~12 MiB
  // instead of the full fp32 flat gradient and its reduced copy.
  void reduce_grad(std::vector<at::Tensor>& grads, const std::vector<int64_t>& offsets);
  // A factor on every reduced gradient (expert parallelism: 1 / ep, since an expert unit's
  // shard group holds W / ep ranks but its gradient sums the tokens of all W).
  void set_grad_scale(double s) { grad_scale_ = s; }
  void zero_grad();

  // The part of this rank's master shard that overlaps parameter p: its first element within
  // p (row-major) and the shard's view of it. False when they do not overlap.
  bool shard_part(const FlatParam& p, int64_t* first, at::Tensor* part);
  // The full fp32 flat buffer [padded] of the master shards, or of any fp32 [S] tensor laid
  // out like them (gradients, optimizer state): a collective over the shard group.
  at::Tensor gather_full_fp32() const { return gather(shard_t_); }
  at::Tensor gather(const at::Tensor& shard) const;

 private:
  std::string name_;
  std::vector<FlatParam> params_;
  Comm* comm_;
  Comm* replicate_;
  at::ScalarType dtype_;
  c10::Device device_;
  int64_t numel_ = 0, padded_ = 0, shard_ = 0;
  at::Tensor shard_t_, grad_t_, full_;
  bool unsharded_ = false;
  double grad_scale_ = 1.0;
};

}  // namespace verl
