// losses.h — the training losses of the engine, op for op as verl 0.9.1 computes them
// (verl/trainer/ppo/core_algos.py and the engine-era verl/workers/utils/losses.py): loss
// aggregation (agg_loss) with global-batch normalisation, SFT, vanilla PPO with dual clip,
// entropy bonus, KL penalties (incl. straight-through "+" variants), clipped value loss, GRPO
// outcome advantages. All tensors are padded [batch, response_len] like verl's; the same ATen
// ops in the same order, so values and gradients match verl's bit for bit on the same device.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace verl {

enum class LossAggMode { TokenMean, TokenSum, SeqMeanTokenSum, SeqMeanTokenMean, SeqMeanTokenSumNorm };
// "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm";
// anything else throws an Error naming the value.
LossAggMode parse_loss_agg_mode(const std::string& s);
const char* loss_agg_mode_name(LossAggMode m);

// verl's `global_batch_info`: how a micro-batch loss is normalised so that, summed over
// micro-batches and averaged over data-parallel ranks by the gradient reduction, it equals the
// loss of the whole global batch. Unset fields fall back to the micro-batch's own counts (only
// allowed with dp_size == 1, as in verl).
struct GlobalBatchInfo {
  int64_t dp_size = 1;
  std::optional<double> batch_num_tokens;   // loss tokens of the global batch (all-reduced over dp)
  std::optional<double> global_batch_size;  // sequences of the global batch (seq-mean-* modes)
  std::optional<double> loss_scale_factor;  // seq-mean-token-sum-norm divisor (default: mask width)
};

// verl_F.masked_sum / masked_mean (mask: bool or numeric; NaN outside the mask ignored by sum).
at::Tensor masked_sum(const at::Tensor& values, const at::Tensor& mask);
at::Tensor masked_mean(const at::Tensor& values, const at::Tensor& mask);

// core_algos.agg_loss: loss_mat, loss_mask [B, T] → scalar.
at::Tensor agg_loss(const at::Tensor& loss_mat, const at::Tensor& loss_mask, LossAggMode mode,
                    const GlobalBatchInfo& g = {});

// SFT (workers/utils/losses.sft_loss), no-padding layout: per-token log-probs of all sequences
// concatenated (log_prob[t] scores token t+1) and the loss mask likewise; the mask is rolled
// left by one over the whole flattened batch, as verl does. −Σ lp·mask / batch_num_tokens × dp.
at::Tensor sft_loss(const at::Tensor& log_prob_flat, const at::Tensor& loss_mask_flat,
                    double batch_num_tokens, int64_t dp_size = 1);
// Padded layout (verl's else-branch): log_prob and response_mask [B, T], no roll.
at::Tensor sft_loss_padded(const at::Tensor& log_prob, const at::Tensor& response_mask,
                           double batch_num_tokens, int64_t dp_size = 1);

// Vanilla PPO (core_algos.compute_policy_loss_vanilla) with dual clip.
struct PolicyLossConfig {
  double clip_ratio = 0.2;
  std::optional<double> clip_ratio_low, clip_ratio_high;  // unset: clip_ratio (verl's actor defaults: 0.2)
  double clip_ratio_c = 3.0;                               // must be > 1
};
struct PolicyLossOutput {
  at::Tensor loss;                 // scalar, with grad to log_prob
  double pg_clipfrac = 0;          // actor/pg_clipfrac
  double ppo_kl = 0;               // actor/ppo_kl
  double pg_clipfrac_lower = 0;    // actor/pg_clipfrac_lower
};
// rollout_is_weights: optional [B, T] importance weights multiplied into the per-token losses.
PolicyLossOutput compute_policy_loss_vanilla(const at::Tensor& old_log_prob, const at::Tensor& log_prob,
                                             const at::Tensor& advantages, const at::Tensor& response_mask,
                                             LossAggMode mode, const PolicyLossConfig& cfg,
                                             const GlobalBatchInfo& g = {},
                                             const at::Tensor& rollout_is_weights = {});

// verl_F.entropy_from_logits (the chunk statistic of the engine's one LM head, model/lm_head.h)
// and core_algos.compute_entropy_loss (micro-batch normalisation).
at::Tensor entropy_from_logits(const at::Tensor& logits);
at::Tensor compute_entropy_loss(const at::Tensor& logits, const at::Tensor& response_mask,
                                LossAggMode mode = LossAggMode::TokenMean);

// core_algos.kl_penalty: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3", each optionally
// with a "+" suffix (value of the estimator, gradient of k2: straight-through). Per token.
at::Tensor kl_penalty(const at::Tensor& logprob, const at::Tensor& ref_logprob, const std::string& type);
void check_kl_penalty_type(const std::string& type);  // throws an Error naming an unknown type

// core_algos.compute_value_loss: ½·agg(max((v−R)², (clip(v, v_old±c) − R)²)).
struct ValueLossOutput {
  at::Tensor loss;          // scalar, with grad to vpreds
  double vf_clipfrac = 0;   // critic/vf_clipfrac
};
ValueLossOutput compute_value_loss(const at::Tensor& vpreds, const at::Tensor& returns, const at::Tensor& values,
                                   const at::Tensor& response_mask, double cliprange_value,
                                   LossAggMode mode = LossAggMode::TokenMean, const GlobalBatchInfo& g = {});

// The engine's whole actor loss (workers/utils/losses.ppo_loss, policy_loss.loss_mode "vanilla"):
// pg_loss − entropy_coeff·agg(entropy) + kl_loss_coef·agg(kl_penalty(log_prob, ref)).
struct PpoLossConfig {
  PolicyLossConfig clip;
  LossAggMode loss_agg_mode = LossAggMode::TokenMean;
  double entropy_coeff = 0;
  bool use_kl_loss = false;
  double kl_loss_coef = 0.001;
  std::string kl_loss_type = "low_var_kl";
};
struct PpoLossOutput {
  at::Tensor loss;                  // what backward runs on
  at::Tensor pg_loss, entropy_loss, kl_loss;  // entropy_loss / kl_loss undefined when not used
  double pg_clipfrac = 0, ppo_kl = 0, pg_clipfrac_lower = 0;
};
// entropy / ref_log_prob / rollout_is_weights may be undefined (no bonus / no KL / no weights).
PpoLossOutput ppo_loss(const PpoLossConfig& cfg, const at::Tensor& log_prob, const at::Tensor& entropy,
                       const at::Tensor& old_log_prob, const at::Tensor& advantages,
                       const at::Tensor& response_mask, const at::Tensor& ref_log_prob,
                       const GlobalBatchInfo& g, const at::Tensor& rollout_is_weights = {});

// core_algos.compute_grpo_outcome_advantage: score = Σ rewards per row, normalised inside each
// group of equal `index` (unbiased std; a group of one: mean 0, std 1); broadcast × mask.
// Returns advantages (= returns in verl), [B, T].
at::Tensor compute_grpo_outcome_advantage(const at::Tensor& token_level_rewards, const at::Tensor& response_mask,
                                          const std::vector<std::string>& index, double epsilon = 1e-6,
                                          bool norm_adv_by_std_in_grpo = true);

}  // namespace verl
