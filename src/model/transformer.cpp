// transformer.cpp — the model code and its weight loader. Weight names follow a table of HF
// templates; every expected key must be present with the expected shape, and unknown keys
// are an error (both listed). Numerics follow transformers op for op (RMSNorm in fp32 then
// cast, rotary cos/sin from fp32 frequencies, SDPA with scale head_dim^-0.5).
#include "model/transformer.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "io/error.h"
#include "io/file.h"
#include "io/safetensors.h"

namespace verl {

namespace fs = std::filesystem;

namespace {

at::ScalarType to_scalar(DType t, const std::string& where) {
  switch (t) {
    case DType::F32: return at::kFloat;
    case DType::BF16: return at::kBFloat16;
    case DType::F16: return at::kHalf;
    case DType::F64: return at::kDouble;
    default: fail(where, ": unsupported weight dtype ", dtype_st_name(t), " (expected F32, BF16, F16 or F64)");
  }
}

std::string fmt_shape(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// All tensors of a HF folder's safetensors files, by name.
class WeightSet {
 public:
  explicit WeightSet(const std::string& dir) : dir_(dir) {
    fs::path single = fs::path(dir) / "model.safetensors";
    fs::path index = fs::path(dir) / "model.safetensors.index.json";
    std::vector<std::string> files;
    if (fs::exists(index)) {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(read_text_file(index.string()));
      } catch (const std::exception& e) {
        fail(index.string(), ": not valid JSON: ", e.what());
      }
      if (!j.contains("weight_map") || !j["weight_map"].is_object())
        fail(index.string(), ": expected an object 'weight_map'");
      std::set<std::string> uniq;
      for (auto& [k, v] : j["weight_map"].items()) {
        if (!v.is_string()) fail(index.string(), ": weight_map['", k, "'] is not a file name");
        std::string f = v.get<std::string>();
        if (f.find('/') != std::string::npos || f == "..") fail(index.string(), ": weight_map['", k, "'] names a file outside the folder: ", f);
        uniq.insert(f);
      }
      files.assign(uniq.begin(), uniq.end());
    } else if (fs::exists(single)) {
      files.push_back("model.safetensors");
    } else {
      fail(dir, ": no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)");
    }
    for (const auto& f : files) {
      readers_.push_back(std::make_unique<SafetensorsReader>((fs::path(dir) / f).string()));
      for (const auto& t : readers_.back()->tensors()) {
        if (where_.count(t.name)) fail(dir, ": tensor '", t.name, "' appears in more than one weight file");
        where_[t.name] = {readers_.size() - 1, &t};
      }
    }
  }
  bool has(const std::string& n) const { return where_.count(n) > 0; }
  std::vector<std::string> names() const {
    std::vector<std::string> r;
    for (auto& [k, v] : where_) r.push_back(k);
    return r;
  }
  // Copy a tensor out of the mapping, check its shape, convert to dtype.
  at::Tensor load(const std::string& name, const std::vector<int64_t>& shape, at::ScalarType dtype) const {
    auto it = where_.find(name);
    const SafetensorsReader& r = *readers_[it->second.first];
    const StTensor& t = *it->second.second;
    if (t.shape != shape)
      fail(r.path(), ": tensor '", name, "' has shape ", fmt_shape(t.shape), ", expected ", fmt_shape(shape),
           " from config.json");
    at::Tensor raw = at::empty(shape, at::TensorOptions().dtype(to_scalar(t.dtype, r.path() + ": '" + name + "'")));
    std::memcpy(raw.data_ptr(), r.data(t), t.nbytes());
    r.release(t);
    return raw.to(dtype);
  }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsReader>> readers_;
  std::map<std::string, std::pair<size_t, const StTensor*>> where_;
};

std::string layer_key(const char* tmpl, int i) {
  std::string s = tmpl;
  auto p = s.find("{}");
  return s.replace(p, 2, std::to_string(i));
}

at::Tensor rotate_half(const at::Tensor& x) {
  int64_t d = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, d, d), x.narrow(-1, 0, d)}, -1);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, true);
  h = h * at::rsqrt(var + eps);
  return w * h.to(x.scalar_type());
}

void rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& position_ids, at::ScalarType dtype, at::Tensor* cos,
                  at::Tensor* sin) {
  at::Tensor freqs = position_ids.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);  // [n, hd/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  *cos = emb.cos().to(dtype).unsqueeze(1);
  *sin = emb.sin().to(dtype).unsqueeze(1);
}

