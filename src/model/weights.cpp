// weights.cpp — the HF weight table and the weight folder reader (see weights.h).
#include "model/weights.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/file.h"
#include "io/safetensors.h"
#include "hf/folder.h"
#include "model/torch_dtype.h"

namespace verl {

namespace fs = std::filesystem;

namespace {

std::string fmt_shape(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::string layer_name(const char* tmpl, int i) {
  std::string s = tmpl;
  return s.replace(s.find("{}"), 2, std::to_string(i));
}

}  // namespace

std::vector<WeightSpec> layer_weight_specs(const ModelConfig& c, int i) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim;
  const int64_t qd = int64_t(c.num_heads) * hd, kvd = int64_t(c.num_kv_heads) * hd;
  const bool o_bias = c.family != Family::Qwen2 && c.attention_bias;
  std::vector<WeightSpec> p;
  auto add = [&](const char* t, std::vector<int64_t> s, bool on = true) {
    if (on) p.push_back({layer_name(t, i), std::move(s)});
  };
  add("model.layers.{}.input_layernorm.weight", {H});
  add("model.layers.{}.self_attn.q_proj.weight", {qd, H});
  add("model.layers.{}.self_attn.k_proj.weight", {kvd, H});
  add("model.layers.{}.self_attn.v_proj.weight", {kvd, H});
  add("model.layers.{}.self_attn.q_proj.bias", {qd}, c.attention_bias);
  add("model.layers.{}.self_attn.k_proj.bias", {kvd}, c.attention_bias);
  add("model.layers.{}.self_attn.v_proj.bias", {kvd}, c.attention_bias);
  add("model.layers.{}.self_attn.o_proj.weight", {H, qd});
  add("model.layers.{}.self_attn.o_proj.bias", {H}, o_bias);
  add("model.layers.{}.self_attn.q_norm.weight", {hd}, c.qk_norm);
  add("model.layers.{}.self_attn.k_norm.weight", {hd}, c.qk_norm);
  add("model.layers.{}.post_attention_layernorm.weight", {H});
  add("model.layers.{}.mlp.gate_proj.weight", {I, H});
  add("model.layers.{}.mlp.up_proj.weight", {I, H});
  add("model.layers.{}.mlp.gate_proj.bias", {I}, c.mlp_bias);
  add("model.layers.{}.mlp.up_proj.bias", {I}, c.mlp_bias);
  add("model.layers.{}.mlp.down_proj.weight", {H, I});
  add("model.layers.{}.mlp.down_proj.bias", {H}, c.mlp_bias);
  return p;
}

std::vector<WeightSpec> root_weight_specs(const ModelConfig& c, bool score_bias) {
  std::vector<WeightSpec> p;
  p.push_back({"model.embed_tokens.weight", {c.vocab_size, c.hidden_size}});
  p.push_back({"model.norm.weight", {c.hidden_size}});
  if (c.head == Head::CausalLM) {
    if (!c.tie_word_embeddings) p.push_back({"lm_head.weight", {c.vocab_size, c.hidden_size}});
  } else {
    p.push_back({"score.weight", {c.num_labels, c.hidden_size}});
    if (score_bias) p.push_back({"score.bias", {c.num_labels}});
  }
  return p;
}

std::vector<FlatParam> flat_layout(const std::vector<WeightSpec>& specs, int64_t* numel) {
  std::vector<FlatParam> r;
  int64_t off = 0;
  for (const auto& w : specs) {
    int64_t n = 1;
    for (auto s : w.shape) n *= s;
    r.push_back({w.name, w.shape, off, n});
    off += n;
  }
  if (numel) *numel = off;
  return r;
}

at::Tensor param_view(const at::Tensor& flat, const FlatParam& p) { return flat.narrow(0, p.offset, p.numel).view(p.shape); }

std::vector<std::vector<WeightSpec>> WeightSet::unit_specs(const ModelConfig& c) const {
  const bool score_bias = c.head == Head::TokenClassification && has("score.bias");
  std::vector<std::vector<WeightSpec>> units{root_weight_specs(c, score_bias)};
  for (int i = 0; i < c.num_layers; ++i) units.push_back(layer_weight_specs(c, i));
  std::vector<WeightSpec> all;
  for (const auto& u : units) all.insert(all.end(), u.begin(), u.end());
  check(all, c);
  return units;
}

WeightSet::WeightSet(const std::string& dir) : folder_(std::make_unique<HfFolder>(dir)) {}

WeightSet::~WeightSet() = default;

bool WeightSet::has(const std::string& name) const { return folder_->contains(name); }

std::vector<std::string> WeightSet::names() const { return folder_->names(); }

void WeightSet::check(const std::vector<WeightSpec>& want, const ModelConfig& c) const {
  std::set<std::string> wanted;
  std::vector<std::string> missing, unexpected;
  for (const auto& w : want) {
    wanted.insert(w.name);
    if (!has(w.name)) missing.push_back(w.name);
  }
  std::sort(missing.begin(), missing.end());
  for (const auto& k : names()) {
    if (wanted.count(k)) continue;
    if (k.size() >= 19 && k.compare(k.size() - 19, 19, "rotary_emb.inv_freq") == 0) continue;  // old checkpoints
    if (k == "lm_head.weight" && c.tie_word_embeddings) continue;                               // saved though tied
    unexpected.push_back(k);
  }
  if (missing.empty() && unexpected.empty()) return;
  auto join = [](const std::vector<std::string>& v) {
    std::string r;
    for (size_t i = 0; i < v.size() && i < 20; ++i) r += (i ? ", " : "") + v[i];
    if (v.size() > 20) r += ", ... (" + std::to_string(v.size()) + " in all)";
    return r;
  };
  std::string msg = folder_->dir() + ": weights do not match " + c.architecture + " from config.json:";
  if (!missing.empty()) msg += " missing keys: " + join(missing) + ";";
  if (!unexpected.empty()) msg += " unexpected keys: " + join(unexpected) + ";";
  msg.pop_back();
  throw Error(msg);
}

at::Tensor WeightSet::load(const std::string& name, const std::vector<int64_t>& shape, at::ScalarType dtype) const {
  auto [r, t] = folder_->find(name);
  if (t->shape != shape)
    fail(r->path(), ": tensor '", name, "' has shape ", fmt_shape(t->shape), ", expected ", fmt_shape(shape),
         " from config.json");
  if (!dtype_is_float(t->dtype)) fail(r->path(), ": tensor '", name, "' has dtype ", dtype_st_name(t->dtype), ", expected a float type");
  return read_st_tensor(*r, *t).to(dtype);
}

}  // namespace verl
