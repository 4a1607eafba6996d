// lm_head.h — the one output head of the engine: per-token log-probs of the labels and the
// entropy of the next-token distribution, at a per-token temperature, computed over row chunks
// so that the full [n, vocab] fp32 logits are never built — in training too: the autograd
// function keeps only the hidden states, the weight and one fp32 log-sum-exp per row, and
// recomputes each chunk's logits in backward (as verl's chunked entropy / fused kernels do).
// Used by inference (`verlcpp logprob`, infer_batch), training (the losses' log_probs and
// entropy) and verl's entropy_from_logits (engine/losses).
#pragma once
#include <ATen/core/Tensor.h>

namespace verl {

struct HeadOutputs {
  at::Tensor log_probs;  // [n] fp32: log softmax(h·Wᵀ / T)[label]
  at::Tensor entropy;    // [n] fp32 (when asked): −Σ p log p of that distribution
};

// hidden [n, H] and weight [V, H] in the compute dtype, labels int64 [n], temperature fp32 [n]
// (> 0). Differentiable with respect to `hidden` and `weight` when grad mode is on.
// `chunk_rows` = 0 picks ~32 MB of fp32 logits per chunk (at least 32 rows).
HeadOutputs lm_head_log_probs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              const at::Tensor& temperature, bool with_entropy, int64_t chunk_rows = 0);

// The statistics of one chunk of fp32 logits z [c, V]: log-sum-exp [c] and the entropy [c]
// (lse − Σ softmax(z)·z), as verl_F.entropy_from_logits computes it.
at::Tensor logits_entropy(const at::Tensor& z, const at::Tensor& lse);

}  // namespace verl
