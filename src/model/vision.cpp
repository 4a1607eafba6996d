// vision.cpp — the vision tower, the image features in the token embeddings and mRoPE of
// Qwen2-VL / Qwen2.5-VL (see vision.h). Numerics follow transformers op for op: the 2-D rotary
// embedding applied in fp32 then cast back, attention per image (or window) with SDPA at scale
// head_dim^-0.5, the merger's GELU exact (nn.GELU), the text rotary cos / sin from fp32
// frequencies.
#include "model/vision.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "core/error.h"
#include "model/transformer.h"

namespace verl {

namespace {

at::Tensor find_slot(const std::vector<SlotView>& slots, Slot slot) {
  for (const auto& s : slots)
    if (s.slot == slot) return s.view;
  return at::Tensor();
}

at::Tensor rotate_half(const at::Tensor& x) {
  const std::vector<at::Tensor> h = x.chunk(2, -1);
  return at::cat({-h[1], h[0]}, -1);
}

at::Tensor activation(const std::string& act, const at::Tensor& x) {
  if (act == "quick_gelu") return x * at::sigmoid(1.702 * x);
  if (act == "silu") return at::silu(x);
  if (act == "gelu") return at::gelu(x);
  if (act == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  fail("internal: vision activation '", act, "'");
}

}  // namespace

VisionRootParams vision_root_params(const std::vector<SlotView>& slots) {
  VisionRootParams r;
  r.patch = find_slot(slots, Slot::VisPatch);
  r.merger_norm = find_slot(slots, Slot::MergerNorm);
  r.merger_norm_b = find_slot(slots, Slot::MergerNormBias);
  r.merger_fc1 = find_slot(slots, Slot::MergerFc1);
  r.merger_fc1_b = find_slot(slots, Slot::MergerFc1Bias);
  r.merger_fc2 = find_slot(slots, Slot::MergerFc2);
  r.merger_fc2_b = find_slot(slots, Slot::MergerFc2Bias);
  return r;
}

VisionBlock vision_block_params(const std::vector<SlotView>& slots) {
  using M = at::Tensor VisionBlock::*;
  static const std::pair<M, Slot> kSlots[] = {
      {&VisionBlock::norm1, Slot::VisNorm1}, {&VisionBlock::norm1_b, Slot::VisNorm1Bias},
      {&VisionBlock::qkv_w, Slot::VisQkv},   {&VisionBlock::qkv_b, Slot::VisQkvBias},
      {&VisionBlock::proj_w, Slot::VisProj}, {&VisionBlock::proj_b, Slot::VisProjBias},
      {&VisionBlock::norm2, Slot::VisNorm2}, {&VisionBlock::norm2_b, Slot::VisNorm2Bias},
      {&VisionBlock::fc1_w, Slot::VisFc1},   {&VisionBlock::fc1_b, Slot::VisFc1Bias},
      {&VisionBlock::fc2_w, Slot::VisFc2},   {&VisionBlock::fc2_b, Slot::VisFc2Bias}};
  VisionBlock b;
  for (const auto& [m, slot] : kSlots) b.*m = find_slot(slots, slot);
  return b;
}

std::vector<std::vector<WeightSpec>> vision_weight_specs(const ModelConfig& c) {
  const VisionConfig& v = *c.vision;
  const int64_t W = v.width, H = v.mlp_hidden, M = int64_t(v.spatial_merge_size) * v.spatial_merge_size;
  const bool ln = !v.qwen2_5;  // Qwen2-VL's LayerNorms have biases; Qwen2.5-VL's RMSNorms none
  std::vector<std::vector<WeightSpec>> units(1);
  auto& root = units[0];
  root.push_back({"visual.patch_embed.proj.weight", {W, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size}, Slot::VisPatch});
  root.push_back({"visual.merger.ln_q.weight", {W}, Slot::MergerNorm});
  if (ln) root.push_back({"visual.merger.ln_q.bias", {W}, Slot::MergerNormBias});
  root.push_back({"visual.merger.mlp.0.weight", {W * M, W * M}, Slot::MergerFc1});
  root.push_back({"visual.merger.mlp.0.bias", {W * M}, Slot::MergerFc1Bias});
  root.push_back({"visual.merger.mlp.2.weight", {v.out_hidden, W * M}, Slot::MergerFc2});
  root.push_back({"visual.merger.mlp.2.bias", {v.out_hidden}, Slot::MergerFc2Bias});
  for (int b = 0; b < v.depth; ++b) {
    const std::string p = "visual.blocks." + std::to_string(b) + ".";
    std::vector<WeightSpec> u;
    u.push_back({p + "norm1.weight", {W}, Slot::VisNorm1});
    if (ln) u.push_back({p + "norm1.bias", {W}, Slot::VisNorm1Bias});
    u.push_back({p + "attn.qkv.weight", {3 * W, W}, Slot::VisQkv});
    u.push_back({p + "attn.qkv.bias", {3 * W}, Slot::VisQkvBias});
    u.push_back({p + "attn.proj.weight", {W, W}, Slot::VisProj});
    u.push_back({p + "attn.proj.bias", {W}, Slot::VisProjBias});
    u.push_back({p + "norm2.weight", {W}, Slot::VisNorm2});
    if (ln) u.push_back({p + "norm2.bias", {W}, Slot::VisNorm2Bias});
    if (v.qwen2_5) {  // [gate;up] contiguous: one fused slot
      u.push_back({p + "mlp.gate_proj.weight", {H, W}, Slot::VisFc1});
      u.push_back({p + "mlp.up_proj.weight", {H, W}, Slot::VisFc1});
      u.push_back({p + "mlp.gate_proj.bias", {H}, Slot::VisFc1Bias});
      u.push_back({p + "mlp.up_proj.bias", {H}, Slot::VisFc1Bias});
      u.push_back({p + "mlp.down_proj.weight", {W, H}, Slot::VisFc2});
      u.push_back({p + "mlp.down_proj.bias", {W}, Slot::VisFc2Bias});
    } else {
      u.push_back({p + "mlp.fc1.weight", {H, W}, Slot::VisFc1});
      u.push_back({p + "mlp.fc1.bias", {H}, Slot::VisFc1Bias});
      u.push_back({p + "mlp.fc2.weight", {W, H}, Slot::VisFc2});
      u.push_back({p + "mlp.fc2.bias", {W}, Slot::VisFc2Bias});
    }
    units.push_back(std::move(u));
  }
  return units;
}

VisionTower::VisionTower(const ModelConfig& c, at::ScalarType compute_dtype) : vc_(*c.vision), dtype_(compute_dtype) {
  // VisionRotaryEmbedding(head_dim / 2): inv_freq = 1 / 10000^(arange(0, dim, 2) / dim).
  const int64_t dim = vc_.width / vc_.num_heads / 2;
  inv_freq_ = 1.0 / at::pow(10000.0, at::arange(0, dim, 2, at::kFloat) / double(dim));
}

namespace {

// Per image (t, h, w): the patches' (row, column) in the merge-block order of the pixel rows
// (transformers' get_vision_position_ids), [patches, 2].
at::Tensor patch_positions(const std::vector<std::array<int64_t, 3>>& grids, int64_t m) {
  std::vector<int64_t> pos;
  for (const auto& [t, h, w] : grids)
    for (int64_t f = 0; f < t; ++f)
      for (int64_t bh = 0; bh < h / m; ++bh)
        for (int64_t bw = 0; bw < w / m; ++bw)
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < m; ++j) {
              pos.push_back(bh * m + i);
              pos.push_back(bw * m + j);
            }
  return at::tensor(pos, at::kLong).view({static_cast<int64_t>(pos.size()) / 2, 2});
}

// Qwen2.5-VL's windows (transformers' get_vision_window_index): the merged patches reordered
// window by window, and the windows' offsets in patches (empty windows dropped).
void window_index(const std::vector<std::array<int64_t, 3>>& grids, const VisionConfig& v, std::vector<int64_t>* index,
                  std::vector<int64_t>* cu) {
  const int64_t m = v.spatial_merge_size, ws = v.window_size / m / v.patch_size, unit = m * m;
  int64_t base = 0;
  cu->assign(1, 0);
  for (const auto& [t, h, w] : grids) {
    const int64_t lh = h / m, lw = w / m;
    const int64_t nwh = (lh + ws - lh % ws) / ws, nww = (lw + ws - lw % ws) / ws;
    for (int64_t f = 0; f < t; ++f)
      for (int64_t a = 0; a < nwh; ++a)
        for (int64_t b = 0; b < nww; ++b) {
          int64_t count = 0;
          for (int64_t r = a * ws; r < std::min(lh, a * ws + ws); ++r)
            for (int64_t c = b * ws; c < std::min(lw, b * ws + ws); ++c) {
              index->push_back(base + f * lh * lw + r * lw + c);
              ++count;
            }
          if (count) cu->push_back(cu->back() + count * unit);
        }
    base += t * lh * lw;
  }
}

// Attention of q, k, v [n, heads, d] within each span of `cu`, not causal: [n, heads, d].
at::Tensor span_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& cu) {
  std::vector<int64_t> lens;
  for (size_t i = 0; i + 1 < cu.size(); ++i) lens.push_back(cu[i + 1] - cu[i]);
  const at::Tensor qt = q.transpose(0, 1), kt = k.transpose(0, 1), vt = v.transpose(0, 1);
  const std::vector<at::Tensor> qs = qt.split_with_sizes(lens, 1), ks = kt.split_with_sizes(lens, 1),
                                vs = vt.split_with_sizes(lens, 1);
  const double scale = 1.0 / std::sqrt(double(q.size(2)));
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < lens.size(); ++i) {
    if (lens[i] == 0) continue;
    at::Tensor o = at::scaled_dot_product_attention(qs[i].unsqueeze(0), ks[i].unsqueeze(0), vs[i].unsqueeze(0),
                                                    std::nullopt, 0.0, /*is_causal=*/false, scale);
    outs.push_back(o.squeeze(0).transpose(0, 1));
  }
  return outs.empty() ? at::empty({0, q.size(1), q.size(2)}, q.options()) : at::cat(outs, 0);
}

}  // namespace