at::ScalarType parse_engine_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return at::kFloat;
  if (s == "bf16" || s == "bfloat16") return at::kBFloat16;
  if (s == "fp16" || s == "float16") return at::kHalf;
  fail("unknown dtype '", s, "' (expected fp32, bf16 or fp16)");
}

at::Tensor rope_inv_freq(const ModelConfig& c) {
  const int64_t dim = c.head_dim;
  at::Tensor inv = 1.0 / at::pow(c.rope_theta, at::arange(0, dim, 2, at::kLong).to(at::kFloat) / double(dim));
  const RopeScaling& rs = c.rope_scaling;
  if (rs.type == "linear") {
    inv = inv / rs.factor;
  } else if (rs.type == "llama3") {
    const double old_ctx = rs.original_max_position_embeddings;
    const double low_wavelen = old_ctx / rs.low_freq_factor, high_wavelen = old_ctx / rs.high_freq_factor;
    at::Tensor wavelen = 2 * M_PI / inv;
    at::Tensor inv_l = at::where(wavelen > low_wavelen, inv / rs.factor, inv);
    at::Tensor smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
    at::Tensor smoothed = (1 - smooth) * inv_l / rs.factor + smooth * inv_l;
    at::Tensor medium = (wavelen < high_wavelen).logical_not() * (wavelen > low_wavelen).logical_not();
    inv = at::where(medium, smoothed, inv_l);
  }
  return inv;
}

