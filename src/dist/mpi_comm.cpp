// mpi_comm.cpp — Comm over MPI for host buffers. Every collective is issued non-blocking
// (MPI-3 MPI_I*) and polled under a watchdog: if it has not completed within the timeout,
// this rank prints one line naming the collective and aborts the job (MPI_Abort), so a rank
// that stalls cannot hang the others. bf16 / fp16 reductions use user-defined MPI ops that
// accumulate in fp32 and round back exactly as torch does (core/dtype.h convert).
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "dist/comm_impl.h"
#include "core/error.h"

namespace verl {
namespace {

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail("MPI ", what, " failed: ", std::string(msg, static_cast<size_t>(len)));
}

// Element type of the same width, for collectives that only move bytes.
MPI_Datatype raw_type(DType dt) {
  switch (dtype_size(dt)) {
    case 1: return MPI_UINT8_T;
    case 2: return MPI_UINT16_T;
    case 4: return MPI_UINT32_T;
    case 8: return MPI_UINT64_T;
    default: fail("MPI: unsupported element size ", dtype_size(dt));
  }
}

// Reduction over fp16 / bf16 stored as uint16: widen to fp32, combine, round back.
template <DType D, ReduceOp OP>
void half_op(void* in, void* inout, int* len, MPI_Datatype*) {
  const size_t n = static_cast<size_t>(*len);
  thread_local std::vector<float> a, b;
  a.resize(n);
  b.resize(n);
  convert(in, D, a.data(), DType::F32, n);
  convert(inout, D, b.data(), DType::F32, n);
  for (size_t i = 0; i < n; ++i) {
    if constexpr (OP == ReduceOp::Max) b[i] = a[i] > b[i] || a[i] != a[i] ? a[i] : b[i];
    else if constexpr (OP == ReduceOp::Min) b[i] = a[i] < b[i] || a[i] != a[i] ? a[i] : b[i];
    else b[i] = a[i] + b[i];
  }
  convert(b.data(), DType::F32, inout, D, n);
}

struct HalfOps {
  MPI_Op op[2][3];  // [fp16, bf16][sum, max, min]
  HalfOps() {
    MPI_Op_create(&half_op<DType::F16, ReduceOp::Sum>, 1, &op[0][0]);
    MPI_Op_create(&half_op<DType::F16, ReduceOp::Max>, 1, &op[0][1]);
    MPI_Op_create(&half_op<DType::F16, ReduceOp::Min>, 1, &op[0][2]);
    MPI_Op_create(&half_op<DType::BF16, ReduceOp::Sum>, 1, &op[1][0]);
    MPI_Op_create(&half_op<DType::BF16, ReduceOp::Max>, 1, &op[1][1]);
    MPI_Op_create(&half_op<DType::BF16, ReduceOp::Min>, 1, &op[1][2]);
  }
};
HalfOps* g_half_ops = nullptr;

// (datatype, op) for a reduction; Avg reduces with Sum and is divided afterwards.
std::pair<MPI_Datatype, MPI_Op> reduction(DType dt, ReduceOp op) {
  const int k = op == ReduceOp::Max ? 1 : op == ReduceOp::Min ? 2 : 0;
  const MPI_Op std_op = k == 1 ? MPI_MAX : k == 2 ? MPI_MIN : MPI_SUM;
  switch (dt) {
    case DType::F32: return {MPI_FLOAT, std_op};
    case DType::F64: return {MPI_DOUBLE, std_op};
    case DType::I64: return {MPI_INT64_T, std_op};
    case DType::I32: return {MPI_INT32_T, std_op};
    case DType::I16: return {MPI_INT16_T, std_op};
    case DType::I8: return {MPI_INT8_T, std_op};
    case DType::U8: return {MPI_UINT8_T, std_op};
    case DType::U32: return {MPI_UINT32_T, std_op};
    case DType::U64: return {MPI_UINT64_T, std_op};
    case DType::F16:
    case DType::BF16:
      if (!g_half_ops) g_half_ops = new HalfOps();
      return {MPI_UINT16_T, g_half_ops->op[dt == DType::BF16 ? 1 : 0][k]};
    default: fail("MPI: cannot reduce ", dtype_st_name(dt), " tensors");
  }
}

int icount(size_t n, const char* what) {
  if (n > static_cast<size_t>(INT_MAX)) fail("MPI ", what, ": ", n, " elements exceed MPI's int count limit");
  return static_cast<int>(n);
}

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm c, bool owned, double timeout) : comm_(c), owned_(owned), timeout_(timeout) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  }
  ~MpiComm() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (owned_ && !fin) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  void all_gather(const void* send, void* recv, size_t count, DType dt) override {
    const int n = icount(count, "all_gather");
    run("all_gather", [&](MPI_Request* r) { return MPI_Iallgather(send, n, raw_type(dt), recv, n, raw_type(dt), comm_, r); });
  }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dt, ReduceOp op) override {
    const int n = icount(count, "reduce_scatter");
    auto [type, mop] = reduction(dt, op);
    run("reduce_scatter", [&](MPI_Request* r) { return MPI_Ireduce_scatter_block(send, recv, n, type, mop, comm_, r); });
    if (op == ReduceOp::Avg) divide(recv, count, dt);
  }
  void all_reduce(void* buf, size_t count, DType dt, ReduceOp op) override {
    const int n = icount(count, "all_reduce");
    auto [type, mop] = reduction(dt, op);
    run("all_reduce", [&](MPI_Request* r) { return MPI_Iallreduce(MPI_IN_PLACE, buf, n, type, mop, comm_, r); });
    if (op == ReduceOp::Avg) divide(buf, count, dt);
  }
  void broadcast(void* buf, size_t count, DType dt, int root) override {
    const int n = icount(count, "broadcast");
    run("broadcast", [&](MPI_Request* r) { return MPI_Ibcast(buf, n, raw_type(dt), root, comm_, r); });
  }
  void all_to_all(const void* send, void* recv, size_t count, DType dt) override {
    const int n = icount(count, "all_to_all");
    run("all_to_all", [&](MPI_Request* r) { return MPI_Ialltoall(send, n, raw_type(dt), recv, n, raw_type(dt), comm_, r); });
  }
  void barrier() override {
    run("barrier", [&](MPI_Request* r) { return MPI_Ibarrier(comm_, r); });
  }
  // Starts one non-blocking collective and waits for it under the watchdog.
  template <class Start>
  void run(const char* what, Start&& start) {
    MPI_Request r;
    check(start(&r), what);
    wait(r, what);
  }
  std::unique_ptr<Comm> split(int color, int key) override {
    MPI_Comm c;
    check(MPI_Comm_split(comm_, color, key, &c), "comm_split");
    return std::make_unique<MpiComm>(c, true, timeout_);
  }

 private:
  MPI_Comm comm_;
  bool owned_;
  double timeout_;
  int rank_ = 0, size_ = 1, world_rank_ = 0;

  // Polls until the request completes; past the timeout, one line and MPI_Abort.
  void wait(MPI_Request& r, const char* what) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    int done = 0;
    int spins = 0;
    while (true) {
      check(MPI_Test(&r, &done, MPI_STATUS_IGNORE), what);
      if (done) return;
      const double el = std::chrono::duration<double>(clock::now() - t0).count();
      if (el > timeout_) {
        std::fprintf(stderr,
                     "verlcpp: error: rank %d: collective %s did not complete within %.0f s: another rank died or "
                     "stalled; aborting the job\n",
                     world_rank_, what, timeout_);
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, 4);
      }
      // Keep calling MPI_Test: non-blocking collectives progress only inside MPI calls, so a
      // sleep here would stall large transfers. Yield so oversubscribed ranks share cores;
      // back off to short sleeps only after a long wait (a stalled peer).
      if (++spins > 200000) std::this_thread::sleep_for(std::chrono::microseconds(100));
      else std::this_thread::yield();
    }
  }

  void divide(void* buf, size_t count, DType dt) const { divide_by(buf, count, dt, size_); }
};

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(double timeout_s) {
  int init = 0;
  MPI_Initialized(&init);
  if (!init) {
    int provided = 0;
    check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "init");
  }
  return std::make_unique<MpiComm>(MPI_COMM_WORLD, false, timeout_s);
}

void abort_mpi(int code) {
  int init = 0, fin = 0, size = 1;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (!init || fin) return;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::fflush(stderr);
  if (size > 1) MPI_Abort(MPI_COMM_WORLD, code);
  MPI_Finalize();
}

void finalize_mpi() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (init && !fin) MPI_Finalize();
}

}  // namespace verl