at::Tensor VisionTower::block_forward(const VisionBlock& b, int i, const at::Tensor& h, const VisionContext& ctx) const {
  const int64_t n = h.size(0), W = vc_.width, nh = vc_.num_heads, hd = W / nh;
  auto norm = [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
    return vc_.qwen2_5 ? rms_norm(x, w, 1e-6) : at::layer_norm(x, {W}, w, bias, 1e-6);
  };
  // Attention: q, k, v [n, heads, d]; the 2-D rotary embedding in fp32.
  const std::vector<at::Tensor> qkv = at::linear(norm(h, b.norm1, b.norm1_b), b.qkv_w, b.qkv_b).view({n, 3, nh, hd}).unbind(1);
  const at::Tensor cos = ctx.cos.unsqueeze(1), sin = ctx.sin.unsqueeze(1);
  auto rope = [&](const at::Tensor& x) {
    const at::Tensor xf = x.to(at::kFloat);
    return (xf * cos + rotate_half(xf) * sin).to(x.scalar_type());
  };
  const bool full = !vc_.qwen2_5 || std::find(vc_.fullatt_block_indexes.begin(), vc_.fullatt_block_indexes.end(), i) !=
                                        vc_.fullatt_block_indexes.end();
  const at::Tensor attn = span_attention(rope(qkv[0]), rope(qkv[1]), qkv[2], full ? ctx.full_cu : ctx.window_cu);
  at::Tensor x = h + at::linear(attn.reshape({n, W}), b.proj_w, b.proj_b);
  // MLP.
  const at::Tensor y = norm(x, b.norm2, b.norm2_b);
  at::Tensor mid;
  if (vc_.qwen2_5) {
    const std::vector<at::Tensor> gu = at::linear(y, b.fc1_w, b.fc1_b).chunk(2, -1);
    mid = activation(vc_.hidden_act, gu[0]) * gu[1];
  } else {
    mid = activation(vc_.hidden_act, at::linear(y, b.fc1_w, b.fc1_b));
  }
  return x + at::linear(mid, b.fc2_w, b.fc2_b);
}

