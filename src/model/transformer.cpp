// transformer.cpp — the model code and its weight loader. Weight names follow the table of HF
// templates in weights.h; every expected key must be present with the expected shape, and
// unknown keys are an error (both listed). Numerics follow transformers op for op (RMSNorm in fp32 then
// cast, rotary cos/sin from fp32 frequencies, SDPA with scale head_dim^-0.5).
#include "model/transformer.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <cstring>
#include <map>

#include "io/error.h"
#include "model/weights.h"

namespace verl {

namespace {

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
  const bool o_bias = c.family != Family::Qwen2 && c.attention_bias;
  const bool has_score_bias = c.head == Head::TokenClassification && ws.has("score.bias");
  std::vector<WeightSpec> specs = root_weight_specs(c, has_score_bias);
  for (int i = 0; i < c.num_layers; ++i)
    for (auto& w : layer_weight_specs(c, i)) specs.push_back(std::move(w));
  ws.check(specs, c);
  std::map<std::string, std::vector<int64_t>> want;
  for (const auto& w : specs) want[w.name] = w.shape;

  auto L = [&](const std::string& k) { return ws.load(k, want[k], dtype); };
  m->embed_ = L("model.embed_tokens.weight");
  m->final_norm_ = L("model.norm.weight");
  if (c.head == Head::CausalLM) m->lm_head_ = c.tie_word_embeddings ? m->embed_ : L("lm_head.weight");
  else {
    m->score_w_ = L("score.weight");
    if (has_score_bias) m->score_b_ = L("score.bias");
  }
  for (int i = 0; i < c.num_layers; ++i) {
    auto K = [&](const char* t) {
      std::string k = t;
      return L(k.replace(k.find("{}"), 2, std::to_string(i)));
    };
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
