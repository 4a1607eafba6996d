// config.cpp — HF config.json → ModelConfig, with the defaults each family's transformers
// config class uses when a field is absent (see config.h).
#include "hf/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/file.h"

namespace verl {

namespace {
using nlohmann::json;

struct Arch {
  const char* name;
  Family family;
  Head head;
  bool engine;  // the engine builds it
  bool megatron = true;  // the Megatron merger maps it
};
const Arch kArchs[] = {
    {"LlamaForCausalLM", Family::Llama, Head::CausalLM, true},
    {"LlamaForTokenClassification", Family::Llama, Head::TokenClassification, true},
    {"Qwen2ForCausalLM", Family::Qwen2, Head::CausalLM, true},
    {"Qwen2ForTokenClassification", Family::Qwen2, Head::TokenClassification, true},
    {"Qwen3ForCausalLM", Family::Qwen3, Head::CausalLM, true},
    {"Qwen3ForTokenClassification", Family::Qwen3, Head::TokenClassification, true},
    {"Qwen2MoeForCausalLM", Family::Qwen2Moe, Head::CausalLM, true},
    {"Qwen2MoeForTokenClassification", Family::Qwen2Moe, Head::TokenClassification, true},
    {"Qwen3MoeForCausalLM", Family::Qwen3Moe, Head::CausalLM, true},
    {"Qwen3MoeForTokenClassification", Family::Qwen3Moe, Head::TokenClassification, true},
    {"MixtralForCausalLM", Family::Mixtral, Head::CausalLM, true},
    {"MixtralForTokenClassification", Family::Mixtral, Head::TokenClassification, true},
    // Vision-language: a Qwen2 text model (text_config) and a vision tower (vision_config).
    {"Qwen2VLForConditionalGeneration", Family::Qwen2, Head::CausalLM, true, false},
    {"Qwen2_5_VLForConditionalGeneration", Family::Qwen2, Head::CausalLM, true, false},
};
bool serves(const Arch& a, ConfigUse use) { return use == ConfigUse::Engine ? a.engine : a.megatron; }

template <class T>
T get_or(const json& j, const char* key, T dflt, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  try {
    return it->get<T>();
  } catch (const std::exception&) {
    fail(where, ": config field '", key, "' has the wrong type (", it->dump(), ")");
  }
}
int get_pos_int(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer() || it->get<long long>() <= 0)
    fail(where, ": config field '", key, "' must be a positive integer, found ",
         it == j.end() ? std::string("nothing") : it->dump());
  return it->get<int>();
}
}  // namespace

const std::vector<std::string>& supported_architectures(ConfigUse use) {
  auto list = [](ConfigUse u) {
    std::vector<std::string> r;
    for (const auto& a : kArchs)
      if (serves(a, u)) r.push_back(a.name);
    return r;
  };
  static const std::vector<std::string> engine = list(ConfigUse::Engine), megatron = list(ConfigUse::Megatron);
  return use == ConfigUse::Engine ? engine : megatron;
}

