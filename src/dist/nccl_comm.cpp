// nccl_comm.cpp — Comm over NCCL for CUDA device buffers. Rank and world come from MPI
// (the unique id is broadcast over MPI_COMM_WORLD); a single process needs no MPI. Each
// collective is enqueued on this comm's stream and then polled under a watchdog: past the
// timeout (or on an asynchronous NCCL error) the communicator is aborted and the rank stops
// with one clear line. Built only when the CUDA toolkit and nccl.h are found.
// Buffers may be device or host memory: a host buffer (the engine's counts and statistics) is
// staged through a device copy, since NCCL itself only moves device memory.
#include <cuda_runtime.h>
#include <nccl.h>
#ifdef VERLCPP_WITH_MPI
#include <mpi.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "dist/comm_impl.h"
#include "core/error.h"

namespace verl {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA ", what, " failed: ", cudaGetErrorString(e));
}
void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) fail("NCCL ", what, " failed: ", ncclGetErrorString(r));
}

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::F16: return ncclFloat16;
    case DType::BF16: return ncclBfloat16;
    case DType::I64: return ncclInt64;
    case DType::I32: return ncclInt32;
    case DType::U8: return ncclUint8;
    case DType::I8: return ncclInt8;
    case DType::U32: return ncclUint32;
    case DType::U64: return ncclUint64;
    default: fail("NCCL: unsupported dtype ", dtype_st_name(dt));
  }
}

// True for memory the device can hand to NCCL (device or managed allocations).
bool on_device(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "invalid value" of an unknown host pointer
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

// A host buffer seen through a temporary device copy: `in` bytes copied in on construction,
// `out` bytes copied back by finish(); a device buffer is used as it is.
class Staged {
 public:
  Staged(const void* p, size_t in_bytes, size_t out_bytes, cudaStream_t s)
      : host_(const_cast<void*>(p)), out_(out_bytes), stream_(s) {
    if (!p || on_device(p)) {
      dev_ = host_;
      host_ = nullptr;
      return;
    }
    cuda_check(cudaMalloc(&dev_, std::max<size_t>(std::max(in_bytes, out_bytes), 1)), "malloc (staging)");
    if (in_bytes) cuda_check(cudaMemcpyAsync(dev_, p, in_bytes, cudaMemcpyHostToDevice, stream_), "copy to device");
  }
  ~Staged() {
    if (host_) cudaFree(dev_);
  }
  Staged(const Staged&) = delete;
  Staged& operator=(const Staged&) = delete;
  void* get() const { return dev_; }
  void finish() {
    if (host_ && out_) {
      cuda_check(cudaMemcpyAsync(host_, dev_, out_, cudaMemcpyDeviceToHost, stream_), "copy to host");
      cuda_check(cudaStreamSynchronize(stream_), "copy to host");
    }
  }

 private:
  void* host_;
  void* dev_ = nullptr;
  size_t out_;
  cudaStream_t stream_;
};

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Avg: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
    case ReduceOp::Min: return ncclMin;
  }
  return ncclSum;
}