at::Tensor VisionTower::forward(ParamProvider& p, const at::Tensor& pixel_values, const at::Tensor& grid_thw) const {
  const int64_t m = vc_.spatial_merge_size, unit = m * m, W = vc_.width;
  std::vector<std::array<int64_t, 3>> grids;
  const at::Tensor g = grid_thw.to(at::kLong).contiguous();
  for (int64_t i = 0; i < g.size(0); ++i)
    grids.push_back({g[i][0].item<int64_t>(), g[i][1].item<int64_t>(), g[i][2].item<int64_t>()});
  VisionContext ctx;
  ctx.full_cu.assign(1, 0);
  for (const auto& [t, h, w] : grids)
    for (int64_t f = 0; f < t; ++f) ctx.full_cu.push_back(ctx.full_cu.back() + h * w);
  const int64_t n = ctx.full_cu.back();
  if (pixel_values.size(0) != n)
    fail("vision tower: ", pixel_values.size(0), " rows of pixel_values for image grids of ", n, " patches");

  const VisionRootParams r = p.vision_root();
  const at::Device dev = r.patch.device();  // the pixels come from the host batch
  // Conv3d with stride = kernel over each patch = a linear map of its flattened pixels.
  at::Tensor h = at::linear(pixel_values.to(dev, dtype_), r.patch.reshape({W, -1}));
  // 2-D rotary embedding: (row, column) of each patch.
  at::Tensor rot = (patch_positions(grids, m).to(dev, at::kFloat).unsqueeze(-1) * inv_freq_.to(dev)).flatten(1);
  if (vc_.qwen2_5) {  // windows: patches reordered window by window (in merge-block units)
    std::vector<int64_t> idx;
    window_index(grids, vc_, &idx, &ctx.window_cu);
    const at::Tensor wi = at::tensor(idx, at::kLong).to(dev);
    h = h.reshape({n / unit, unit, W}).index_select(0, wi).reshape({n, W});
    rot = rot.reshape({n / unit, unit, rot.size(1)}).index_select(0, wi).reshape({n, rot.size(1)});
    // The merged outputs go back to image order below.
    const at::Tensor emb = at::cat({rot, rot}, -1);
    ctx.cos = emb.cos();
    ctx.sin = emb.sin();
    for (int i = 0; i < vc_.depth; ++i) h = p.run_vision_block(*this, i, h, ctx);
    at::Tensor x = rms_norm(h, r.merger_norm, 1e-6).reshape({n / unit, W * unit});
    x = at::linear(at::gelu(at::linear(x, r.merger_fc1, r.merger_fc1_b)), r.merger_fc2, r.merger_fc2_b);
    p.end_vision();
    return x.index_select(0, at::argsort(wi));
  }
  const at::Tensor emb = at::cat({rot, rot}, -1);
  ctx.cos = emb.cos();
  ctx.sin = emb.sin();
  ctx.window_cu = ctx.full_cu;
  for (int i = 0; i < vc_.depth; ++i) h = p.run_vision_block(*this, i, h, ctx);
  at::Tensor x = at::layer_norm(h, {W}, r.merger_norm, r.merger_norm_b, 1e-6).reshape({n / unit, W * unit});
  x = at::linear(at::gelu(at::linear(x, r.merger_fc1, r.merger_fc1_b)), r.merger_fc2, r.merger_fc2_b);
  p.end_vision();
  return x;
}

