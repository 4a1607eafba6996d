// vision.h — the vision side of the vision-language models Qwen2-VL and Qwen2.5-VL
// (transformers' Qwen2VisionTransformerPretrainedModel / Qwen2_5_VisionTransformerPretrainedModel
// and the parts of Qwen2VLModel.forward around the text model), single-device libtorch code:
//   - the vision tower: patch embedding (Conv3d with stride = kernel, i.e. a linear map of each
//     patch's C·T·P·P pixels), 2-D rotary embedding over each patch's (row, column), blocks of
//     full bidirectional attention within each image (Qwen2-VL: LayerNorm, fc1 / quick_gelu / fc2;
//     Qwen2.5-VL: RMSNorm, SwiGLU, attention within windows of window_size pixels except the
//     fullatt_block_indexes blocks), and the patch merger (norm, spatial_merge_size² patches
//     concatenated, Linear–GELU–Linear to the text model's width);
//   - the image and video tokens of the packed row replaced by the tower's features
//     (masked_scatter; one tower forward for both: each image / video frame attends alone);
//   - the multimodal rotary position ids (mRoPE: temporal, height, width; get_rope_index of
//     transformers, per sequence of the packed row) and their cos / sin (mrope_section).
// Parameters come from a ParamProvider (model/transformer.h), one unit for the patch embedding
// and merger, one per block, as the text model's; the FSDP model shards them from outside.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "hf/config.h"
#include "model/weights.h"

namespace verl {

class ParamProvider;
struct SlotView;

// The tower's own unit: patch embedding and merger.
struct VisionRootParams {
  at::Tensor patch;  // [width, C, T, P, P]
  at::Tensor merger_norm, merger_norm_b, merger_fc1, merger_fc1_b, merger_fc2, merger_fc2_b;
};
// One block (fc1: Qwen2-VL's fc1, Qwen2.5-VL's [gate;up]; fc2: fc2 / down_proj).
struct VisionBlock {
  at::Tensor norm1, norm1_b, qkv_w, qkv_b, proj_w, proj_b, norm2, norm2_b, fc1_w, fc1_b, fc2_w, fc2_b;
};
VisionRootParams vision_root_params(const std::vector<SlotView>& slots);
VisionBlock vision_block_params(const std::vector<SlotView>& slots);

// The vision tower's weights, as saved by save_pretrained ("visual." names): the root unit
// (patch embedding, merger) then one unit per block, fused slots contiguous.
std::vector<std::vector<WeightSpec>> vision_weight_specs(const ModelConfig& c);

// What every block of one tower forward shares: rotary cos / sin [patches, head_dim] (fp32) and
// the attention spans (whole images and, for Qwen2.5-VL, windows) as offsets into the patches.
struct VisionContext {
  at::Tensor cos, sin;
  std::vector<int64_t> full_cu, window_cu;
};

// One packed row's images and where their features go.
struct VisionInputs {
  at::Tensor pixel_values;   // [patches, C·T·P·P] of the images the tower runs, in row order
  at::Tensor grid_thw;       // [images, 3] int64
  at::Tensor token_index;    // [k] int64: positions of the row (this rank's slice) that take features
  at::Tensor feature_index;  // [k] int64: the tower output row each of them takes
};

class VisionTower {
 public:
  VisionTower(const ModelConfig& c, at::ScalarType compute_dtype);
  // The merged features [tokens, out_hidden] of images `grid_thw` (pixels back to back).
  at::Tensor forward(ParamProvider& p, const at::Tensor& pixel_values, const at::Tensor& grid_thw) const;
  // Block i over the patches h [patches, width].
  at::Tensor block_forward(const VisionBlock& b, int i, const at::Tensor& h, const VisionContext& ctx) const;
  // The token embeddings h [n, hidden] with the features of in's images at their tokens; the
  // tower runs (on no image) even when `in` is null, so that every rank of a sharded model
  // gathers the same units.
  at::Tensor embed(ParamProvider& p, const at::Tensor& h, const VisionInputs* in) const;
  const VisionConfig& config() const { return vc_; }

 private:
  VisionConfig vc_;
  at::ScalarType dtype_;
  at::Tensor inv_freq_;  // the 2-D rotary embedding's, [head_dim / 4]
};

// cos / sin [n, 1, head_dim] of the text model's multimodal rotary embedding at position_ids
// [3, n] (t, h, w): the rotary dims split into mrope_section (twice over, as the two halves of
// rotate-half), section s rotated by the positions of axis s % 3.
void mrope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& position_ids, const std::vector<int>& section,
                   at::ScalarType dtype, at::Tensor* cos, at::Tensor* sin);

// transformers' get_rope_index for one sequence: position ids [3, len]. Text runs count on by
// one on all three axes; each run of image (video) tokens is the next image (video) of
// image_grid_thw (video_grid_thw) ([items, 3]; undefined: none) and takes positions
// start + (t · time_interval, h / merge, w / merge) of its merged grid (time_interval: 1, or for
// Qwen2.5-VL's videos tokens_per_second × int(second_per_grid_ts[video]), 1 second when
// undefined); the text after it starts at start + max(h, w) / merge.
at::Tensor mrope_position_ids(const VisionConfig& vc, const at::Tensor& ids, const at::Tensor& image_grid_thw,
                              const at::Tensor& video_grid_thw = at::Tensor(), const at::Tensor& second_per_grid_ts = at::Tensor());

// One packed row of a vision-language model: its vision inputs and mRoPE positions.
struct VisionRow {
  VisionInputs inputs;
  at::Tensor position_ids;  // [3, n]
};
// `ids`: the whole row (sequences at `cu`, unpadded); `mm`: each sequence's multi_modal_inputs
// (pixel_values [patches, C·T·P·P], image_grid_thw [images, 3]; pixel_values_videos,
// video_grid_thw [videos, 3], second_per_grid_ts [videos]; empty: text only; an empty vector:
// none at all); the row padded to `padded` tokens (the pad continues 0, 1, 2, ...), of
// which this rank holds [begin, begin + n) (sequence parallelism; the whole row otherwise).
// The tower runs on the images and videos with a token in the slice. Errors name the sequence.
using TensorDict = std::map<std::string, at::Tensor>;
VisionRow prepare_vision_row(const ModelConfig& c, const at::Tensor& ids, const std::vector<int64_t>& cu,
                             const std::vector<TensorDict>& mm, int64_t begin, int64_t n, int64_t padded);

}  // namespace verl