class NcclComm final : public Comm {
 public:
  NcclComm(ncclComm_t c, int rank, int size, double timeout) : comm_(c), rank_(rank), size_(size), timeout_(timeout) {
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream create");
  }
  ~NcclComm() override {
    if (comm_) ncclCommDestroy(comm_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }
  bool device_buffers() const override { return true; }

  void all_gather(const void* send, void* recv, size_t count, DType dt) override {
    const size_t b = count * dtype_size(dt);
    Staged s(send, b, 0, stream_), r(recv, 0, b * size_, stream_);
    nccl_check(ncclAllGather(s.get(), r.get(), count, nccl_type(dt), comm_, stream_), "all_gather");
    wait("all_gather");
    r.finish();
  }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dt, ReduceOp op) override {
    const size_t b = count * dtype_size(dt);
    Staged s(send, b * size_, 0, stream_), r(recv, 0, b, stream_);
    nccl_check(ncclReduceScatter(s.get(), r.get(), count, nccl_type(dt), nccl_op(op), comm_, stream_), "reduce_scatter");
    wait("reduce_scatter");
    r.finish();
  }
  void all_reduce(void* buf, size_t count, DType dt, ReduceOp op) override {
    const size_t b = count * dtype_size(dt);
    Staged s(buf, b, b, stream_);
    nccl_check(ncclAllReduce(s.get(), s.get(), count, nccl_type(dt), nccl_op(op), comm_, stream_), "all_reduce");
    wait("all_reduce");
    s.finish();
  }
  void broadcast(void* buf, size_t count, DType dt, int root) override {
    const size_t b = count * dtype_size(dt);
    Staged s(buf, b, b, stream_);
    nccl_check(ncclBroadcast(s.get(), s.get(), count, nccl_type(dt), root, comm_, stream_), "broadcast");
    wait("broadcast");
    s.finish();
  }
  void all_to_all(const void* send, void* recv, size_t count, DType dt) override {
    const size_t bytes = count * dtype_size(dt);
    Staged s(send, bytes * size_, 0, stream_), r(recv, 0, bytes * size_, stream_);
    nccl_check(ncclGroupStart(), "group start");
    for (int p = 0; p < size_; ++p) {
      nccl_check(ncclSend(static_cast<const char*>(s.get()) + p * bytes, count, nccl_type(dt), p, comm_, stream_), "send");
      nccl_check(ncclRecv(static_cast<char*>(r.get()) + p * bytes, count, nccl_type(dt), p, comm_, stream_), "recv");
    }
    nccl_check(ncclGroupEnd(), "group end");
    wait("all_to_all");
    r.finish();
  }
  void barrier() override {
    // An all-reduce of one int on the device is NCCL's barrier.
    int* d = nullptr;
    cuda_check(cudaMalloc(&d, sizeof(int)), "malloc");
    cuda_check(cudaMemsetAsync(d, 0, sizeof(int), stream_), "memset");
    nccl_check(ncclAllReduce(d, d, 1, ncclInt32, ncclSum, comm_, stream_), "barrier");
    wait("barrier");
    cudaFree(d);
  }
  std::unique_ptr<Comm> split(int color, int key) override {
    ncclComm_t c = nullptr;
    nccl_check(ncclCommSplit(comm_, color, key, &c, nullptr), "comm split");
    int r = 0, n = 1;
    nccl_check(ncclCommUserRank(c, &r), "user rank");
    nccl_check(ncclCommCount(c, &n), "count");
    return std::make_unique<NcclComm>(c, r, n, timeout_);
  }

 private:
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int rank_, size_;
  double timeout_;

  void wait(const char* what) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    while (true) {
      cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) cuda_check(q, what);
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      const double el = std::chrono::duration<double>(clock::now() - t0).count();
      if (async != ncclSuccess || el > timeout_) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        if (async != ncclSuccess) fail("rank ", rank_, ": NCCL ", what, " failed: ", ncclGetErrorString(async));
        fail("rank ", rank_, ": collective ", what, " did not complete within ", timeout_,
             " s: another rank died or stalled");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
};

}  // namespace

std::unique_ptr<Comm> make_nccl_comm(double timeout_s, int device) {
  int rank = 0, size = 1;
#ifdef VERLCPP_WITH_MPI
  if (launched_by_mpi()) {
    int init = 0;
    MPI_Initialized(&init);
    if (!init) {
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
  }
#else
  if (launched_by_mpi()) fail("NCCL with several ranks needs MPI to exchange its id: rebuild with MPI");
#endif
  int ndev = 0;
  cuda_check(cudaGetDeviceCount(&ndev), "device count");
  if (ndev == 0) fail("backend 'nccl' needs a CUDA device, found none");
  if (device < 0) {
    const char* lr = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (!lr) lr = std::getenv("SLURM_LOCALID");
    device = (lr ? std::atoi(lr) : rank) % ndev;
  }
  cuda_check(cudaSetDevice(device), "set device");
  ncclUniqueId id;
  if (rank == 0) nccl_check(ncclGetUniqueId(&id), "unique id");
#ifdef VERLCPP_WITH_MPI
  if (size > 1) MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
#endif
  ncclComm_t c = nullptr;
  nccl_check(ncclCommInitRank(&c, size, id, rank), "init");
  return std::make_unique<NcclComm>(c, rank, size, timeout_s);
}

}  // namespace verl
