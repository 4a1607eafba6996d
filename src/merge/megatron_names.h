// megatron_names.h — the Megatron-Core → HuggingFace name map (the names come from the family
// name table, hf/names.h) and the row arithmetic that un-fuses Megatron's fused tensors:
// linear_qkv (rows grouped per KV head: [q_g; k_g; v_g] for each group g), linear_fc1
// ([gate; up], or its halves as linear_fc1.weight_w / weight_v), padded vocabularies. The key
// forms are those of megatron-core's GPTModel sharded_state_dict (per-layer, layer-stacked,
// expert-stacked, TEGroupedMLP, singleton_local_shards). Pure functions
// of a key, a global shape and the HF config: unit-testable without files.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "hf/config.h"

namespace verl {

// The model a Megatron checkpoint holds: its config.json (hf/config's parser, ConfigUse::
// Megatron) and the merger's flags.
struct MegatronModel {
  ModelConfig config;
  bool tied = false;   // tie_word_embeddings, or --tie-word-embedding
  bool value = false;  // a value head (…ForTokenClassification, or --is-value-model)
  MegatronModel(ModelConfig c, bool tie_flag, bool value_flag);
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