std::unique_ptr<Transformer> Transformer::load(const std::string& config_dir, const std::string& weights_dir,
                                               at::ScalarType dtype, const std::string& device) {
  if (device != "cpu") fail("device '", device, "': this build runs the engine on the CPU only");
  auto m = std::unique_ptr<Transformer>(new Transformer());
  m->cfg_ = load_model_config(config_dir);
  m->dtype_ = dtype;
  const ModelConfig& c = m->cfg_;
  WeightSet ws(weights_dir);
  const int64_t H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim;
  const int64_t qd = int64_t(c.num_heads) * hd, kvd = int64_t(c.num_kv_heads) * hd;
  const bool o_bias = c.family != Family::Qwen2 && c.attention_bias;

  // The expected keys and shapes (HF name templates).
  std::map<std::string, std::vector<int64_t>> want;
  want["model.embed_tokens.weight"] = {c.vocab_size, H};
  want["model.norm.weight"] = {H};
  if (c.head == Head::CausalLM) {
    if (!c.tie_word_embeddings) want["lm_head.weight"] = {c.vocab_size, H};
  } else {
    want["score.weight"] = {c.num_labels, H};
  }
  struct T {
    const char* tmpl;
    std::vector<int64_t> shape;
    bool on;
  };
  const std::vector<T> per_layer = {
      {"model.layers.{}.input_layernorm.weight", {H}, true},
      {"model.layers.{}.post_attention_layernorm.weight", {H}, true},
      {"model.layers.{}.self_attn.q_proj.weight", {qd, H}, true},
      {"model.layers.{}.self_attn.k_proj.weight", {kvd, H}, true},
      {"model.layers.{}.self_attn.v_proj.weight", {kvd, H}, true},
      {"model.layers.{}.self_attn.o_proj.weight", {H, qd}, true},
      {"model.layers.{}.self_attn.q_proj.bias", {qd}, c.attention_bias},
      {"model.layers.{}.self_attn.k_proj.bias", {kvd}, c.attention_bias},
      {"model.layers.{}.self_attn.v_proj.bias", {kvd}, c.attention_bias},
      {"model.layers.{}.self_attn.o_proj.bias", {H}, o_bias},
      {"model.layers.{}.self_attn.q_norm.weight", {hd}, c.qk_norm},
      {"model.layers.{}.self_attn.k_norm.weight", {hd}, c.qk_norm},
      {"model.layers.{}.mlp.gate_proj.weight", {I, H}, true},
      {"model.layers.{}.mlp.up_proj.weight", {I, H}, true},
      {"model.layers.{}.mlp.down_proj.weight", {H, I}, true},
      {"model.layers.{}.mlp.gate_proj.bias", {I}, c.mlp_bias},
      {"model.layers.{}.mlp.up_proj.bias", {I}, c.mlp_bias},
      {"model.layers.{}.mlp.down_proj.bias", {H}, c.mlp_bias},
  };
  for (int i = 0; i < c.num_layers; ++i)
    for (const auto& t : per_layer)
      if (t.on) want[layer_key(t.tmpl, i)] = t.shape;
  // score.bias: nn.Linear's default; accept checkpoints with or without it.
  const bool has_score_bias = c.head == Head::TokenClassification && ws.has("score.bias");
  if (has_score_bias) want["score.bias"] = {c.num_labels};

  std::vector<std::string> missing, unexpected;
  for (const auto& [k, s] : want)
    if (!ws.has(k)) missing.push_back(k);
  for (const auto& k : ws.names()) {
    if (want.count(k)) continue;
    if (k.size() >= 19 && k.compare(k.size() - 19, 19, "rotary_emb.inv_freq") == 0) continue;  // old checkpoints
    if (k == "lm_head.weight" && c.tie_word_embeddings) continue;                               // saved though tied
    unexpected.push_back(k);
  }
  if (!missing.empty() || !unexpected.empty()) {
    auto join = [](const std::vector<std::string>& v) {
      std::string r;
      for (size_t i = 0; i < v.size() && i < 20; ++i) r += (i ? ", " : "") + v[i];
      if (v.size() > 20) r += ", ... (" + std::to_string(v.size()) + " in all)";
      return r;
    };
    std::string msg = weights_dir + ": weights do not match " + c.architecture + " from config.json:";
    if (!missing.empty()) msg += " missing keys: " + join(missing) + ";";
    if (!unexpected.empty()) msg += " unexpected keys: " + join(unexpected) + ";";
    msg.pop_back();
    throw Error(msg);
  }

  auto L = [&](const std::string& k) { return ws.load(k, want[k], dtype); };
  m->embed_ = L("model.embed_tokens.weight");
  m->final_norm_ = L("model.norm.weight");
  if (c.head == Head::CausalLM) m->lm_head_ = c.tie_word_embeddings ? m->embed_ : L("lm_head.weight");
  else {
    m->score_w_ = L("score.weight");
    if (has_score_bias) m->score_b_ = L("score.bias");
  }
  for (int i = 0; i < c.num_layers; ++i) {
    auto K = [&](const char* t) { return L(layer_key(t, i)); };
    DecoderLayer l;
    l.input_norm = K("model.layers.{}.input_layernorm.weight");
    l.post_norm = K("model.layers.{}.post_attention_layernorm.weight");
    l.qkv_w = at::cat({K("model.layers.{}.self_attn.q_proj.weight"), K("model.layers.{}.self_attn.k_proj.weight"),
                       K("model.layers.{}.self_attn.v_proj.weight")}, 0);
    if (c.attention_bias)
      l.qkv_b = at::cat({K("model.layers.{}.self_attn.q_proj.bias"), K("model.layers.{}.self_attn.k_proj.bias"),
                         K("model.layers.{}.self_attn.v_proj.bias")}, 0);
    l.o_w = K("model.layers.{}.self_attn.o_proj.weight");
    if (o_bias) l.o_b = K("model.layers.{}.self_attn.o_proj.bias");
    if (c.qk_norm) {
      l.q_norm = K("model.layers.{}.self_attn.q_norm.weight");
      l.k_norm = K("model.layers.{}.self_attn.k_norm.weight");
    }
    l.gate_up_w = at::cat({K("model.layers.{}.mlp.gate_proj.weight"), K("model.layers.{}.mlp.up_proj.weight")}, 0);
    l.down_w = K("model.layers.{}.mlp.down_proj.weight");
    if (c.mlp_bias) {
      l.gate_up_b = at::cat({K("model.layers.{}.mlp.gate_proj.bias"), K("model.layers.{}.mlp.up_proj.bias")}, 0);
      l.down_b = K("model.layers.{}.mlp.down_proj.bias");
    }
    m->layers_.push_back(std::move(l));
  }
  m->inv_freq_ = rope_inv_freq(c);
  return m;
}

at::Device Transformer::device() const { return embed_.device(); }

int64_t Transformer::num_parameters() const {
  int64_t n = embed_.numel() + final_norm_.numel();
  if (lm_head_.defined() && !lm_head_.is_same(embed_)) n += lm_head_.numel();
  if (score_w_.defined()) n += score_w_.numel() + (score_b_.defined() ? score_b_.numel() : 0);
  for (const auto& l : layers_)
    for (const at::Tensor* t : {&l.input_norm, &l.post_norm, &l.qkv_w, &l.qkv_b, &l.o_w, &l.o_b, &l.q_norm, &l.k_norm,
                                &l.gate_up_w, &l.down_w, &l.gate_up_b, &l.down_b})
      if (t->defined()) n += t->numel();
  return n;
}

