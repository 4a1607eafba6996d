// batch.h — a batch of samples as the engine sees it: named tensors sharing dim 0,
// variable-length per-sample token sequences (values + offsets, no padding), per-sample
// non-tensor values (strings, numbers, dicts) and per-sample dicts of tensors (verl's non-tensor
// `multi_modal_inputs` of a vision-language model: pixel_values, image_grid_thw) and a
// batch-wide `meta` dictionary. select()/split() give every piece its own copy of meta.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/balance.h"

namespace verl {

// B variable-length sequences stored back to back: sequence i is values[offsets[i]:offsets[i+1]].
struct Jagged {
  at::Tensor values;             // [nnz, ...]
  std::vector<int64_t> offsets;  // B + 1, offsets[0] = 0, non-decreasing
  int64_t size() const { return offsets.empty() ? 0 : int64_t(offsets.size()) - 1; }
  int64_t length(int64_t i) const { return offsets[i + 1] - offsets[i]; }
  at::Tensor at(int64_t i) const;
  Jagged select(const std::vector<int>& idx) const;
  std::vector<int64_t> lengths() const;
  static Jagged from_lengths(const at::Tensor& values, const std::vector<int64_t>& lengths);
  static Jagged concat(const std::vector<Jagged>& parts);
};

// One sample's named tensors (a vision-language sample's multi_modal_inputs).
using TensorDict = std::map<std::string, at::Tensor>;

struct Batch {
  std::map<std::string, at::Tensor> tensors;  // dim 0 = batch size
  std::map<std::string, Jagged> sequences;    // per-sample variable length
  std::map<std::string, std::vector<nlohmann::json>> non_tensors;  // per sample
  std::map<std::string, std::vector<TensorDict>> tensor_dicts;      // per sample (tensors shared, not copied)
  nlohmann::json meta = nlohmann::json::object();

  // Number of samples; throws if the members disagree.
  int64_t size() const;
  // Samples idx (in that order) with a deep copy of meta.
  Batch select(const std::vector<int>& idx) const;
  std::vector<Batch> split(const Partitions& parts) const;
  // The same batch with every tensor on `device` (no copy for those already there).
  Batch to(const c10::Device& device) const;
  // Concatenate along samples; meta is taken from the first piece.
  static Batch concat(const std::vector<Batch>& parts);
};

}  // namespace verl
