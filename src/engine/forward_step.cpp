// forward_step.cpp — see forward_step.h. The vocabulary-sized tensors are only ever built for
// a chunk of rows at a time (logits → fp32 → /T → logsumexp → label log-prob, entropy), so
// the full-vocabulary softmax is never materialised for the whole row.
#include "engine/forward_step.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>

#include "io/error.h"

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

TokenOutputs model_forward(const Transformer& model, const ModelInputs& in, bool calculate_entropy) {
  c10::InferenceMode guard;
  if (in.sp_size > 1) fail("sequence parallelism (sp=", in.sp_size, ") needs the distributed engine; this forward runs sp=1");
  for (const auto& m : in.multi_modal_inputs)
    if (!m.is_null() && !(m.is_object() && m.empty()))
      fail(model.config().architecture, " is a text-only model, but the batch carries multi_modal_inputs");
  at::Tensor h = model.hidden_states(in.input_ids, in.position_ids, in.cu_seqlens);
  const int64_t n = h.size(0);
  TokenOutputs out;
  if (model.is_value_model()) {
    at::Tensor v = model.score(h).to(at::kFloat);
    if (v.size(1) != 1) fail("value head has num_labels=", v.size(1), "; a value model needs num_labels=1");
    out.values = v.squeeze(1);
    return out;
  }
  const at::Tensor& W = model.lm_head();
  const int64_t V = W.size(0);
  const int64_t chunk = std::max<int64_t>(1, (int64_t(8) << 20) / V);  // ~32 MB of fp32 logits per chunk
  out.log_probs = at::empty({n}, at::kFloat);
  if (calculate_entropy) out.entropy = at::empty({n}, at::kFloat);
  at::Tensor temp = in.temperature.clamp_min(1e-8);
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t c = std::min(chunk, n - s);
    at::Tensor logits = at::linear(h.narrow(0, s, c), W).to(at::kFloat);
    logits.div_(temp.narrow(0, s, c).unsqueeze(1));
    at::Tensor lse = at::logsumexp(logits, {1});
    at::Tensor picked = logits.gather(1, in.labels.narrow(0, s, c).unsqueeze(1)).squeeze(1);
    out.log_probs.narrow(0, s, c).copy_(picked - lse);
    if (calculate_entropy) {
      at::Tensor p = (logits - lse.unsqueeze(1)).exp_();
      out.entropy.narrow(0, s, c).copy_(lse - (p * logits).sum(1));
    }
  }
  return out;
}

SampleOutputs prepare_model_outputs(const TokenOutputs& out, const ModelInputs& in, const SpGather& gather) {
  auto full = [&](const at::Tensor& t) -> at::Tensor {
    if (!t.defined()) return t;
    at::Tensor r = t;
    if (in.sp_size > 1) {
      if (!gather) fail("sequence parallelism (sp=", in.sp_size, ") needs a gather across the sp group");
      r = gather(t);
    }
    r = r.narrow(0, 0, in.total_nnz).clone();
    return r;
  };
  SampleOutputs so;
  std::vector<int64_t> lens;
  for (size_t i = 0; i + 1 < in.cu_seqlens.size(); ++i) lens.push_back(in.cu_seqlens[i + 1] - in.cu_seqlens[i]);
  auto mask_last = [&](at::Tensor t) {  // no next token after a sequence's last position
    for (size_t i = 0; i + 1 < in.cu_seqlens.size(); ++i)
      if (lens[i] > 0) t[in.cu_seqlens[i + 1] - 1] = 0.0f;
    return t;
  };
  if (out.log_probs.defined()) so.log_probs = Jagged::from_lengths(mask_last(full(out.log_probs)), lens);
  if (out.entropy.defined()) so.entropy = Jagged::from_lengths(mask_last(full(out.entropy)), lens);
  if (out.values.defined()) so.values = Jagged::from_lengths(full(out.values), lens);
  return so;
}

SampleOutputs forward_step(const Transformer& model, const Batch& mb, double temperature, bool calculate_entropy) {
  ModelInputs in = prepare_model_inputs(mb, temperature);
  return prepare_model_outputs(model_forward(model, in, calculate_entropy), in);
}

SampleOutputs infer_batch(const Transformer& model, const Batch& batch, const InferOptions& o,
                          Partitions* used_partitions) {
  auto it = batch.sequences.find("input_ids");
  if (it == batch.sequences.end()) fail("batch has no 'input_ids' sequences");
  const int64_t B = batch.size();
  if (B == 0) fail("batch is empty");
  double temperature = o.temperature;
  if (batch.meta.contains("temperature") && batch.meta["temperature"].is_number())
    temperature = batch.meta["temperature"].get<double>();
  Partitions parts;
  if (o.max_token_len > 0) {
    DynamicBatchOptions d;
    d.max_token_len = o.max_token_len;
    d.min_num_micro_batch = o.min_num_micro_batch;
    d.num_batches_divided_by = o.num_batches_divided_by;
    d.dp_max = o.dp_max;
    parts = rearrange_micro_batches(it->second.lengths(), d);
  } else {
    parts = fixed_micro_batches(int(B), o.micro_batch_size > 0 ? o.micro_batch_size : int(B));
  }
  std::vector<Jagged> lp, ent, val;
  for (const auto& p : parts) {
    SampleOutputs so = forward_step(model, batch.select(p), temperature, o.calculate_entropy);
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

}  // namespace verl
