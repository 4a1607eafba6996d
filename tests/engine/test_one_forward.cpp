// test_one_forward.cpp — the model has one forward, with parameters from a provider: the
// single-device reference (DenseParams) and the FSDP engine (FlatUnits gathered from shards, at
// world size 1 and 2 with thread ranks) must give the same outputs bit for bit, where the
// arithmetic is the same, and the same gradients. And the one LM head: chunked log-probs and
// entropy with their recomputing backward, against plain autograd through the full logits.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "dist/comm.h"
#include "engine/fsdp_engine.h"
#include "engine/forward_step.h"
#include "engine_test_util.h"
#include "model/lm_head.h"
#include "thread_comm.h"

namespace verl::test {
namespace {

EngineConfig infer_config(const std::string& dir) {
  EngineConfig c;
  c.model_path = dir;
  c.temperature = 0.7;
  c.forward_only = true;
  c.micro_batch_size_per_gpu = 3;
  return c;
}

void expect_same(const SampleOutputs& a, const SampleOutputs& b) {
  for (auto [x, y] : {std::pair{&a.log_probs, &b.log_probs}, {&a.entropy, &b.entropy}, {&a.values, &b.values}}) {
    ASSERT_EQ(x->offsets, y->offsets);
    if (x->values.defined() || y->values.defined()) EXPECT_TRUE(at::equal(x->values, y->values));
  }
}

class OneForward : public ::testing::TestWithParam<std::string> {};

TEST_P(OneForward, ShardedEngineEqualsTheDenseModelBitForBit) {
  const std::string fx = engine_fixtures(), dir = fx + "/" + GetParam();
  const Batch b = load_batch(fx + "/batch.safetensors");
  auto dense = Transformer::load(dir, dir, at::kFloat);
  InferOptions o;
  o.calculate_entropy = !dense->is_value_model();
  o.temperature = 0.7;
  o.micro.micro_batch_size = 3;
  const SampleOutputs ref = infer_batch(*dense, b, o);
  ASSERT_GT(ref.log_probs.values.defined() ? ref.log_probs.values.abs().max().item<double>()
                                           : ref.values.values.abs().max().item<double>(), 0.0);
  for (int world : {1, 2}) {
    SCOPED_TRACE("world " + std::to_string(world));
    std::vector<SampleOutputs> got(world);
    ThreadComm::run(world, [&](Comm& c) {
      FsdpEngine e(infer_config(dir), c);
      got[c.rank()] = e.infer_batch(b, o.calculate_entropy);
    });
    for (const auto& g : got) expect_same(g, ref);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, OneForward, ::testing::Values("qwen2", "llama_tied", "qwen3", "value", "qwen3_moe", "mixtral"));

// SFT-style loss over the packed row: −Σ log_probs · mask / n.
at::Tensor row_loss(const TokenOutputs& t, const at::Tensor& mask) {
  return -(t.log_probs * mask).sum() / mask.sum();
}

TEST(OneForward, EngineGradientsEqualTheDenseModelsAtWorldOne) {
  const std::string fx = engine_fixtures();
  for (const char* name : {"qwen2", "llama_tied"}) {
    SCOPED_TRACE(name);
    const std::string dir = fx + std::string("/") + name;
    Batch b = load_batch(fx + "/batch.safetensors");
    const ModelInputs in = prepare_model_inputs(b, 0.7);  // infer_config's temperature
    const at::Tensor mask = at::ones({in.input_ids.size(0)}, at::kFloat);
    // Reference: autograd through the dense model whose flat buffers are leaves.
    Transformer arch(load_model_config(dir), at::kFloat);
    DenseParams dp(arch.config(), WeightSet(dir), at::kFloat, /*requires_grad=*/true);
    torch::autograd::backward({row_loss(model_forward(arch, dp, in, false), mask)});
    // The engine: one rank, its flat units' reduced gradients.
    auto comm = make_comm({"local"});
    EngineConfig c = infer_config(dir);
    c.forward_only = false;
    LossFn loss = [&](const Batch&, const MicroOutputs& out, const GlobalBatchInfo&) {
      LossResult r;
      r.loss = row_loss(out, mask);
      return r;
    };
    c.micro_batch_size_per_gpu = static_cast<int>(b.size());
    FsdpEngine whole(c, *comm);
    whole.forward_backward_batch(b, loss, false, false);
    auto wu = whole.model().units();
    ASSERT_EQ(wu.size(), dp.flats().size());
    for (size_t i = 0; i < wu.size(); ++i) {
      SCOPED_TRACE(wu[i]->name());
      const at::Tensor g = wu[i]->grad().narrow(0, 0, wu[i]->numel());
      const at::Tensor ref = dp.flats()[i].grad();
      ASSERT_TRUE(ref.defined());
      EXPECT_LE(max_abs_diff(g, ref), 1e-6 * std::max(1.0, ref.abs().max().item<double>()));
    }
  }
}

// The reference head: plain autograd through the full fp32 logits.
HeadOutputs full_head(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& temp) {
  at::Tensor z = at::linear(h, w).to(at::kFloat) / temp.unsqueeze(1);
  at::Tensor lse = at::logsumexp(z, {1});
  HeadOutputs o;
  o.log_probs = z.gather(1, labels.unsqueeze(1)).squeeze(1) - lse;
  o.entropy = lse - (at::softmax(z, 1) * z).sum(1);
  return o;
}

TEST(LmHead, ChunkedValuesAndGradientsMatchFullLogits) {
  at::manual_seed(0);
  const int64_t n = 37, H = 16, V = 50;
  // Forward chunks of 8 rows; backward as one row group (the weight gradient written once per
  // vocabulary block) and as groups of 16 rows (accumulated), with vocabulary blocks of 12.
  for (const HeadBlocks blocks : {HeadBlocks{8, 0, 12}, HeadBlocks{8, 16, 12}, HeadBlocks{8, 0, 0}})
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(std::string(c10::toString(dt)) + " bwd_rows " + std::to_string(blocks.bwd_rows));
    at::Tensor h0 = at::randn({n, H}).to(dt), w0 = (at::randn({V, H}) * 0.5).to(dt);
    at::Tensor labels = at::randint(V, {n}, at::kLong), temp = at::rand({n}) + 0.5;
    at::Tensor a = at::randn({n}), c = at::randn({n});
    std::vector<at::Tensor> grads[2];
    HeadOutputs outs[2];
    for (int k = 0; k < 2; ++k) {
      at::Tensor h = h0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
      outs[k] = k == 0 ? full_head(h, w, labels, temp) : lm_head_log_probs(h, w, labels, temp, true, blocks);
      torch::autograd::backward({(outs[k].log_probs * a).sum() + (outs[k].entropy * c).sum()});
      grads[k] = {h.grad().to(at::kFloat), w.grad().to(at::kFloat)};
    }
    const double tol = dt == at::kFloat ? 1e-5 : 2e-2;
    EXPECT_LE(max_abs_diff(outs[1].log_probs, outs[0].log_probs), tol);
    EXPECT_LE(max_abs_diff(outs[1].entropy, outs[0].entropy), tol);
    for (int g = 0; g < 2; ++g) {
      const double scale = grads[0][g].abs().max().item<double>();
      ASSERT_GT(scale, 0.0);
      EXPECT_LE(max_abs_diff(grads[1][g], grads[0][g]), tol * scale) << (g ? "weight" : "hidden");
    }
  }
}

TEST(LmHead, LogProbsOnlyHasNoEntropyAndTheSameGradient) {
  at::manual_seed(1);
  at::Tensor h = at::randn({20, 8}).requires_grad_(true), w = at::randn({30, 8}).requires_grad_(true);
  at::Tensor labels = at::randint(30, {20}, at::kLong), temp = at::ones({20});
  HeadOutputs o = lm_head_log_probs(h, w, labels, temp, false, HeadBlocks{7, 6, 9});
  EXPECT_FALSE(o.entropy.defined());
  torch::autograd::backward({o.log_probs.sum()});
  at::Tensor h2 = h.detach().clone().requires_grad_(true), w2 = w.detach().clone().requires_grad_(true);
  torch::autograd::backward({full_head(h2, w2, labels, temp).log_probs.sum()});
  EXPECT_LE(max_abs_diff(h.grad(), h2.grad()), 1e-5);
  EXPECT_LE(max_abs_diff(w.grad(), w2.grad()), 1e-5);
}

}  // namespace
}  // namespace verl::test
