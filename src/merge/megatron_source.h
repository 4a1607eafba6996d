// megatron_source.h — a Megatron-Core distributed checkpoint (`torch_dist`, i.e. PyTorch DCP)
// as a CheckpointSource that already speaks HuggingFace: every output tensor is a view of one
// global DCP tensor — a fixed layer (and expert) index on the stacked leading dims, and a list
// of row ranges on the next dim — so un-fusing QKV (grouped-query layout), splitting gate/up
// and trimming a padded vocabulary are index arithmetic done while reading, one tensor at a
// time, with no copy of the fused tensor. Names come from the family name table (hf/names.h)
// through megatron_names (Llama, Qwen2, Qwen3 dense; Qwen2-MoE, Qwen3-MoE, Mixtral).
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "hf/config.h"
#include "merge/source.h"

namespace verl {

class DcpCheckpoint;

struct MegatronPaths {
  std::string dist_dir;  // folder with .metadata and __R_I.distcp files
  std::string hf_dir;    // folder with config.json and the tokenizer
};
// verl layouts: <local_dir>/model/dist_ckpt + <local_dir>/model/huggingface (older:
// <local_dir>/huggingface, <local_dir>/dist_ckpt), or a dist_ckpt folder given directly
// (config beside it in ../huggingface). `hf_config_dir` overrides the config folder.
MegatronPaths locate_megatron_checkpoint(const std::string& local_dir, const std::string& hf_config_dir);

struct MegatronOptions {
  bool tie_word_embedding = false;  // drop output_layer (also when the config says so)
  bool is_value_model = false;      // output_layer [1, hidden] is the value head (score.weight)
};

class MegatronSource : public CheckpointSource {
 public:
  // `config`: the checkpoint's config.json as parse_model_config(..., ConfigUse::Megatron) reads it.
  MegatronSource(const std::string& dist_dir, const ModelConfig& config, const MegatronOptions& opt);
  ~MegatronSource() override;

  const std::vector<SourceTensor>& tensors() const override { return tensors_; }
  void read(size_t index, DType out, void* dst, ThreadPool& pool) const override;
  std::string describe() const override;
  uint64_t input_bytes() const override;

  // The Megatron key and view behind an output tensor (for messages and tests).
  struct View {
    size_t tensor = 0;                                // index into the DCP tensors
    std::vector<int64_t> lead;                        // fixed indices of the leading (layer, expert) dims
    std::vector<std::pair<int64_t, int64_t>> rows;    // row ranges on the next dim, concatenated
  };
  const View& view(size_t index) const { return views_.at(index); }

 private:
  std::string dir_;
  std::unique_ptr<DcpCheckpoint> ckpt_;
  std::vector<SourceTensor> tensors_;
  std::vector<View> views_;
  std::string family_, key_form_;
  size_t skipped_ = 0;
};

}  // namespace verl
