// transformer.cpp — the model code, its parameter views and the dense (single-device)
// parameters. Weight names and slots follow the family name table (hf/names.h); every expected key
// must be present with the expected shape, and unknown keys are an error (both listed). Numerics follow transformers op for op (RMSNorm in fp32 then
// cast, rotary cos/sin from fp32 frequencies, SDPA with scale head_dim^-0.5).
#include "model/transformer.h"

#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/InferenceMode.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/error.h"
#include "model/lm_head.h"
#include "model/moe.h"
#include "model/vision.h"
#include "model/weights.h"

namespace verl {

namespace {

at::Tensor rotate_half(const at::Tensor& x) {
  const std::vector<at::Tensor> h = x.chunk(2, -1);  // chunk, not narrow: see attention()
  return at::cat({-h[1], h[0]}, -1);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, true);
  h = h * at::rsqrt(var + eps);
  return w * h.to(x.scalar_type());
}

// cos / sin [n, 1, head_dim] of the rotary embedding at `position_ids`, in `dtype`.
static void rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& position_ids, at::ScalarType dtype, at::Tensor* cos,
                  at::Tensor* sin) {
  at::Tensor freqs = position_ids.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);  // [n, hd/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  *cos = emb.cos().to(dtype).unsqueeze(1);
  *sin = emb.sin().to(dtype).unsqueeze(1);
}

at::ScalarType parse_engine_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return at::kFloat;
  if (s == "bf16" || s == "bfloat16") return at::kBFloat16;
  if (s == "fp16" || s == "float16") return at::kHalf;
  fail("unknown dtype '", s, "' (expected fp32, bf16 or fp16)");
}

// libtorch's CUDA half (kernels, allocator, CUDA hooks) is a library of its own that a program
// linked against libtorch_cpu alone does not load; Python's torch loads it at import. The CLI
// loads it here, from the directory of the libtorch in use, the first time a CUDA device is
// asked for — before anything asks libtorch whether CUDA is there (that answer is cached for
// the life of the process). CPU runs never map it (~1 GB of code, measurable start-up time).
static void load_torch_cuda() {
#ifdef VERLCPP_WITH_CUDA
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&at::globalContext), &info) || !info.dli_fname) return;
  const std::string lib = std::filesystem::path(info.dli_fname).parent_path() / "libtorch_cuda.so";
  if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD)) return;  // already loaded (Python's torch)
  if (!std::filesystem::exists(lib)) fail("device cuda: this libtorch has no CUDA part (", lib, " is missing)");
  if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) fail("device cuda: cannot load ", lib, ": ", dlerror());
#endif
}

at::Device parse_engine_device(const std::string& s) {
  at::Device d(at::kCPU);
  try {
    d = at::Device(s);
  } catch (const std::exception&) {
    fail("unknown device '", s, "' (expected cpu, cuda or cuda:N)");
  }
  if (d.is_cpu()) return at::Device(at::kCPU);
  if (!d.is_cuda()) fail("device '", s, "': the engine computes on cpu or cuda");
#ifndef VERLCPP_WITH_CUDA
  fail("device '", s, "': this verlcpp was built without CUDA (VERLCPP_WITH_CUDA=OFF)");
#endif
  load_torch_cuda();
  if (!at::hasCUDA())
    fail("device '", s, "': no CUDA device is available (none visible to this process, or this verlcpp was built "
         "without CUDA: VERLCPP_WITH_CUDA)");
  const int n = static_cast<int>(at::detail::getCUDAHooks().deviceCount());
  // "cuda" alone: this process's current device (mpirun's NCCL comm and verl's workers set it
  // to the local rank's GPU).
  const int i = d.has_index() ? d.index() : std::max<int>(0, at::detail::getCUDAHooks().current_device());
  if (i < 0 || i >= n) fail("device '", s, "': only ", n, " CUDA device(s) are visible");
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(i));
}

