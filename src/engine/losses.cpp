// losses.cpp — verl 0.9.1's losses as ATen ops, mirrored op for op (including dtypes: a bool
// mask summed gives int64, `x / n` by a host scalar, `** 2` as pow) so that results and
// gradients equal verl's exactly; see losses.h for the map to verl's functions.
#include "engine/losses.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <map>

#include "core/error.h"
#include "model/lm_head.h"

namespace verl {

LossAggMode parse_loss_agg_mode(const std::string& s) {
  if (s == "token-mean") return LossAggMode::TokenMean;
  if (s == "token-sum") return LossAggMode::TokenSum;
  if (s == "seq-mean-token-sum") return LossAggMode::SeqMeanTokenSum;
  if (s == "seq-mean-token-mean") return LossAggMode::SeqMeanTokenMean;
  if (s == "seq-mean-token-sum-norm") return LossAggMode::SeqMeanTokenSumNorm;
  fail("loss_agg_mode: unknown value '", s,
       "' (expected token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm)");
}

const char* loss_agg_mode_name(LossAggMode m) {
  switch (m) {
    case LossAggMode::TokenMean: return "token-mean";
    case LossAggMode::TokenSum: return "token-sum";
    case LossAggMode::SeqMeanTokenSum: return "seq-mean-token-sum";
    case LossAggMode::SeqMeanTokenMean: return "seq-mean-token-mean";
    case LossAggMode::SeqMeanTokenSumNorm: return "seq-mean-token-sum-norm";
  }
  return "?";
}

namespace {

void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* what) {
  if (!a.sizes().equals(b.sizes()))
    fail(what, ": shape mismatch ", a.sizes(), " vs ", b.sizes());
}

// `x / n` where n is either verl's Python number (a wrapped scalar) or the local count tensor.
at::Tensor div_count(const at::Tensor& x, const std::optional<double>& global, const at::Tensor& local) {
  return global ? x / at::Scalar(*global) : x / local;
}

}  // namespace

at::Tensor masked_sum(const at::Tensor& values, const at::Tensor& mask) {
  at::Tensor valid = at::where(mask.to(at::kBool), values, at::Scalar(0.0));
  return (valid * mask).sum();
}

at::Tensor masked_mean(const at::Tensor& values, const at::Tensor& mask) {
  return masked_sum(values, mask) / (mask.sum() + 1e-8);
}

at::Tensor agg_loss(const at::Tensor& loss_mat, const at::Tensor& loss_mask, LossAggMode mode,
                    const GlobalBatchInfo& g) {
  check_same_shape(loss_mat, loss_mask, "agg_loss");
  const int64_t dp = g.dp_size;
  switch (mode) {
    case LossAggMode::TokenMean: {
      at::Tensor local;
      if (!g.batch_num_tokens) {
        if (dp > 1) fail("agg_loss: (global) batch_num_tokens is required when dp_size > 1");
        local = loss_mask.sum();
      }
      return div_count(masked_sum(loss_mat, loss_mask), g.batch_num_tokens, local) * dp;
    }
    case LossAggMode::TokenSum:
      return masked_sum(loss_mat, loss_mask) * dp;
    case LossAggMode::SeqMeanTokenSum:
    case LossAggMode::SeqMeanTokenSumNorm: {
      at::Tensor seq_losses = at::sum(loss_mat * loss_mask, -1);
      at::Tensor seq_mask = (at::sum(loss_mask, -1) > 0).to(at::kFloat);
      at::Tensor local;
      if (!g.global_batch_size) {
        if (dp > 1) fail("agg_loss: global_batch_size is required when dp_size > 1");
        local = seq_mask.sum();
      }
      at::Tensor loss = div_count(masked_sum(seq_losses, seq_mask), g.global_batch_size, local) * dp;
      if (mode == LossAggMode::SeqMeanTokenSumNorm) {
        if (g.loss_scale_factor) loss = loss / at::Scalar(*g.loss_scale_factor);
        else loss = loss / at::Scalar(loss_mask.size(-1));
      }
      return loss;
    }
    case LossAggMode::SeqMeanTokenMean: {
      at::Tensor seq_count = at::sum(loss_mask, -1);
      at::Tensor seq_losses = at::sum(loss_mat * loss_mask, -1) / (seq_count + 1e-8);
      at::Tensor seq_mask = (seq_count > 0).to(at::kFloat);
      at::Tensor local;
      if (!g.global_batch_size) {
        if (dp > 1) fail("agg_loss: global_batch_size is required when dp_size > 1");
        local = seq_mask.sum();
      }
      return div_count(masked_sum(seq_losses, seq_mask), g.global_batch_size, local) * dp;
    }
  }
  fail("agg_loss: bad mode");
}

