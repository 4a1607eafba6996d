// multi_modal.h — the images of a `verlcpp logprob` / `verlcpp train` data file, for a
// vision-language model (Qwen2-VL, Qwen2.5-VL): two optional tensors beside input_ids,
//   pixel_values     float [patches, C·T·P·P]  every image's patch rows (as the HF image
//                                              processor writes them), images back to back
//   image_grid_thw   int64 [images, 3]         each image's (t, h, w) in patches
// in the order the images appear in the file's sequences; videos the same way with
// pixel_values_videos, video_grid_thw and (Qwen2.5-VL, optional) second_per_grid_ts float
// [videos]. A sequence's images are its runs of image tokens (config.json's image_token_id),
// one run per image of t·h·w / merge² tokens, as transformers consumes image_grid_thw across a
// batch (videos: runs of video_token_id). The result is verl's per-sample multi_modal_inputs
// (pixel_values, image_grid_thw, pixel_values_videos, ...; empty for a text-only sequence).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "batch/batch.h"
#include "hf/config.h"

namespace verl {

class SafetensorsReader;

// Whether the file has any of those tensors.
bool has_multi_modal(const SafetensorsReader& r);
// Per sequence of `ids` (at offsets `cu`): its images' tensors; errors name the file and what is wrong.
std::vector<TensorDict> read_multi_modal(const SafetensorsReader& r, const at::Tensor& ids, const std::vector<int64_t>& cu,
                                         const ModelConfig& mc);

}  // namespace verl