namespace {

const Arch& find_arch(const json& j, const std::string& where, ConfigUse use) {
  std::string arch;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    arch = j["architectures"][0].get<std::string>();
  else if (j.contains("model_type") && j["model_type"].is_string()) {  // config saved without a model
    std::string mt = j["model_type"].get<std::string>();
    if (mt == "llama") arch = "LlamaForCausalLM";
    else if (mt == "qwen2") arch = "Qwen2ForCausalLM";
    else if (mt == "qwen3") arch = "Qwen3ForCausalLM";
    else arch = "model_type " + mt;
  }
  for (const auto& a : kArchs)
    if (arch == a.name && serves(a, use)) return a;
  if (use == ConfigUse::Megatron && is_vision_language_architecture(arch))
    fail(where, ": vision-language model '", arch, "' is not supported by the Megatron backend (no name map for its ",
         "vision tower and projector); verl FSDP checkpoints of it merge with --backend fsdp");
  std::string list;
  for (const auto& a : supported_architectures(use)) list += (list.empty() ? "" : ", ") + a;
  fail(where, ": unsupported architecture '", arch.empty() ? std::string("(none)") : arch, "'",
       use == ConfigUse::Megatron ? " for the Megatron backend" : "", "; supported: ", list);
}

void parse_shape(const json& j, const std::string& where, ConfigUse use, ModelConfig& c) {
  c.vocab_size = get_pos_int(j, "vocab_size", where);
  c.hidden_size = get_pos_int(j, "hidden_size", where);
  c.intermediate_size = use == ConfigUse::Engine || j.contains("intermediate_size")
                            ? get_pos_int(j, "intermediate_size", where)
                            : 0;
  c.num_layers = get_pos_int(j, "num_hidden_layers", where);
  c.num_heads = get_pos_int(j, "num_attention_heads", where);
  c.num_kv_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                       ? get_pos_int(j, "num_key_value_heads", where)
                       : c.num_heads;
  if (c.num_heads % c.num_kv_heads != 0)
    fail(where, ": num_attention_heads (", c.num_heads, ") is not a multiple of num_key_value_heads (",
         c.num_kv_heads, ")");
  c.head_dim = j.contains("head_dim") && !j["head_dim"].is_null() ? get_pos_int(j, "head_dim", where)
                                                                  : c.hidden_size / c.num_heads;
  if (!j.contains("head_dim") && c.hidden_size % c.num_heads != 0)
    fail(where, ": hidden_size (", c.hidden_size, ") is not a multiple of num_attention_heads (", c.num_heads, ")");
  if (use == ConfigUse::Engine && c.head_dim % 2)
    fail(where, ": head_dim must be even for rotary embeddings, found ", c.head_dim);
  c.num_experts = get_or<int>(j, "num_experts", get_or<int>(j, "num_local_experts", 0, where), where);
}

// The engine's rotary embedding; a weight conversion (strict = false) keeps an unknown type as
// written and does not refuse it.
void parse_rope(const json& j, const std::string& where, bool strict, ModelConfig& c) {
  // transformers 5 moved rope_theta into rope_parameters; accept both.
  json rope = j.contains("rope_parameters") && j["rope_parameters"].is_object() ? j["rope_parameters"]
              : j.contains("rope_scaling") && j["rope_scaling"].is_object() ? j["rope_scaling"]
                                                                            : json::object();
  c.rope_theta = get_or<double>(j, "rope_theta", get_or<double>(rope, "rope_theta", 10000.0, where), where);
  std::string rtype = get_or<std::string>(rope, "rope_type", get_or<std::string>(rope, "type", "default", where), where);
  if (rtype == "default" || rtype.empty() || (rtype == "mrope" && rope.contains("mrope_section"))) {
    c.rope_scaling.type = "none";
  } else if (rtype == "linear") {
    c.rope_scaling.type = "linear";
    c.rope_scaling.factor = get_or<double>(rope, "factor", 1.0, where);
  } else if (rtype == "llama3") {
    c.rope_scaling.type = "llama3";
    c.rope_scaling.factor = get_or<double>(rope, "factor", 8.0, where);
    c.rope_scaling.low_freq_factor = get_or<double>(rope, "low_freq_factor", 1.0, where);
    c.rope_scaling.high_freq_factor = get_or<double>(rope, "high_freq_factor", 4.0, where);
    c.rope_scaling.original_max_position_embeddings =
        get_or<int>(rope, "original_max_position_embeddings", 8192, where);
  } else if (strict) {
    fail(where, ": unsupported rope_scaling type '", rtype, "'; supported: default, linear, llama3");
  } else {
    c.rope_scaling.type = rtype;
  }
  if (c.rope_scaling.factor <= 0) fail(where, ": rope_scaling.factor must be positive");
}

// What the engine's forward implements (the merger converts weights whatever these say).
void check_engine_forward(const json& j, const std::string& where, const ModelConfig& c) {
  if (get_or<bool>(j, "use_sliding_window", false, where))
    fail(where, ": use_sliding_window is not supported (full attention only)");
  // Mixtral has no use_sliding_window switch: a sliding_window value turns it on.
  if (c.family == Family::Mixtral && j.contains("sliding_window") && !j["sliding_window"].is_null())
    fail(where, ": sliding_window is not supported (full attention only; Mixtral needs sliding_window null)");
  if (get_or<double>(j, "router_jitter_noise", 0.0, where) != 0.0)
    fail(where, ": router_jitter_noise is not supported (random noise on the router inputs in training); set it to 0");
  if (c.hidden_act != "silu")
    fail(where, ": unsupported hidden_act '", c.hidden_act, "'; supported: silu (SwiGLU)");
}

// Biases and norms each family's HF modules have.
void parse_family_flags(const json& j, const std::string& where, ModelConfig& c) {
  const bool qwen2 = c.family == Family::Qwen2 || c.family == Family::Qwen2Moe;
  c.attention_bias = c.family == Family::Qwen2 ? true
                     : c.family == Family::Qwen2Moe ? get_or<bool>(j, "qkv_bias", true, where)
                                                    : get_or<bool>(j, "attention_bias", false, where);
  c.o_proj_bias = !qwen2 && c.attention_bias;
  c.mlp_bias = c.family == Family::Llama ? get_or<bool>(j, "mlp_bias", false, where) : false;
  c.qk_norm = c.family == Family::Qwen3 || c.family == Family::Qwen3Moe;
}

// The mixture-of-experts fields, with the defaults of each family's transformers config class;
// read and checked only for the engine (a weight conversion needs num_experts alone, as written).
void parse_moe(const json& j, const std::string& where, ConfigUse use, ModelConfig& c) {
  if (use != ConfigUse::Engine) return;
  const bool q2 = c.family == Family::Qwen2Moe, q3 = c.family == Family::Qwen3Moe, mx = c.family == Family::Mixtral;
  if (!q2 && !q3 && !mx) {
    c.num_experts = 0;  // dense families have no experts
    return;
  }
  // Either spelling in any family: transformers 5 writes Qwen3-MoE's as num_local_experts.
  const int dflt = mx ? 8 : q2 ? 60 : 128;
  c.num_experts = get_or<int>(j, "num_experts", get_or<int>(j, "num_local_experts", dflt, where), where);
  c.num_experts_per_tok = get_or<int>(j, "num_experts_per_tok", mx ? 2 : q2 ? 4 : 8, where);
  c.moe_intermediate_size = mx ? c.intermediate_size : get_or<int>(j, "moe_intermediate_size", q2 ? 1408 : 768, where);
  c.shared_expert_intermediate_size = q2 ? get_or<int>(j, "shared_expert_intermediate_size", 5632, where) : 0;
  c.norm_topk_prob = mx ? true : get_or<bool>(j, "norm_topk_prob", false, where);
  c.decoder_sparse_step = mx ? 1 : get_or<int>(j, "decoder_sparse_step", 1, where);
  if (!mx) c.mlp_only_layers = get_or<std::vector<int>>(j, "mlp_only_layers", {}, where);
  c.output_router_logits = get_or<bool>(j, "output_router_logits", false, where);
  c.router_aux_loss_coef = get_or<double>(j, "router_aux_loss_coef", 0.001, where);
  if (c.num_experts < 0) fail(where, ": num_experts must be >= 0, found ", c.num_experts);
  if (c.num_experts > 0 && (c.num_experts_per_tok < 1 || c.num_experts_per_tok > c.num_experts))
    fail(where, ": num_experts_per_tok must be in [1, num_experts = ", c.num_experts, "], found ", c.num_experts_per_tok);
  if (c.num_experts > 0 && c.moe_intermediate_size <= 0)
    fail(where, ": moe_intermediate_size must be a positive integer, found ", c.moe_intermediate_size);
  if (q2 && c.shared_expert_intermediate_size <= 0)
    fail(where, ": shared_expert_intermediate_size must be a positive integer, found ", c.shared_expert_intermediate_size);
  if (c.decoder_sparse_step < 1) fail(where, ": decoder_sparse_step must be >= 1, found ", c.decoder_sparse_step);
  for (int l : c.mlp_only_layers)
    if (l < 0 || l >= c.num_layers)
      fail(where, ": mlp_only_layers has layer ", l, ", outside [0, num_hidden_layers = ", c.num_layers, ")");
  if (!std::isfinite(c.router_aux_loss_coef) || c.router_aux_loss_coef < 0)
    fail(where, ": router_aux_loss_coef must be a finite number >= 0");
}

// transformers' Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig (their defaults where a field is
// absent), the token ids of the top level and the text model's mrope_section.
VisionConfig parse_vision_config(const json& top, const json& text, const std::string& where, bool qwen2_5) {
  if (!top.contains("vision_config") || !top["vision_config"].is_object())
    fail(where, ": a vision-language model needs a vision_config object");
  const json& v = top["vision_config"];
  VisionConfig vc;
  vc.qwen2_5 = qwen2_5;
  vc.depth = get_or<int>(v, "depth", 32, where);
  vc.num_heads = get_or<int>(v, "num_heads", 16, where);
  if (qwen2_5) {
    vc.width = get_or<int>(v, "hidden_size", 3584, where);
    vc.out_hidden = get_or<int>(v, "out_hidden_size", 3584, where);
    vc.mlp_hidden = get_or<int>(v, "intermediate_size", 3420, where);
    vc.hidden_act = get_or<std::string>(v, "hidden_act", "silu", where);
    vc.window_size = get_or<int>(v, "window_size", 112, where);
    vc.fullatt_block_indexes = get_or<std::vector<int>>(v, "fullatt_block_indexes", {7, 15, 23, 31}, where);
    vc.tokens_per_second = get_or<int>(v, "tokens_per_second", 4, where);
  } else {
    vc.width = get_or<int>(v, "embed_dim", 1280, where);
    vc.out_hidden = get_or<int>(v, "hidden_size", 3584, where);
    vc.mlp_hidden = vc.width * get_or<int>(v, "mlp_ratio", 4, where);
    vc.hidden_act = get_or<std::string>(v, "hidden_act", "quick_gelu", where);
  }
  vc.in_channels = get_or<int>(v, "in_channels", 3, where);
  vc.patch_size = get_or<int>(v, "patch_size", 14, where);
  vc.temporal_patch_size = get_or<int>(v, "temporal_patch_size", 2, where);
  vc.spatial_merge_size = get_or<int>(v, "spatial_merge_size", 2, where);
  for (int x : {vc.depth, vc.width, vc.out_hidden, vc.num_heads, vc.mlp_hidden, vc.in_channels, vc.patch_size,
                vc.temporal_patch_size, vc.spatial_merge_size})
    if (x <= 0) fail(where, ": vision_config: depth, widths, num_heads, patch and merge sizes must be positive");
  if (vc.width % vc.num_heads || (vc.width / vc.num_heads) % 4)
    fail(where, ": vision_config: the width (", vc.width, ") must split into num_heads (", vc.num_heads,
         ") heads of a multiple of 4 (2-D rotary)");
  for (int b : vc.fullatt_block_indexes)
    if (b < 0 || b >= vc.depth) fail(where, ": vision_config.fullatt_block_indexes has block ", b, ", outside [0, depth = ", vc.depth, ")");
  if (qwen2_5 && vc.window_size / vc.spatial_merge_size / vc.patch_size < 1)
    fail(where, ": vision_config.window_size ", vc.window_size, " is smaller than one merged patch");
  static const char* kActs[] = {"quick_gelu", "silu", "gelu", "gelu_pytorch_tanh"};
  if (std::find_if(std::begin(kActs), std::end(kActs), [&](const char* a) { return vc.hidden_act == a; }) == std::end(kActs))
    fail(where, ": vision_config.hidden_act '", vc.hidden_act, "' is not supported; supported: quick_gelu, silu, gelu, gelu_pytorch_tanh");
  // The text model's multimodal rotary sections (rope_parameters / rope_scaling).
  json rope = text.contains("rope_parameters") && text["rope_parameters"].is_object() ? text["rope_parameters"]
              : text.contains("rope_scaling") && text["rope_scaling"].is_object() ? text["rope_scaling"]
                                                                                  : json::object();
  vc.mrope_section = get_or<std::vector<int>>(rope, "mrope_section", {}, where);
  vc.image_token_id = get_or<int64_t>(top, "image_token_id", 151655, where);
  vc.video_token_id = get_or<int64_t>(top, "video_token_id", 151656, where);
  vc.vision_start_token_id = get_or<int64_t>(top, "vision_start_token_id", 151652, where);
  return vc;
}

int parse_num_labels(const json& j, const std::string& where) {
  int n = 2;  // transformers' PretrainedConfig default
  if (j.contains("num_labels") && j["num_labels"].is_number_integer()) n = j["num_labels"].get<int>();
  else if (j.contains("id2label") && j["id2label"].is_object()) n = int(j["id2label"].size());
  if (n <= 0) fail(where, ": num_labels must be positive");
  return n;
}

}  // namespace

