// comm.h — the collectives the sharded engine needs, over raw buffers, so that this layer
// links no libtorch: all-gather into a flat buffer, reduce-scatter (sum / avg), all-reduce,
// broadcast, all-to-all, barrier, and splitting into sub-groups (hybrid sharding).
//
// Three implementations: MPI for host buffers (processes started by mpirun / srun), NCCL
// for device buffers (unique id broadcast over MPI; built when the CUDA toolkit is found),
// and a single-process one that needs no MPI at all. Every blocking collective runs under a
// watchdog: a rank that dies or stalls makes the others stop with one clear line within
// `timeout_s`, never a silent hang.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

#include "core/dtype.h"

namespace verl {

enum class ReduceOp { Sum, Avg, Max, Min };

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "mpi", "nccl", "local"
  // True when the collectives take CUDA device buffers (NCCL; torch.distributed over NCCL);
  // such a comm also accepts host buffers (small ones: counts, statistics), staged through
  // the device. False: host buffers only (MPI, shared memory, gloo, the single-process comm);
  // the engine stages device tensors through the host for them (fsdp/tensor_comm.h).
  virtual bool device_buffers() const { return false; }

  // recv holds size() * count elements; rank r's `send` lands at recv[r * count].
  virtual void all_gather(const void* send, void* recv, size_t count, DType dt) = 0;
  // send holds size() * count elements; rank r receives the reduction of block r.
  virtual void reduce_scatter(const void* send, void* recv, size_t count, DType dt, ReduceOp op) = 0;
  // In place over `count` elements.
  virtual void all_reduce(void* buf, size_t count, DType dt, ReduceOp op) = 0;
  virtual void broadcast(void* buf, size_t count, DType dt, int root) = 0;
  // send and recv hold size() * count elements; block j of send goes to rank j.
  virtual void all_to_all(const void* send, void* recv, size_t count, DType dt) = 0;
  virtual void barrier() = 0;
  // Ranks with the same color form a new group, ordered by key (MPI_Comm_split semantics).
  virtual std::unique_ptr<Comm> split(int color, int key) = 0;
};

struct CommOptions {
  std::string backend = "auto";  // auto | mpi | local | nccl
  double timeout_s = 600;        // watchdog: a collective that takes longer aborts the job
  int device = -1;               // nccl: CUDA device (default: local rank)
};

// "auto": MPI when the process was started by mpirun / srun (OMPI_COMM_WORLD_SIZE,
// PMI_SIZE or PMIX_RANK set) and MPI was built in, else the single-process comm.
// Throws Error when the requested backend is not available.
std::unique_ptr<Comm> make_comm(const CommOptions& opt = {});

// True when this process looks like one rank of an MPI launch.
bool launched_by_mpi();

// Ends MPI cleanly at exit (no-op when MPI was never initialised).
void finalize_comm();
// After a fatal error on this rank: ends the whole job when there are other ranks
// (MPI_Abort), so they do not wait for it; no-op for a single process.
void abort_comm(int code);

}  // namespace verl
