// source.h — what every checkpoint backend (FSDP, Megatron) offers the merger: the list
// of full tensors it holds, and the bytes of one of them at a time, converted to a dtype.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace verl {

class ThreadPool;

struct SourceTensor {
  std::string name;            // state-dict key as saved
  DType dtype;                 // dtype in the checkpoint
  std::vector<int64_t> shape;  // full (merged) shape
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

class CheckpointSource {
 public:
  virtual ~CheckpointSource() = default;
  virtual const std::vector<SourceTensor>& tensors() const = 0;
  // Assembles tensor `index` (of tensors()) converted to `out` into dst, which holds
  // numel × dtype_size(out) bytes. May use `pool` to read pieces in parallel.
  virtual void read(size_t index, DType out, void* dst, ThreadPool& pool) const = 0;
  // One line for the log: format, world size, mesh.
  virtual std::string describe() const = 0;
  // Total bytes of the input files that read() touches (for the disk floor / progress).
  virtual uint64_t input_bytes() const = 0;
  // True if tensors a and b are known to be the same bytes (one storage saved under two
  // names, e.g. tied embeddings); false when unknown.
  virtual bool same_data(size_t a, size_t b) const { return false; }
};

}  // namespace verl