ModelConfig parse_model_config(const std::string& text, const std::string& where, ConfigUse use) {
  json top;
  try {
    top = json::parse(text);
  } catch (const std::exception& e) {
    fail(where, ": not valid JSON: ", e.what());
  }
  if (!top.is_object()) fail(where, ": expected a JSON object");
  ModelConfig c;
  const Arch& arch = find_arch(top, where, use);
  // A vision-language model keeps its text model's fields in text_config (transformers 5) or at
  // the top level (older configs); tie_word_embeddings is a top-level field.
  const bool vl = is_vision_language_architecture(arch.name);
  const json& j = vl && top.contains("text_config") && top["text_config"].is_object() ? top["text_config"] : top;
  c.architecture = arch.name;
  c.family = arch.family;
  c.head = arch.head;
  parse_shape(j, where, use, c);
  c.rms_norm_eps = get_or<double>(j, "rms_norm_eps", 1e-6, where);
  parse_rope(j, where, use == ConfigUse::Engine, c);
  c.tie_word_embeddings = get_or<bool>(top, "tie_word_embeddings", get_or<bool>(j, "tie_word_embeddings", false, where), where);
  parse_family_flags(j, where, c);
  if (vl) c.vision = parse_vision_config(top, j, where, arch.name == std::string("Qwen2_5_VLForConditionalGeneration"));
  parse_moe(j, where, use, c);
  c.hidden_act = get_or<std::string>(j, "hidden_act", "silu", where);
  if (use == ConfigUse::Engine) check_engine_forward(j, where, c);
  if (c.head == Head::TokenClassification) c.num_labels = parse_num_labels(j, where);
  if (c.vision) {
    int sum = 0;
    for (int s : c.vision->mrope_section) sum += s;
    if (c.vision->mrope_section.size() != 3 || sum * 2 != c.head_dim)
      fail(where, ": a vision-language model needs rope_parameters.mrope_section: 3 sections summing to head_dim / 2 = ",
           c.head_dim / 2);
  }
  c.torch_dtype = get_or<std::string>(j, "torch_dtype", get_or<std::string>(j, "dtype", "", where), where);
  // transformers builds the embedding as nn.Embedding(vocab, hidden, padding_idx=pad_token_id):
  // a negative index counts from the end, one past the vocabulary is refused (as torch does).
  if (use == ConfigUse::Engine && j.contains("pad_token_id") && j["pad_token_id"].is_number_integer()) {
    int64_t p = j["pad_token_id"].get<int64_t>();
    if (p < 0) p += c.vocab_size;
    if (p < 0 || p >= c.vocab_size)
      fail(where, ": pad_token_id ", j["pad_token_id"].get<int64_t>(), " is outside the vocabulary (size ",
           c.vocab_size, ")");
    c.pad_token_id = p;
  }
  return c;
}

