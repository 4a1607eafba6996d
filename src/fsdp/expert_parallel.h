// expert_parallel.h — expert parallelism over a Comm (the ExpertParallel of model/moe.h) and
// the groups it needs. With ep ranks per expert group, a world of W ranks forms W / ep groups of
// ep consecutive ranks (VeOmni's ("ep_fsdp", "ep") mesh with ep innermost): the ranks of one
// group split every MoE layer's experts in order; the ranks with the same place in their group
// (the expert-data group, W / ep ranks) hold the same experts and FSDP-shard them among
// themselves. Everything else stays sharded over the whole world.
#pragma once
#include <memory>

#include "model/moe.h"

namespace verl {

class Comm;

struct ExpertGroups {
  std::unique_ptr<Comm> ep;    // ranks [g·ep, (g+1)·ep) of this rank's group g
  std::unique_ptr<Comm> data;  // the ranks with this rank's place in its group (one per group)
};
// A collective over `world`. One-line Error when ep does not divide the world.
ExpertGroups make_expert_groups(Comm& world, int ep);

class ExpertGroup final : public ExpertParallel {
 public:
  explicit ExpertGroup(Comm& ep) : comm_(ep) {}
  int size() const override;
  int rank() const override;
  at::Tensor all_to_all(const at::Tensor& send) const override;
  int64_t max(int64_t v) const override;

 private:
  Comm& comm_;
};

}  // namespace verl
