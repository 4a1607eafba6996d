// forward_step.cpp — see forward_step.h. The vocabulary-sized tensors are only ever built for
// a chunk of rows at a time (logits → fp32 → /T → logsumexp → label log-prob, entropy), so
// the full-vocabulary softmax is never materialised for the whole row.
#include "engine/forward_step.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>

#include "core/error.h"
#include "fsdp/ulysses.h"
#include "model/vision.h"

namespace verl {

at::Tensor sp_pad_and_slice(const at::Tensor& row, int sp_size, int sp_rank, const at::Tensor& pad) {
  if (sp_size <= 1) return row;
  if (sp_rank < 0 || sp_rank >= sp_size) fail("sequence parallel rank ", sp_rank, " not in [0, ", sp_size, ")");
  const int64_t n = row.size(0), padded = (n + sp_size - 1) / sp_size * sp_size, p = padded - n;
  at::Tensor full = p ? at::cat({row, pad.narrow(0, 0, p).to(row.scalar_type())}, 0) : row;
  const int64_t part = padded / sp_size;
  return full.narrow(0, sp_rank * part, part);
}

ModelInputs prepare_model_inputs(const Batch& mb, double temperature, int sp_size, int sp_rank) {
  auto it = mb.sequences.find("input_ids");
  if (it == mb.sequences.end()) fail("batch has no 'input_ids' sequences");
  const Jagged& ids = it->second;
  ModelInputs in;
  in.sp_size = sp_size;
  in.sp_rank = sp_rank;
  in.cu_seqlens = ids.offsets;
  const int64_t B = ids.size(), nnz = ids.offsets.back();
  in.total_nnz = nnz;
  at::Tensor row = ids.values.to(at::kLong).reshape({nnz});
  // Positions restart at 0 for each sequence.
  std::vector<int64_t> pos(nnz);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t t = ids.offsets[i]; t < ids.offsets[i + 1]; ++t) pos[t] = t - ids.offsets[i];
  at::Tensor position_ids = at::tensor(pos, at::kLong);
  // Labels: the row rolled left by one (each sequence's last label is masked out later).
  at::Tensor labels = at::roll(row, {-1}, {0});
  // Per-token temperature: the per-sample tensor if present, else the scalar.
  at::Tensor per_sample;
  if (auto t = mb.tensors.find("temperature"); t != mb.tensors.end()) {
    per_sample = t->second.to(at::kFloat).reshape({-1});
    if (per_sample.size(0) != B) fail("batch: 'temperature' has ", per_sample.size(0), " values for ", B, " samples");
  } else {
    per_sample = at::full({B}, temperature, at::kFloat);
  }
  std::vector<int64_t> lens = ids.lengths();
  at::Tensor temp = per_sample.repeat_interleave(at::tensor(lens, at::kLong), 0, nnz);
  // Multi-modal inputs travel in the non-tensor part of the batch.
  if (auto m = mb.non_tensors.find("multi_modal_inputs"); m != mb.non_tensors.end()) in.multi_modal_inputs = m->second;
  if (auto m = mb.tensor_dicts.find("multi_modal_inputs"); m != mb.tensor_dicts.end()) in.multi_modal_tensors = m->second;
  in.row_input_ids = row;
  // Sequence parallelism: pad (ids 0, positions 0,1,2,…, temperature 1, labels like ids), slice.
  if (sp_size > 1) {
    const int64_t pad = (nnz + sp_size - 1) / sp_size * sp_size - nnz;
    in.pad_size = pad;
    row = sp_pad_and_slice(row, sp_size, sp_rank, at::zeros({pad}, at::kLong));
    labels = sp_pad_and_slice(labels, sp_size, sp_rank, at::zeros({pad}, at::kLong));
    position_ids = sp_pad_and_slice(position_ids, sp_size, sp_rank, at::arange(pad, at::kLong));
    temp = sp_pad_and_slice(temp, sp_size, sp_rank, at::ones({pad}, at::kFloat));
  }
  in.input_ids = row;
  in.position_ids = position_ids;
  in.labels = labels;
  in.temperature = temp;
  return in;
}

ModelInputs prepare_model_inputs(const Batch& mb, double temperature, const Ulysses* sp) {
  ModelInputs in = sp ? prepare_model_inputs(mb, temperature, sp->size(), sp->rank()) : prepare_model_inputs(mb, temperature);
  in.ulysses = sp;
  return in;
}

namespace {

// 1 where a position's label is the next token of the same sequence, 0 at each sequence's last
// position; for this rank's slice of the (padded) row.
at::Tensor next_token_mask(const ModelInputs& in) {
  const int64_t n = in.input_ids.size(0), begin = in.sp_rank * n;
  at::Tensor valid = at::ones({n}, at::kFloat);
  float* v = valid.data_ptr<float>();
  for (size_t i = 0; i + 1 < in.cu_seqlens.size(); ++i) {
    const int64_t last = in.cu_seqlens[i + 1] - 1 - begin;
    if (in.cu_seqlens[i + 1] > in.cu_seqlens[i] && last >= 0 && last < n) v[last] = 0.0f;
  }
  return valid;
}

}  // namespace

