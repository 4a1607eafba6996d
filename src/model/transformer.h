// transformer.h — the decoder-only transformer (Llama / Qwen2 / Qwen3, and the mixture-of-experts
// Qwen2-MoE / Qwen3-MoE / Mixtral through model/moe.h) in libtorch, the one
// forward of the engine, run on one packed row of variable-length sequences: RMSNorm, rotary
// embeddings in HF's rotate-half convention, grouped-query attention that never crosses a
// sequence boundary, SwiGLU MLP, and the heads: causal LM (`lm_head`, possibly tied; the
// chunked log-prob / entropy head of lm_head.h) or the value head `score`.
//
// The model code is single-device code and does not own its parameters: a ParamProvider hands
// them to it, layer by layer. DenseParams (below) keeps every parameter as a plain tensor —
// the labelled single-device reference path (`Transformer::load`); the FSDP-sharded model
// (fsdp/fsdp_model.h) gathers each unit from its shards just in time and hooks backward,
// applying the parallelism from outside (torchtitan's rule). Both run this same forward.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "hf/config.h"
#include "model/weights.h"

namespace verl {

class ExpertParallel;  // model/moe.h
// Vision-language models: model/vision.h.
struct VisionRootParams;
struct VisionBlock;
struct VisionContext;
struct VisionInputs;
class VisionTower;

// One decoder layer's parameters (views: fused [q;k;v] and [gate;up] along the output dim).
struct DecoderLayer {
  at::Tensor input_norm, post_norm;
  at::Tensor qkv_w, qkv_b;
  at::Tensor o_w, o_b;
  at::Tensor q_norm, k_norm;     // Qwen3
  at::Tensor gate_up_w, down_w;
  at::Tensor gate_up_b, down_b;  // Llama mlp_bias
  // A mixture-of-experts layer (model/moe.h) instead of gate_up_w / down_w: the router
  // [experts, hidden], every expert's [gate;up] [E·2I, hidden] and down [E·hidden, I], and
  // Qwen2-MoE's shared expert ([gate;up], down, sigmoid gate [1, hidden]).
  at::Tensor router, experts_gate_up, experts_down;
  at::Tensor shared_gate_up, shared_down, shared_gate;
  const ExpertParallel* ep = nullptr;  // set: the expert slots hold this rank's experts only
  bool is_moe() const { return router.defined(); }
};

// The parameters outside the layers.
struct RootParams {
  at::Tensor embed, final_norm;
  at::Tensor lm_head;           // [vocab, hidden] (the embedding when tied); undefined for value models
  at::Tensor score_w, score_b;  // value head
};

// One slot of a unit's flat buffer laid out by flat_layout() (model/weights.h): a parameter
// in its shape, or a fused slot ([q;k;v], [gate;up]: contiguous in the layout) as one tensor
// along the output dim; `offset`: its first element in the flat buffer.
struct SlotView {
  Slot slot = Slot::None;
  int64_t offset = 0;
  at::Tensor view;
};
// Every slot the layout has, in layout order, each once.
std::vector<SlotView> slot_views(const std::vector<FlatParam>& layout, const at::Tensor& flat);
// The model's parameters from slot tensors (any tensors: views of a flat buffer, or the
// outputs of an autograd function over them), and the two composed with slot_views().
DecoderLayer layer_params(const std::vector<SlotView>& slots);
RootParams root_params(const ModelConfig& c, const std::vector<SlotView>& slots);
DecoderLayer layer_views(const std::vector<FlatParam>& layout, const at::Tensor& flat);
RootParams root_views(const ModelConfig& c, const std::vector<FlatParam>& layout, const at::Tensor& flat);

// Sequence parallelism seen from attention (applied from outside: fsdp/ulysses.h implements
// it). When a row is one rank's slice of a longer row, attention hands q / k / v
// [n, heads, d] of its slice to to_heads, which returns them for the whole row and a subset
// of the heads ([n·sp, heads/sp, d]; kv heads repeated first where needed), and hands the
// attention output of those heads to to_sequence, which returns [n, heads, d] of the slice.
class SeqParallelAttention {
 public:
  virtual ~SeqParallelAttention() = default;
  virtual int size() const = 0;
  virtual void to_heads(at::Tensor& q, at::Tensor& k, at::Tensor& v) const = 0;
  virtual at::Tensor to_sequence(const at::Tensor& out) const = 0;
};

// What every layer of one forward shares: rotary cos / sin [n, 1, head_dim], the row's
// sequence offsets and, for a sequence-parallel slice, the exchange (cu_seqlens then describe
// the whole row, n·sp tokens).
struct MoeAux;  // model/moe.h

struct LayerContext {
  at::Tensor cos, sin;
  std::vector<int64_t> cu_seqlens;
  const SeqParallelAttention* sp = nullptr;
  MoeAux* moe = nullptr;  // mixture-of-experts layers: the load-balancing loss's statistics
};

// One packed row: sequences back to back, positions restarting per sequence, the labels of the
// LM head (the row rolled left by one) and a per-token temperature (fp32). With `sp` set the
// tensors are this rank's slice and cu_seqlens describe the whole row (sp × the slice).
struct PackedRow {
  at::Tensor input_ids, position_ids, labels, temperature;
  std::vector<int64_t> cu_seqlens;
  const SeqParallelAttention* sp = nullptr;
  MoeAux* moe = nullptr;  // set: collect the load-balancing loss (model/moe.h)
  // Vision-language models: the row's images (null: none) and position_ids [3, n] (mRoPE).
  const VisionInputs* vision = nullptr;
};

// Per-token outputs of a packed row, fp32 [n]: log_probs[t] scores labels[t].
struct TokenOutputs {
  at::Tensor log_probs, entropy, values;
};

class Transformer;

// Who holds the parameters during a forward.
class ParamProvider {
 public:
  virtual ~ParamProvider() = default;
  // The root parameters, valid until end_forward().
  virtual RootParams root() = 0;
  // Runs layer i on h: fetches its parameters and calls model.layer_forward (a provider may
  // wrap the call: backward hooks, recomputation).
  virtual at::Tensor run_layer(const Transformer& model, int i, const at::Tensor& h, const LayerContext& ctx) = 0;
  virtual void end_forward() {}
  // Vision-language models (model/vision.h), as root / run_layer / end_forward for the vision
  // tower: its own unit (patch embedding, merger), block i, and the end of the tower's forward.
  virtual VisionRootParams vision_root();
  virtual at::Tensor run_vision_block(const VisionTower& tower, int i, const at::Tensor& h, const VisionContext& ctx);
  virtual void end_vision() {}
};

// Every parameter as a plain tensor, one flat buffer per unit (root, each layer).
class DenseParams : public ParamProvider {
 public:
  // Loads every weight of the folder (checked against the config) converted to `dtype`;
  // `requires_grad`: the flat buffers are autograd leaves (the reference for gradients).
  DenseParams(const ModelConfig& c, const WeightSet& w, at::ScalarType dtype, bool requires_grad = false,
              at::Device device = at::Device(at::kCPU));
  RootParams root() override { return root_; }
  at::Tensor run_layer(const Transformer& model, int i, const at::Tensor& h, const LayerContext& ctx) override;
  VisionRootParams vision_root() override;
  at::Tensor run_vision_block(const VisionTower& tower, int i, const at::Tensor& h, const VisionContext& ctx) override;
  const RootParams& root_params() const { return root_; }
  int64_t num_parameters() const { return numel_; }
  // One flat buffer per unit (root, then each layer), laid out as flat_layout() of the specs.
  const std::vector<at::Tensor>& flats() const { return flats_; }