at::Tensor rope_inv_freq(const ModelConfig& c) {
  const int64_t dim = c.head_dim;
  at::Tensor inv = 1.0 / at::pow(c.rope_theta, at::arange(0, dim, 2, at::kLong).to(at::kFloat) / double(dim));
  const RopeScaling& rs = c.rope_scaling;
  if (rs.type == "linear") {
    inv = inv / rs.factor;
  } else if (rs.type == "llama3") {
    const double old_ctx = rs.original_max_position_embeddings;
    const double low_wavelen = old_ctx / rs.low_freq_factor, high_wavelen = old_ctx / rs.high_freq_factor;
    at::Tensor wavelen = 2 * M_PI / inv;
    at::Tensor inv_l = at::where(wavelen > low_wavelen, inv / rs.factor, inv);
    at::Tensor smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
    at::Tensor smoothed = (1 - smooth) * inv_l / rs.factor + smooth * inv_l;
    at::Tensor medium = (wavelen < high_wavelen).logical_not() * (wavelen > low_wavelen).logical_not();
    inv = at::where(medium, smoothed, inv_l);
  }
  return inv;
}

std::vector<SlotView> slot_views(const std::vector<FlatParam>& layout, const at::Tensor& flat) {
  std::vector<SlotView> r;
  for (size_t i = 0; i < layout.size();) {
    const FlatParam& first = layout[i];
    size_t j = i + 1;
    while (j < layout.size() && layout[j].slot == first.slot) ++j;
    const FlatParam& last = layout[j - 1];
    at::Tensor t;
    if (j == i + 1) {
      t = param_view(flat, first);
    } else {
      const int64_t n = last.offset + last.numel - first.offset;
      t = flat.narrow(0, first.offset, n);
      if (first.shape.size() == 2) t = t.view({n / first.shape[1], first.shape[1]});
    }
    for (const auto& s : r)
      if (s.slot == first.slot) fail("internal: parameter slot of '", first.name, "' is split in its unit's layout");
    r.push_back({first.slot, first.offset, t});
    i = j;
  }
  return r;
}

namespace {

at::Tensor find_slot(const std::vector<SlotView>& slots, Slot slot) {
  for (const auto& s : slots)
    if (s.slot == slot) return s.view;
  return at::Tensor();
}

}  // namespace

DecoderLayer layer_params(const std::vector<SlotView>& slots) {
  using M = at::Tensor DecoderLayer::*;
  static const std::pair<M, Slot> kSlots[] = {
      {&DecoderLayer::input_norm, Slot::InputNorm}, {&DecoderLayer::post_norm, Slot::PostNorm},
      {&DecoderLayer::qkv_w, Slot::Qkv},            {&DecoderLayer::qkv_b, Slot::QkvBias},
      {&DecoderLayer::o_w, Slot::O},                {&DecoderLayer::o_b, Slot::OBias},
      {&DecoderLayer::q_norm, Slot::QNorm},         {&DecoderLayer::k_norm, Slot::KNorm},
      {&DecoderLayer::gate_up_w, Slot::GateUp},     {&DecoderLayer::gate_up_b, Slot::GateUpBias},
      {&DecoderLayer::down_w, Slot::Down},          {&DecoderLayer::down_b, Slot::DownBias},
      {&DecoderLayer::router, Slot::Router},        {&DecoderLayer::experts_gate_up, Slot::ExpertGateUp},
      {&DecoderLayer::experts_down, Slot::ExpertDown}, {&DecoderLayer::shared_gate_up, Slot::SharedGateUp},
      {&DecoderLayer::shared_down, Slot::SharedDown}, {&DecoderLayer::shared_gate, Slot::SharedGate}};
  DecoderLayer l;
  for (const auto& [m, slot] : kSlots) l.*m = find_slot(slots, slot);
  return l;
}

RootParams root_params(const ModelConfig& c, const std::vector<SlotView>& slots) {
  RootParams r;
  r.embed = find_slot(slots, Slot::Embed);
  r.final_norm = find_slot(slots, Slot::FinalNorm);
  if (c.head == Head::CausalLM) r.lm_head = c.tie_word_embeddings ? r.embed : find_slot(slots, Slot::LmHead);
  r.score_w = find_slot(slots, Slot::Score);
  r.score_b = find_slot(slots, Slot::ScoreBias);
  return r;
}

