// moe.h — the sparse mixture-of-experts MLP of Qwen2-MoE, Qwen3-MoE and Mixtral, and
// transformers' auxiliary load-balancing loss, on the packed row of model/transformer.h.
// Routing is transformers' op for op (modeling_qwen2_moe.py, modeling_qwen3_moe.py,
// modeling_mixtral.py, 5.x): router logits in the compute dtype, softmax in fp32, top-k of the
// probabilities, renormalised over the k when norm_topk_prob (Mixtral: always); the Qwen
// families cast the k weights back to the compute dtype, Mixtral keeps fp32. The experts run as
// grouped work: the (token, choice) pairs are sorted by expert and each expert's two matmuls run
// once on its contiguous slice of the sorted tokens (experts with no token are skipped), then
// the weighted outputs are summed back per token (index_add). Under expert parallelism
// (DecoderLayer::ep) the sorted rows travel to their expert's rank and back through two
// all-to-alls, each rank's blocks padded to the largest count of the group (the counts per
// expert go first, so every rank knows the layout of what it receives).
//
// The load-balancing loss (transformers' load_balancing_loss_func over every sparse layer's
// router logits of one forward, a packed row having no padding):
//   aux = E · Σ_e (C_e / R) · (S_e / R)
// with R = tokens × sparse layers, C_e the (token, choice) pairs routed to expert e and S_e the
// sum of the router's softmax for e (softmax and top-k in the logits' dtype, as that function
// does). C is a constant, so d aux / d p[t, e] = E · C_e / R² — known once the whole forward has
// run. MoeAux collects C, S and R during the forward; each sparse layer then passes its output
// through an identity whose backward also sends grad_scale · E · C / R² into that layer's
// router probabilities (Megatron's MoEAuxLossAutoScaler pattern), so the loss needs no tensor
// of its own and works unchanged under activation recomputation (set counting = false before
// backward: the recomputed forward must not count again).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace verl {

struct ModelConfig;
struct DecoderLayer;

// Expert parallelism seen from the MoE layer (applied from outside: fsdp/expert_parallel.h
// implements it). The experts are split over size() ranks in order (rank j holds experts
// [j·E/size, (j+1)·E/size), the layer's expert slots hold only those); every rank routes its own
// tokens, sends each (token, choice) row to the rank of its expert and gets the result back.
class ExpertParallel {
 public:
  virtual ~ExpertParallel() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // Block j of `send` [size·m, ...] goes to rank j; returns [size·m, ...] with block i from
  // rank i (m equal on every rank). Differentiable (its own adjoint); any dtype.
  virtual at::Tensor all_to_all(const at::Tensor& send) const = 0;
  // The largest `v` over the group.
  virtual int64_t max(int64_t v) const = 0;
};

struct MoeAux {
  bool counting = true;     // the forward adds to counts / prob_sum / rows
  double grad_scale = 0.0;  // d(training loss) / d(aux); 0: no gradient
  at::Tensor counts;        // [E] fp64
  at::Tensor prob_sum;      // [E] fp64 (detached)
  int64_t rows = 0;
  // transformers' value of the loss for what was counted (0 when nothing was).
  double value() const;
};

// The sparse MLP over x [n, hidden] (already post-attention-normed). With `aux`, the
// load-balancing statistics are collected (and its gradient attached in grad mode).
at::Tensor moe_mlp(const ModelConfig& c, const DecoderLayer& l, const at::Tensor& x, MoeAux* aux);

}  // namespace verl
