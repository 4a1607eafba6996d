// multi_modal.cpp — a data file's images, per sequence (see multi_modal.h).
#ifdef VERLCPP_WITH_TORCH
#include "cli/multi_modal.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/torch_dtype.h"

namespace verl {

bool has_multi_modal(const SafetensorsReader& r) {
  for (const char* k : {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"})
    if (r.find(k)) return true;
  return false;
}

namespace {

// One kind of vision item (images or videos) of the file: pixels, grids and the sequences'
// runs of the kind's token, split per sequence into out[s][pixel_key] / out[s][grid_key].
void split_kind(const SafetensorsReader& r, const char* pixel_key, const char* grid_key, int64_t token, const VisionConfig& vc,
                const int64_t* ids, const std::vector<int64_t>& cu, std::vector<TensorDict>& out,
                std::vector<std::pair<int64_t, int64_t>>* items_of_seq) {
  const std::string& path = r.path();
  const StTensor* pv = r.find(pixel_key);
  const StTensor* gt = r.find(grid_key);
  items_of_seq->assign(cu.size() - 1, {0, 0});
  if (!pv && !gt) {
    for (size_t s = 0; s + 1 < cu.size(); ++s)
      for (int64_t t = cu[s]; t < cu[s + 1]; ++t)
        if (ids[t] == token)
          fail(path, ": sequence ", s, " has tokens ", token, " but the file has no '", pixel_key, "' / '", grid_key, "'");
    return;
  }
  if (!pv || !gt) fail(path, ": needs both '", pixel_key, "' and '", grid_key, "'");
  if (gt->dtype != DType::I64 || gt->shape.size() != 2 || gt->shape[1] != 3) fail(path, ": '", grid_key, "' must be I64 [items, 3]");
  if (pv->shape.size() != 2 || pv->shape[1] != vc.patch_dim())
    fail(path, ": '", pixel_key, "' must be [patches, ", vc.patch_dim(), "] (in_channels · temporal_patch_size · patch_size²)");
  const at::ScalarType st = to_scalar_type(pv->dtype, path + ": '" + pixel_key + "'");
  if (!at::isFloatingType(st)) fail(path, ": '", pixel_key, "' must hold floats, has ", dtype_st_name(pv->dtype));
  const at::Tensor grid = read_st_tensor(r, *gt);
  const at::Tensor pixels = read_st_tensor(r, *pv);
  const int64_t m = vc.spatial_merge_size, items = grid.size(0);
  if (items > 0 && (!(grid > 0).all().item<bool>() || !(grid.narrow(1, 1, 2).remainder(m) == 0).all().item<bool>()))
    fail(path, ": '", grid_key, "' needs positive t, h, w with h and w multiples of spatial_merge_size ", m);
  const at::Tensor patches = items ? grid.prod(1) : at::empty({0}, at::kLong);
  if (patches.sum().item<int64_t>() != pixels.size(0))
    fail(path, ": '", pixel_key, "' has ", pixels.size(0), " rows for ", grid_key, "'s ", patches.sum().item<int64_t>(), " patches");
  // Each sequence takes as many items as it has runs of the kind's token.
  int64_t item = 0, row = 0;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t first = item, first_row = row;
    for (int64_t t = cu[s]; t < cu[s + 1]; ++t)
      if (ids[t] == token && (t == cu[s] || ids[t - 1] != token)) {
        if (item >= items)
          fail(path, ": sequence ", s, " has more runs of tokens ", token, " than ", grid_key, " has items (", items, ")");
        row += patches[item].item<int64_t>();
        ++item;
      }
    (*items_of_seq)[s] = {first, item - first};
    if (item == first) continue;
    out[s][pixel_key] = pixels.narrow(0, first_row, row - first_row);
    out[s][grid_key] = grid.narrow(0, first, item - first);
  }
  if (item != items)
    fail(path, ": ", grid_key, " has ", items, " items but the sequences have ", item, " runs of tokens ", token);
}

}  // namespace

std::vector<TensorDict> read_multi_modal(const SafetensorsReader& r, const at::Tensor& ids, const std::vector<int64_t>& cu,
                                         const ModelConfig& mc) {
  const std::string& path = r.path();
  if (!has_multi_modal(r)) return {};
  if (!mc.vision)
    fail(path, ": has images or videos (pixel_values, image_grid_thw, ...) but ", mc.architecture, " is a text-only model");
  const VisionConfig& vc = *mc.vision;
  const at::Tensor c = ids.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<TensorDict> out(cu.size() - 1);
  std::vector<std::pair<int64_t, int64_t>> images, videos;
  split_kind(r, "pixel_values", "image_grid_thw", vc.image_token_id, vc, p, cu, out, &images);
  split_kind(r, "pixel_values_videos", "video_grid_thw", vc.video_token_id, vc, p, cu, out, &videos);
  if (const StTensor* sec = r.find("second_per_grid_ts")) {
    const at::Tensor t = read_st_tensor(r, *sec).to(at::kFloat);
    const StTensor* vg = r.find("video_grid_thw");
    if (t.dim() != 1 || !vg || t.size(0) != vg->shape[0])
      fail(path, ": 'second_per_grid_ts' must be [videos], one value per row of video_grid_thw");
    for (size_t s = 0; s < out.size(); ++s)
      if (videos[s].second) out[s]["second_per_grid_ts"] = t.narrow(0, videos[s].first, videos[s].second);
  }
  return out;
}

}  // namespace verl
#endif