at::Tensor VisionTower::embed(ParamProvider& p, const at::Tensor& h, const VisionInputs* in) const {
  if (!in || !in->pixel_values.defined()) {
    const at::Tensor f = forward(p, at::empty({0, vc_.patch_dim()}, h.options()), at::empty({0, 3}, at::kLong));
    return h.index_put({at::empty({0}, h.options().dtype(at::kLong))}, f.to(h.scalar_type()));  // keeps the tower in the graph
  }
  const at::Tensor f = forward(p, in->pixel_values, in->grid_thw);
  return h.index_put({in->token_index.to(h.device())},
                     f.index_select(0, in->feature_index.to(f.device())).to(h.scalar_type()));
}

void mrope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& position_ids, const std::vector<int>& section,
                   at::ScalarType dtype, at::Tensor* cos, at::Tensor* sin) {
  // freqs[a] = positions of axis a × inv_freq, [3, n, hd/2]; each rotary dim takes its section's axis.
  const at::Tensor freqs = position_ids.to(at::kFloat).unsqueeze(-1) * inv_freq.view({1, 1, -1});
  std::vector<at::Tensor> parts;
  int64_t off = 0;
  for (size_t s = 0; s < section.size(); ++s) {
    parts.push_back(freqs[s % 3].narrow(-1, off, section[s]));
    off += section[s];
  }
  const at::Tensor f = at::cat(parts, -1);  // [n, hd/2]
  const at::Tensor emb = at::cat({f, f}, -1);
  *cos = emb.cos().to(dtype).unsqueeze(1);
  *sin = emb.sin().to(dtype).unsqueeze(1);
}

