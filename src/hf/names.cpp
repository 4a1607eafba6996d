// names.cpp — the family name table (see names.h). The rows of a layer are in the engine's
// flat order (fused parts contiguous: [q;k;v] weights, then their biases, [gate;up]), which is
// also the order of the parts in Megatron's fused tensors.
#include "hf/names.h"

#include "core/error.h"

namespace verl {

namespace {

using D = Dim;
using F = Fused;
using S = Slot;
using W = When;

constexpr TensorName kRoot[] = {
    {"model.embed_tokens.weight", "embedding.word_embeddings.weight", F::None, S::Embed, W::Always, {D::Vocab, D::Hidden}},
    {"model.norm.weight", "decoder.final_layernorm.weight", F::None, S::FinalNorm, W::Always, {D::Hidden}},
    {"model.norm.bias", "decoder.final_layernorm.bias", F::None, S::None, W::Never, {D::Hidden}},
    {"lm_head.weight", "output_layer.weight", F::None, S::LmHead, W::Untied, {D::Vocab, D::Hidden}},
    {"lm_head.bias", "output_layer.bias", F::None, S::None, W::Never, {D::Vocab}},
    {"score.weight", "output_layer.weight", F::None, S::Score, W::ValueHead, {D::Labels, D::Hidden}},
    {"score.bias", "output_layer.bias", F::None, S::ScoreBias, W::ScoreBias, {D::Labels}},
};

constexpr TensorName kLayer[] = {
    {"input_layernorm.weight", "input_layernorm.weight", F::None, S::InputNorm, W::Always, {D::Hidden}},
    {"input_layernorm.bias", "input_layernorm.bias", F::None, S::None, W::Never, {D::Hidden}},
    {"self_attn.q_proj.weight", "self_attention.linear_qkv.weight", F::Qkv, S::Qkv, W::Always, {D::QRows, D::Hidden}},
    {"self_attn.k_proj.weight", "self_attention.linear_qkv.weight", F::Qkv, S::Qkv, W::Always, {D::KvRows, D::Hidden}},
    {"self_attn.v_proj.weight", "self_attention.linear_qkv.weight", F::Qkv, S::Qkv, W::Always, {D::KvRows, D::Hidden}},
    {"self_attn.q_proj.bias", "self_attention.linear_qkv.bias", F::Qkv, S::QkvBias, W::AttentionBias, {D::QRows}},
    {"self_attn.k_proj.bias", "self_attention.linear_qkv.bias", F::Qkv, S::QkvBias, W::AttentionBias, {D::KvRows}},
    {"self_attn.v_proj.bias", "self_attention.linear_qkv.bias", F::Qkv, S::QkvBias, W::AttentionBias, {D::KvRows}},
    {"self_attn.o_proj.weight", "self_attention.linear_proj.weight", F::None, S::O, W::Always, {D::Hidden, D::QRows}},
    {"self_attn.o_proj.bias", "self_attention.linear_proj.bias", F::None, S::OBias, W::OProjBias, {D::Hidden}},
    {"self_attn.q_norm.weight", "self_attention.q_layernorm.weight", F::None, S::QNorm, W::QkNorm, {D::HeadDim}},
    {"self_attn.k_norm.weight", "self_attention.k_layernorm.weight", F::None, S::KNorm, W::QkNorm, {D::HeadDim}},
    {"post_attention_layernorm.weight", "pre_mlp_layernorm.weight", F::None, S::PostNorm, W::Always, {D::Hidden}},
    {"post_attention_layernorm.bias", "pre_mlp_layernorm.bias", F::None, S::None, W::Never, {D::Hidden}},
    {"mlp.gate_proj.weight", "mlp.linear_fc1.weight", F::GateUp, S::GateUp, W::DenseMlp, {D::Intermediate, D::Hidden}},
    {"mlp.up_proj.weight", "mlp.linear_fc1.weight", F::GateUp, S::GateUp, W::DenseMlp, {D::Intermediate, D::Hidden}},
    {"mlp.gate_proj.bias", "mlp.linear_fc1.bias", F::GateUp, S::GateUpBias, W::MlpBias, {D::Intermediate}},
    {"mlp.up_proj.bias", "mlp.linear_fc1.bias", F::GateUp, S::GateUpBias, W::MlpBias, {D::Intermediate}},
    {"mlp.down_proj.weight", "mlp.linear_fc2.weight", F::None, S::Down, W::DenseMlp, {D::Hidden, D::Intermediate}},
    {"mlp.down_proj.bias", "mlp.linear_fc2.bias", F::None, S::DownBias, W::MlpBias, {D::Hidden}},
    // MoE: router, shared experts and their gate (the experts' rows are kExpert).
    {"{moe}.gate.weight", "mlp.router.weight", F::None, S::Router, W::MoeLayer, {D::Experts, D::Hidden}},
    {"{moe}.gate.e_score_correction_bias", "mlp.router.expert_bias"},
    {"{shared}.gate_proj.weight", "mlp.shared_experts.linear_fc1.weight", F::GateUp, S::SharedGateUp, W::SharedExpert,
     {D::SharedIntermediate, D::Hidden}},
    {"{shared}.up_proj.weight", "mlp.shared_experts.linear_fc1.weight", F::GateUp, S::SharedGateUp, W::SharedExpert,
     {D::SharedIntermediate, D::Hidden}},
    {"{shared}.down_proj.weight", "mlp.shared_experts.linear_fc2.weight", F::None, S::SharedDown, W::SharedExpert,
     {D::Hidden, D::SharedIntermediate}},
    {"mlp.shared_expert_gate.weight", "mlp.shared_experts.gate_weight", F::None, S::SharedGate, W::SharedExpert,
     {D::One, D::Hidden}},
};

constexpr TensorName kExpert[] = {
    {"{gate}.weight", "linear_fc1.weight", F::GateUp, S::ExpertGateUp, W::MoeLayer, {D::MoeIntermediate, D::Hidden}},
    {"{up}.weight", "linear_fc1.weight", F::GateUp, S::ExpertGateUp, W::MoeLayer, {D::MoeIntermediate, D::Hidden}},
    {"{gate}.bias", "linear_fc1.bias", F::GateUp},
    {"{up}.bias", "linear_fc1.bias", F::GateUp},
    {"{down}.weight", "linear_fc2.weight", F::None, S::ExpertDown, W::MoeLayer, {D::Hidden, D::MoeIntermediate}},
    {"{down}.bias", "linear_fc2.bias"},
};

// Transformer Engine fuses a layer's norms into the next linear; its keys name them there.
constexpr std::pair<std::string_view, std::string_view> kTeAliases[] = {
    {"self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"},
    {"self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"},
    {"mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"},
    {"mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"},
};

constexpr FamilyNames kFamilies[] = {
    {Family::Llama, "llama", "mlp", "mlp.shared_experts", "gate_proj", "up_proj", "down_proj"},
    {Family::Qwen2, "qwen2", "mlp", "mlp.shared_experts", "gate_proj", "up_proj", "down_proj"},
    {Family::Qwen3, "qwen3", "mlp", "mlp.shared_experts", "gate_proj", "up_proj", "down_proj"},
    {Family::Qwen2Moe, "qwen2_moe", "mlp", "mlp.shared_expert", "gate_proj", "up_proj", "down_proj"},
    {Family::Qwen3Moe, "qwen3_moe", "mlp", "mlp.shared_experts", "gate_proj", "up_proj", "down_proj"},
    {Family::Mixtral, "mixtral", "block_sparse_moe", "block_sparse_moe.shared_experts", "w1", "w3", "w2"},
};

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  for (size_t p = 0; (p = s.find(from, p)) != std::string::npos; p += to.size()) s.replace(p, from.size(), to);
  return s;
}

}  // namespace

