// torch_checkpoint.h — a torch.save file (zip container + data.pkl) read as a state dict,
// without torch: each entry is a plain tensor or a DTensor (local shard + placements + mesh
// + global shape). Bytes are read on demand with pread; nothing but the pickle is held.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "io/file.h"
#include "io/pickle.h"
#include "io/zip.h"

namespace verl {

struct Placement {
  enum class Kind { Shard, Replicate, Partial, StridedShard, Unknown };
  Kind kind = Kind::Unknown;
  int64_t dim = 0;           // Shard / StridedShard
  int64_t split_factor = 1;  // StridedShard
  std::string cls;           // class name as pickled, for messages
  std::string str() const;
};

struct DTensorMeta {
  std::vector<int64_t> global_shape;
  std::vector<Placement> placements;  // one per mesh dim
  std::vector<int64_t> mesh_shape;
  std::vector<std::string> mesh_dim_names;
  std::vector<int64_t> mesh_ranks;  // row-major rank ids of the mesh (empty: ShardedTensor, ranks 0..n-1)
  int64_t shard_offset = -1;        // ShardedTensor only: where the local shard starts along its dim
  // The rank that saved this DTensor, where the mesh records it (torch 2.11+ `_rank`, else
  // `_coordinate_on_dim` looked up in the mesh); -1 when not recorded.
  int64_t file_rank = -1;
  std::string rank_source;  // which field gave file_rank, for messages
  std::string mesh_layout;  // which DeviceMesh layout was read, for messages
};

// What a pickled torch.distributed DeviceMesh means, read from whichever of its known
// layouts is present (checkpoint-formats.md §3): torch 2.4–2.9 `mesh` rank tensor; 2.10–2.12
// `_layout` = _MeshLayout{shape, stride} over `_rank_map`; 2.13+ `_layout` = _MeshLayout{axes:
// one _FlatLayout{shape, stride} per mesh dim}. Unknown layouts fail naming the class and the
// fields found. `read_ints` fetches an integer tensor's values.
struct MeshInfo {
  std::vector<int64_t> shape;
  std::vector<std::string> dim_names;
  std::vector<int64_t> ranks;  // row-major
  int64_t file_rank = -1;
  std::string rank_source, layout;
};
MeshInfo decode_device_mesh(const Value& mesh, const std::string& where,
                            const std::function<std::vector<int64_t>(const TensorRef&)>& read_ints);

// "an int", "a str", "None", "a torch.Foo object", ... for "is X, not a tensor" messages.
std::string describe_value(const Value& v);
// Field names of an inert object (its BUILD state dict), comma-separated, for messages.
std::string field_names(const Value& obj);

struct CkptTensor {
  std::string key;
  TensorRef local;                     // the plain tensor, or the DTensor's local shard
  std::shared_ptr<DTensorMeta> dtensor;  // null for plain tensors
};

class TorchCheckpoint {
 public:
  explicit TorchCheckpoint(const std::string& path);

  const std::string& path() const { return zip_.path(); }
  const std::vector<CkptTensor>& tensors() const { return tensors_; }  // file order
  const CkptTensor* find(const std::string& key) const;
  // Keys whose value is not a tensor, with what they are ("an int", "a Foo object", ...),
  // e.g. "_extra_state" bytes. The merger decides which of them are an error.
  const std::vector<std::pair<std::string, std::string>>& other_values() const { return other_values_; }

  // Copies elements [first, first+n) of the row-major view `t` into dst (t.dtype, dense).
  void read_elements(const TensorRef& t, int64_t first, int64_t n, void* dst) const;
  std::vector<int64_t> read_ints(const TensorRef& t) const;  // small integer tensors
  // Elements [first, first+n) of a contiguous view, in place in a read-only mapping of the
  // file (nullptr when the view is not contiguous); release_elements drops those pages from
  // the resident set again once used.
  const uint8_t* map_elements(const TensorRef& t, int64_t first, int64_t n) const;
  void release_elements(const TensorRef& t, int64_t first, int64_t n) const;

 private:
  ZipReader zip_;
  mutable std::once_flag map_once_;
  mutable std::unique_ptr<MappedFile> map_;
  std::string prefix_;
  std::vector<CkptTensor> tensors_;
  std::vector<std::pair<std::string, std::string>> other_values_;
  std::unordered_map<std::string, size_t> index_;
  struct Rec { uint64_t data_offset, size; };
  std::unordered_map<std::string, Rec> storages_;  // storage key -> record
  std::unordered_map<std::string, std::vector<int64_t>> mesh_cache_;  // storage key -> ranks
  void collect(const ValuePtr& v, const std::string& prefix, int depth);
  void validate(const CkptTensor& t);
  const Rec& storage(const TensorRef& t) const;
};

// Decodes an FSDP1 ShardedTensor (SHARDED_STATE_DICT without a device mesh: one chunk per
// rank along the ChunkShardingSpec dim) into the same form as a 1-D-mesh DTensor.
CkptTensor decode_sharded_tensor(const Value& obj, const std::string& key, const std::string& where);

// Decodes a DTensor Object (as produced by parse_pickle) into its local tensor and meta;
// `read_ints` fetches the mesh tensor's values. Throws Error naming `where`.
CkptTensor decode_dtensor(const Value& obj, const std::string& key, const std::string& where,
                          const std::function<std::vector<int64_t>(const TensorRef&)>& read_ints);

}  // namespace verl