namespace {

// A sequence's vision items (images and videos), each a run of its kind's tokens.
struct Media {
  at::Tensor grid;     // [items, 3] int64 (undefined: none)
  at::Tensor pixels;   // [patches, C·T·P·P]
  at::Tensor seconds;  // videos: second_per_grid_ts [items] (undefined: 1 each)
};

const char* kKindName[2] = {"image", "video"};

}  // namespace

at::Tensor mrope_position_ids(const VisionConfig& vc, const at::Tensor& ids, const at::Tensor& image_grid_thw,
                              const at::Tensor& video_grid_thw, const at::Tensor& second_per_grid_ts) {
  const int64_t len = ids.size(0), m = vc.spatial_merge_size;
  const at::Tensor c = ids.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const at::Tensor grids[2] = {image_grid_thw, video_grid_thw};
  const int64_t totals[2] = {image_grid_thw.defined() ? image_grid_thw.size(0) : 0,
                             video_grid_thw.defined() ? video_grid_thw.size(0) : 0};
  int64_t counts[2] = {0, 0};
  at::Tensor out = at::empty({3, len}, at::kLong);
  int64_t* t_ = out[0].data_ptr<int64_t>();
  int64_t* h_ = t_ + len;
  int64_t* w_ = h_ + len;
  int64_t pos = 0;
  for (int64_t i = 0; i < len;) {
    const int kind = p[i] == vc.image_token_id ? 0 : p[i] == vc.video_token_id ? 1 : -1;
    if (kind < 0) {
      t_[i] = h_[i] = w_[i] = pos++;
      ++i;
      continue;
    }
    int64_t j = i;
    while (j < len && p[j] == p[i]) ++j;
    const int64_t item = counts[kind]++;
    if (item >= totals[kind])
      fail(kKindName[kind], " tokens at position ", i, " but only ", totals[kind], " ", kKindName[kind], "(s) in ",
           kind ? "video_grid_thw" : "image_grid_thw");
    const at::Tensor& g = grids[kind];
    const int64_t gt = g[item][0].item<int64_t>(), gh = g[item][1].item<int64_t>() / m, gw = g[item][2].item<int64_t>() / m;
    if (j - i != gt * gh * gw)
      fail(kKindName[kind], " ", item, ": a run of ", j - i, " tokens at position ", i, " for a grid of ", gt * gh * gw,
           " merged patches (t ", gt, " × h ", gh, " × w ", gw, ")");
    // Frames are time_interval apart: Qwen2.5-VL's videos tokens_per_second × whole seconds per
    // temporal patch (second_per_grid_ts, 1 when absent); 1 otherwise.
    int64_t interval = 1;
    if (kind == 1 && vc.qwen2_5)
      interval = vc.tokens_per_second *
                 (second_per_grid_ts.defined() ? static_cast<int64_t>(second_per_grid_ts[item].item<double>()) : 1);
    int64_t k = i;
    for (int64_t a = 0; a < gt; ++a)
      for (int64_t b = 0; b < gh; ++b)
        for (int64_t d = 0; d < gw; ++d, ++k) {
          t_[k] = pos + a * interval;
          h_[k] = pos + b;
          w_[k] = pos + d;
        }
    pos += std::max(gh, gw);
    i = j;
  }
  for (int kind : {0, 1})
    if (counts[kind] != totals[kind])
      fail(totals[kind], " ", kKindName[kind], "(s) in ", kind ? "video_grid_thw" : "image_grid_thw", " but ", counts[kind],
           " run(s) of ", kKindName[kind], " tokens");
  return out;
}