at::Tensor sft_loss(const at::Tensor& log_prob_flat, const at::Tensor& loss_mask_flat, double batch_num_tokens,
                    int64_t dp_size) {
  if (log_prob_flat.dim() != 1) fail("sft_loss: log_prob must be 1-D (all tokens concatenated), got ", log_prob_flat.sizes());
  check_same_shape(log_prob_flat, loss_mask_flat, "sft_loss");
  at::Tensor rolled = at::roll(loss_mask_flat, {-1}, {0});
  return -masked_sum(log_prob_flat, rolled) / at::Scalar(batch_num_tokens) * dp_size;
}

at::Tensor sft_loss_padded(const at::Tensor& log_prob, const at::Tensor& response_mask, double batch_num_tokens,
                           int64_t dp_size) {
  check_same_shape(log_prob, response_mask, "sft_loss");
  return -masked_sum(log_prob, response_mask.to(at::kBool)) / at::Scalar(batch_num_tokens) * dp_size;
}

PolicyLossOutput compute_policy_loss_vanilla(const at::Tensor& old_log_prob, const at::Tensor& log_prob,
                                             const at::Tensor& advantages, const at::Tensor& response_mask,
                                             LossAggMode mode, const PolicyLossConfig& cfg, const GlobalBatchInfo& g,
                                             const at::Tensor& rollout_is_weights) {
  check_same_shape(old_log_prob, log_prob, "policy loss (old_log_prob vs log_prob)");
  check_same_shape(advantages, log_prob, "policy loss (advantages vs log_prob)");
  check_same_shape(response_mask, log_prob, "policy loss (response_mask vs log_prob)");
  const double clip_low = cfg.clip_ratio_low.value_or(cfg.clip_ratio);
  const double clip_high = cfg.clip_ratio_high.value_or(cfg.clip_ratio);
  const double clip_c = cfg.clip_ratio_c;
  if (!(clip_c > 1.0))
    fail("clip_ratio_c: the lower bound of the ratio for dual-clip PPO must be > 1.0, got ", clip_c);

  at::Tensor negative_approx_kl = at::clamp(log_prob - old_log_prob, -20.0, 20.0);
  at::Tensor ratio = at::exp(negative_approx_kl);
  at::Tensor ppo_kl = masked_mean(-negative_approx_kl, response_mask);

  at::Tensor neg_adv = -advantages;
  at::Tensor pg_losses1 = neg_adv * ratio;
  at::Tensor pg_losses2 = neg_adv * at::clamp(ratio, 1 - clip_low, 1 + clip_high);
  at::Tensor clip_pg_losses1 = at::maximum(pg_losses1, pg_losses2);
  at::Tensor pg_clipfrac = masked_mean(at::gt(pg_losses2, pg_losses1).to(at::kFloat), response_mask);

  at::Tensor pg_losses3 = neg_adv * clip_c;
  at::Tensor clip_pg_losses2 = at::min(pg_losses3, clip_pg_losses1);
  at::Tensor negative = advantages < 0;
  at::Tensor pg_clipfrac_lower =
      masked_mean(at::gt(clip_pg_losses1, pg_losses3) * negative.to(at::kFloat), response_mask);

  at::Tensor pg_losses = at::where(negative, clip_pg_losses2, clip_pg_losses1);
  if (rollout_is_weights.defined()) pg_losses = pg_losses * rollout_is_weights;

  PolicyLossOutput out;
  out.loss = agg_loss(pg_losses, response_mask, mode, g);
  out.pg_clipfrac = pg_clipfrac.detach().item<double>();
  out.ppo_kl = ppo_kl.detach().item<double>();
  out.pg_clipfrac_lower = pg_clipfrac_lower.detach().item<double>();
  return out;
}

