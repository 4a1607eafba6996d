// ulysses.h — Ulysses sequence parallelism (DeepSpeed-Ulysses, as verl runs it:
// verl/utils/ulysses.py and the attention patch of verl/models/transformers/monkey_patch.py),
// applied to the single-device model from outside. The ranks of the world form groups of sp
// consecutive ranks (verl's ("dp", "sp") device mesh); each rank of a group holds a 1/sp slice
// of the packed row. Inside attention an all-to-all turns [s/sp, h, d] into [s, h/sp, d]
// (gather_seq_scatter_heads) and back (gather_heads_scatter_seq); outputs are all-gathered
// along the sequence and the pad dropped (gather_outputs_and_unpad). All three are autograd
// functions: the all-to-all's backward is the reverse all-to-all, the gather's backward takes
// this rank's slice scaled by sp (verl's grad_scaler, which makes FSDP's mean over the whole
// world the mean over the data-parallel groups).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>

#include "model/transformer.h"

namespace verl {

class Comm;

// verl's validate_ulysses_config and apply_monkey_patch assertions: num_heads divisible by sp,
// and num_kv_heads divisible by sp or dividing it (then kv heads are repeated). One-line Error.
void check_ulysses(const ModelConfig& c, int sp);

// The groups of a world for sequence parallelism sp (a collective over `world`): `sp` holds the
// ranks [g·sp, (g+1)·sp) of this rank's group g; `dp` holds the ranks with this rank's position
// in its group (one per group: data-parallel size world / sp). At sp = 1 both are null.
struct UlyssesGroups {
  std::unique_ptr<Comm> sp, dp;
};
UlyssesGroups make_ulysses_groups(Comm& world, int sp);
// Groups the caller made itself (inside Python: the "sp" and "dp" groups of verl's DeviceMesh,
// torch.distributed groups): checks they have the layout make_ulysses_groups makes (sizes, this
// rank's place in each, and every member's world rank: a collective over both). One-line Error.
void check_ulysses_groups(Comm& world, int sp, const UlyssesGroups& g);

class Ulysses final : public SeqParallelAttention {
 public:
  explicit Ulysses(Comm& group) : comm_(group) {}
  int size() const override;
  int rank() const;
  // q [s/sp, h, d], k / v [s/sp, kv, d] → [s, h/sp, d] and [s, kv'/sp, d], kv' = kv repeated
  // sp / kv times (repeat_interleave, as verl's repeat_kv) when kv < sp.
  void to_heads(at::Tensor& q, at::Tensor& k, at::Tensor& v) const override;
  // [s, h/sp, d] → [s/sp, h, d] (contiguous).
  at::Tensor to_sequence(const at::Tensor& out) const override;
  // This rank's slice [s/sp] of every rank's → the whole row with the last `pad` entries
  // dropped; backward: this rank's slice of the gradient × sp.
  at::Tensor gather_and_unpad(const at::Tensor& x, int64_t pad) const;
  // The plain all-to-all steps (autograd functions), for tests.
  at::Tensor gather_seq_scatter_heads(const at::Tensor& x) const;
  at::Tensor gather_heads_scatter_seq(const at::Tensor& x) const;

 private:
  Comm& comm_;
};

}  // namespace verl
