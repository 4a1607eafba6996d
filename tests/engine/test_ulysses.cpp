// test_ulysses.cpp — Ulysses sequence parallelism (fsdp/ulysses.h) with thread ranks: the
// all-to-all steps against slicing the whole tensor, the output gather's backward (this rank's
// slice × sp); and the engine at sp = 2 over 2 ranks, sp = 2 × dp = 2 and sp = 4 over 4 ranks
// against the same engine at sp = 1 with the same data-parallel split (itself tested against
// transformers and torch): log-probs, entropy and values, the loss, every gradient, the grad
// norm and the updated parameters (fp32, rel ≤ 1e-5). The micro-batches' token counts are not
// multiples of sp (the pad), and the families include GQA with n_kv_heads < sp (llama_tied
// has one kv head, qwen2 two at sp = 4). Heads that sp does not divide are a clear error.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <mutex>

#include "dist/comm.h"
#include "engine/fsdp_engine.h"
#include "engine/forward_step.h"
#include "engine_test_util.h"
#include "fsdp/ulysses.h"
#include "thread_comm.h"

namespace verl::test {
namespace {

double rel_diff(const at::Tensor& got, const at::Tensor& ref) {
  return max_abs_diff(got, ref) / std::max(1.0, ref.abs().max().item<double>());
}

TEST(Ulysses, AllToAllMovesHeadsAndSequenceAndRoundTrips) {
  for (int sp : {2, 4}) {
    SCOPED_TRACE("sp " + std::to_string(sp));
    const int64_t s = 3 * sp, h = 8, d = 5;
    at::manual_seed(sp);
    const at::Tensor whole = at::randn({s, h, d});
    ThreadComm::run(sp, [&](Comm& c) {
      Ulysses u(c);
      const int64_t part = s / sp, hp = h / sp;
      const at::Tensor mine = whole.narrow(0, c.rank() * part, part).clone();
      const at::Tensor heads = u.gather_seq_scatter_heads(mine);
      EXPECT_TRUE(at::equal(heads, whole.narrow(1, c.rank() * hp, hp)));
      EXPECT_TRUE(at::equal(u.gather_heads_scatter_seq(heads), mine));
      // KV heads fewer than sp are repeated first (one kv head here), as verl's repeat_kv.
      at::Tensor q = mine.clone(), k = mine.narrow(1, 0, 1).clone(), v = k.clone();
      u.to_heads(q, k, v);
      EXPECT_EQ(k.size(1), 1);
      EXPECT_TRUE(at::equal(k, whole.narrow(1, 0, 1)));
    });
  }
}

TEST(Ulysses, AllToAllAndGatherBackward) {
  const int sp = 2;
  const int64_t s = 6, h = 4, d = 3;
  at::manual_seed(7);
  const at::Tensor whole = at::randn({s, h, d}), w = at::randn({s, h / sp, d}), gw = at::randn({s - 1});
  ThreadComm::run(sp, [&](Comm& c) {
    Ulysses u(c);
    const int64_t part = s / sp;
    // d/dx Σ w · to_heads(x): this rank's rows of the per-rank head blocks of w.
    at::Tensor x = whole.narrow(0, c.rank() * part, part).clone().requires_grad_(true);
    torch::autograd::backward({(u.gather_seq_scatter_heads(x) * w).sum()});
    // Head block j of x went to rank j, whose rows of this rank's slice are w's rows here.
    const at::Tensor want = w.narrow(0, c.rank() * part, part);
    for (int j = 0; j < sp; ++j) EXPECT_TRUE(at::allclose(x.grad().narrow(1, j * (h / sp), h / sp), want)) << j;
    // Output gather, pad of 1 dropped: backward is this rank's slice × sp.
    at::Tensor y = at::randn({part}).requires_grad_(true);
    at::Tensor full = u.gather_and_unpad(y, 1);
    EXPECT_EQ(full.size(0), s - 1);
    torch::autograd::backward({(full * gw).sum()});
    at::Tensor g = at::cat({gw, at::zeros({1})}).narrow(0, c.rank() * part, part) * sp;
    EXPECT_TRUE(at::allclose(y.grad(), g));
  });
}

// The same samples of every data-parallel group's part: group g of dp takes [g·B/dp, (g+1)·B/dp).
Batch dp_part(const Batch& b, int dp, int g) {
  const int per = static_cast<int>(b.size()) / dp;
  std::vector<int> idx;
  for (int i = g * per; i < (g + 1) * per; ++i) idx.push_back(i);
  return b.select(idx);
}

// The fixture batch (lengths 1, 17, 40, 5, 33, 2, 26, 12; per-sample temperature) with a loss
// mask and per-token value targets. Micro-batches of 2 sequences hold 18, 45, 35, 38 tokens.
Batch train_batch() {
  Batch b = load_batch(engine_fixtures() + "/batch_temp.safetensors");
  const Jagged& ids = b.sequences.at("input_ids");
  b.sequences["loss_mask"] = Jagged{(ids.values.remainder(3) != 0).to(at::kFloat), ids.offsets};
  b.sequences["target"] = Jagged{at::sin(ids.values.to(at::kFloat)), ids.offsets};
  return b;
}

EngineConfig sp_config(const std::string& dir, int sp, bool forward_only) {
  EngineConfig c;
  c.model_path = dir;
  c.forward_only = forward_only;
  c.micro_batch_size_per_gpu = 2;
  c.ulysses_sequence_parallel_size = sp;
  // AdamW's first step is lr·g/(|g| + eps): with the usual eps it is lr·sign(g), which flips
  // on gradients that are 0 up to rounding. eps = 1 makes the step ≈ lr·g, so the updated
  // parameters depend on the gradients' values (scale included) smoothly.
  c.adamw.lr = 0.1;
  c.adamw.eps = 1.0;
  return c;
}

// Token-mean losses normalised by the global loss tokens × dp (verl's): SFT log-likelihood with
// an entropy term (so both outputs carry gradients), or a squared value error.
LossResult loss_of(const Batch& mb, const MicroOutputs& out, const GlobalBatchInfo& g) {
  const at::Tensor m = mb.sequences.at("loss_mask").values;
  const double scale = static_cast<double>(g.dp_size) / *g.batch_num_tokens;
  LossResult r;
  if (out.values.defined()) {
    r.loss = ((out.values - mb.sequences.at("target").values).pow(2) * m).sum() * scale;
  } else {
    r.loss = (-(out.log_probs * m).sum() + 0.1 * (out.entropy * m).sum()) * scale;
  }
  return r;
}

struct RunResult {
  std::vector<SampleOutputs> outs;           // per dp group (from its first rank)
  double loss = 0, grad_norm = 0;            // loss: Σ over ranks / world (as the metrics logger)
  std::vector<at::Tensor> grads;             // full reduced gradient per unit
  std::map<std::string, at::Tensor> params;  // after one optimizer step
};

// One engine per thread rank: infer the dp part, then one forward_backward + optimizer_step.
RunResult run_engine(const std::string& dir, int world, int sp, bool checkpointing, int ep = 1, int micro = 2) {
  const Batch b = train_batch();
  const int dp = world / sp;
  RunResult res;
  res.outs.resize(dp);
  std::mutex mu;
  ThreadComm::run(world, [&](Comm& c) {
    EngineConfig cfg = sp_config(dir, sp, false);
    cfg.fsdp.gradient_checkpointing = checkpointing;
    cfg.fsdp.expert_parallel_size = ep;
    cfg.micro_batch_size_per_gpu = micro;
    FsdpEngine e(cfg, c);
    EXPECT_EQ(e.dp_size(), dp);
    const Batch mine = dp_part(b, dp, e.dp_rank());
    SampleOutputs so = e.infer_batch(mine, !e.is_value_model());
    StepMetrics sm = e.forward_backward_batch(mine, loss_of, false, !e.is_value_model());
    {
      std::lock_guard<std::mutex> lk(mu);
      if (c.rank() % sp == 0) res.outs[e.dp_rank()] = so;
      res.loss += sm.metrics["loss"] / world;
      auto units = e.model().units();
      if (res.grads.empty())
        for (FlatUnit* u : units) res.grads.push_back(at::zeros({u->grad().numel() * world}));
      for (size_t i = 0; i < units.size(); ++i)
        res.grads[i].narrow(0, units[i]->shard_begin(), units[i]->grad().numel()).copy_(units[i]->grad());
    }
    c.barrier();
    const OptimizerStepResult opt = e.optimizer_step();
    std::map<std::string, at::Tensor> p;
    e.get_per_tensor_param([&](const std::string& n, const at::Tensor& t) { p[n] = t.clone(); });
    std::lock_guard<std::mutex> lk(mu);
    if (c.rank() == 0) {
      res.grad_norm = opt.grad_norm;
      res.params = std::move(p);
    }
  });
  return res;
}

void expect_close(const Jagged& got, const Jagged& ref, const char* what) {
  ASSERT_EQ(got.offsets, ref.offsets) << what;
  if (!ref.values.defined()) {
    EXPECT_FALSE(got.values.defined()) << what;
    return;
  }
  EXPECT_LE(rel_diff(got.values, ref.values), 1e-5) << what;
}

void expect_same_run(const RunResult& got, const RunResult& ref, int64_t grad_numel_check) {
  ASSERT_EQ(got.outs.size(), ref.outs.size());
  for (size_t g = 0; g < ref.outs.size(); ++g) {
    expect_close(got.outs[g].log_probs, ref.outs[g].log_probs, "log_probs");
    expect_close(got.outs[g].entropy, ref.outs[g].entropy, "entropy");
    expect_close(got.outs[g].values, ref.outs[g].values, "values");
  }
  EXPECT_NE(ref.loss, 0.0);
  EXPECT_NEAR(got.loss, ref.loss, 1e-5 * std::max(1.0, std::abs(ref.loss)));
  EXPECT_NEAR(got.grad_norm, ref.grad_norm, 1e-5 * ref.grad_norm);
  if (grad_numel_check < 0) {  // other unit structures (expert parallelism): no per-unit gradients
    ASSERT_EQ(got.params.size(), ref.params.size());
    for (const auto& [name, t] : ref.params) EXPECT_LE(rel_diff(got.params.at(name), t), 1e-5) << name;
    return;
  }
  ASSERT_EQ(got.grads.size(), ref.grads.size());
  int64_t checked = 0;
  for (size_t i = 0; i < ref.grads.size(); ++i) {
    const int64_t n = std::min(got.grads[i].numel(), ref.grads[i].numel());  // padded to the shard count
    EXPECT_LE(rel_diff(got.grads[i].narrow(0, 0, n), ref.grads[i].narrow(0, 0, n)), 1e-5) << "unit " << i;
    checked += n;
  }
  EXPECT_GE(checked, grad_numel_check);
  ASSERT_EQ(got.params.size(), ref.params.size());
  for (const auto& [name, t] : ref.params) EXPECT_LE(rel_diff(got.params.at(name), t), 1e-5) << name;
}

struct SpCase {
  std::string family;
  int world, sp;
  bool checkpointing;
};

void PrintTo(const SpCase& k, std::ostream* os) {
  *os << k.family << " world " << k.world << " sp " << k.sp << (k.checkpointing ? " checkpointing" : "");
}

class UlyssesEngine : public ::testing::TestWithParam<SpCase> {};

TEST_P(UlyssesEngine, SameOutputsGradientsAndUpdateAsSpOne) {
  const SpCase& k = GetParam();
  const std::string dir = engine_fixtures() + "/" + k.family;
  const RunResult ref = run_engine(dir, k.world / k.sp, 1, false);
  const RunResult got = run_engine(dir, k.world, k.sp, k.checkpointing);
  int64_t numel = 0;
  for (const auto& [n, t] : ref.params) numel += t.numel();
  expect_same_run(got, ref, numel);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, UlyssesEngine,
    ::testing::Values(SpCase{"qwen2", 2, 2, false}, SpCase{"llama_tied", 2, 2, false}, SpCase{"qwen3", 2, 2, true},
                      SpCase{"value", 2, 2, false}, SpCase{"qwen2", 4, 2, false}, SpCase{"llama_tied", 4, 2, true},
                      SpCase{"qwen2", 4, 4, false}),
    [](const ::testing::TestParamInfo<SpCase>& i) {
      return i.param.family + "_world" + std::to_string(i.param.world) + "_sp" + std::to_string(i.param.sp) +
             (i.param.checkpointing ? "_ckpt" : "");
    });

// Expert parallelism (fsdp/expert_parallel.h): the same engine with the experts of every sparse
// layer split over ep ranks (dispatch and combine by all-to-all, expert units sharded inside
// their expert-data group) against ep = 1 on the same ranks and data: outputs, loss, grad norm
// and updated parameters (all experts, from get_per_tensor_param), fp32 rel ≤ 1e-5. One-sequence
// micro-batches (micro 1: the first holds a single token, so most experts get no row from that
// rank and some none at all) and uneven counts; gradient checkpointing recomputes the exchange.
struct EpCase {
  std::string family;
  int world, ep, micro;
  bool checkpointing;
};

void PrintTo(const EpCase& k, std::ostream* os) {
  *os << k.family << " world " << k.world << " ep " << k.ep << " micro " << k.micro
      << (k.checkpointing ? " checkpointing" : "");
}

class ExpertParallelEngine : public ::testing::TestWithParam<EpCase> {};

TEST_P(ExpertParallelEngine, SameOutputsLossAndUpdateAsEpOne) {
  const EpCase& k = GetParam();
  const std::string dir = engine_fixtures() + "/" + k.family;
  const RunResult ref = run_engine(dir, k.world, 1, false, 1, k.micro);
  const RunResult got = run_engine(dir, k.world, 1, k.checkpointing, k.ep, k.micro);
  expect_same_run(got, ref, -1);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ExpertParallelEngine,
    ::testing::Values(EpCase{"qwen3_moe", 2, 2, 2, false}, EpCase{"mixtral", 2, 2, 1, true},
                      EpCase{"qwen2_moe", 4, 2, 2, false}, EpCase{"qwen3_moe", 4, 4, 1, true},
                      EpCase{"moe_value", 2, 2, 2, false}),
    [](const ::testing::TestParamInfo<EpCase>& i) {
      return i.param.family + "_world" + std::to_string(i.param.world) + "_ep" + std::to_string(i.param.ep) + "_micro" +
             std::to_string(i.param.micro) + (i.param.checkpointing ? "_ckpt" : "");
    });

// The engine's construction fails with an Error whose message holds `want`.
void expect_build_error(const EngineConfig& cfg, Comm& c, const std::string& want) {
  try {
    FsdpEngine e(cfg, c);
    ADD_FAILURE() << "no error; expected: " << want;
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find(want), std::string::npos) << err.what();
  }
}

TEST(ExpertParallel, BadSettingsAreOneLine) {
  const std::string fx = engine_fixtures();
  ThreadComm::run(2, [&](Comm& c) {
    EngineConfig cfg = sp_config(fx + "/qwen2", 1, true);
    cfg.fsdp.expert_parallel_size = 2;
    expect_build_error(cfg, c, "has no experts");
    cfg = sp_config(fx + "/qwen2_moe", 1, true);  // 6 experts
    cfg.fsdp.expert_parallel_size = 4;
    expect_build_error(cfg, c, "divide the world size");
  });
  ThreadComm::run(4, [&](Comm& c) {
    EngineConfig cfg = sp_config(fx + "/qwen2_moe", 1, true);
    cfg.fsdp.expert_parallel_size = 4;
    expect_build_error(cfg, c, "does not divide num_experts = 6");
  });
}

TEST(Ulysses, DynamicBatchingBudgetIsMaxTokenLenTimesSp) {
  // 136 tokens, budget 40 per rank: 4 micro-batches at sp = 1, 2 at sp = 2 (80 per micro-batch).
  const std::string dir = engine_fixtures() + "/qwen2";
  const Batch b = train_batch();
  for (int sp : {1, 2}) {
    ThreadComm::run(sp, [&](Comm& c) {
      EngineConfig cfg = sp_config(dir, sp, true);
      cfg.use_dynamic_bsz = true;
      cfg.max_token_len_per_gpu = 40;
      FsdpEngine e(cfg, c);
      StepMetrics sm = e.forward_backward_batch(b, loss_of, true, true);
      EXPECT_EQ(sm.num_micro_batches, sp == 1 ? 4 : 2);
      // tokens: counted once per sp group (on its first rank)
      EXPECT_EQ(sm.tokens, c.rank() == 0 ? 136 : 0);
    });
  }
}

TEST(Ulysses, BadSettingsAreOneLineErrors) {
  const std::string dir = engine_fixtures() + "/qwen2";  // 4 heads, 2 kv heads
  auto error_of = [&](int world, int sp) {
    std::string msg;
    std::mutex mu;
    ThreadComm::run(world, [&](Comm& c) {
      try {
        FsdpEngine e(sp_config(dir, sp, true), c);
      } catch (const Error& err) {
        std::lock_guard<std::mutex> lk(mu);
        msg = err.what();
      }
    });
    return msg;
  };
  const std::string heads = error_of(3, 3);
  EXPECT_NE(heads.find("ulysses_sequence_parallel_size = 3"), std::string::npos) << heads;
  EXPECT_NE(heads.find("num_attention_heads (4) must be divisible"), std::string::npos) << heads;
  EXPECT_EQ(heads.find('\n'), std::string::npos);
  const std::string world = error_of(2, 4);
  EXPECT_NE(world.find("divide the world size (2 ranks)"), std::string::npos) << world;
  ModelConfig mc = load_model_config(dir);
  mc.num_heads = 6;
  mc.num_kv_heads = 3;
  try {
    check_ulysses(mc, 2);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("num_key_value_heads (3)"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace verl::test
