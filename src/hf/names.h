// names.h — the family name table: every tensor a HuggingFace model of a supported family
// stores, by its HF name, the Megatron-Core name it has in a distributed checkpoint (and how
// Megatron fuses it: [q;k;v] grouped per KV head, [gate;up]), and where the engine keeps it
// (the unit: root or decoder layer; the slot: a field of model/transformer.h's RootParams /
// DecoderLayer; its shape and presence from config.json). One table serves every conversion,
// as torchtitan's per-model state_dict_adapter.py does: model/weights builds the engine's
// weight specs from it and merge/megatron_names maps Megatron keys with it. The families share
// the rows; what differs per family is the flags of ModelConfig (which biases and norms exist)
// and the MoE module names ({moe}, {shared}, expert projections) of FamilyNames. Torch-free.
#pragma once
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "hf/config.h"

namespace verl {

// How Megatron stores a tensor: whole, or as one part of a fused tensor (the parts of one
// fused tensor stand in the table in Megatron's row order).
enum class Fused { None, Qkv, GateUp };

// Where the engine keeps a tensor. Rows of one fused slot (Qkv: q, k, v) are contiguous in the
// unit's flat buffer, in table order. None: the engine does not build this tensor.
enum class Slot {
  None,
  Embed, FinalNorm, LmHead, Score, ScoreBias,                        // root unit
  InputNorm, Qkv, QkvBias, O, OBias, QNorm, KNorm, PostNorm,         // decoder layer
  GateUp, GateUpBias, Down, DownBias,
  // mixture-of-experts layer: the router [experts, hidden], the shared expert's [gate;up],
  // down and sigmoid gate, then every expert's [gate;up] and down, expert-major ([E·2I, H],
  // [E·H, I]) and last in the layer's layout, so that a range of experts is one contiguous
  // range of each expert slot (what expert parallelism splits over ranks).
  Router, SharedGateUp, SharedDown, SharedGate,
  ExpertGateUp, ExpertDown,
  // vision tower (model/vision.h: its own table): the patch embedding and the merger (norm,
  // two linears), each block's norms, attention and MLP (Qwen2-VL fc1 / fc2; Qwen2.5-VL
  // [gate;up] / down)
  VisPatch, MergerNorm, MergerNormBias, MergerFc1, MergerFc1Bias, MergerFc2, MergerFc2Bias,
  VisNorm1, VisNorm1Bias, VisQkv, VisQkvBias, VisProj, VisProjBias, VisNorm2, VisNorm2Bias,
  VisFc1, VisFc1Bias, VisFc2, VisFc2Bias,
};

// A dimension of a tensor's shape, from config.json.
enum class Dim { None, Hidden, Intermediate, QRows, KvRows, HeadDim, Vocab, Labels, Experts, MoeIntermediate,
                 SharedIntermediate, One };

// When a model of an engine family has the tensor (a Megatron key is mapped whenever present).
// DenseMlp / MoeLayer / SharedExpert: the layer's MLP is dense, sparse, sparse with a shared expert.
enum class When { Always, Untied, ValueHead, ScoreBias, AttentionBias, OProjBias, QkNorm, MlpBias, DenseMlp, MoeLayer,
                  SharedExpert, Never };

struct TensorName {
  std::string_view hf;           // root: full name; layer: after "model.layers.<i>."; expert: after "{moe}.experts.<e>."
  std::string_view megatron;     // root: full key; layer: after "decoder.layers.[<i>.]"; expert: after the expert index
  Fused fused = Fused::None;
  Slot slot = Slot::None;
  When when = When::Never;
  std::array<Dim, 2> shape{Dim::None, Dim::None};  // Dim::None ends the shape
};

// The rows outside the layers, of one decoder layer, and of one MoE expert.
std::span<const TensorName> root_names();
std::span<const TensorName> layer_names();
std::span<const TensorName> expert_names();
// A layer key suffix in the table's spelling: Transformer Engine's names of the norms fused
// into the next linear (self_attention.linear_qkv.layer_norm_weight, ...) become the plain ones.
std::string_view megatron_layer_name(std::string_view suffix);

// The per-family spellings that fill a row's placeholders {moe}, {shared}, {gate}, {up}, {down}.
struct FamilyNames {
  Family family;
  std::string_view name;                   // llama | qwen2 | qwen3 | qwen2_moe | qwen3_moe | mixtral
  std::string_view moe, shared;            // MoE block and shared-expert module paths
  std::string_view gate, up, down;         // expert projection names
};
const FamilyNames& family_names(Family f);
// `tmpl` with the family's placeholders filled in.
std::string fill_family(std::string_view tmpl, const FamilyNames& f);

// Whether a model with config `c` has the row's tensor (`score_bias`: a value head's bias is
// nn.Linear's default, present only when the checkpoint has it; `layer`: the decoder layer of a
// layer or expert row, whose MLP may be dense or sparse).
bool model_has(const TensorName& t, const ModelConfig& c, bool score_bias, int layer = -1);
// The row's shape for config `c`.
std::vector<int64_t> shape_of(const TensorName& t, const ModelConfig& c);

}  // namespace verl