VisionRow prepare_vision_row(const ModelConfig& c, const at::Tensor& ids, const std::vector<int64_t>& cu,
                             const std::vector<TensorDict>& mm, int64_t begin, int64_t n, int64_t padded) {
  const VisionConfig& vc = *c.vision;
  const int64_t B = static_cast<int64_t>(cu.size()) - 1, nnz = cu.back(), m = vc.spatial_merge_size;
  if (!mm.empty() && static_cast<int64_t>(mm.size()) != B)
    fail("multi_modal_inputs: ", mm.size(), " entries for ", B, " sequences");
  at::Tensor pos = at::empty({3, padded}, at::kLong);
  std::vector<at::Tensor> pixels, grids;
  std::vector<int64_t> token_index, feature_index;
  int64_t features = 0;  // rows of the tower's output so far
  static const char* kPixels[2] = {"pixel_values", "pixel_values_videos"};
  static const char* kGrid[2] = {"image_grid_thw", "video_grid_thw"};
  for (int64_t s = 0; s < B; ++s) {
    const at::Tensor seq = ids.narrow(0, cu[s], cu[s + 1] - cu[s]);
    Media media[2];
    if (!mm.empty()) {
      for (const auto& [k, t] : mm[s]) {
        if (k == kPixels[0]) media[0].pixels = t;
        else if (k == kGrid[0]) media[0].grid = t;
        else if (k == kPixels[1]) media[1].pixels = t;
        else if (k == kGrid[1]) media[1].grid = t;
        else if (k == "second_per_grid_ts") media[1].seconds = t.to(at::kDouble).reshape({-1});
        else
          fail("sequence ", s, ": multi_modal_inputs key '", k, "' is not supported (pixel_values, image_grid_thw, ",
               "pixel_values_videos, video_grid_thw, second_per_grid_ts)");
      }
    }
    for (int kind : {0, 1}) {
      Media& md = media[kind];
      if (md.pixels.defined() != md.grid.defined())
        fail("sequence ", s, ": multi_modal_inputs needs both ", kPixels[kind], " and ", kGrid[kind]);
      if (!md.grid.defined()) continue;
      if (md.grid.dim() != 2 || md.grid.size(1) != 3) fail("sequence ", s, ": ", kGrid[kind], " must be [items, 3]");
      md.grid = md.grid.to(at::kLong);
      if (!(md.grid > 0).all().item<bool>() || !(md.grid.narrow(1, 1, 2).remainder(m) == 0).all().item<bool>())
        fail("sequence ", s, ": ", kGrid[kind], " needs positive t, h, w with h and w multiples of spatial_merge_size ", m);
      const int64_t patches = md.grid.prod(1).sum().item<int64_t>();
      if (md.pixels.dim() != 2 || md.pixels.size(0) != patches || md.pixels.size(1) != vc.patch_dim())
        fail("sequence ", s, ": ", kPixels[kind], " must be [", patches, ", ", vc.patch_dim(), "] for its ", kGrid[kind],
             ", found ", md.pixels.sizes());
    }
    if (media[1].seconds.defined() && (!media[1].grid.defined() || media[1].seconds.numel() != media[1].grid.size(0)))
      fail("sequence ", s, ": second_per_grid_ts needs one value per video of video_grid_thw");
    at::Tensor sp;
    try {
      sp = mrope_position_ids(vc, seq, media[0].grid, media[1].grid, media[1].seconds);
    } catch (const Error& e) {
      fail("sequence ", s, ": ", e.what());
    }
    pos.narrow(1, cu[s], seq.size(0)).copy_(sp);
    if (!media[0].grid.defined() && !media[1].grid.defined()) continue;
    // Each image or video: its token run [a, a + len) in the row; the tower runs it when a token
    // is in the slice. Items go to the tower in row order (images and videos mixed).
    const at::Tensor seq_c = seq.to(at::kLong).contiguous();
    const int64_t* p = seq_c.data_ptr<int64_t>();
    int64_t item[2] = {0, 0}, patch[2] = {0, 0};
    for (int64_t t = 0; t < seq.size(0);) {
      const int kind = p[t] == vc.image_token_id ? 0 : p[t] == vc.video_token_id ? 1 : -1;
      if (kind < 0) {
        ++t;
        continue;
      }
      const Media& md = media[kind];
      const int64_t a = cu[s] + t, tokens = md.grid[item[kind]].prod().item<int64_t>(), len = tokens / (m * m);
      if (a < begin + n && a + len > begin) {
        pixels.push_back(md.pixels.narrow(0, patch[kind], tokens));
        grids.push_back(md.grid[item[kind]].unsqueeze(0));
        for (int64_t q = std::max(a, begin); q < std::min(a + len, begin + n); ++q) {
          token_index.push_back(q - begin);
          feature_index.push_back(features + q - a);
        }
        features += len;
      }
      patch[kind] += tokens;
      ++item[kind];
      t += len;
    }
  }
  // The sequence-parallel pad continues 0, 1, 2, ... on every axis.
  if (padded > nnz) pos.narrow(1, nnz, padded - nnz).copy_(at::arange(padded - nnz, at::kLong).expand({3, padded - nnz}));
  VisionRow r;
  r.position_ids = pos.narrow(1, begin, n).contiguous();
  if (!pixels.empty()) {
    for (auto& px : pixels) px = px.to(pixels[0].scalar_type());
    r.inputs.pixel_values = at::cat(pixels, 0);
    r.inputs.grid_thw = at::cat(grids, 0);
    r.inputs.token_index = at::tensor(token_index, at::kLong);
    r.inputs.feature_index = at::tensor(feature_index, at::kLong);
  }
  return r;
}

// The providers' vision tower (declared in model/transformer.h).
VisionRootParams ParamProvider::vision_root() { fail("internal: these parameters have no vision tower"); }

at::Tensor ParamProvider::run_vision_block(const VisionTower&, int, const at::Tensor&, const VisionContext&) {
  fail("internal: these parameters have no vision tower");
}

VisionRootParams DenseParams::vision_root() {
  if (vision_.empty()) fail("internal: these parameters have no vision tower");
  return vision_root_params(vision_[0]);
}

at::Tensor DenseParams::run_vision_block(const VisionTower& tower, int i, const at::Tensor& h, const VisionContext& ctx) {
  return tower.block_forward(vision_block_params(vision_.at(i + 1)), i, h, ctx);
}

}  // namespace verl