DecoderLayer layer_views(const std::vector<FlatParam>& layout, const at::Tensor& flat) {
  return layer_params(slot_views(layout, flat));
}

RootParams root_views(const ModelConfig& c, const std::vector<FlatParam>& layout, const at::Tensor& flat) {
  return root_params(c, slot_views(layout, flat));
}

DenseParams::DenseParams(const ModelConfig& c, const WeightSet& w, at::ScalarType dtype, bool requires_grad,
                         at::Device device) {
  const auto units = w.unit_specs(c);
  for (size_t u = 0; u < units.size(); ++u) {
    int64_t n = 0;
    const std::vector<FlatParam> layout = flat_layout(units[u], &n);
    at::Tensor flat = at::empty({n}, at::TensorOptions().dtype(dtype).device(device));
    for (const auto& p : layout) param_view(flat, p).copy_(w.load(p.name, p.shape, dtype));
    if (requires_grad) flat.requires_grad_(true);
    if (u == 0) root_ = root_views(c, layout, flat);
    else if (u <= static_cast<size_t>(c.num_layers)) layers_.push_back(layer_views(layout, flat));
    else vision_.push_back(slot_views(layout, flat));  // vision-language: the tower's units
    flats_.push_back(flat);
    numel_ += n;
  }
}

at::Tensor DenseParams::run_layer(const Transformer& model, int i, const at::Tensor& h, const LayerContext& ctx) {
  return model.layer_forward(layers_.at(i), h, ctx);
}

Transformer::Transformer(ModelConfig cfg, at::ScalarType compute_dtype)
    : cfg_(std::move(cfg)), dtype_(compute_dtype), inv_freq_(rope_inv_freq(cfg_)) {
  if (cfg_.vision) vision_ = std::make_unique<VisionTower>(cfg_, compute_dtype);
}

Transformer::~Transformer() = default;

std::unique_ptr<Transformer> Transformer::load(const std::string& config_dir, const std::string& weights_dir,
                                               at::ScalarType dtype, const std::string& device) {
  const at::Device d = parse_engine_device(device);
  auto m = std::make_unique<Transformer>(load_model_config(config_dir), dtype);
  m->dense_ = std::make_unique<DenseParams>(m->cfg_, WeightSet(weights_dir), dtype, false, d);
  return m;
}

const RootParams& Transformer::root_params() const {
  own_params();  // fails when there are none
  return dense_->root_params();
}

int64_t Transformer::num_parameters() const {
  own_params();  // fails when there are none
  return dense_->num_parameters();  // a tied lm_head is the embedding: counted once
}