at::Tensor entropy_from_logits(const at::Tensor& logits) { return logits_entropy(logits, at::logsumexp(logits, {-1})); }

at::Tensor compute_entropy_loss(const at::Tensor& logits, const at::Tensor& response_mask, LossAggMode mode) {
  return agg_loss(entropy_from_logits(logits), response_mask, mode);
}

namespace {

enum class KlBase { K1, Abs, K2, K3 };

KlBase parse_kl_base(const std::string& type, const std::string& full) {
  if (type == "kl" || type == "k1") return KlBase::K1;
  if (type == "abs") return KlBase::Abs;
  if (type == "mse" || type == "k2") return KlBase::K2;
  if (type == "low_var_kl" || type == "k3") return KlBase::K3;
  if (type == "full") fail("kl_penalty: type 'full' is not implemented in verl either (needs full-vocabulary logits)");
  fail("kl_penalty: unknown type '", full,
       "' (expected kl, k1, abs, mse, k2, low_var_kl or k3, optionally with a '+' suffix)");
}

std::string strip_plus(const std::string& t) {
  return !t.empty() && t.back() == '+' ? t.substr(0, t.size() - 1) : t;
}

at::Tensor kl_forward(const at::Tensor& logprob, const at::Tensor& ref_logprob, KlBase base) {
  switch (base) {
    case KlBase::K1: return logprob - ref_logprob;
    case KlBase::Abs: return (logprob - ref_logprob).abs();
    case KlBase::K2: return 0.5 * (logprob - ref_logprob).square();
    case KlBase::K3: {
      at::Tensor kl = at::clamp(ref_logprob - logprob, -20, 20);
      at::Tensor ratio = at::exp(kl);
      at::Tensor kld = (ratio - kl - 1).contiguous();
      return at::clamp(kld, -10, 10);
    }
  }
  fail("kl_penalty: bad type");
}

}  // namespace

void check_kl_penalty_type(const std::string& type) { parse_kl_base(strip_plus(type), type); }

at::Tensor kl_penalty(const at::Tensor& logprob, const at::Tensor& ref_logprob, const std::string& type) {
  check_same_shape(logprob, ref_logprob, "kl_penalty");
  const bool plus = !type.empty() && type.back() == '+';
  at::Tensor forward_score = kl_forward(logprob, ref_logprob, parse_kl_base(strip_plus(type), type));
  if (!plus) return forward_score;
  // Straight-through: the estimator's value, the gradient of k2 (unbiased KL gradient).
  at::Tensor backward_score = 0.5 * (logprob - ref_logprob).square();
  return backward_score - backward_score.detach() + forward_score.detach();
}

ValueLossOutput compute_value_loss(const at::Tensor& vpreds, const at::Tensor& returns, const at::Tensor& values,
                                   const at::Tensor& response_mask, double cliprange_value, LossAggMode mode,
                                   const GlobalBatchInfo& g) {
  check_same_shape(vpreds, returns, "value loss (vpreds vs returns)");
  check_same_shape(vpreds, values, "value loss (vpreds vs values)");
  check_same_shape(vpreds, response_mask, "value loss (vpreds vs response_mask)");
  // verl_F.clip_by_value: max(min(x, hi), lo)
  at::Tensor vpredclipped = at::max(at::min(vpreds, values + cliprange_value), values - cliprange_value);
  at::Tensor vf_losses1 = at::pow(vpreds - returns, 2);
  at::Tensor vf_losses2 = at::pow(vpredclipped - returns, 2);
  at::Tensor clipped = at::max(vf_losses1, vf_losses2);
  ValueLossOutput out;
  out.loss = 0.5 * agg_loss(clipped, response_mask, mode, g);
  out.vf_clipfrac = masked_mean(at::gt(vf_losses2, vf_losses1).to(at::kFloat), response_mask).detach().item<double>();
  return out;
}

