// forward_step.h — the forward half of the model engine, in verl's three stages:
// prepare_model_inputs (pack a micro-batch into one row, positions restarting per sequence,
// labels rolled left by one, per-token temperature, sequence-parallel pad + slice),
// model forward, prepare_model_outputs (log-probs at the temperature, chunked entropy,
// values; split back per sequence). infer_batch micro-batches a whole batch (fixed or
// token-balanced) and restores the original sample order.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "batch/batch.h"
#include "model/transformer.h"

namespace verl {

struct ModelInputs {
  at::Tensor input_ids, position_ids, labels, temperature;  // [nnz (+pad) / sp] this rank's slice
  std::vector<int64_t> cu_seqlens;                          // of the unpadded row (B + 1)
  int64_t total_nnz = 0;                                    // before padding
  int64_t pad_size = 0;                                     // sp padding added at the end
  int sp_size = 1, sp_rank = 0;
  std::vector<nlohmann::json> multi_modal_inputs;           // per sample, from the non-tensor part
};

// `temperature`: used when the micro-batch has no per-sample "temperature" tensor.
ModelInputs prepare_model_inputs(const Batch& micro_batch, double temperature, int sp_size = 1, int sp_rank = 0);

// Per-token outputs of the packed row (this rank's slice): float32.
struct TokenOutputs {
  at::Tensor log_probs, entropy, values;
};
TokenOutputs model_forward(const Transformer& model, const ModelInputs& in, bool calculate_entropy);

// Per-sample outputs (micro-batch order). log_probs[t] = log p(token t+1 | ≤ t); 0 at each
// sequence's last position (as is entropy there).
struct SampleOutputs {
  Jagged log_probs, entropy, values;
};
// With sp > 1 `gather` all-gathers a rank's slice along dim 0 (empty: sp must be 1).
using SpGather = std::function<at::Tensor(const at::Tensor&)>;
SampleOutputs prepare_model_outputs(const TokenOutputs& out, const ModelInputs& in, const SpGather& gather = {});

SampleOutputs forward_step(const Transformer& model, const Batch& micro_batch, double temperature,
                           bool calculate_entropy);

struct InferOptions {
  bool calculate_entropy = false;
  double temperature = 1.0;       // when the batch has no "temperature" tensor / meta
  int micro_batch_size = 0;       // fixed micro-batches (0: the whole batch)
  int64_t max_token_len = 0;      // > 0: dynamic batching by token budget
  std::optional<int> min_num_micro_batch, num_batches_divided_by;
  DpMaxHook dp_max;               // same micro-batch count on every data-parallel rank
};
// Whole batch (sequence "input_ids") → per-sample outputs in the original sample order.
SampleOutputs infer_batch(const Transformer& model, const Batch& batch, const InferOptions& o,
                          Partitions* used_partitions = nullptr);

// Sequence-parallel pad + slice of a packed 1-D row: pad to a multiple of sp with
// `pad_value`, keep rank's contiguous slice. Identity at sp = 1.
at::Tensor sp_pad_and_slice(const at::Tensor& row, int sp_size, int sp_rank, const at::Tensor& pad);

}  // namespace verl
