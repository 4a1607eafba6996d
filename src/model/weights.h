// weights.h — a HuggingFace folder's weights and what each model needs: WeightSet loads
// tensors of model.safetensors (or a sharded index) by name as torch tensors; the spec lists
// are the rows of the family name table (hf/names.h) that a config has, with their shapes,
// per decoder layer in the order the fused views need ([q;k;v] and [gate;up] contiguous; a
// mixture-of-experts layer's router and shared expert, then its experts last, expert-major:
// every expert's gate and up, then every down) and for the root (embeddings, final norm, head). Both the single-device model and the
// FSDP-sharded model load through these, so the name table and its checks exist once.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hf/config.h"
#include "hf/names.h"

namespace verl {

class HfFolder;
class SafetensorsReader;
struct StTensor;

struct WeightSpec {
  std::string name;             // e.g. "model.layers.3.self_attn.q_proj.weight"
  std::vector<int64_t> shape;
  Slot slot = Slot::None;       // where the model keeps it (hf/names.h)
};

// A parameter inside a unit's flat buffer (the units of both the dense and the sharded model).
struct FlatParam {
  std::string name;             // HF name, e.g. "model.layers.3.self_attn.q_proj.weight"
  std::vector<int64_t> shape;
  Slot slot = Slot::None;
  int64_t offset = 0, numel = 0;  // in the unit's flat buffer
};
// The specs laid out back to back in order; `*numel` = the total.
std::vector<FlatParam> flat_layout(const std::vector<WeightSpec>& specs, int64_t* numel);
// Parameter p as a view of its unit's flat buffer.
at::Tensor param_view(const at::Tensor& flat, const FlatParam& p);

std::vector<WeightSpec> layer_weight_specs(const ModelConfig& c, int layer);
// The same split for expert parallelism: everything but the experts, and the experts
// [first, first + count) of an MoE layer (empty for a dense one), in layer_weight_specs' order.
std::vector<WeightSpec> layer_dense_weight_specs(const ModelConfig& c, int layer);
std::vector<WeightSpec> expert_weight_specs(const ModelConfig& c, int layer, int first, int count);
// score.bias is nn.Linear's default: checkpoints may or may not carry it.
std::vector<WeightSpec> root_weight_specs(const ModelConfig& c, bool score_bias);

// The torch side of a HF folder's weights (the folder reader itself is torch-free: HfFolder).
class WeightSet {
 public:
  explicit WeightSet(const std::string& dir);  // throws Error naming the folder / index
  ~WeightSet();
  bool has(const std::string& name) const;
  std::vector<std::string> names() const;
  // Every spec present and nothing unexpected (a tied model's saved lm_head and old rotary
  // inv_freq buffers are tolerated); one Error listing both otherwise.
  void check(const std::vector<WeightSpec>& want, const ModelConfig& c) const;
  // Every spec of the root and the layers (score.bias when the folder has it), checked.
  std::vector<std::vector<WeightSpec>> unit_specs(const ModelConfig& c) const;
  // Copies a tensor out of the mapping, checks its shape, converts to dtype.
  at::Tensor load(const std::string& name, const std::vector<int64_t>& shape, at::ScalarType dtype) const;
  // Elements [lo, lo + dst.numel()) of the tensor in row-major order, converted into `dst`
  // straight from the mapping (no copy of the whole tensor: what a rank of a sharded model reads).
  void load_slice(const std::string& name, const std::vector<int64_t>& shape, int64_t lo, at::Tensor& dst) const;

 private:
  // The tensor's file and entry, its shape checked against `shape` and its dtype a float type.
  std::pair<const SafetensorsReader*, const StTensor*> find_checked(const std::string& name,
                                                                    const std::vector<int64_t>& shape) const;
  std::unique_ptr<HfFolder> folder_;
};

}  // namespace verl
