// megatron_names.h — the Megatron-Core → HuggingFace name table, as templates, and the
// row arithmetic that un-fuses Megatron's fused tensors: linear_qkv (rows grouped per KV
// head: [q_g; k_g; v_g] for each group g), linear_fc1 ([gate; up]), padded vocabularies.
// Pure functions of a key, a global shape and the HF config: unit-testable without files.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace verl {

// What the name table needs from config.json.
struct MegatronModel {
  std::string arch;     // architectures[0]
  std::string family;   // llama | qwen2 | qwen3 | qwen2_moe | qwen3_moe | mixtral
  int64_t layers = 0, heads = 0, kv_heads = 0, head_dim = 0, hidden = 0, vocab = 0, experts = 0;
  bool tied = false, value = false;
  // Reads and checks the config; an unsupported architecture names the supported ones.
  static MegatronModel from_config(const nlohmann::ordered_json& config, bool tie_flag, bool value_flag);
};

// One HF tensor cut from a Megatron tensor: fixed indices on the leading (layer, expert)
// dims, then the listed row ranges of the next dim, concatenated (empty: a scalar).
struct NamedView {
  std::string name;
  std::vector<int64_t> lead;
  std::vector<std::pair<int64_t, int64_t>> rows;
};

// Appends the HF tensors that the Megatron tensor `key` of global shape `size` becomes.
// Returns false for keys that carry no model weights (optimizer, RNG, _extra_state) or that
// the HF model does not store (a tied output layer). Throws Error for unknown keys.
bool megatron_to_hf(const std::string& key, const std::vector<int64_t>& size, const MegatronModel& m,
                    std::vector<NamedView>* out);

}  // namespace verl
