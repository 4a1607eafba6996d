// lm_head.h — the one output head of the engine: per-token log-probs of the labels and the
// entropy of the next-token distribution, at a per-token temperature, computed over row chunks
// so that the full [n, vocab] fp32 logits are never built — in training too: the autograd
// function keeps only the hidden states, the weight and per row the fp32 log-sum-exp (and
// Σ p·z with entropy), and recomputes the logits block by block in backward (as verl's
// chunked entropy / fused kernels do).
// Used by inference (`verlcpp logprob`, infer_batch), training (the losses' log_probs and
// entropy) and verl's entropy_from_logits (engine/losses).
#pragma once
#include <ATen/core/Tensor.h>

namespace verl {

struct HeadOutputs {
  at::Tensor log_probs;  // [n] fp32: log softmax(h·Wᵀ / T)[label]
  at::Tensor entropy;    // [n] fp32 (when asked): −Σ p log p of that distribution
};

// How the head is cut (0: automatic). Forward: row chunks of ~32 MB of fp32 logits (at least 32
// rows). Backward: row groups of up to 8192 rows, each swept over vocabulary blocks of ~32 MB of
// fp32 logits, so that a block's weight gradient is one GEMM over the whole group (written
// once, not accumulated per chunk) and only the small [rows, H] hidden gradient accumulates.
struct HeadBlocks {
  int64_t rows = 0;       // forward rows per chunk
  int64_t bwd_rows = 0;   // backward rows per group
  int64_t bwd_vocab = 0;  // backward vocabulary rows per block
};

// hidden [n, H] and weight [V, H] in the compute dtype, labels int64 [n], temperature fp32 [n]
// (> 0). Differentiable with respect to `hidden` and `weight` when grad mode is on.
HeadOutputs lm_head_log_probs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                              const at::Tensor& temperature, bool with_entropy, const HeadBlocks& blocks = {});

// The statistics of one chunk of fp32 logits z [c, V]: log-sum-exp [c] and the entropy [c]
// (lse − Σ softmax(z)·z), as verl_F.entropy_from_logits computes it.
at::Tensor logits_entropy(const at::Tensor& z, const at::Tensor& lse);

}  // namespace verl
