// moe.h — the sparse mixture-of-experts MLP of Qwen2-MoE, Qwen3-MoE and Mixtral, and
// transformers' auxiliary load-balancing loss, on the packed row of model/transformer.h.
// Routing is transformers' op for op (modeling_qwen2_moe.py, modeling_qwen3_moe.py,
// modeling_mixtral.py, 5.x): router logits in the compute dtype, softmax in fp32, top-k of the
// probabilities, renormalised over the k when norm_topk_prob (Mixtral: always); the Qwen
// families cast the k weights back to the compute dtype, Mixtral keeps fp32. The experts run as
// grouped work: the (token, choice) pairs are sorted by expert and each expert's two matmuls run
// once on its contiguous slice of the sorted tokens (experts with no token are skipped), then
// the weighted outputs are summed back per token (index_add).
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
