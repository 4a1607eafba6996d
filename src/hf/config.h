// config.h — the transformer hyper-parameters read from a HuggingFace config.json: the one
// config.json parser of both the engine and the merger. The engine builds the dense families
// (Llama, Qwen2, Qwen3) with a causal-LM or value (`score`) head and the mixture-of-experts
// families (Qwen2-MoE, Qwen3-MoE, Mixtral) with either head; the Megatron merger maps all.
// Unknown architectures and (for the engine)
// rope scalings and activations are errors that name what is supported. Defaults are those of
// each family's transformers config class (LlamaConfig, Qwen2Config, ...). For the merger's
// config-vs-weights check, read_config_shapes reads the shape fields of any config.json,
// vision-language ones included (nested text_config / vision_config, or top-level fields).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace verl {

enum class Family { Llama, Qwen2, Qwen3, Qwen2Moe, Qwen3Moe, Mixtral };
enum class Head { CausalLM, TokenClassification };

struct RopeScaling {
  std::string type = "none";  // none | linear | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int original_max_position_embeddings = 8192;            // llama3
};

// The vision tower of a vision-language model and what the text model needs of it
// (transformers' Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig and the top-level token ids).
struct VisionConfig {
  bool qwen2_5 = false;            // Qwen2.5-VL: RMSNorm, SwiGLU blocks, window attention
  int depth = 0, width = 0;        // blocks; their width (Qwen2-VL embed_dim, Qwen2.5-VL hidden_size)
  int out_hidden = 0;              // the merger's output: the text model's hidden_size
  int num_heads = 0, mlp_hidden = 0;  // mlp_hidden: embed_dim · mlp_ratio (Qwen2-VL), intermediate_size (2.5)
  std::string hidden_act;          // the blocks' MLP: quick_gelu (Qwen2-VL), silu (Qwen2.5-VL)
  int in_channels = 3, patch_size = 14, temporal_patch_size = 2, spatial_merge_size = 2;
  int window_size = 0;             // Qwen2.5-VL: windows of window_size pixels ...
  std::vector<int> fullatt_block_indexes;  // ... except these blocks, which attend over whole images
  int tokens_per_second = 0;
  std::vector<int> mrope_section;  // the text model's rotary dims per axis (t, h, w): sums to head_dim / 2
  int64_t image_token_id = -1, video_token_id = -1, vision_start_token_id = -1;
  int64_t patch_dim() const { return int64_t(in_channels) * temporal_patch_size * patch_size * patch_size; }
};

struct ModelConfig {
  std::string architecture;  // as written in config.json, e.g. "Qwen2ForCausalLM"
  Family family = Family::Llama;
  Head head = Head::CausalLM;
  int vocab_size = 0, hidden_size = 0, intermediate_size = 0;
  int num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2 always; Llama when attention_bias)
  bool o_proj_bias = false;     // Llama's attention_bias biases o_proj too; Qwen2's does not
  bool mlp_bias = false;
  bool qk_norm = false;         // Qwen3: RMSNorm over head_dim on q and k
  int num_labels = 1;           // value head width
  int num_experts = 0;          // MoE families: num_experts (Qwen) / num_local_experts (Mixtral)
  // Mixture of experts (engine; transformers' Qwen2MoeConfig / Qwen3MoeConfig / MixtralConfig):
  // a layer is sparse when num_experts > 0, it is not in mlp_only_layers and
  // (layer + 1) % decoder_sparse_step == 0 (Mixtral: every layer); its router picks
  // num_experts_per_tok experts per token (softmax, then top-k, renormalised when
  // norm_topk_prob: Mixtral always). Qwen2-MoE adds a shared expert scaled by
  // sigmoid(shared_expert_gate). Dense layers of an MoE model use intermediate_size.
  int num_experts_per_tok = 0;
  int moe_intermediate_size = 0;            // each expert's width (Mixtral: intermediate_size)
  int shared_expert_intermediate_size = 0;  // Qwen2-MoE's shared expert; 0: none
  bool norm_topk_prob = false;
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;
  // transformers' load-balancing loss: added to the training loss × router_aux_loss_coef when
  // output_router_logits is true in config.json.
  bool output_router_logits = false;
  double router_aux_loss_coef = 0.0;
  bool is_moe_layer(int layer) const;
  std::string hidden_act = "silu";
  std::string torch_dtype;      // "bfloat16", "float32", ... (informative)
  // The embedding row that gets no gradient (transformers: nn.Embedding padding_idx); -1: none.
  int64_t pad_token_id = -1;
  // Vision-language models (Qwen2-VL, Qwen2.5-VL: a Qwen2 text model, model/vision.h): the
  // vision tower and the multimodal rotary embedding; empty for a text-only model.
  std::optional<VisionConfig> vision;
};

// Who reads the config: the engine (dense families, and only what its forward implements) or
// the Megatron merger (MoE families too; rope, activation and attention window do not matter
// to a weight conversion, and intermediate_size is not needed).
enum class ConfigUse { Engine, Megatron };

// Every architecture string the engine builds (or the Megatron merger maps).
const std::vector<std::string>& supported_architectures(ConfigUse use = ConfigUse::Engine);
// Parse config.json text; `where` names the file in errors.
ModelConfig parse_model_config(const std::string& json_text, const std::string& where,
                               ConfigUse use = ConfigUse::Engine);
// Read <dir>/config.json (or a path to the file itself).
ModelConfig load_model_config(const std::string& dir_or_file);

// The vision-language architectures the FSDP merger knows (Qwen2-VL, Qwen2.5-VL): it writes
// their tensors under the names transformers' save_pretrained writes. Neither the engine nor
// the Megatron backend supports them; both refuse them by architecture.
const std::vector<std::string>& vision_language_architectures();
bool is_vision_language_architecture(const std::string& arch);

// The shape fields of a config.json that a weight conversion checks against the tensors, for
// any architecture. A vision-language config keeps its text model's fields in `text_config`
// (transformers 5) or at the top level (older configs): text_config wins where both exist, as
// transformers reads it; tie_word_embeddings is read at the top level first. The vision tower
// (`vision_config`): Qwen2-VL's layout names its width embed_dim and its output (the text
// model's width) hidden_size; Qwen2.5-VL's names them hidden_size and out_hidden_size.
// Absent (or mistyped) fields stay empty.
struct ConfigShapes {
  std::string architecture;  // architectures[0]; "" when absent
  std::optional<int64_t> vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim;
  std::optional<bool> attention_bias, tie_word_embeddings;
  bool vision = false;  // the config has a vision_config object
  std::optional<int64_t> vision_depth, vision_width, vision_out;
};
ConfigShapes read_config_shapes(const std::string& json_text, const std::string& where);

}  // namespace verl
