// megatron_names.cpp — see megatron_names.h. The names are the family name table's
// (hf/names.h); this file parses the key forms (root, per-layer or layer-stacked, expert
// forms, swiglu halves as linear_fc1.weight_w / weight_v) and cuts the rows of fused tensors.
#include "merge/megatron_names.h"

#include <cctype>
#include <string_view>

#include "core/error.h"
#include "hf/names.h"

namespace verl {

namespace {

using Rows = std::vector<std::pair<int64_t, int64_t>>;

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) { return s.size() >= p.size() && s.substr(s.size() - p.size()) == p; }

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

// The key being mapped: what every step needs to check it and to name it in errors.
struct Key {
  const std::string& name;  // as in the checkpoint
  const std::vector<int64_t>& size;
  const MegatronModel& m;
  int64_t rows_of(size_t dim) const { return size.size() <= dim ? -1 : size[dim]; }
  [[noreturn]] void unknown() const {
    fail("key '", name, "' (shape ", shape_str(size), ") has no HuggingFace name for ", m.config.architecture,
         " (not in the Megatron name table)");
  }
};

// Row ranges of each part of a fused tensor with R rows.
std::vector<Rows> split_rows(Fused fused, int64_t R, const Key& k) {
  if (fused == Fused::None) return {{{0, R}}};
  if (fused == Fused::GateUp) {
    if (R % 2) fail("key '", k.name, "': ", R, " rows cannot be split into gate and up halves");
    return {{{0, R / 2}}, {{R / 2, R}}};
  }
  // QKV: per KV group g, rows [q (heads/kv_heads heads); k (1 head); v (1 head)] of head_dim.
  const ModelConfig& c = k.m.config;
  const int64_t qpg = c.num_heads / c.num_kv_heads, hd = c.head_dim;
  const int64_t group = (qpg + 2) * hd;
  if (R != c.num_kv_heads * group)
    fail("key '", k.name, "': ", R, " fused QKV rows, but the config (", c.num_heads, " heads, ", c.num_kv_heads,
         " KV heads, head_dim ", hd, ") gives ", c.num_kv_heads * group);
  std::vector<Rows> parts(3);
  for (int64_t g = 0; g < c.num_kv_heads; ++g) {
    const int64_t b = g * group;
    parts[0].push_back({b, b + qpg * hd});
    parts[1].push_back({b + qpg * hd, b + (qpg + 1) * hd});
    parts[2].push_back({b + (qpg + 1) * hd, b + group});
  }
  return parts;
}

// The rows of a (possibly padded) vocabulary matrix that the HF model keeps.
Rows vocab_rows(const Key& k, const char* what) {
  if (k.size.size() != 2) fail("key '", k.name, "': expected a 2-D ", what, ", found shape ", shape_str(k.size));
  if (k.size[0] < k.m.config.vocab_size)
    fail("key '", k.name, "': ", k.size[0], " rows but the config's vocab_size is ", k.m.config.vocab_size);
  return {{0, k.m.config.vocab_size}};  // a padded vocabulary is trimmed
}

// The root row of `key` (the value head's rows for a value model), or null.
const TensorName* root_row(std::string_view key, const MegatronModel& m) {
  for (const auto& t : root_names()) {
    const bool head = starts_with(t.megatron, "output_layer.");
    if (t.megatron == key && (!head || starts_with(t.hf, "score.") == m.value)) return &t;
  }
  return nullptr;
}

bool map_root(const TensorName& t, const Key& k, std::vector<NamedView>* out) {
  if (starts_with(t.megatron, "output_layer.") && !k.m.value && k.m.tied) return false;  // the embedding
  Rows rows;
  if (t.slot == Slot::Embed) {
    rows = vocab_rows(k, "embedding");
  } else if (t.slot == Slot::LmHead) {
    rows = vocab_rows(k, "output layer");
  } else if (t.slot == Slot::Score) {
    if (k.size.size() != 2 || k.size[0] != 1)
      fail("key '", k.name, "': a value model's output layer must be [1, hidden], found ", shape_str(k.size));
    rows = {{0, 1}};
  } else {
    rows = {{0, k.rows_of(0)}};
  }
  out->push_back({std::string(t.hf), {}, std::move(rows)});
  return true;
}

// Where a decoder-layer key puts its layer and expert, and what is left of it.
struct LayerKey {
  int64_t layer = -1;    // -1: stacked on leading dim 0
  int64_t expert = -2;   // -2: not an expert tensor; -1: stacked on the next leading dim
  size_t lead_dims = 0;  // leading (layer, expert) dims of the tensor
  std::string_view suffix;
};

// The layer: in the key (per-layer form) or the leading dim (layer-stacked form).
void parse_layer(std::string_view rest, const Key& k, LayerKey& lk) {
  const int64_t layers = k.m.config.num_layers;
  size_t n = 0;
  lk.layer = leading_index(rest, &n);
  if (lk.layer >= 0 && n < rest.size() && rest[n] == '.') {
    lk.suffix = rest.substr(n + 1);
    if (lk.layer >= layers) fail("key '", k.name, "': layer ", lk.layer, " but the config has ", layers, " layers");
    return;
  }
  lk.layer = -1;
  lk.lead_dims = 1;
  lk.suffix = rest;
  if (k.size.empty() || k.size[0] != layers)
    fail("key '", k.name, "': a layer-stacked tensor of shape ", shape_str(k.size), " should have ", layers,
         " layers (num_hidden_layers) on dim 0");
}

// Experts: local_experts.<e>.X | experts.experts.<e>.X (SequentialMLP with singleton_local_shards)
// | experts.X<e> (TEGroupedMLP) | stacked experts.experts.X / experts.X.
void parse_expert(const Key& k, LayerKey& lk) {
  if (!starts_with(lk.suffix, "mlp.experts.")) return;
  std::string_view r = lk.suffix.substr(12);
  size_t n = 0;
  if (starts_with(r, "local_experts.")) {
    r.remove_prefix(14);
    lk.expert = leading_index(r, &n);
    if (lk.expert < 0 || n >= r.size() || r[n] != '.') k.unknown();
    lk.suffix = r.substr(n + 1);
  } else if (starts_with(r, "experts.") && leading_index(r.substr(8), &n) >= 0 && n + 8 < r.size() &&
             r[n + 8] == '.') {
    lk.expert = leading_index(r.substr(8), &n);
    lk.suffix = r.substr(8 + n + 1);
  } else {
    if (starts_with(r, "experts.")) r.remove_prefix(8);
    size_t d = r.size();
    while (d > 0 && std::isdigit(static_cast<unsigned char>(r[d - 1]))) --d;
    const bool numbered = d < r.size() && (ends_with(r.substr(0, d), ".weight") || ends_with(r.substr(0, d), ".bias"));
    lk.expert = numbered ? std::stoll(std::string(r.substr(d))) : -1;
    lk.suffix = numbered ? r.substr(0, d) : r;
  }
  const int64_t experts = k.m.config.num_experts;
  if (experts <= 0) fail("key '", k.name, "' is an expert weight but the config has no experts");
  if (lk.expert == -1) {
    if (k.size.size() <= lk.lead_dims || k.size[lk.lead_dims] != experts)
      fail("key '", k.name, "': an expert-stacked tensor of shape ", shape_str(k.size), " should have ", experts,
           " experts on dim ", lk.lead_dims);
    ++lk.lead_dims;
  } else if (lk.expert >= experts) {
    fail("key '", k.name, "': expert ", lk.expert, " but the config has ", experts, " experts");
  }
}

// The HF templates (after model.layers.<i>.) of a layer key's suffix, one per fused part.
std::vector<std::string> layer_templates(const LayerKey& lk, Fused* fused) {
  std::vector<std::string> templates;
  const bool expert = lk.expert != -2;
  const std::string_view suffix = expert ? lk.suffix : megatron_layer_name(lk.suffix);
  for (const auto& t : expert ? expert_names() : layer_names())
    if (t.megatron == suffix) {
      *fused = t.fused;
      templates.push_back(expert ? "{moe}.experts.{e}." + std::string(t.hf) : std::string(t.hf));
    }
  return templates;
}

// One view per (layer, expert, part) of the tensor.
void emit_layer_views(const LayerKey& lk, const std::vector<std::string>& templates, const std::vector<Rows>& parts,
                      const Key& k, std::vector<NamedView>* out) {
  const FamilyNames& fam = family_names(k.m.config.family);
  const int64_t nl = lk.layer >= 0 ? 1 : k.m.config.num_layers;
  const int64_t ne = lk.expert == -1 ? k.m.config.num_experts : 1;
  for (int64_t li = 0; li < nl; ++li)
    for (int64_t ei = 0; ei < ne; ++ei) {
      const int64_t l = lk.layer >= 0 ? lk.layer : li;
      const int64_t e = lk.expert >= 0 ? lk.expert : ei;
      std::vector<int64_t> lead;
      if (lk.layer < 0) lead.push_back(li);
      if (lk.expert == -1) lead.push_back(ei);
      for (size_t p = 0; p < templates.size(); ++p) {
        std::string name = "model.layers." + std::to_string(l) + "." + fill_family(templates[p], fam);
        const size_t at = name.find("{e}");
        if (at != std::string::npos) name.replace(at, 3, std::to_string(e));
        out->push_back({std::move(name), lead, parts[p]});
      }
    }
}

// megatron-core's swiglu halves stored as their own keys (sharded_state_dict with
// singleton_local_shards, 0.16+): linear_fc1.weight_w is the gate, .weight_v the up projection
// (likewise bias_w / bias_v). Returns the part (0, 1) and strips the _w / _v; -1 otherwise.
int swiglu_half(LayerKey& lk) {
  for (const char* base : {".weight", ".bias"})
    for (int part = 0; part < 2; ++part) {
      const std::string tail = std::string(base) + (part ? "_v" : "_w");
      if (ends_with(lk.suffix, tail) && lk.suffix.find("linear_fc1") != std::string_view::npos) {
        lk.suffix.remove_suffix(2);
        return part;
      }
    }
  return -1;
}

bool map_layer(std::string_view rest, const Key& k, std::vector<NamedView>* out) {
  LayerKey lk;
  parse_layer(rest, k, lk);
  parse_expert(k, lk);
  const int half = swiglu_half(lk);
  Fused fused = Fused::None;
  std::vector<std::string> templates = layer_templates(lk, &fused);
  if (templates.empty()) k.unknown();
  if (half >= 0) {
    // One half of [gate; up]: the whole tensor is that part.
    if (fused != Fused::GateUp || templates.size() != 2) k.unknown();
    templates = {templates[static_cast<size_t>(half)]};
    fused = Fused::None;
  }
  const int64_t R = k.rows_of(lk.lead_dims);
  if (R < 0 && fused != Fused::None) fail("key '", k.name, "': shape ", shape_str(k.size), " has no row dim to split");
  const auto parts = R < 0 ? std::vector<Rows>{{}} : split_rows(fused, R, k);
  emit_layer_views(lk, templates, parts, k, out);
  return true;
}

}  // namespace

MegatronModel::MegatronModel(ModelConfig c, bool tie_flag, bool value_flag)
    : config(std::move(c)),
      tied(tie_flag || config.tie_word_embeddings),
      value(value_flag || config.head == Head::TokenClassification) {}

bool megatron_to_hf(const std::string& key_in, const std::vector<int64_t>& size, const MegatronModel& m,
                    std::vector<NamedView>* out) {
  std::string_view key = key_in;
  while (starts_with(key, "module.")) key.remove_prefix(7);
  if (key.find("_extra_state") != std::string_view::npos || starts_with(key, "optimizer") ||
      starts_with(key, "rng_state") || ends_with(key, ".inv_freq"))
    return false;
  const Key k{key_in, size, m};
  if (const TensorName* root = root_row(key, m)) return map_root(*root, k, out);
  if (!starts_with(key, "decoder.layers.")) k.unknown();
  return map_layer(key.substr(15), k, out);
}

}  // namespace verl
