// fsdp_source.h — a verl FSDP checkpoint folder (model_world_size_W_rank_r.pt files) as a
// CheckpointSource: plain tensors are taken once from one rank, DTensors are assembled from
// the ranks of one replica along their Shard dim and trimmed to the global shape.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "io/pickle.h"
#include "merge/source.h"

namespace verl {

class TorchCheckpoint;
struct CkptTensor;

class FsdpSource : public CheckpointSource {
 public:
  explicit FsdpSource(const std::string& local_dir);
  ~FsdpSource() override;

  const std::vector<SourceTensor>& tensors() const override { return tensors_; }
  void read(size_t index, DType out, void* dst, ThreadPool& pool) const override;
  std::string describe() const override;
  uint64_t input_bytes() const override { return input_bytes_; }
  bool same_data(size_t a, size_t b) const override;
  int world_size() const { return world_; }

  // World size from fsdp_config.json, else from the file names (exposed for tests).
  static int detect_world_size(const std::string& dir);

 private:
  struct Piece {     // one rank's contribution to a tensor
    int file;        // index into files_
    size_t entry;    // index into that file's tensors()
    int64_t offset;  // start along the shard dim in the full tensor
    int synth = -1;  // >= 0: read synth_[synth] instead of the file's tensor (flat slices)
  };
  struct Plan {
    int shard_dim = -1;  // -1: take pieces[0] whole
    bool flat = false;   // pieces tile the tensor as a 1-D array (verlcpp flat units)
    std::vector<Piece> pieces;
  };
  std::vector<TensorRef> synth_;  // slices of flat shards (verlcpp checkpoints)
  // verlcpp's own checkpoints: per-unit flat shards + the unit table in fsdp_config.json.
  void plan_flat_units(const nlohmann::json& cfg);
  const TensorRef& local_of(const Piece& pc) const;
  std::string dir_;
  int world_ = 0;
  std::string mesh_desc_;
  std::vector<std::unique_ptr<TorchCheckpoint>> files_;  // only the ranks that are read
  std::vector<int> file_rank_;
  std::vector<SourceTensor> tensors_;
  std::vector<Plan> plans_;
  uint64_t input_bytes_ = 0;
  void plan_tensor(const std::string& key);
  // A read task: local elements [a, b) of one piece, in shape g (the global or flat shape).
  struct ReadTask {
    size_t piece;
    int64_t a, b;
  };
  std::vector<ReadTask> plan_reads(const Plan& plan, const std::vector<int64_t>& g) const;
  void read_task(const Plan& plan, const std::vector<int64_t>& g, const ReadTask& t, DType in, DType out,
                 uint8_t* o) const;
  void check_file(const TorchCheckpoint& f, int rank);
  int64_t step_ = -1;  // verlcpp checkpoints: the step every file records
};

}  // namespace verl
