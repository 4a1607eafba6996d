// test_fsdp_engine.cpp — the FSDP engine's API in one process (the single-process Comm):
// infer_batch against transformers' log-probs / entropy / values computed at test time
// (tests/oracle/engine_fixtures.py), with fixed and token-balanced micro-batches restoring the
// sample order; get_per_tensor_param against the HF weights; bf16 compute; train_batch moves
// the parameters and lowers the loss on repeated data.
#include <gtest/gtest.h>

#include <filesystem>

#include "dist/comm.h"
#include "engine/fsdp_engine.h"
#include "engine_test_util.h"

namespace verl::test {
namespace {

EngineConfig config_for(const std::string& dir) {
  EngineConfig c;
  c.model_path = dir;
  c.temperature = 0.7;  // as engine_fixtures.py
  c.forward_only = true;
  return c;
}

class FsdpEngineVsTransformers : public ::testing::TestWithParam<std::string> {};

TEST_P(FsdpEngineVsTransformers, InferBatchFixedAndDynamic) {
  const std::string fx = engine_fixtures(), name = GetParam();
  auto comm = make_comm({"local"});
  auto ref = load_st(fx + "/ref_" + name + "_fp32.safetensors");
  Batch b = load_batch(fx + "/batch.safetensors");
  for (bool dynamic : {false, true}) {
    SCOPED_TRACE(dynamic ? "dynamic" : "fixed");
    EngineConfig c = config_for(fx + "/" + name);
    c.micro_batch_size_per_gpu = 2;
    c.use_dynamic_bsz = dynamic;
    c.max_token_len_per_gpu = 64;
    FsdpEngine e(c, *comm);
    SampleOutputs so = e.infer_batch(b, !e.is_value_model());
    if (e.is_value_model()) {
      EXPECT_LE(max_abs_diff(so.values.values, ref.at("values")), 1e-4);
    } else {
      EXPECT_LE(max_abs_diff(so.log_probs.values, ref.at("log_probs")), 1e-4);
      EXPECT_LE(max_abs_diff(so.entropy.values, ref.at("entropy")), 1e-4);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, FsdpEngineVsTransformers,
                         ::testing::Values("qwen2", "llama_tied", "qwen3", "value", "qwen2_moe", "mixtral", "moe_value"));

TEST(FsdpEngine, PerTensorParamsAreTheHfWeights) {
  const std::string fx = engine_fixtures();
  auto comm = make_comm({"local"});
  for (const char* name : {"qwen2", "llama_tied"}) {
    SCOPED_TRACE(name);
    FsdpEngine e(config_for(fx + "/" + name), *comm);
    std::map<std::string, at::Tensor> hf;
    for (const auto& f : std::filesystem::directory_iterator(fx + "/" + name))
      if (f.path().extension() == ".safetensors")
        for (auto& [k, v] : load_st(f.path().string())) hf[k] = v;
    size_t seen = 0;
    e.get_per_tensor_param([&](const std::string& k, const at::Tensor& t) {
      ++seen;
      ASSERT_TRUE(hf.count(k)) << k;
      EXPECT_TRUE(at::equal(t, hf.at(k).to(at::kFloat))) << k;
    });
    size_t want = hf.size() - (hf.count("lm_head.weight") && e.model_config().tie_word_embeddings ? 1 : 0);
    EXPECT_EQ(seen, want);
  }
}

TEST(FsdpEngine, Bf16InferStaysClose) {
  const std::string fx = engine_fixtures();
  auto comm = make_comm({"local"});
  EngineConfig c = config_for(fx + "/qwen2");
  c.param_dtype = "bf16";
  FsdpEngine e(c, *comm);
  SampleOutputs so = e.infer_batch(load_batch(fx + "/batch.safetensors"), false);
  auto ref = load_st(fx + "/ref_qwen2_bf16.safetensors");  // transformers in bf16
  EXPECT_LE((so.log_probs.values - ref.at("log_probs")).abs().mean().item<double>(), 2e-2);
}

TEST(FsdpEngine, TrainBatchLowersTheLossOnRepeatedData) {
  const std::string fx = engine_fixtures();
  auto comm = make_comm({"local"});
  EngineConfig c = config_for(fx + "/qwen2");
  c.forward_only = false;
  c.adamw.lr = 3e-3;
  FsdpEngine e(c, *comm);
  Batch b = load_batch(fx + "/batch.safetensors");
  b.sequences["loss_mask"] = Jagged{at::ones_like(b.sequences["input_ids"].values, at::kFloat), b.sequences["input_ids"].offsets};
  LossFn sft = [](const Batch& m, const MicroOutputs& out, const GlobalBatchInfo& g) {
    LossResult r;
    int64_t tmax = 0;
    for (size_t i = 0; i + 1 < out.cu_seqlens.size(); ++i) tmax = std::max(tmax, out.cu_seqlens[i + 1] - out.cu_seqlens[i]);
    at::Tensor mask = pad_jagged(m.sequences.at("loss_mask").values, out.cu_seqlens, tmax);
    r.loss = sft_loss_padded(pad_jagged(out.log_probs, out.cu_seqlens, tmax), mask, *g.batch_num_tokens, g.dp_size);
    return r;
  };
  std::vector<double> losses;
  for (int s = 0; s < 4; ++s) {
    auto r = e.train_batch(b, sft, false);
    losses.push_back(r.metrics.metrics["loss"]);
    EXPECT_TRUE(r.opt.stepped);
    EXPECT_GT(r.opt.grad_norm, 0);
  }
  EXPECT_LT(losses.back(), losses.front()) << losses.front() << " -> " << losses.back();
  EXPECT_THROW(e.to("cuda"), Error);
}

}  // namespace
}  // namespace verl::test