std::span<const TensorName> root_names() { return kRoot; }
std::span<const TensorName> layer_names() { return kLayer; }
std::span<const TensorName> expert_names() { return kExpert; }

std::string_view megatron_layer_name(std::string_view suffix) {
  for (const auto& [te, name] : kTeAliases)
    if (suffix == te) return name;
  return suffix;
}

const FamilyNames& family_names(Family f) {
  for (const auto& n : kFamilies)
    if (n.family == f) return n;
  fail("internal: no name table for family ", static_cast<int>(f));
}

std::string fill_family(std::string_view tmpl, const FamilyNames& f) {
  std::string s(tmpl);
  if (s.find('{') == std::string::npos) return s;
  for (auto [from, to] : {std::pair{"{moe}", f.moe}, {"{shared}", f.shared}, {"{gate}", f.gate}, {"{up}", f.up},
                          {"{down}", f.down}})
    s = replace_all(std::move(s), from, to);
  return s;
}

bool model_has(const TensorName& t, const ModelConfig& c, bool score_bias, int layer) {
  switch (t.when) {
    case When::Always: return true;
    case When::Untied: return c.head == Head::CausalLM && !c.tie_word_embeddings;
    case When::ValueHead: return c.head == Head::TokenClassification;
    case When::ScoreBias: return c.head == Head::TokenClassification && score_bias;
    case When::AttentionBias: return c.attention_bias;
    case When::OProjBias: return c.o_proj_bias;
    case When::QkNorm: return c.qk_norm;
    case When::MlpBias: return c.mlp_bias && !c.is_moe_layer(layer);
    case When::DenseMlp: return !c.is_moe_layer(layer);
    case When::MoeLayer: return c.is_moe_layer(layer);
    case When::SharedExpert: return c.is_moe_layer(layer) && c.shared_expert_intermediate_size > 0;
    case When::Never: return false;
  }
  return false;
}

std::vector<int64_t> shape_of(const TensorName& t, const ModelConfig& c) {
  std::vector<int64_t> s;
  for (Dim d : t.shape) {
    switch (d) {
      case Dim::None: return s;
      case Dim::Hidden: s.push_back(c.hidden_size); break;
      case Dim::Intermediate: s.push_back(c.intermediate_size); break;
      case Dim::QRows: s.push_back(int64_t(c.num_heads) * c.head_dim); break;
      case Dim::KvRows: s.push_back(int64_t(c.num_kv_heads) * c.head_dim); break;
      case Dim::HeadDim: s.push_back(c.head_dim); break;
      case Dim::Vocab: s.push_back(c.vocab_size); break;
      case Dim::Labels: s.push_back(c.num_labels); break;
      case Dim::Experts: s.push_back(c.num_experts); break;
      case Dim::MoeIntermediate: s.push_back(c.moe_intermediate_size); break;
      case Dim::SharedIntermediate: s.push_back(c.shared_expert_intermediate_size); break;
      case Dim::One: s.push_back(1); break;
    }
  }
  return s;
}

}  // namespace verl