 private:
  std::vector<at::Tensor> flats_;  // root, then one per layer
  RootParams root_;
  std::vector<DecoderLayer> layers_;
  std::vector<std::vector<SlotView>> vision_;  // vision-language: the tower's units (root, blocks)
  int64_t numel_ = 0;
};

class Transformer {
 public:
  // The architecture alone (no parameters): `compute_dtype` is the dtype of the activations.
  Transformer(ModelConfig cfg, at::ScalarType compute_dtype);
  ~Transformer();
  // The single-device reference: config from `config_dir`, weights (model.safetensors or
  // model.safetensors.index.json) from `weights_dir`, converted to `dtype`, on `device`
  // (parse_engine_device).
  static std::unique_ptr<Transformer> load(const std::string& config_dir, const std::string& weights_dir,
                                           at::ScalarType dtype, const std::string& device = "cpu");

  const ModelConfig& config() const { return cfg_; }
  at::ScalarType dtype() const { return dtype_; }
  bool is_value_model() const { return cfg_.head == Head::TokenClassification; }

  // The forward: embeddings → layers → final norm → head, with parameters from `params`.
  // Value models give `values`; causal LMs give `log_probs` of row.labels (and `entropy`).
  // Differentiable when grad mode is on. Token ids outside the vocabulary are an error.
  TokenOutputs forward(ParamProvider& params, const PackedRow& row, bool with_entropy) const;
  // One decoder layer over [n, hidden]: attention within each sequence, then the MLP.
  at::Tensor layer_forward(const DecoderLayer& l, const at::Tensor& h, const LayerContext& ctx) const;

  // The reference path (models built by load()): this model's own parameters, and its final
  // hidden states [n, hidden] (inference mode).
  ParamProvider& own_params() const;
  at::Tensor hidden_states(const at::Tensor& input_ids, const at::Tensor& position_ids,
                           const std::vector<int64_t>& cu_seqlens) const;
  const RootParams& root_params() const;
  const VisionTower* vision_tower() const { return vision_.get(); }
  const at::Tensor& lm_head() const { return root_params().lm_head; }
  int64_t num_parameters() const;

 private:
  ModelConfig cfg_;
  at::ScalarType dtype_;
  at::Tensor inv_freq_;
  std::unique_ptr<DenseParams> dense_;
  std::unique_ptr<VisionTower> vision_;  // vision-language models
  at::Tensor embed_and_layers(ParamProvider& p, const RootParams& r, const PackedRow& row) const;
};

// The model's building blocks.
// HF RMSNorm: normalise in fp32, cast back, scale.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
// Rotary inverse frequencies (float32 [head_dim/2]) with the config's rope scaling, computed
// exactly as transformers does.
at::Tensor rope_inv_freq(const ModelConfig& c);
// "fp32" / "float32" / "bf16" / "bfloat16" / "fp16" / "float16" → a torch scalar type.
at::ScalarType parse_engine_dtype(const std::string& s);
// "cpu", "cuda" (the current CUDA device) or "cuda:N" → a device the engine can compute on (checked: a CUDA
// device must be visible to this process; errors name what was found).
at::Device parse_engine_device(const std::string& s);

}  // namespace verl