PpoLossOutput ppo_loss(const PpoLossConfig& cfg, const at::Tensor& log_prob, const at::Tensor& entropy,
                       const at::Tensor& old_log_prob, const at::Tensor& advantages, const at::Tensor& response_mask,
                       const at::Tensor& ref_log_prob, const GlobalBatchInfo& g, const at::Tensor& rollout_is_weights) {
  at::Tensor mask = response_mask.to(at::kBool);
  PolicyLossOutput pg = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, cfg.loss_agg_mode,
                                                    cfg.clip, g, rollout_is_weights);
  PpoLossOutput out;
  out.pg_loss = pg.loss;
  out.pg_clipfrac = pg.pg_clipfrac;
  out.ppo_kl = pg.ppo_kl;
  out.pg_clipfrac_lower = pg.pg_clipfrac_lower;
  at::Tensor loss = pg.loss;
  if (entropy.defined()) {
    out.entropy_loss = agg_loss(entropy, mask, cfg.loss_agg_mode, g);
    loss = loss - cfg.entropy_coeff * out.entropy_loss;
  }
  if (cfg.use_kl_loss) {
    if (!ref_log_prob.defined()) fail("ppo_loss: use_kl_loss needs ref_log_prob");
    at::Tensor kld = kl_penalty(log_prob, ref_log_prob, cfg.kl_loss_type);
    out.kl_loss = agg_loss(kld, mask, cfg.loss_agg_mode, g);
    loss = loss + out.kl_loss * cfg.kl_loss_coef;
  }
  out.loss = loss;
  return out;
}

at::Tensor compute_grpo_outcome_advantage(const at::Tensor& token_level_rewards, const at::Tensor& response_mask,
                                          const std::vector<std::string>& index, double epsilon,
                                          bool norm_adv_by_std_in_grpo) {
  check_same_shape(token_level_rewards, response_mask, "grpo advantage (rewards vs response_mask)");
  const int64_t bsz = token_level_rewards.size(0);
  if (static_cast<int64_t>(index.size()) != bsz)
    fail("grpo advantage: index has ", index.size(), " entries for a batch of ", bsz);
  c10::NoGradGuard no_grad;
  at::Tensor scores = token_level_rewards.sum(-1);
  // Groups in order of first appearance, members in batch order (verl's id2score lists).
  std::map<std::string, std::vector<int64_t>> groups;
  for (int64_t i = 0; i < bsz; ++i) groups[index[i]].push_back(i);
  at::Tensor mean = at::empty({bsz}, scores.options());
  at::Tensor stdv = at::empty({bsz}, scores.options());
  for (const auto& [id, members] : groups) {
    at::Tensor m, s;
    if (members.size() == 1) {
      m = at::scalar_tensor(0.0, scores.options());
      s = at::scalar_tensor(1.0, scores.options());
    } else {
      at::Tensor idx = at::tensor(members, at::TensorOptions().dtype(at::kLong)).to(scores.device());
      at::Tensor group = scores.index_select(0, idx);
      m = at::mean(group);
      s = at::std(group);
    }
    for (int64_t i : members) {
      mean.select(0, i).copy_(m);
      stdv.select(0, i).copy_(s);
    }
  }
  at::Tensor adv = norm_adv_by_std_in_grpo ? (scores - mean) / (stdv + epsilon) : scores - mean;
  return adv.unsqueeze(-1) * response_mask;
}

}  // namespace verl
