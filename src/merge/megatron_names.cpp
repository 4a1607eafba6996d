// megatron_names.cpp — see megatron_names.h. The tables below are the whole mapping: a
// Megatron suffix, how its rows split, and the HF name templates ({moe}, {shared} and the
// expert projection names vary by family).
#include "merge/megatron_names.h"

#include <cctype>
#include <string_view>

#include "core/error.h"

namespace verl {

namespace {

enum class Split { None, Qkv, GateUp };

struct LayerRule {
  std::string_view megatron;  // suffix after decoder.layers.[<i>.]
  Split split;
  std::string_view hf[3];     // templates after model.layers.<i>.; one per part
};

// Per-layer tensors (dense and MoE). Order matters only for readability.
constexpr LayerRule kLayerRules[] = {
    {"input_layernorm.weight", Split::None, {"input_layernorm.weight"}},
    {"input_layernorm.bias", Split::None, {"input_layernorm.bias"}},
    {"self_attention.linear_qkv.layer_norm_weight", Split::None, {"input_layernorm.weight"}},
    {"self_attention.linear_qkv.layer_norm_bias", Split::None, {"input_layernorm.bias"}},
    {"self_attention.linear_qkv.weight", Split::Qkv,
     {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"}},
    {"self_attention.linear_qkv.bias", Split::Qkv,
     {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}},
    {"self_attention.q_layernorm.weight", Split::None, {"self_attn.q_norm.weight"}},
    {"self_attention.k_layernorm.weight", Split::None, {"self_attn.k_norm.weight"}},
    {"self_attention.linear_proj.weight", Split::None, {"self_attn.o_proj.weight"}},
    {"self_attention.linear_proj.bias", Split::None, {"self_attn.o_proj.bias"}},
    {"pre_mlp_layernorm.weight", Split::None, {"post_attention_layernorm.weight"}},
    {"pre_mlp_layernorm.bias", Split::None, {"post_attention_layernorm.bias"}},
    {"mlp.linear_fc1.layer_norm_weight", Split::None, {"post_attention_layernorm.weight"}},
    {"mlp.linear_fc1.layer_norm_bias", Split::None, {"post_attention_layernorm.bias"}},
    {"mlp.linear_fc1.weight", Split::GateUp, {"mlp.gate_proj.weight", "mlp.up_proj.weight"}},
    {"mlp.linear_fc1.bias", Split::GateUp, {"mlp.gate_proj.bias", "mlp.up_proj.bias"}},
    {"mlp.linear_fc2.weight", Split::None, {"mlp.down_proj.weight"}},
    {"mlp.linear_fc2.bias", Split::None, {"mlp.down_proj.bias"}},
    // MoE: router, shared experts and their gate.
    {"mlp.router.weight", Split::None, {"{moe}.gate.weight"}},
    {"mlp.router.expert_bias", Split::None, {"{moe}.gate.e_score_correction_bias"}},
    {"mlp.shared_experts.linear_fc1.weight", Split::GateUp, {"{shared}.gate_proj.weight", "{shared}.up_proj.weight"}},
    {"mlp.shared_experts.linear_fc2.weight", Split::None, {"{shared}.down_proj.weight"}},
    {"mlp.shared_experts.gate_weight", Split::None, {"mlp.shared_expert_gate.weight"}},
};

// Expert tensors, after the expert index is known: {moe}.experts.<e>.<name>.
struct ExpertRule {
  std::string_view megatron;
  Split split;
  std::string_view hf[2];     // {gate}/{up}/{down} become the family's projection names
};
constexpr ExpertRule kExpertRules[] = {
    {"linear_fc1.weight", Split::GateUp, {"{gate}.weight", "{up}.weight"}},
    {"linear_fc1.bias", Split::GateUp, {"{gate}.bias", "{up}.bias"}},
    {"linear_fc2.weight", Split::None, {"{down}.weight"}},
    {"linear_fc2.bias", Split::None, {"{down}.bias"}},
};

struct Family {
  std::string_view name, moe, shared, gate, up, down;
};
constexpr Family kFamilies[] = {
    {"llama", "mlp", "mlp.shared_experts", "gate_proj", "up_proj", "down_proj"},
    {"qwen2", "mlp", "mlp.shared_experts", "gate_proj", "up_proj", "down_proj"},
    {"qwen3", "mlp", "mlp.shared_experts", "gate_proj", "up_proj", "down_proj"},
    {"qwen2_moe", "mlp", "mlp.shared_expert", "gate_proj", "up_proj", "down_proj"},
    {"qwen3_moe", "mlp", "mlp.shared_experts", "gate_proj", "up_proj", "down_proj"},
    {"mixtral", "block_sparse_moe", "block_sparse_moe.shared_experts", "w1", "w3", "w2"},
};

struct Arch {
  std::string_view arch, family;
};
constexpr Arch kArchs[] = {
    {"LlamaForCausalLM", "llama"},         {"LlamaForTokenClassification", "llama"},
    {"Qwen2ForCausalLM", "qwen2"},         {"Qwen2ForTokenClassification", "qwen2"},
    {"Qwen3ForCausalLM", "qwen3"},         {"Qwen3ForTokenClassification", "qwen3"},
    {"Qwen2MoeForCausalLM", "qwen2_moe"},  {"Qwen3MoeForCausalLM", "qwen3_moe"},
    {"MixtralForCausalLM", "mixtral"},
};

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) { return s.size() >= p.size() && s.substr(s.size() - p.size()) == p; }

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  for (size_t p = 0; (p = s.find(from, p)) != std::string::npos; p += to.size()) s.replace(p, from.size(), to);
  return s;
}

const Family& family_of(const std::string& name) {
  for (const auto& f : kFamilies)
    if (f.name == name) return f;
  fail("internal: unknown family ", name);
}

int64_t int_field(const nlohmann::ordered_json& c, const char* k, int64_t dflt) {
  if (c.contains(k) && c[k].is_number_integer()) return c[k].get<int64_t>();
  return dflt;
}

// Leading decimal index of s (and its length), or -1.
int64_t leading_index(std::string_view s, size_t* len) {
  size_t i = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  if (i == 0 || i > 9) return -1;
  *len = i;
  return std::stoll(std::string(s.substr(0, i)));
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

// Row ranges of each part of a split tensor with R rows.
std::vector<std::vector<std::pair<int64_t, int64_t>>> split_rows(Split split, int64_t R, const MegatronModel& m,
                                                                 const std::string& key) {
  if (split == Split::None) return {{{0, R}}};
  if (split == Split::GateUp) {
    if (R % 2) fail("key '", key, "': ", R, " rows cannot be split into gate and up halves");
    return {{{0, R / 2}}, {{R / 2, R}}};
  }
  // QKV: per KV group g, rows [q (heads/kv_heads heads); k (1 head); v (1 head)] of head_dim.
  const int64_t qpg = m.heads / m.kv_heads, hd = m.head_dim;
  const int64_t group = (qpg + 2) * hd;
  if (R != m.kv_heads * group)
    fail("key '", key, "': ", R, " fused QKV rows, but the config (", m.heads, " heads, ", m.kv_heads, " KV heads, head_dim ",
         hd, ") gives ", m.kv_heads * group);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> parts(3);
  for (int64_t g = 0; g < m.kv_heads; ++g) {
    const int64_t b = g * group;
    parts[0].push_back({b, b + qpg * hd});
    parts[1].push_back({b + qpg * hd, b + (qpg + 1) * hd});
    parts[2].push_back({b + (qpg + 1) * hd, b + group});
  }
  return parts;
}

}  // namespace

MegatronModel MegatronModel::from_config(const nlohmann::ordered_json& c, bool tie_flag, bool value_flag) {
  MegatronModel m;
  if (c.contains("architectures") && c["architectures"].is_array() && !c["architectures"].empty() &&
      c["architectures"][0].is_string())
    m.arch = c["architectures"][0].get<std::string>();
  for (const auto& a : kArchs)
    if (a.arch == m.arch) m.family = a.family;
  if (m.family.empty()) {
    std::string list;
    for (const auto& a : kArchs) list += (list.empty() ? "" : ", ") + std::string(a.arch);
    fail("config.json: architecture '", m.arch.empty() ? std::string("(none)") : m.arch,
         "' is not supported by the Megatron backend (supported: ", list, ")");
  }
  m.hidden = int_field(c, "hidden_size", 0);
  m.layers = int_field(c, "num_hidden_layers", 0);
  m.heads = int_field(c, "num_attention_heads", 0);
  m.kv_heads = int_field(c, "num_key_value_heads", m.heads);
  m.vocab = int_field(c, "vocab_size", 0);
  m.head_dim = int_field(c, "head_dim", m.heads > 0 ? m.hidden / m.heads : 0);
  m.experts = int_field(c, "num_experts", int_field(c, "num_local_experts", 0));
  if (m.hidden <= 0 || m.layers <= 0 || m.heads <= 0 || m.kv_heads <= 0 || m.head_dim <= 0 || m.vocab <= 0 ||
      m.heads % m.kv_heads)
    fail("config.json: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads (dividing the heads), "
         "head_dim and vocab_size must be positive");
  m.value = value_flag || m.arch.find("ForTokenClassification") != std::string::npos;
  m.tied = tie_flag || (c.contains("tie_word_embeddings") && c["tie_word_embeddings"].is_boolean() &&
                        c["tie_word_embeddings"].get<bool>());
  return m;
}

bool megatron_to_hf(const std::string& key_in, const std::vector<int64_t>& size, const MegatronModel& m,
                    std::vector<NamedView>* out) {
  std::string_view key = key_in;
  while (starts_with(key, "module.")) key.remove_prefix(7);
  if (key.find("_extra_state") != std::string_view::npos || starts_with(key, "optimizer") ||
      starts_with(key, "rng_state") || ends_with(key, ".inv_freq"))
    return false;
  const Family& fam = family_of(m.family);
  auto fill = [&](std::string s) {
    s = replace_all(std::move(s), "{moe}", fam.moe);
    s = replace_all(std::move(s), "{shared}", fam.shared);
    s = replace_all(std::move(s), "{gate}", fam.gate);
    s = replace_all(std::move(s), "{up}", fam.up);
    return replace_all(std::move(s), "{down}", fam.down);
  };
  auto rows_of = [&](size_t lead) -> int64_t {
    if (size.size() <= lead) return -1;
    return size[lead];
  };
  auto vocab_rows = [&](const char* what) {
    const int64_t R = rows_of(0);
    if (size.size() != 2) fail("key '", key_in, "': expected a 2-D ", what, ", found shape ", shape_str(size));
    if (R < m.vocab)
      fail("key '", key_in, "': ", R, " rows but the config's vocab_size is ", m.vocab);
    return std::vector<std::pair<int64_t, int64_t>>{{0, m.vocab}};  // a padded vocabulary is trimmed
  };

  if (key == "embedding.word_embeddings.weight") {
    out->push_back({"model.embed_tokens.weight", {}, vocab_rows("embedding")});
    return true;
  }
  if (key == "decoder.final_layernorm.weight" || key == "decoder.final_layernorm.bias") {
    out->push_back({ends_with(key, "weight") ? "model.norm.weight" : "model.norm.bias", {}, {{0, rows_of(0)}}});
    return true;
  }
  if (key == "output_layer.bias") {  // a value head with a bias
    if (!m.value && m.tied) return false;
    out->push_back({m.value ? "score.bias" : "lm_head.bias", {}, {{0, rows_of(0)}}});
    return true;
  }
  if (key == "output_layer.weight") {
    if (m.value) {
      if (size.size() != 2 || size[0] != 1)
        fail("key '", key_in, "': a value model's output layer must be [1, hidden], found ", shape_str(size));
      out->push_back({"score.weight", {}, {{0, 1}}});
      return true;
    }
    if (m.tied) return false;
    out->push_back({"lm_head.weight", {}, vocab_rows("output layer")});
    return true;
  }
  auto unknown = [&]() -> bool {
    fail("key '", key_in, "' (shape ", shape_str(size), ") has no HuggingFace name for ", m.arch,
         " (not in the Megatron name table)");
  };
  if (!starts_with(key, "decoder.layers.")) return unknown();
  std::string_view rest = key.substr(15);

  // Layer: in the key (per-layer form) or the leading dim (layer-stacked form).
  size_t lead_dims = 0, n = 0;
  int64_t layer = leading_index(rest, &n);
  if (layer >= 0 && n < rest.size() && rest[n] == '.') {
    rest.remove_prefix(n + 1);
    if (layer >= m.layers) fail("key '", key_in, "': layer ", layer, " but the config has ", m.layers, " layers");
  } else {
    layer = -1;
    lead_dims = 1;
    if (size.empty() || size[0] != m.layers)
      fail("key '", key_in, "': a layer-stacked tensor of shape ", shape_str(size), " should have ", m.layers,
           " layers (num_hidden_layers) on dim 0");
  }

  // Experts: local_experts.<e>.X | experts.X<e> | stacked experts.experts.X / experts.X.
  int64_t expert = -2;  // -2: not an expert tensor; -1: stacked on the next leading dim
  std::string_view esuf;
  if (starts_with(rest, "mlp.experts.")) {
    std::string_view r = rest.substr(12);
    if (starts_with(r, "local_experts.")) {
      r.remove_prefix(14);
      expert = leading_index(r, &n);
      if (expert < 0 || n >= r.size() || r[n] != '.') return unknown();
      esuf = r.substr(n + 1);
    } else {
      if (starts_with(r, "experts.")) r.remove_prefix(8);
      size_t d = r.size();
      while (d > 0 && std::isdigit(static_cast<unsigned char>(r[d - 1]))) --d;
      if (d < r.size() && (ends_with(r.substr(0, d), ".weight") || ends_with(r.substr(0, d), ".bias"))) {
        expert = std::stoll(std::string(r.substr(d)));  // TEGroupedMLP: linear_fc1.weight<e>
        esuf = r.substr(0, d);
      } else {
        expert = -1;
        esuf = r;
      }
    }
    if (m.experts <= 0) fail("key '", key_in, "' is an expert weight but the config has no experts");
    if (expert == -1) {
      if (size.size() <= lead_dims || size[lead_dims] != m.experts)
        fail("key '", key_in, "': an expert-stacked tensor of shape ", shape_str(size), " should have ", m.experts,
             " experts on dim ", lead_dims);
      ++lead_dims;
    } else if (expert >= m.experts) {
      fail("key '", key_in, "': expert ", expert, " but the config has ", m.experts, " experts");
    }
  }

  Split split = Split::None;
  std::vector<std::string> templates;
  if (expert != -2) {
    for (const auto& r : kExpertRules)
      if (r.megatron == esuf) {
        split = r.split;
        for (const auto& h : r.hf)
          if (!h.empty()) templates.push_back("{moe}.experts.{e}." + std::string(h));
      }
  } else {
    for (const auto& r : kLayerRules)
      if (r.megatron == rest) {
        split = r.split;
        for (const auto& h : r.hf)
          if (!h.empty()) templates.emplace_back(h);
      }
  }
  if (templates.empty()) return unknown();

  const int64_t R = rows_of(lead_dims);
  if (R < 0 && split != Split::None)
    fail("key '", key_in, "': shape ", shape_str(size), " has no row dim to split");
  const auto parts = R < 0 ? std::vector<std::vector<std::pair<int64_t, int64_t>>>{{}} : split_rows(split, R, m, key_in);
  const int64_t nl = layer >= 0 ? 1 : m.layers;
  const int64_t ne = expert == -1 ? m.experts : 1;
  for (int64_t li = 0; li < nl; ++li)
    for (int64_t ei = 0; ei < ne; ++ei) {
      const int64_t l = layer >= 0 ? layer : li;
      const int64_t e = expert >= 0 ? expert : ei;
      std::vector<int64_t> lead;
      if (layer < 0) lead.push_back(li);
      if (expert == -1) lead.push_back(ei);
      for (size_t p = 0; p < templates.size(); ++p) {
        std::string name = "model.layers." + std::to_string(l) + "." + fill(templates[p]);
        name = replace_all(std::move(name), "{e}", std::to_string(e));
        out->push_back({std::move(name), lead, parts[p]});
      }
    }
  return true;
}

}  // namespace verl
