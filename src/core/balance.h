// balance.h — micro-batch partitioning, exactly as verl's seqlen_balancing: fixed-size
// micro-batches, and dynamic batching under a token budget (count rule, workload
// 24576·s + s², Karmarkar–Karp largest differencing, ordering small–large–small,
// min_num_micro_batch, num_batches_divided_by, a data-parallel sync hook so every rank uses
// the same count) plus the inverse permutation that restores sample order. No libtorch.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

namespace verl {

using Partitions = std::vector<std::vector<int>>;

// Estimated attention + MLP cost of a sequence of s tokens (calibrated for hidden 4096).
inline int64_t calculate_workload(int64_t s) { return 24576 * s + s * s; }

// verl's karmarkar_karp (same heap order and tie-breaking, so identical partitions).
Partitions karmarkar_karp(const std::vector<int64_t>& values, int k, bool equal_size);
// karmarkar_karp + checks (k ≤ n, no empty partition) + indices sorted in each partition.
Partitions get_seqlen_balanced_partitions(const std::vector<int64_t>& values, int k, bool equal_size);

// Element-wise all-reduce MAX over the data-parallel group, in place. Empty = one rank.
using DpMaxHook = std::function<void(std::vector<int64_t>&)>;

struct DynamicBatchOptions {
  int64_t max_token_len = 0;  // per micro-batch (already × sp size)
  std::optional<int> num_batches_divided_by;
  std::optional<int> min_num_micro_batch;
  bool use_dynamic_bsz_balance = true;  // order micro-batches small–large–small
  int force_group_size = 1;             // consecutive samples kept together
  DpMaxHook dp_max;                     // same micro-batch count on every rank
};

// verl's rearrange_micro_batches on the per-sample token counts: micro-batch index lists.
Partitions rearrange_micro_batches(const std::vector<int64_t>& seqlens, const DynamicBatchOptions& o);
// Fixed micro-batches of `micro_batch_size` samples in order; a smaller last one.
Partitions fixed_micro_batches(int batch_size, int micro_batch_size);
// How a batch is cut into micro-batches: token-balanced when max_token_len > 0, else fixed
// runs of micro_batch_size samples (0: the whole batch in one).
struct MicroBatchOptions {
  int micro_batch_size = 0;
  int64_t max_token_len = 0;  // > 0: dynamic batching (rearrange_micro_batches)
  std::optional<int> min_num_micro_batch, num_batches_divided_by;
  DpMaxHook dp_max;           // same micro-batch count on every data-parallel rank
};
Partitions plan_micro_batches(const std::vector<int64_t>& seqlens, const MicroBatchOptions& o);
// Inverse of the concatenated partitions: out[original index] = position in the concatenation.
std::vector<int> reverse_index(const Partitions& parts);

}  // namespace verl
