// dataset.h — `verlcpp train`'s data: one safetensors file, read once and checked before any
// model work, and the order in which steps take its sequences.
//
// File layout, one row per sequence, tokens concatenated:
//   input_ids   int64 [nnz]     all sequences back to back
//   cu_seqlens  int64 [N + 1]   offsets
//   loss_mask   any    [nnz]    1 where the prediction of the NEXT token is trained
// and, for a vision-language model, pixel_values and image_grid_thw (cli/multi_modal.h);
// and, per task, fields aligned the same way (position t describes token t+1, as `verlcpp
// logprob` writes log_probs): ppo: advantages, old_log_probs (+ ref_log_probs with
// use_kl_loss); value: returns, values.
//
// Checks: ids inside the model's vocabulary; loss_mask finite, >= 0 and not 0 everywhere (a
// sequence's last position never counts); every field finite where loss_mask != 0 — an
// Error naming the field, the first sequence and the count. Non-finite values where
// loss_mask is 0 would still make every gradient NaN (NaN x 0 = NaN, so every update is
// skipped): they are set to 0 with a warning that counts them.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "batch/batch.h"

namespace verl {

struct Dataset {
  std::string path;
  at::Tensor input_ids;                       // int64 [nnz]
  std::vector<int64_t> cu;                    // N + 1 offsets
  std::map<std::string, at::Tensor> fields;   // float32 [nnz]: loss_mask and the task's fields
  std::vector<double> loss_tokens;            // per sequence: sum of loss_mask
  std::vector<std::string> warnings;          // for the lead rank to print
  std::vector<TensorDict> multi_modal;        // vision-language: per sequence (cli/multi_modal.h); empty: none
  int64_t size() const { return static_cast<int64_t>(cu.size()) - 1; }
};

// Reads and checks the file; `fields`: the task's per-token fields besides loss_mask.
Dataset load_dataset(const std::string& path, const std::vector<std::string>& fields, int64_t vocab_size);

// The samples `idx` as a Batch: "input_ids" and every field as sequences (and their
// multi_modal_inputs, as per-sample tensor dicts).
Batch make_batch(const Dataset& d, const std::vector<int64_t>& idx);

// verl's sampler order: a seeded permutation per epoch (or the file order without shuffle).
// Global position j is sample order(j / N)[j % N]; step s takes positions [s·bs, (s+1)·bs),
// rank r of W the contiguous [s·bs + r·bs/W, s·bs + (r+1)·bs/W).
class DataOrder {
 public:
  DataOrder(int64_t n, bool shuffle, int64_t seed) : n_(n), shuffle_(shuffle), seed_(seed) {}
  std::vector<int64_t> positions(int64_t begin, int64_t end);

 private:
  int64_t n_;
  bool shuffle_;
  int64_t seed_;
  int64_t epoch_ = -1;  // the cached epoch's permutation
  std::vector<int64_t> order_;
};

// An Error naming the first step in [0, steps) whose global batch has no loss token.
void check_step_batches(const Dataset& d, DataOrder order, int64_t steps, int64_t batch_size);

}  // namespace verl