namespace {

at::Tensor attention(const ModelConfig& cfg_, const DecoderLayer& l, const at::Tensor& x, const at::Tensor& cos,
                     const at::Tensor& sin, const std::vector<int64_t>& cu) {
  const int64_t n = x.size(0), nh = cfg_.num_heads, nkv = cfg_.num_kv_heads, hd = cfg_.head_dim;
  at::Tensor qkv = at::linear(x, l.qkv_w, l.qkv_b);
  at::Tensor q = qkv.narrow(1, 0, nh * hd).view({n, nh, hd});
  at::Tensor k = qkv.narrow(1, nh * hd, nkv * hd).view({n, nkv, hd});
  at::Tensor v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd).view({n, nkv, hd});
  if (cfg_.qk_norm) {
    q = rms_norm(q, l.q_norm, cfg_.rms_norm_eps);
    k = rms_norm(k, l.k_norm, cfg_.rms_norm_eps);
  }
  q = q * cos + rotate_half(q) * sin;
  k = k * cos + rotate_half(k) * sin;
  // [n, h, d] → [h, n, d] so each sequence is a contiguous slice along dim 1.
  q = q.transpose(0, 1);
  k = k.transpose(0, 1);
  v = v.transpose(0, 1);
  if (nkv != nh) {  // GQA: repeat kv heads (as HF's repeat_kv)
    k = k.repeat_interleave(nh / nkv, 0);
    v = v.repeat_interleave(nh / nkv, 0);
  }
  at::Tensor out = at::empty({n, nh, hd}, x.options());
  const double scale = 1.0 / std::sqrt(double(hd));
  for (size_t i = 0; i + 1 < cu.size(); ++i) {
    const int64_t s = cu[i], len = cu[i + 1] - cu[i];
    if (len == 0) continue;
    at::Tensor o = at::scaled_dot_product_attention(q.narrow(1, s, len).unsqueeze(0), k.narrow(1, s, len).unsqueeze(0),
                                                    v.narrow(1, s, len).unsqueeze(0), std::nullopt, 0.0,
                                                    /*is_causal=*/true, scale);
    out.narrow(0, s, len).copy_(o.squeeze(0).transpose(0, 1));
  }
  return at::linear(out.view({n, nh * hd}), l.o_w, l.o_b);
}

}  // namespace

at::Tensor decoder_layer_forward(const ModelConfig& cfg, const DecoderLayer& l, const at::Tensor& h,
                                 const at::Tensor& cos, const at::Tensor& sin, const std::vector<int64_t>& cu) {
  at::Tensor x = h + attention(cfg, l, rms_norm(h, l.input_norm, cfg.rms_norm_eps), cos, sin, cu);
  at::Tensor gu = at::linear(rms_norm(x, l.post_norm, cfg.rms_norm_eps), l.gate_up_w, l.gate_up_b);
  const int64_t I = cfg.intermediate_size;
  return x + at::linear(at::silu(gu.narrow(1, 0, I)) * gu.narrow(1, I, I), l.down_w, l.down_b);
}

at::Tensor Transformer::hidden_states(const at::Tensor& input_ids, const at::Tensor& position_ids,
                                      const std::vector<int64_t>& cu) const {
  c10::InferenceMode guard;
  const int64_t n = input_ids.size(0);
  if (cu.empty() || cu.front() != 0 || cu.back() != n)
    fail("packed row: cu_seqlens must start at 0 and end at the row length ", n);
  const int64_t V = cfg_.vocab_size;
  if (n > 0) {
    int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
    if (lo < 0 || hi >= V) fail("input_ids: token id ", lo < 0 ? lo : hi, " is outside the vocabulary [0, ", V, ")");
  }
  at::Tensor h = at::embedding(embed_, input_ids);
  at::Tensor cos, sin;
  rope_cos_sin(inv_freq_, position_ids, dtype_, &cos, &sin);
  for (const auto& l : layers_) h = decoder_layer_forward(cfg_, l, h, cos, sin, cu);
  return rms_norm(h, final_norm_, cfg_.rms_norm_eps);
}

at::Tensor Transformer::score(const at::Tensor& hidden) const {
  if (!score_w_.defined()) fail(cfg_.architecture, " has no value head (score)");
  return at::linear(hidden, score_w_, score_b_);
}

}  // namespace verl