namespace {

// Varlen flash attention applies: a CUDA tensor in bf16 / fp16 with a head size flash takes,
// unless VERLCPP_ATTENTION=sdpa asks for the per-sequence SDPA path (the reference, and fp32).
bool varlen_flash(const at::Tensor& q, int64_t head_dim) {
  static const bool sdpa_only = [] {
    const char* e = std::getenv("VERLCPP_ATTENTION");
    return e && std::string(e) == "sdpa";
  }();
  const auto t = q.scalar_type();
  return !sdpa_only && q.is_cuda() && (t == at::kBFloat16 || t == at::kHalf) && head_dim % 8 == 0 && head_dim <= 256;
}

at::Tensor attention(const ModelConfig& cfg_, const DecoderLayer& l, const at::Tensor& x, const at::Tensor& cos,
                     const at::Tensor& sin, const std::vector<int64_t>& cu, const SeqParallelAttention* sp) {
  const int64_t n_local = x.size(0), nh_all = cfg_.num_heads, nkv = cfg_.num_kv_heads, hd = cfg_.head_dim;
  int64_t n = n_local, nh = nh_all;
  // split, not narrow: its backward writes the three gradients into one buffer (narrow's
  // would zero-fill a full-size gradient per part and sum them).
  const std::vector<at::Tensor> parts = at::linear(x, l.qkv_w, l.qkv_b).split_with_sizes({nh * hd, nkv * hd, nkv * hd}, 1);
  at::Tensor q = parts[0].view({n, nh, hd});
  at::Tensor k = parts[1].view({n, nkv, hd});
  at::Tensor v = parts[2].view({n, nkv, hd});
  if (cfg_.qk_norm) {
    q = rms_norm(q, l.q_norm, cfg_.rms_norm_eps);
    k = rms_norm(k, l.k_norm, cfg_.rms_norm_eps);
  }
  q = q * cos + rotate_half(q) * sin;
  k = k * cos + rotate_half(k) * sin;
  if (sp) sp->to_heads(q, k, v);  // the whole row, heads/sp of the heads
  n = q.size(0);
  nh = q.size(1);
  const int64_t kvh = k.size(1);
  const double scale = 1.0 / std::sqrt(double(hd));
  if (varlen_flash(q, hd)) {
    // CUDA, 16-bit: libtorch's flash attention over the packed row at once (cu_seqlens; GQA
    // without repeating kv heads), what verl runs through flash_attn_varlen_func.
    int64_t max_len = 0;
    for (size_t i = 0; i + 1 < cu.size(); ++i) max_len = std::max(max_len, cu[i + 1] - cu[i]);
    const at::Tensor cu_t = at::tensor(cu, at::kLong).to(at::kInt).to(q.device());
    at::Tensor out = std::get<0>(at::_flash_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), cu_t, cu_t,
                                                              max_len, max_len, 0.0, /*is_causal=*/true,
                                                              /*return_debug_mask=*/false, scale));
    if (sp) out = sp->to_sequence(out);
    return at::linear(out.reshape({n_local, nh_all * hd}), l.o_w, l.o_b);
  }
  // [n, h, d] → [h, n, d] so each sequence is a contiguous slice along dim 1.
  q = q.transpose(0, 1);
  k = k.transpose(0, 1);
  v = v.transpose(0, 1);
  if (kvh != nh) {  // GQA: repeat kv heads (as HF's repeat_kv)
    k = k.repeat_interleave(nh / kvh, 0);
    v = v.repeat_interleave(nh / kvh, 0);
  }
  // One SDPA per sequence over split views; the outputs are concatenated (writing them into
  // slices of one buffer would make backward clone the full gradient once per sequence).
  std::vector<int64_t> lens;
  for (size_t i = 0; i + 1 < cu.size(); ++i) lens.push_back(cu[i + 1] - cu[i]);
  const std::vector<at::Tensor> qs = q.split_with_sizes(lens, 1), ks = k.split_with_sizes(lens, 1),
                                vs = v.split_with_sizes(lens, 1);
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < lens.size(); ++i) {
    if (lens[i] == 0) continue;
    at::Tensor o = at::scaled_dot_product_attention(qs[i].unsqueeze(0), ks[i].unsqueeze(0), vs[i].unsqueeze(0),
                                                    std::nullopt, 0.0, /*is_causal=*/true, scale);
    outs.push_back(o.squeeze(0).transpose(0, 1));  // [len, nh, hd]
  }
  at::Tensor out = outs.empty() ? at::empty({0, nh, hd}, x.options()) : at::cat(outs, 0);
  if (sp) out = sp->to_sequence(out);
  return at::linear(out.reshape({n_local, nh_all * hd}), l.o_w, l.o_b);
}

}  // namespace

at::Tensor Transformer::layer_forward(const DecoderLayer& l, const at::Tensor& h, const LayerContext& ctx) const {
  const ModelConfig& c = cfg_;
  at::Tensor x = h + attention(c, l, rms_norm(h, l.input_norm, c.rms_norm_eps), ctx.cos, ctx.sin, ctx.cu_seqlens, ctx.sp);
  const at::Tensor y = rms_norm(x, l.post_norm, c.rms_norm_eps);
  if (l.is_moe()) return x + moe_mlp(c, l, y, ctx.moe);
  const std::vector<at::Tensor> gu = at::linear(y, l.gate_up_w, l.gate_up_b).chunk(2, 1);
  return x + at::linear(at::silu(gu[0]) * gu[1], l.down_w, l.down_b);
}

