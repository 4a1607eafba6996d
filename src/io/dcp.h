// dcp.h — reader for PyTorch Distributed Checkpoint (DCP) folders, the format of Megatron's
// `torch_dist` checkpoints: a `.metadata` pickle (Metadata: per key a global size, a dtype and
// a list of chunks, each chunk stored as one item of a `__R_I.distcp` file) plus the .distcp
// files. A tensor item is a complete torch.save archive of the chunk (default), a safetensors
// blob shared by the file's tensors (SerializationFormat.SAFETENSORS), or raw bytes; byte
// items (pickled objects, `_extra_state`) are listed but never needed for weights.
// Nothing is executed and nothing is loaded whole: chunk bytes are read with pread on demand.
// The layout is validated when opened: every chunk inside its tensor, chunks neither overlap
// nor leave gaps, every chunk has a storage entry, files exist and are long enough.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "io/file.h"
#include "io/pickle.h"

namespace verl {

struct DcpChunk {
  std::vector<int64_t> offsets, sizes;  // box of the global tensor this chunk covers
  int file = -1;                        // index into DcpCheckpoint::files()
  uint64_t offset = 0, length = 0;      // the item's byte range in that file
  int64_t numel() const;
};

struct DcpTensor {
  std::string fqn;
  DType dtype = DType::F32;
  std::vector<int64_t> size;  // global shape
  std::vector<DcpChunk> chunks;
  int64_t numel() const;
};

class DcpCheckpoint {
 public:
  // Opens and validates `dir` (the folder holding .metadata). Throws Error naming the file.
  explicit DcpCheckpoint(const std::string& dir);
  ~DcpCheckpoint();

  const std::string& dir() const { return dir_; }
  const std::vector<DcpTensor>& tensors() const { return tensors_; }  // metadata order
  const DcpTensor* find(const std::string& fqn) const;
  const std::vector<std::string>& byte_keys() const { return byte_keys_; }  // BytesStorageMetadata items
  const std::vector<std::string>& files() const { return file_names_; }     // relative .distcp paths
  uint64_t input_bytes() const { return input_bytes_; }  // total size of the referenced .distcp files

  // Copies elements [first, first+n) of chunk `c` of `t` (row-major over the chunk's sizes)
  // into dst as t.dtype. Thread-safe. Checks the item on first use (archive, dtype, shape).
  void read_chunk(const DcpTensor& t, size_t c, int64_t first, int64_t n, void* dst) const;
  // The whole global tensor, row-major, as t.dtype (simple path for tests and small tensors).
  void read_tensor(const DcpTensor& t, void* dst) const;
  // A byte item's raw bytes (e.g. a pickled `_extra_state`).
  std::string read_bytes(const std::string& fqn) const;

 private:
  // Where a chunk's elements live once its item has been decoded.
  struct Located {
    int64_t base = 0;  // absolute byte offset of storage element 0 in the file
    int64_t storage_offset = 0;
    std::vector<int64_t> size, stride;
    bool contiguous = true;
  };
  std::string dir_;
  std::vector<std::string> file_names_;
  std::vector<std::shared_ptr<const File>> files_;  // opened on first use
  std::vector<DcpTensor> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::vector<std::string> byte_keys_;
  std::map<std::string, std::pair<int, std::pair<uint64_t, uint64_t>>> byte_items_;
  uint64_t input_bytes_ = 0;
  mutable std::mutex mu_;
  mutable std::unordered_map<const DcpChunk*, std::shared_ptr<const Located>> located_;
  // Parsed safetensors headers, per (file, blob offset): name -> (data begin, end, dtype, shape).
  struct StEntry { uint64_t begin, end; DType dtype; std::vector<int64_t> shape; };
  mutable std::map<std::pair<int, uint64_t>, std::shared_ptr<const std::map<std::string, StEntry>>> st_headers_;

  const File& file(int i) const;
  std::shared_ptr<const Located> locate(const DcpTensor& t, const DcpChunk& c) const;
  // locate() for each item format: a torch.save archive of the chunk; a safetensors blob
  // shared by the file's tensors (its header parsed once, cached) or the chunk's raw bytes.
  void locate_torch_item(const DcpTensor& t, const DcpChunk& c, const std::string& w, Located& loc) const;
  void locate_blob_or_raw(const DcpTensor& t, const DcpChunk& c, const std::string& w, const uint8_t* head,
                          uint64_t peek, Located& loc) const;
  std::shared_ptr<const std::map<std::string, StEntry>> blob_header(const DcpChunk& c, uint64_t hlen,
                                                                   uint64_t nbytes) const;
  void check_layout(const DcpTensor& t) const;
};

}  // namespace verl
