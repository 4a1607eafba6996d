// test_model.cpp — config.json parsing (fields as transformers sees them, clear errors for
// unsupported architectures and rope scalings) and weight loading (missing / unexpected keys
// listed, shape mismatches named, sharded index, bf16 conversion).
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "engine_test_util.h"
#include "model/transformer.h"

namespace verl::test {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

TEST(ModelConfig, FieldsAsTransformersSeesThem) {
  const std::string fx = engine_fixtures();
  json info = json::parse(read_text_file(fx + "/info.json"));
  for (std::string name : {"qwen2", "llama_tied", "llama_linear", "qwen3", "value"}) {
    ModelConfig c = load_model_config(fx + "/" + name);
    EXPECT_EQ(c.head_dim, info[name]["head_dim"].get<int>()) << name;
    EXPECT_EQ(c.num_kv_heads, info[name]["num_kv_heads"].get<int>()) << name;
    EXPECT_EQ(c.tie_word_embeddings, info[name]["tie_word_embeddings"].get<bool>()) << name;
    auto m = Transformer::load(fx + "/" + name, fx + "/" + name, at::kFloat);
    EXPECT_EQ(m->num_parameters(), info[name]["num_params"].get<int64_t>()) << name;
  }
  EXPECT_EQ(load_model_config(fx + "/qwen3").family, Family::Qwen3);
  EXPECT_TRUE(load_model_config(fx + "/qwen3").qk_norm);
  EXPECT_TRUE(load_model_config(fx + "/qwen2").attention_bias);
  EXPECT_EQ(load_model_config(fx + "/value").head, Head::TokenClassification);
  EXPECT_EQ(load_model_config(fx + "/llama_tied").rope_scaling.type, "llama3");
}

TEST(ModelConfig, UnsupportedArchitectureNamesTheSupportedOnes) {
  json j = json::parse(read_text_file(engine_fixtures() + "/qwen2/config.json"));
  j["architectures"] = {"GPT2LMHeadModel"};
  std::string m = error_of([&] { parse_model_config(j.dump(), "x/config.json"); });
  EXPECT_NE(m.find("GPT2LMHeadModel"), std::string::npos) << m;
  for (const auto& a : supported_architectures()) EXPECT_NE(m.find(a), std::string::npos) << m;
}

TEST(ModelConfig, UnsupportedRopeScalingIsAnError) {
  json j = json::parse(read_text_file(engine_fixtures() + "/llama_tied/config.json"));
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"rope_theta", 10000.0}};
  std::string m = error_of([&] { parse_model_config(j.dump(), "x/config.json"); });
  EXPECT_NE(m.find("yarn"), std::string::npos) << m;
  EXPECT_NE(m.find("linear, llama3"), std::string::npos) << m;
  // The older `rope_scaling` spelling is read too.
  j.erase("rope_parameters");
  j["rope_theta"] = 10000.0;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 3.0}};
  ModelConfig c = parse_model_config(j.dump(), "x");
  EXPECT_EQ(c.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 3.0);
}

TEST(ModelWeights, MissingAndUnexpectedKeysAreListed) {
  const std::string fx = engine_fixtures();
  TempDir tmp;
  fs::copy_file(fx + "/qwen2/config.json", tmp / "config.json");
  auto w = load_st(fx + "/qwen2/model.safetensors");
  w.erase("model.norm.weight");
  w.erase("model.layers.1.self_attn.k_proj.bias");
  w["extra.weight"] = at::zeros({2});
  save_st(tmp / "model.safetensors", w);
  std::string m = error_of([&] { Transformer::load(tmp.path.string(), tmp.path.string(), at::kFloat); });
  EXPECT_NE(m.find("missing keys: model.layers.1.self_attn.k_proj.bias, model.norm.weight"), std::string::npos) << m;
  EXPECT_NE(m.find("unexpected keys: extra.weight"), std::string::npos) << m;
}

TEST(ModelWeights, ShapeMismatchNamesKeyAndShapes) {
  const std::string fx = engine_fixtures();
  TempDir tmp;
  fs::copy_file(fx + "/qwen2/config.json", tmp / "config.json");
  auto w = load_st(fx + "/qwen2/model.safetensors");
  w["model.norm.weight"] = at::ones({63});
  save_st(tmp / "model.safetensors", w);
  std::string m = error_of([&] { Transformer::load(tmp.path.string(), tmp.path.string(), at::kFloat); });
  EXPECT_NE(m.find("'model.norm.weight' has shape [63], expected [64]"), std::string::npos) << m;
  fs::remove(tmp / "model.safetensors");
  m = error_of([&] { Transformer::load(tmp.path.string(), tmp.path.string(), at::kFloat); });
  EXPECT_NE(m.find("no model.safetensors"), std::string::npos) << m;
}

TEST(ModelWeights, ShardedIndexAndBf16Conversion) {
  const std::string fx = engine_fixtures();
  ASSERT_TRUE(fs::exists(fx + "/llama_tied/model.safetensors.index.json"));
  auto m = Transformer::load(fx + "/llama_tied", fx + "/llama_tied", at::kBFloat16);
  EXPECT_EQ(m->dtype(), at::kBFloat16);
  EXPECT_EQ(m->lm_head().scalar_type(), at::kBFloat16);
  // Tied: the output projection is the (converted) embedding itself.
  SafetensorsReader r0(fx + "/llama_tied/" +
                       json::parse(read_text_file(fx + "/llama_tied/model.safetensors.index.json"))["weight_map"]
                                  ["model.embed_tokens.weight"].get<std::string>());
  auto emb = load_st(r0.path()).at("model.embed_tokens.weight");
  EXPECT_TRUE(at::equal(m->lm_head(), emb.to(at::kBFloat16)));
}

}  // namespace
}  // namespace verl::test
