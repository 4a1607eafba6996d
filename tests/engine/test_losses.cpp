// test_losses.cpp — engine losses (src/engine/losses.*) against verl 0.9.1's own functions on
// random inputs made at test time by tests/oracle/ref_losses.py: agg_loss in every mode and
// normalisation, vanilla PPO with dual clip, KL penalties with "+" variants, clipped value
// loss, entropy loss, GRPO advantages, the engine's sft_loss and ppo_loss. Values, metrics and
// input gradients are compared (fp32, relative 1e-6; most are bit-identical).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/losses.h"
#include "engine_test_util.h"
#include "core/error.h"
#include "oracle_tensors.h"

namespace verl::test {
namespace {

using nlohmann::json;

struct Fixture {
  std::map<std::string, at::Tensor> t;
  json cases;
};

const Fixture& fixture() {
  static Fixture f = [] {
    std::string dir = oracle_fixture("ref_losses.py", "0");
    Fixture x;
    x.t = load_oracle_tensors(dir + "/losses.safetensors");
    std::ifstream in(dir + "/cases.json");
    x.cases = json::parse(in);
    return x;
  }();
  return f;
}

at::Tensor T(const json& c, const char* key) { return fixture().t.at(c.at(key).get<std::string>()); }

at::Tensor mask_of(const json& c) {
  at::Tensor m = T(c, "mask");
  return c.value("mask_bool", false) ? m.to(at::kBool) : m;
}

GlobalBatchInfo ginfo_of(const json& c) {
  GlobalBatchInfo g;
  const json& j = c.at("ginfo");
  if (j.contains("dp_size")) g.dp_size = j["dp_size"].get<int64_t>();
  if (j.contains("batch_num_tokens")) g.batch_num_tokens = j["batch_num_tokens"].get<double>();
  if (j.contains("global_batch_size")) g.global_batch_size = j["global_batch_size"].get<double>();
  if (j.contains("loss_scale_factor")) g.loss_scale_factor = j["loss_scale_factor"].get<double>();
  return g;
}

std::string where(const json& c) {
  std::string s = c.dump();
  return s.size() > 300 ? s.substr(0, 300) : s;
}

TEST(LossAgg, AllModesAndNormalisations) {
  Tally tv, tg;
  int n = 0;
  for (const json& c : fixture().cases.at("agg")) {
    at::Tensor mat = T(c, "mat").clone().requires_grad_(true);
    at::Tensor loss = agg_loss(mat, mask_of(c), parse_loss_agg_mode(c["mode"]), ginfo_of(c));
    loss.backward();
    ASSERT_TRUE(close(loss, T(c, "loss"), &tv)) << where(c);
    ASSERT_TRUE(close(mat.grad(), T(c, "grad"), &tg)) << where(c);
    ++n;
  }
  EXPECT_EQ(n, 480);
  tv.print("agg_loss value");
  tg.print("agg_loss grad");
}

TEST(LossAgg, RejectsMissingGlobalInfoAndUnknownMode) {
  at::Tensor m = at::ones({2, 3});
  GlobalBatchInfo g;
  g.dp_size = 2;
  EXPECT_THROW(agg_loss(m, m, LossAggMode::TokenMean, g), Error);
  EXPECT_THROW(agg_loss(m, m, LossAggMode::SeqMeanTokenMean, g), Error);
  EXPECT_THROW(parse_loss_agg_mode("seq-mean"), Error);
  for (auto mode : {LossAggMode::TokenMean, LossAggMode::TokenSum, LossAggMode::SeqMeanTokenSum,
                    LossAggMode::SeqMeanTokenMean, LossAggMode::SeqMeanTokenSumNorm})
    EXPECT_EQ(parse_loss_agg_mode(loss_agg_mode_name(mode)), mode);
}

// Engine normalisation: split a batch over "ranks" and micro-batches; with the global token /
// sequence counts, Σ_micro loss averaged over ranks (what the gradient all-reduce does) is the
// loss of the whole batch, for every mode.
TEST(LossAgg, GlobalNormalisationIsSplitInvariant) {
  at::manual_seed(3);
  const int64_t B = 12, Tn = 7, dp = 3;
  at::Tensor mat = at::randn({B, Tn});
  at::Tensor mask = (at::rand({B, Tn}) < 0.7).to(at::kFloat);
  mask[4] = 0;
  for (auto mode : {LossAggMode::TokenMean, LossAggMode::TokenSum, LossAggMode::SeqMeanTokenSum,
                    LossAggMode::SeqMeanTokenMean, LossAggMode::SeqMeanTokenSumNorm}) {
    at::Tensor whole = agg_loss(mat, mask, mode);
    GlobalBatchInfo g;
    g.dp_size = dp;
    g.batch_num_tokens = mask.sum().item<double>();
    g.global_batch_size = (mask.sum(-1) > 0).sum().item<double>();
    double total = 0;
    for (int64_t r = 0; r < dp; ++r)
      for (int64_t mb = 0; mb < 2; ++mb) {
        int64_t lo = r * 4 + mb * 2;
        total += agg_loss(mat.slice(0, lo, lo + 2), mask.slice(0, lo, lo + 2), mode, g).item<double>();
      }
    EXPECT_NEAR(total / dp, whole.item<double>(), 1e-5 * std::abs(whole.item<double>())) << loss_agg_mode_name(mode);
  }
}

TEST(LossPolicy, VanillaDualClipMatchesVerl) {
  Tally tv, tg, tm;
  int n = 0, clipped_lower = 0;
  for (const json& c : fixture().cases.at("policy")) {
    PolicyLossConfig cfg;
    cfg.clip_ratio_low = c["clip_low"].get<double>();
    cfg.clip_ratio_high = c["clip_high"].get<double>();
    cfg.clip_ratio_c = c["clip_c"].get<double>();
    at::Tensor lp = T(c, "lp").clone().requires_grad_(true);
    at::Tensor w = c["weights"].get<std::string>().empty() ? at::Tensor() : T(c, "weights");
    PolicyLossOutput o = compute_policy_loss_vanilla(T(c, "old"), lp, T(c, "adv"), mask_of(c),
                                                     parse_loss_agg_mode(c["mode"]), cfg, ginfo_of(c), w);
    o.loss.backward();
    ASSERT_TRUE(close(o.loss, T(c, "loss"), &tv)) << where(c);
    ASSERT_TRUE(close(lp.grad(), T(c, "grad"), &tg)) << where(c);
    ASSERT_TRUE(close(o.pg_clipfrac, c["pg_clipfrac"].get<double>(), &tm)) << where(c);
    ASSERT_TRUE(close(o.ppo_kl, c["ppo_kl"].get<double>(), &tm)) << where(c);
    ASSERT_TRUE(close(o.pg_clipfrac_lower, c["pg_clipfrac_lower"].get<double>(), &tm)) << where(c);
    clipped_lower += o.pg_clipfrac_lower > 0;
    ++n;
  }
  EXPECT_EQ(n, 240);
  EXPECT_GT(clipped_lower, 20);  // the dual clip was exercised
  tv.print("policy loss value");
  tg.print("policy loss grad");
  tm.print("policy metrics");
}

TEST(LossPolicy, RejectsClipRatioCNotAboveOne) {
  at::Tensor x = at::zeros({1, 2});
  PolicyLossConfig cfg;
  cfg.clip_ratio_c = 1.0;
  EXPECT_THROW(compute_policy_loss_vanilla(x, x, x, at::ones({1, 2}), LossAggMode::TokenMean, cfg), Error);
}

TEST(LossKl, AllTypesAndStraightThroughVariants) {
  Tally tv, tg;
  int n = 0;
  for (const json& c : fixture().cases.at("kl")) {
    at::Tensor lp = T(c, "lp").clone().requires_grad_(true);
    at::Tensor kl = kl_penalty(lp, T(c, "ref"), c["type"].get<std::string>());
    at::Tensor weight = at::linspace(0.5, 1.5, kl.numel()).view(kl.sizes());
    (kl * weight).sum().backward();
    ASSERT_TRUE(close(kl, T(c, "kl"), &tv)) << where(c);
    ASSERT_TRUE(close(lp.grad(), T(c, "grad"), &tg)) << where(c);
    ++n;
  }
  EXPECT_EQ(n, 56);
  EXPECT_THROW(kl_penalty(at::zeros({2}), at::zeros({2}), "k4"), Error);
  EXPECT_THROW(check_kl_penalty_type("full"), Error);
  tv.print("kl value");
  tg.print("kl grad");
}

TEST(LossValue, ClippedValueLossMatchesVerl) {
  Tally tv, tg, tm;
  int n = 0;
  for (const json& c : fixture().cases.at("value")) {
    at::Tensor v = T(c, "vpreds").clone().requires_grad_(true);
    ValueLossOutput o = compute_value_loss(v, T(c, "returns"), T(c, "values"), mask_of(c), c["cliprange"].get<double>(),
                                           parse_loss_agg_mode(c["mode"]), ginfo_of(c));
    o.loss.backward();
    ASSERT_TRUE(close(o.loss, T(c, "loss"), &tv)) << where(c);
    ASSERT_TRUE(close(v.grad(), T(c, "grad"), &tg)) << where(c);
    ASSERT_TRUE(close(o.vf_clipfrac, c["clipfrac"].get<double>(), &tm)) << where(c);
    ++n;
  }
  EXPECT_EQ(n, 160);
  tv.print("value loss value");
  tg.print("value loss grad");
}

TEST(LossEntropy, EntropyLossFromLogits) {
  Tally tv, tg;
  for (const json& c : fixture().cases.at("entropy")) {
    at::Tensor logits = T(c, "logits").clone().requires_grad_(true);
    at::Tensor loss = compute_entropy_loss(logits, T(c, "mask"), parse_loss_agg_mode(c["mode"]));
    loss.backward();
    ASSERT_TRUE(close(loss, T(c, "loss"), &tv)) << where(c);
    ASSERT_TRUE(close(logits.grad(), T(c, "grad"), &tg)) << where(c);
  }
  tv.print("entropy loss value");
  tg.print("entropy loss grad");
}

TEST(LossGrpo, OutcomeAdvantages) {
  Tally t;
  int n = 0;
  for (const json& c : fixture().cases.at("grpo")) {
    auto index = c["index"].get<std::vector<std::string>>();
    at::Tensor adv = compute_grpo_outcome_advantage(T(c, "rewards"), T(c, "mask"), index, c["eps"].get<double>(),
                                                    c["norm"].get<bool>());
    ASSERT_TRUE(close(adv, T(c, "adv"), &t)) << where(c);
    ASSERT_TRUE(close(adv, T(c, "ret"), &t)) << where(c);
    ++n;
  }
  EXPECT_EQ(n, 32);
  t.print("grpo advantages");
}

TEST(LossSft, EngineSftLossNoPadding) {
  Tally tv, tg;
  for (const json& c : fixture().cases.at("sft")) {
    at::Tensor lp = T(c, "lp").clone().requires_grad_(true);
    at::Tensor loss = sft_loss(lp, T(c, "mask"), c["batch_num_tokens"].get<double>(), c["dp"].get<int64_t>());
    loss.backward();
    ASSERT_TRUE(close(loss, T(c, "loss"), &tv)) << where(c);
    ASSERT_TRUE(close(lp.grad(), T(c, "grad"), &tg)) << where(c);
  }
  tv.print("sft value");
  tg.print("sft grad");
}

// verl's engine ppo_loss (pg + entropy bonus + KL loss, global-batch normalisation) on nested
// model outputs; the flat → padded response map comes from verl's no_padding_2_padding.
TEST(LossPpo, EnginePpoLossWithEntropyAndKl) {
  Tally tv, tg, tm;
  for (const json& c : fixture().cases.at("ppo")) {
    const json& cj = c["cfg"];
    PpoLossConfig cfg;
    cfg.loss_agg_mode = parse_loss_agg_mode(cj["loss_agg_mode"]);
    cfg.entropy_coeff = cj["entropy_coeff"].get<double>();
    cfg.use_kl_loss = cj["use_kl_loss"].get<bool>();
    cfg.kl_loss_coef = cj.value("kl_loss_coef", 0.001);
    cfg.kl_loss_type = cj.value("kl_loss_type", std::string("low_var_kl"));
    cfg.clip.clip_ratio_low = cj.value("clip_ratio_low", 0.2);
    cfg.clip.clip_ratio_high = cj.value("clip_ratio_high", 0.2);
    cfg.clip.clip_ratio_c = cj.value("clip_ratio_c", 3.0);
    GlobalBatchInfo g;
    g.dp_size = c["dp"].get<int64_t>();
    g.batch_num_tokens = c["batch_num_tokens"].get<double>();
    g.global_batch_size = c["global_batch_size"].get<double>();
    if (cj.contains("loss_scale_factor")) g.loss_scale_factor = cj["loss_scale_factor"].get<double>();

    at::Tensor lp = T(c, "lp").clone().requires_grad_(true);
    at::Tensor ent = T(c, "ent").clone().requires_grad_(true);
    at::Tensor where_idx = T(c, "where");
    at::Tensor valid = where_idx >= 0;
    at::Tensor idx = where_idx.clamp_min(0).reshape({-1});
    auto pad = [&](const at::Tensor& flat) {
      return at::where(valid, flat.index_select(0, idx).view(where_idx.sizes()), at::Scalar(0.0));
    };
    PpoLossOutput o = ppo_loss(cfg, pad(lp), pad(ent), T(c, "old"), T(c, "adv"), T(c, "mask"), T(c, "ref"), g);
    o.loss.backward();
    ASSERT_TRUE(close(o.loss, T(c, "loss"), &tv)) << where(c);
    ASSERT_TRUE(close(lp.grad(), T(c, "grad_lp"), &tg)) << where(c);
    ASSERT_TRUE(close(ent.grad(), T(c, "grad_ent"), &tg)) << where(c);
    ASSERT_TRUE(close(o.pg_clipfrac, c["m:actor/pg_clipfrac"].get<double>(), &tm)) << where(c);
    ASSERT_TRUE(close(o.ppo_kl, c["m:actor/ppo_kl"].get<double>(), &tm)) << where(c);
    ASSERT_TRUE(close(o.pg_clipfrac_lower, c["m:actor/pg_clipfrac_lower"].get<double>(), &tm)) << where(c);
    ASSERT_TRUE(close(o.pg_loss, at::scalar_tensor(c["m:actor/pg_loss"].get<double>()), &tm)) << where(c);
    ASSERT_TRUE(close(o.entropy_loss, at::scalar_tensor(c["m:actor/entropy_loss"].get<double>()), &tm)) << where(c);
    if (cfg.use_kl_loss) {
      ASSERT_TRUE(close(o.kl_loss, at::scalar_tensor(c["m:kl_loss"].get<double>()), &tm)) << where(c);
    }
  }
  tv.print("ppo_loss value");
  tg.print("ppo_loss grads");
  tm.print("ppo_loss metrics");
}

}  // namespace
}  // namespace verl::test
