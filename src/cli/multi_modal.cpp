// multi_modal.cpp — a data file's images, per sequence (see multi_modal.h).
#ifdef VERLCPP_WITH_TORCH
#include "cli/multi_modal.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/torch_dtype.h"

namespace verl {

bool has_multi_modal(const SafetensorsReader& r) { return r.find("pixel_values") || r.find("image_grid_thw"); }

std::vector<TensorDict> read_multi_modal(const SafetensorsReader& r, const at::Tensor& ids, const std::vector<int64_t>& cu,
                                         const ModelConfig& mc) {
  const std::string& path = r.path();
  const StTensor* pv = r.find("pixel_values");
  const StTensor* gt = r.find("image_grid_thw");
  if (!pv && !gt) return {};
  if (!mc.vision)
    fail(path, ": has images (pixel_values / image_grid_thw) but ", mc.architecture, " is a text-only model");
  const VisionConfig& vc = *mc.vision;
  if (!pv || !gt) fail(path, ": images need both 'pixel_values' and 'image_grid_thw'");
  if (gt->dtype != DType::I64 || gt->shape.size() != 2 || gt->shape[1] != 3)
    fail(path, ": 'image_grid_thw' must be I64 [images, 3]");
  if (pv->shape.size() != 2 || pv->shape[1] != vc.patch_dim())
    fail(path, ": 'pixel_values' must be [patches, ", vc.patch_dim(), "] (in_channels · temporal_patch_size · patch_size²)");
  const at::ScalarType st = to_scalar_type(pv->dtype, path + ": 'pixel_values'");
  if (!at::isFloatingType(st)) fail(path, ": 'pixel_values' must hold floats, has ", dtype_st_name(pv->dtype));
  const at::Tensor grid = read_st_tensor(r, *gt);
  const at::Tensor pixels = read_st_tensor(r, *pv);
  const int64_t m = vc.spatial_merge_size, images = grid.size(0);
  if (images > 0 && (!(grid > 0).all().item<bool>() || !(grid.narrow(1, 1, 2).remainder(m) == 0).all().item<bool>()))
    fail(path, ": 'image_grid_thw' needs positive t, h, w with h and w multiples of spatial_merge_size ", m);
  const at::Tensor patches = images ? grid.prod(1) : at::empty({0}, at::kLong);
  if (patches.sum().item<int64_t>() != pixels.size(0))
    fail(path, ": 'pixel_values' has ", pixels.size(0), " rows for image_grid_thw's ", patches.sum().item<int64_t>(), " patches");
  // Each sequence takes as many images as it has runs of image tokens.
  const at::Tensor c = ids.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<TensorDict> out(cu.size() - 1);
  int64_t image = 0, row = 0;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    int64_t first = image, first_row = row;
    for (int64_t t = cu[s]; t < cu[s + 1]; ++t)
      if (p[t] == vc.image_token_id && (t == cu[s] || p[t - 1] != vc.image_token_id)) {
        if (image >= images)
          fail(path, ": sequence ", s, " has more runs of image tokens (id ", vc.image_token_id, ") than image_grid_thw has images (",
               images, ")");
        row += patches[image].item<int64_t>();
        ++image;
      }
    if (image == first) continue;
    out[s]["pixel_values"] = pixels.narrow(0, first_row, row - first_row);
    out[s]["image_grid_thw"] = grid.narrow(0, first, image - first);
  }
  if (image != images)
    fail(path, ": image_grid_thw has ", images, " images but the sequences have ", image, " runs of image tokens (id ",
         vc.image_token_id, ")");
  return out;
}

}  // namespace verl
#endif
