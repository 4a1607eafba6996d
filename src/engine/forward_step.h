// forward_step.h — the forward half of the model engine, in verl's three stages:
// prepare_model_inputs (pack a micro-batch into one row, positions restarting per sequence,
// labels rolled left by one, per-token temperature, sequence-parallel pad + slice),
// model forward (model/transformer.h: one forward, parameters from a provider; the chunked
// LM head; under sequence parallelism the Ulysses exchange of fsdp/ulysses.h inside attention
// and the outputs gathered back to the whole row, pad dropped), prepare_model_outputs (split
// back per sequence). infer_batch micro-batches a whole
// batch (fixed or token-balanced) and restores the original sample order.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <vector>

#include "batch/batch.h"
#include "model/transformer.h"

namespace verl {

class Ulysses;

// One micro-batch packed for the model (the row, its labels and temperature: PackedRow) plus
// what prepare_model_outputs needs to undo the packing.
struct ModelInputs : PackedRow {
  int64_t total_nnz = 0;                                    // before padding
  int64_t pad_size = 0;                                     // sp padding added at the end
  int sp_size = 1, sp_rank = 0;                             // the row is this rank's slice when sp > 1
  const Ulysses* ulysses = nullptr;                         // the sp group's exchange (sp > 1)
  std::vector<nlohmann::json> multi_modal_inputs;           // per sample, from the non-tensor part
  // Vision-language models: per sample multi_modal_inputs' tensors (pixel_values,
  // image_grid_thw; the batch's tensor_dicts) and the whole row before any padding or slicing.
  std::vector<TensorDict> multi_modal_tensors;
  at::Tensor row_input_ids;
  // Vision-language models: the caller's mRoPE position ids of the whole row, [3, total_nnz]
  // (verl's position_ids rows 1..3); undefined: computed from the images as transformers'
  // get_rope_index does. Padded (0, 1, 2, ... per row) and sliced like the row under sp.
  at::Tensor mrope_position_ids;
};

// `temperature`: used when the micro-batch has no per-sample "temperature" tensor.
ModelInputs prepare_model_inputs(const Batch& micro_batch, double temperature, int sp_size = 1, int sp_rank = 0);
// The same for this rank of a sequence-parallel group (null: sp = 1).
ModelInputs prepare_model_inputs(const Batch& micro_batch, double temperature, const Ulysses* sp);

// The model's forward on a packed micro-batch with parameters from `params` (the dense
// reference, or the FSDP units): float32 per-token outputs of the whole micro-batch (total_nnz;
// under sp > 1 every rank of the group gathers them, and their backward takes this rank's
// slice, × sp as verl's gather_outputs_and_unpad); log-probs 0 at each sequence's last position
// (there is no next token to score). Differentiable in grad mode.
TokenOutputs model_forward(const Transformer& model, ParamProvider& params, const ModelInputs& in,
                           bool calculate_entropy);
// The same with the model's own (dense) parameters, in inference mode.
TokenOutputs model_forward(const Transformer& model, const ModelInputs& in, bool calculate_entropy);

// Per-sample outputs (micro-batch order). log_probs[t] = log p(token t+1 | ≤ t); 0 at each
// sequence's last position; entropy is that of every position's next-token distribution
// (the last one included, as in verl).
struct SampleOutputs {
  Jagged log_probs, entropy, values;
};
// `out`: model_forward's outputs (already gathered under sp > 1).
SampleOutputs prepare_model_outputs(const TokenOutputs& out, const ModelInputs& in);

SampleOutputs forward_step(const Transformer& model, const Batch& micro_batch, double temperature,
                           bool calculate_entropy);

struct InferOptions {
  bool calculate_entropy = false;
  double temperature = 1.0;       // when the batch has no "temperature" tensor / meta
  MicroBatchOptions micro;        // fixed (micro_batch_size; 0: the whole batch) or token-balanced
  const Ulysses* ulysses = nullptr;  // sequence parallelism: this rank's group (null: sp = 1)
};
// Whole batch (sequence "input_ids") → micro-batches → `forward` of each → per-sample outputs
// in the original sample order. The one infer loop: the dense model and the FSDP engine use it.
using MicroForward = std::function<TokenOutputs(const ModelInputs&)>;
SampleOutputs infer_batch(const MicroForward& forward, const Batch& batch, const InferOptions& o,
                          Partitions* used_partitions = nullptr);
// With the model's own parameters.
SampleOutputs infer_batch(const Transformer& model, const Batch& batch, const InferOptions& o,
                          Partitions* used_partitions = nullptr);

// Sequence-parallel pad + slice of a packed 1-D row: pad to a multiple of sp with
// `pad_value`, keep rank's contiguous slice. Identity at sp = 1.
at::Tensor sp_pad_and_slice(const at::Tensor& row, int sp_size, int sp_rank, const at::Tensor& pad);

}  // namespace verl
