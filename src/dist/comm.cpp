// comm.cpp — picks the Comm implementation, and the single-process Comm that needs no MPI:
// with one rank every collective is a copy (or nothing), so one-process runs work on
// machines without MPI (e.g. a GPU box) and give the same numbers as a one-rank MPI job.
#include "dist/comm.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dist/comm_impl.h"
#include "dist/shm_comm.h"
#include "core/error.h"

namespace verl {

void divide_by(void* buf, size_t count, DType dt, int n) {
  if (n == 1) return;
  switch (dt) {
    case DType::F32: {
      auto* p = static_cast<float*>(buf);
      for (size_t i = 0; i < count; ++i) p[i] /= static_cast<float>(n);
      return;
    }
    case DType::F64: {
      auto* p = static_cast<double*>(buf);
      for (size_t i = 0; i < count; ++i) p[i] /= n;
      return;
    }
    case DType::F16:
    case DType::BF16: {
      std::vector<float> f(count);
      convert(buf, dt, f.data(), DType::F32, count);
      for (auto& x : f) x /= static_cast<float>(n);
      convert(f.data(), DType::F32, buf, dt, count);
      return;
    }
    case DType::I64: {
      auto* p = static_cast<int64_t*>(buf);
      for (size_t i = 0; i < count; ++i) p[i] /= n;
      return;
    }
    case DType::I32: {
      auto* p = static_cast<int32_t*>(buf);
      for (size_t i = 0; i < count; ++i) p[i] /= n;
      return;
    }
    default: fail("average of ", dtype_st_name(dt), " tensors is not supported");
  }
}

namespace {

class LocalComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "local"; }
  void all_gather(const void* send, void* recv, size_t count, DType dt) override { copy(send, recv, count, dt); }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dt, ReduceOp) override {
    copy(send, recv, count, dt);
  }
  void all_reduce(void*, size_t, DType, ReduceOp) override {}
  void broadcast(void*, size_t, DType, int root) override {
    if (root != 0) fail("broadcast from rank ", root, " in a single-process group");
  }
  void all_to_all(const void* send, void* recv, size_t count, DType dt) override { copy(send, recv, count, dt); }
  void barrier() override {}
  std::unique_ptr<Comm> split(int, int) override { return std::make_unique<LocalComm>(); }

 private:
  static void copy(const void* s, void* d, size_t count, DType dt) {
    if (s != d && count) std::memmove(d, s, count * dtype_size(dt));
  }
};

}  // namespace

std::unique_ptr<Comm> make_local_comm() { return std::make_unique<LocalComm>(); }

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

std::unique_ptr<Comm> make_comm(const CommOptions& opt) {
  const std::string& b = opt.backend;
  if (opt.timeout_s <= 0) fail("collective timeout must be positive, got ", opt.timeout_s);
  if (b == "local") {
    if (launched_by_mpi()) {
      const char* n = std::getenv("OMPI_COMM_WORLD_SIZE");
      if (n && std::atoi(n) > 1) fail("backend 'local' is single-process, but this is one of ", n, " MPI ranks");
    }
    return make_local_comm();
  }
  if (b == "mpi" || (b == "auto" && launched_by_mpi())) {
#ifdef VERLCPP_WITH_MPI
    // Ranks on one host exchange through shared memory (several times faster than MPI's
    // shared-memory transport for FSDP's collectives); MPI stays for anything else.
    return make_shm_comm(make_mpi_comm(opt.timeout_s), opt.timeout_s);
#else
    if (b == "mpi" || launched_by_mpi())
      fail("this verlcpp was built without MPI, but ", b == "mpi" ? "backend 'mpi' was requested" : "it was started by mpirun",
           " (install libopenmpi-dev and rebuild)");
#endif
  }
  if (b == "nccl") {
#ifdef VERLCPP_WITH_NCCL
    return make_nccl_comm(opt.timeout_s, opt.device);
#else
    fail("this verlcpp was built without NCCL (needs the CUDA toolkit and nccl.h at build time)");
#endif
  }
  if (b == "auto") return make_local_comm();
  fail("unknown communication backend '", b, "' (auto, mpi, nccl, local)");
}

void finalize_comm() {
#ifdef VERLCPP_WITH_MPI
  finalize_mpi();
#endif
}

void abort_comm(int code) {
#ifdef VERLCPP_WITH_MPI
  abort_mpi(code);
#else
  (void)code;
#endif
}

}  // namespace verl
