// test_forward.cpp — the engine's forward half against transformers, computed at test time on
// small random models of each family: fp32 log-probs / entropy / values within 1e-4, per-sample
// temperature, packed vs per-sequence, fixed vs dynamic micro-batching, prepare_model_inputs.
#include <gtest/gtest.h>

#include "engine/forward_step.h"
#include "engine_test_util.h"

namespace verl::test {
namespace {

struct FamilyCase {
  std::string name;
};

class ForwardVsTransformers : public ::testing::TestWithParam<std::string> {};

TEST_P(ForwardVsTransformers, Fp32LogProbsEntropyValues) {
  const std::string fx = engine_fixtures(), name = GetParam();
  auto model = Transformer::load(fx + "/" + name, fx + "/" + name, at::kFloat);
  Batch b = load_batch(fx + "/batch.safetensors");
  InferOptions o;
  o.calculate_entropy = !model->is_value_model();
  o.temperature = 0.7;  // as engine_fixtures.py
  SampleOutputs so = infer_batch(*model, b, o);
  auto ref = load_st(fx + "/ref_" + name + "_fp32.safetensors");
  if (model->is_value_model()) {
    EXPECT_LE(max_abs_diff(so.values.values, ref.at("values")), 1e-4);
  } else {
    ASSERT_EQ(so.log_probs.values.numel(), ref.at("log_probs").numel());
    EXPECT_LE(max_abs_diff(so.log_probs.values, ref.at("log_probs")), 1e-4);
    EXPECT_LE(max_abs_diff(so.entropy.values, ref.at("entropy")), 1e-4);
    EXPECT_GT(ref.at("log_probs").abs().max().item<double>(), 1.0);  // a non-trivial reference
  }
}

TEST_P(ForwardVsTransformers, RopeInvFreqMatches) {
  const std::string fx = engine_fixtures(), name = GetParam();
  at::Tensor want = load_st(fx + "/" + name + "_inv_freq.safetensors").at("inv_freq");
  at::Tensor got = rope_inv_freq(load_model_config(fx + "/" + name));
  EXPECT_TRUE(at::allclose(got, want, 1e-6, 0)) << got << want;
}

INSTANTIATE_TEST_SUITE_P(Families, ForwardVsTransformers,
                         ::testing::Values("qwen2", "llama_tied", "llama_linear", "qwen3", "value", "qwen2_moe",
                                           "qwen3_moe", "mixtral", "moe_value"));

TEST(Forward, PerSampleTemperature) {
  const std::string fx = engine_fixtures();
  auto model = Transformer::load(fx + "/qwen2", fx + "/qwen2", at::kFloat);
  SampleOutputs so = infer_batch(*model, load_batch(fx + "/batch_temp.safetensors"), {.calculate_entropy = true});
  auto ref = load_st(fx + "/ref_qwen2_fp32_temp.safetensors");
  EXPECT_LE(max_abs_diff(so.log_probs.values, ref.at("log_probs")), 1e-4);
  EXPECT_LE(max_abs_diff(so.entropy.values, ref.at("entropy")), 1e-4);
}

TEST(Forward, PackedEqualsOneSequenceAtATime) {
  const std::string fx = engine_fixtures();
  auto model = Transformer::load(fx + "/qwen3", fx + "/qwen3", at::kFloat);
  Batch b = load_batch(fx + "/batch.safetensors");
  SampleOutputs packed = infer_batch(*model, b, {.calculate_entropy = true});
  SampleOutputs single = infer_batch(*model, b, {.calculate_entropy = true, .micro = {.micro_batch_size = 1}});
  EXPECT_LE(max_abs_diff(packed.log_probs.values, single.log_probs.values), 1e-5);
  EXPECT_LE(max_abs_diff(packed.entropy.values, single.entropy.values), 1e-5);
}

TEST(Forward, FixedAndDynamicMicroBatchesAgreePerSample) {
  const std::string fx = engine_fixtures();
  for (std::string name : {"llama_tied", "value"}) {
    auto model = Transformer::load(fx + "/" + name, fx + "/" + name, at::kFloat);
    Batch b = load_batch(fx + "/batch.safetensors");
    b.non_tensors["uid"] = {"a", "b", "c", "d", "e", "f", "g", "h"};
    Partitions dyn_parts;
    SampleOutputs fixed = infer_batch(*model, b, {.micro = {.micro_batch_size = 3}});
    SampleOutputs dyn = infer_batch(*model, b, {.micro = {.max_token_len = 48}}, &dyn_parts);
    EXPECT_GT(dyn_parts.size(), 2u);
    bool reordered = false;  // balancing really changed the sample order
    for (size_t i = 0, k = 0; i < dyn_parts.size(); ++i)
      for (int idx : dyn_parts[i]) reordered |= idx != int(k++);
    EXPECT_TRUE(reordered);
    const Jagged& a = model->is_value_model() ? fixed.values : fixed.log_probs;
    const Jagged& c = model->is_value_model() ? dyn.values : dyn.log_probs;
    ASSERT_EQ(a.offsets, c.offsets);
    ASSERT_EQ(a.offsets, b.sequences["input_ids"].offsets);
    EXPECT_LE(max_abs_diff(a.values, c.values), 1e-5) << name;
  }
}

TEST(Forward, PrepareModelInputsPacksAndRolls) {
  Batch b;
  at::Tensor ids = at::tensor(std::vector<int64_t>{5, 6, 7, 8, 9, 10}, at::kLong);
  b.sequences["input_ids"] = Jagged{ids, {0, 3, 4, 6}};
  b.tensors["temperature"] = at::tensor(std::vector<float>{0.5f, 1.0f, 2.0f});
  b.non_tensors["multi_modal_inputs"] = {nlohmann::json::object(), nlohmann::json::object(), nlohmann::json::object()};
  ModelInputs in = prepare_model_inputs(b, 1.0);
  // positions restart per sequence, labels are the row rolled left by one
  EXPECT_TRUE(at::equal(in.position_ids, at::cat({at::arange(3, at::kLong), at::arange(1, at::kLong), at::arange(2, at::kLong)})));
  EXPECT_TRUE(at::equal(in.labels, at::roll(ids, {-1}, {0})));
  EXPECT_TRUE(at::equal(in.temperature, at::tensor(std::vector<float>{0.5f, 0.5f, 0.5f, 1.f, 2.f, 2.f})));
  EXPECT_EQ(in.multi_modal_inputs.size(), 3u);  // taken from the non-tensor part
  EXPECT_EQ(in.pad_size, 0);
  // sp = 1: pad/slice is the identity
  EXPECT_TRUE(at::equal(sp_pad_and_slice(ids, 1, 0, at::zeros({0}, at::kLong)), ids));
  // sp = 4: 6 tokens padded to 8; slices cover the padded row in order
  std::vector<at::Tensor> ids_parts, pos_parts, temp_parts;
  for (int r = 0; r < 4; ++r) {
    ModelInputs s = prepare_model_inputs(b, 1.0, 4, r);
    EXPECT_EQ(s.pad_size, 2);
    ids_parts.push_back(s.input_ids);
    pos_parts.push_back(s.position_ids);
    temp_parts.push_back(s.temperature);
  }
  EXPECT_TRUE(at::equal(at::cat(ids_parts), at::cat({ids, at::zeros({2}, at::kLong)})));
  EXPECT_TRUE(at::equal(at::cat(pos_parts), at::cat({in.position_ids, at::arange(2, at::kLong)})));
  EXPECT_TRUE(at::equal(at::cat(temp_parts), at::cat({in.temperature, at::ones({2})})));
}

TEST(Forward, TextModelRejectsMultiModalInputs) {
  const std::string fx = engine_fixtures();
  auto model = Transformer::load(fx + "/qwen2", fx + "/qwen2", at::kFloat);
  Batch b = load_batch(fx + "/batch.safetensors");
  b.non_tensors["multi_modal_inputs"] = std::vector<nlohmann::json>(8, nlohmann::json{{"pixel_values", 1}});
  try {
    infer_batch(*model, b, {});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multi_modal_inputs"), std::string::npos);
  }
}

}  // namespace
}  // namespace verl::test