bool ModelConfig::is_moe_layer(int layer) const {
  if (num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
  return (layer + 1) % decoder_sparse_step == 0;
}

const std::vector<std::string>& vision_language_architectures() {
  static const std::vector<std::string> v = {"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"};
  return v;
}

bool is_vision_language_architecture(const std::string& arch) {
  const auto& v = vision_language_architectures();
  return std::find(v.begin(), v.end(), arch) != v.end();
}

ConfigShapes read_config_shapes(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    fail(where, ": not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(where, ": expected a JSON object");
  auto sub = [&](const char* k) -> const json* {
    auto it = j.find(k);
    return it != j.end() && it->is_object() ? &*it : nullptr;
  };
  const json* tc = sub("text_config");
  const json* vc = sub("vision_config");
  auto int_in = [](const json* o, const char* k) -> std::optional<int64_t> {
    if (!o) return std::nullopt;
    auto it = o->find(k);
    if (it == o->end() || !it->is_number_integer()) return std::nullopt;
    return it->get<int64_t>();
  };
  auto bool_in = [](const json* o, const char* k) -> std::optional<bool> {
    if (!o) return std::nullopt;
    auto it = o->find(k);
    if (it == o->end() || !it->is_boolean()) return std::nullopt;
    return it->get<bool>();
  };
  auto text_int = [&](const char* k) { return tc && int_in(tc, k) ? int_in(tc, k) : int_in(&j, k); };
  ConfigShapes s;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    s.architecture = j["architectures"][0].get<std::string>();
  s.vocab_size = text_int("vocab_size");
  s.hidden_size = text_int("hidden_size");
  s.num_layers = text_int("num_hidden_layers");
  s.num_heads = text_int("num_attention_heads");
  s.num_kv_heads = text_int("num_key_value_heads");
  s.head_dim = text_int("head_dim");
  s.attention_bias = tc && bool_in(tc, "attention_bias") ? bool_in(tc, "attention_bias") : bool_in(&j, "attention_bias");
  s.tie_word_embeddings = bool_in(&j, "tie_word_embeddings") ? bool_in(&j, "tie_word_embeddings")
                                                             : bool_in(tc, "tie_word_embeddings");
  s.vision = vc != nullptr;
  if (vc) {
    s.vision_depth = int_in(vc, "depth");
    if (int_in(vc, "embed_dim")) {  // Qwen2-VL
      s.vision_width = int_in(vc, "embed_dim");
      s.vision_out = int_in(vc, "hidden_size");
    } else {  // Qwen2.5-VL
      s.vision_width = int_in(vc, "hidden_size");
      s.vision_out = int_in(vc, "out_hidden_size");
    }
  }
  return s;
}

ModelConfig load_model_config(const std::string& dir_or_file) {
  namespace fs = std::filesystem;
  std::string p = fs::is_directory(dir_or_file) ? (fs::path(dir_or_file) / "config.json").string() : dir_or_file;
  if (!fs::exists(p)) fail(p, ": no such file (expected a HuggingFace config.json)");
  return parse_model_config(read_text_file(p), p);
}

}  // namespace verl