TokenOutputs model_forward(const Transformer& model, ParamProvider& params, const ModelInputs& in,
                           bool calculate_entropy) {
  const ModelConfig& mc = model.config();
  for (const auto& m : in.multi_modal_inputs)
    if (!m.is_null() && !(m.is_object() && m.empty()))
      fail(mc.architecture, mc.vision ? ": multi_modal_inputs must hold tensors (pixel_values, image_grid_thw)"
                                      : " is a text-only model, but the batch carries multi_modal_inputs");
  if (!mc.vision) {
    for (const auto& m : in.multi_modal_tensors)
      if (!m.empty()) fail(mc.architecture, " is a text-only model, but the batch carries multi_modal_inputs");
    if (in.mrope_position_ids.defined())
      fail(mc.architecture, " is a text-only model, but the batch carries multimodal (3-row) position_ids");
  }
  const Ulysses* sp = in.sp_size > 1 ? in.ulysses : nullptr;
  if (in.sp_size > 1 && (!sp || sp->size() != in.sp_size || sp->rank() != in.sp_rank))
    fail("internal: a sequence-parallel micro-batch (sp=", in.sp_size, ") without its group's exchange");
  // Under sp the row is this rank's slice; attention sees the whole padded row, the pad as a
  // sequence of its own (its positions restart at 0, as verl's flash-attention varlen sees it).
  PackedRow row = in;
  row.sp = sp;
  if (sp && in.pad_size > 0) row.cu_seqlens.push_back(in.total_nnz + in.pad_size);
  // Vision-language: mRoPE positions and the images with a token in this rank's part of the row.
  VisionRow vision;
  if (mc.vision) {
    const int64_t n = in.input_ids.size(0);
    vision = prepare_vision_row(mc, in.row_input_ids, in.cu_seqlens, in.multi_modal_tensors, in.sp_rank * n, n,
                                in.total_nnz + in.pad_size);
    if (in.mrope_position_ids.defined()) {
      const at::Tensor& p = in.mrope_position_ids;
      if (p.dim() != 2 || p.size(0) != 3 || p.size(1) != in.total_nnz)
        fail("mRoPE position_ids: expected [3, ", in.total_nnz, "], got ", p.sizes());
      const at::Tensor pad = at::arange(in.pad_size, at::kLong).expand({3, in.pad_size});
      vision.position_ids = at::cat({p.to(at::kLong).cpu(), pad}, 1).narrow(1, in.sp_rank * n, n).contiguous();
    }
    row.position_ids = vision.position_ids;
    row.vision = &vision.inputs;
  }
  TokenOutputs out = model.forward(params, row, calculate_entropy);
  // A sequence's last position has no next token to score: its log-prob is 0. Its entropy (of
  // the next-token distribution) is kept, as verl's prepare_model_outputs keeps it.
  if (!model.is_value_model()) out.log_probs = out.log_probs * next_token_mask(in).to(out.log_probs.device());
  if (sp)
    for (at::Tensor* t : {&out.log_probs, &out.entropy, &out.values})
      if (t->defined()) *t = sp->gather_and_unpad(*t, in.pad_size);
  return out;
}

TokenOutputs model_forward(const Transformer& model, const ModelInputs& in, bool calculate_entropy) {
  c10::InferenceMode guard;
  return model_forward(model, model.own_params(), in, calculate_entropy);
}

SampleOutputs prepare_model_outputs(const TokenOutputs& out, const ModelInputs& in) {
  auto full = [&](const at::Tensor& t) -> at::Tensor {
    if (t.size(0) != in.total_nnz)
      fail("internal: ", t.size(0), " per-token outputs for a micro-batch of ", in.total_nnz, " tokens");
    return t.clone();
  };
  SampleOutputs so;
  std::vector<int64_t> lens;
  for (size_t i = 0; i + 1 < in.cu_seqlens.size(); ++i) lens.push_back(in.cu_seqlens[i + 1] - in.cu_seqlens[i]);
  if (out.log_probs.defined()) so.log_probs = Jagged::from_lengths(full(out.log_probs), lens);
  if (out.entropy.defined()) so.entropy = Jagged::from_lengths(full(out.entropy), lens);
  if (out.values.defined()) so.values = Jagged::from_lengths(full(out.values), lens);
  return so;
}

SampleOutputs forward_step(const Transformer& model, const Batch& mb, double temperature, bool calculate_entropy) {
  ModelInputs in = prepare_model_inputs(mb, temperature);
  return prepare_model_outputs(model_forward(model, in, calculate_entropy), in);
}

SampleOutputs infer_batch(const MicroForward& forward, const Batch& batch, const InferOptions& o,
                          Partitions* used_partitions) {
  auto it = batch.sequences.find("input_ids");
  if (it == batch.sequences.end()) fail("batch has no 'input_ids' sequences");
  if (batch.size() == 0) fail("batch is empty");
  double temperature = o.temperature;
  if (batch.meta.contains("temperature") && batch.meta["temperature"].is_number())
    temperature = batch.meta["temperature"].get<double>();
  const Partitions parts = plan_micro_batches(it->second.lengths(), o.micro);
  std::vector<Jagged> lp, ent, val;
  for (const auto& p : parts) {
    ModelInputs in = prepare_model_inputs(batch.select(p), temperature, o.ulysses);
    SampleOutputs so = prepare_model_outputs(forward(in), in);
    if (so.log_probs.size()) lp.push_back(std::move(so.log_probs));
    if (so.entropy.size()) ent.push_back(std::move(so.entropy));
    if (so.values.size()) val.push_back(std::move(so.values));
  }
  std::vector<int> rev = reverse_index(parts);
  SampleOutputs out;
  if (!lp.empty()) out.log_probs = Jagged::concat(lp).select(rev);
  if (!ent.empty()) out.entropy = Jagged::concat(ent).select(rev);
  if (!val.empty()) out.values = Jagged::concat(val).select(rev);
  if (used_partitions) *used_partitions = parts;
  return out;
}

SampleOutputs infer_batch(const Transformer& model, const Batch& batch, const InferOptions& o,
                          Partitions* used_partitions) {
  return infer_batch([&](const ModelInputs& in) { return model_forward(model, in, o.calculate_entropy); }, batch, o,
                     used_partitions);
}

}  // namespace verl
