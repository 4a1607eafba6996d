// tasks.cpp — the registry of `verlcpp train` tasks (see tasks.h): sft (verl's SFT loss),
// ppo (verl's vanilla PPO policy loss with dual clip, entropy bonus and KL loss; GRPO is the
// same update with group-normalised advantages in the data) and value (verl's clipped value
// loss). Every loss is normalised by the global batch (GlobalBatchInfo), as verl's are.
#ifdef VERLCPP_WITH_TORCH
#include "cli/tasks.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace verl {

namespace {

// A micro-batch's per-token tensors padded to [B, Tmax], the layout verl's losses take.
struct Padded {
  const Batch& micro;
  const MicroOutputs& out;
  int64_t tmax = 0;
  Padded(const Batch& m, const MicroOutputs& o) : micro(m), out(o) {
    for (size_t i = 0; i + 1 < o.cu_seqlens.size(); ++i) tmax = std::max(tmax, o.cu_seqlens[i + 1] - o.cu_seqlens[i]);
  }
  at::Tensor operator()(const at::Tensor& flat) const { return pad_jagged(flat, out.cu_seqlens, tmax); }
  at::Tensor field(const char* k) const { return (*this)(micro.sequences.at(k).values); }
};

LossFn make_sft_loss(const LossSettings&) {
  return [](const Batch& m, const MicroOutputs& out, const GlobalBatchInfo& g) {
    const Padded p(m, out);
    LossResult r;
    r.loss = sft_loss_padded(p(out.log_probs), p.field("loss_mask"), *g.batch_num_tokens, g.dp_size);
    return r;
  };
}

LossFn make_ppo_loss(const LossSettings& s) {
  const PpoLossConfig pc = s.ppo;
  return [pc](const Batch& m, const MicroOutputs& out, const GlobalBatchInfo& g) {
    const Padded p(m, out);
    const at::Tensor ref = pc.use_kl_loss ? p.field("ref_log_probs") : at::Tensor();
    const at::Tensor ent = out.entropy.defined() ? p(out.entropy) : at::Tensor();
    PpoLossOutput o = ppo_loss(pc, p(out.log_probs), ent, p.field("old_log_probs"), p.field("advantages"),
                               p.field("loss_mask"), ref, g);
    LossResult r;
    r.loss = o.loss;
    r.metrics["pg_clipfrac"] = o.pg_clipfrac;
    r.metrics["ppo_kl"] = o.ppo_kl;
    r.metrics["pg_clipfrac_lower"] = o.pg_clipfrac_lower;
    if (o.kl_loss.defined()) r.metrics["kl_loss"] = o.kl_loss.item<double>();
    if (o.entropy_loss.defined()) r.metrics["entropy"] = o.entropy_loss.item<double>();
    return r;
  };
}

LossFn make_value_loss(const LossSettings& s) {
  const double clip = s.cliprange_value;
  const LossAggMode mode = s.ppo.loss_agg_mode;
  return [clip, mode](const Batch& m, const MicroOutputs& out, const GlobalBatchInfo& g) {
    const Padded p(m, out);
    ValueLossOutput o = compute_value_loss(p(out.values), p.field("returns"), p.field("values"), p.field("loss_mask"),
                                           clip, mode, g);
    LossResult r;
    r.loss = o.loss;
    r.metrics["vf_clipfrac"] = o.vf_clipfrac;
    return r;
  };
}

bool no_entropy(const LossSettings&) { return false; }

}  // namespace

const std::vector<TaskSpec>& tasks() {
  static const std::vector<TaskSpec> t = {
      {"sft", "actor", false, "supervised fine-tuning: token-mean NLL of the loss_mask tokens",
       [](const LossSettings&) { return std::vector<std::string>{}; }, no_entropy, make_sft_loss},
      {"ppo", "actor", false,
       "PPO policy update (also GRPO: advantages come in the data): needs advantages, old_log_probs "
       "(and ref_log_probs with use_kl_loss)",
       [](const LossSettings& s) {
         std::vector<std::string> f = {"advantages", "old_log_probs"};
         if (s.ppo.use_kl_loss) f.push_back("ref_log_probs");
         return f;
       },
       [](const LossSettings& s) { return s.ppo.entropy_coeff != 0; }, make_ppo_loss},
      {"value", "critic", true, "value-model update (clipped value loss): needs returns, values",
       [](const LossSettings&) { return std::vector<std::string>{"returns", "values"}; }, no_entropy, make_value_loss},
  };
  return t;
}

const TaskSpec& find_task(const std::string& name) {
  std::string names;
  for (const auto& t : tasks()) {
    if (t.name == name) return t;
    names += (names.empty() ? "" : ", ") + t.name;
  }
  fail("unknown task '", name, "' (expected ", names, ")");
}

}  // namespace verl
#endif
