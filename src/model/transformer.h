// transformer.h — single-device decoder-only transformer (Llama / Qwen2 / Qwen3) in libtorch,
// run on one packed row of variable-length sequences: RMSNorm, rotary embeddings in HF's
// rotate-half convention, grouped-query attention that never crosses a sequence boundary,
// SwiGLU MLP. Heads: causal LM (`lm_head`, possibly tied) or token-classification `score`.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"

namespace verl {

struct DecoderLayer {
  at::Tensor input_norm, post_norm;
  at::Tensor qkv_w, qkv_b;  // q, k, v projections fused along the output dim ([q;k;v])
  at::Tensor o_w, o_b;
  at::Tensor q_norm, k_norm;     // Qwen3
  at::Tensor gate_up_w, down_w;  // gate and up fused ([gate;up])
  at::Tensor gate_up_b, down_b;  // Llama mlp_bias
};

class Transformer {
 public:
  // Build from a local HF folder: config from `config_dir`, weights (model.safetensors or
  // model.safetensors.index.json) from `weights_dir`, converted to `dtype` on `device`.
  static std::unique_ptr<Transformer> load(const std::string& config_dir, const std::string& weights_dir,
                                           at::ScalarType dtype, const std::string& device = "cpu");

  const ModelConfig& config() const { return cfg_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const;
  bool is_value_model() const { return cfg_.head == Head::TokenClassification; }

  // Final hidden states [nnz, hidden] of a packed row. `input_ids`, `position_ids`: int64
  // [nnz]; `cu_seqlens`: B+1 offsets into the row; attention is causal within each sequence.
  at::Tensor hidden_states(const at::Tensor& input_ids, const at::Tensor& position_ids,
                           const std::vector<int64_t>& cu_seqlens) const;
  // Output projection weight [vocab, hidden] (lm_head, or the embedding when tied).
  const at::Tensor& lm_head() const { return lm_head_; }
  // Value head: [nnz, hidden] → [nnz, num_labels].
  at::Tensor score(const at::Tensor& hidden) const;
  int64_t num_parameters() const;

 private:
  ModelConfig cfg_;
  at::ScalarType dtype_;
  at::Tensor embed_, final_norm_, lm_head_, score_w_, score_b_, inv_freq_;
  std::vector<DecoderLayer> layers_;
};

// The model's building blocks, used by Transformer and by the FSDP-sharded model (fsdp/),
// which passes views of gathered flat buffers as the layer's tensors.
// HF RMSNorm: normalise in fp32, cast back, scale.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
// cos / sin [n, 1, head_dim] of the rotary embedding at `position_ids`, in `dtype`.
void rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& position_ids, at::ScalarType dtype, at::Tensor* cos,
                  at::Tensor* sin);
// One decoder layer over a packed row [n, hidden]: attention within each sequence of `cu`, MLP.
at::Tensor decoder_layer_forward(const ModelConfig& cfg, const DecoderLayer& l, const at::Tensor& h,
                                 const at::Tensor& cos, const at::Tensor& sin, const std::vector<int64_t>& cu);

// Rotary inverse frequencies (float32 [head_dim/2]) with the config's rope scaling, computed
// exactly as transformers does.
at::Tensor rope_inv_freq(const ModelConfig& c);
// "fp32" / "float32" / "bf16" / "bfloat16" / "fp16" / "float16" → a torch scalar type.
at::ScalarType parse_engine_dtype(const std::string& s);

}  // namespace verl