at::Tensor Transformer::embed_and_layers(ParamProvider& p, const RootParams& r, const PackedRow& row) const {
  const int64_t n = row.input_ids.size(0);
  const auto& cu = row.cu_seqlens;
  const int64_t whole = n * (row.sp ? row.sp->size() : 1);
  if (cu.empty() || cu.front() != 0 || cu.back() != whole)
    fail("packed row: cu_seqlens must start at 0 and end at the row length ", whole);
  if (n > 0) {
    const int64_t lo = row.input_ids.min().item<int64_t>(), hi = row.input_ids.max().item<int64_t>();
    if (lo < 0 || hi >= cfg_.vocab_size)
      fail("input_ids: token id ", lo < 0 ? lo : hi, " is outside the vocabulary [0, ", cfg_.vocab_size, ")");
  }
  LayerContext ctx;
  ctx.cu_seqlens = cu;
  ctx.sp = row.sp;
  ctx.moe = row.moe;
  const at::Device dev = r.embed.device();
  if (row.position_ids.dim() == 2) {  // vision-language: mRoPE positions [3, n]
    if (!cfg_.vision) fail("internal: multimodal position ids for ", cfg_.architecture);
    mrope_cos_sin(inv_freq_.to(dev), row.position_ids.to(dev), cfg_.vision->mrope_section, dtype_, &ctx.cos, &ctx.sin);
  } else {
    rope_cos_sin(inv_freq_.to(dev), row.position_ids.to(dev), dtype_, &ctx.cos, &ctx.sin);
  }
  // padding_idx: that row's gradient stays zero, as in transformers' nn.Embedding(padding_idx=pad_token_id).
  at::Tensor h = at::embedding(r.embed, row.input_ids, cfg_.pad_token_id);
  if (vision_) h = vision_->embed(p, h, row.vision);  // image tokens → the vision tower's features
  for (int i = 0; i < cfg_.num_layers; ++i) h = p.run_layer(*this, i, h, ctx);
  return rms_norm(h, r.final_norm, cfg_.rms_norm_eps);
}

// The row's tensors on the parameters' device (the batch arrives in host memory).
static PackedRow on_device(const PackedRow& in, const at::Device& d) {
  PackedRow row = in;
  for (at::Tensor* t : {&row.input_ids, &row.position_ids, &row.labels, &row.temperature})
    if (t->defined() && t->device() != d) *t = t->to(d);
  return row;
}

TokenOutputs Transformer::forward(ParamProvider& p, const PackedRow& in, bool with_entropy) const {
  const RootParams r = p.root();
  const PackedRow row = on_device(in, r.embed.device());
  const at::Tensor h = embed_and_layers(p, r, row);
  TokenOutputs out;
  if (is_value_model()) {
    if (!r.score_w.defined()) fail(cfg_.architecture, " has no value head (score)");
    at::Tensor v = at::linear(h, r.score_w, r.score_b).to(at::kFloat);
    if (v.size(1) != 1) fail("value head has num_labels=", v.size(1), "; a value model needs num_labels=1");
    out.values = v.squeeze(1);
  } else {
    HeadOutputs o = lm_head_log_probs(h, r.lm_head, row.labels, row.temperature, with_entropy);
    out.log_probs = o.log_probs;
    out.entropy = o.entropy;
  }
  p.end_forward();
  return out;
}

ParamProvider& Transformer::own_params() const {
  if (!dense_) fail("internal: this Transformer holds no parameters of its own");
  return *dense_;
}

at::Tensor Transformer::hidden_states(const at::Tensor& input_ids, const at::Tensor& position_ids,
                                      const std::vector<int64_t>& cu) const {
  c10::InferenceMode guard;
  PackedRow row;
  row.input_ids = input_ids;
  row.position_ids = position_ids;
  row.cu_seqlens = cu;
  return embed_and_layers(*dense_, root_params(), on_device(row, root_params().embed.device()));
}

}  // namespace verl
