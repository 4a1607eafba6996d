// comm_check.cpp — drives every Comm collective on 1..N ranks and checks the results
// against closed-form values (each rank's data is a known function of rank and index, so
// sums, maxima and gathers have exact expected values, also in bf16 / fp16 with small
// integers). Modes for the failure tests: a rank that stalls or dies mid-step must make
// the others stop with a clear error within the watchdog timeout.
//   comm_check collectives [--backend B]
//   comm_check stall --timeout S      (rank 1 stops responding before a collective)
//   comm_check die                    (rank 1 is killed before a collective)
#include <signal.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dist/comm.h"
#include "core/error.h"

using namespace verl;

namespace {

int g_fail = 0;
int g_rank = 0;
#define EXPECT(cond, ...)                                          \
  do {                                                             \
    if (!(cond)) {                                                 \
      std::fprintf(stderr, "rank %d: check failed: ", g_rank);     \
      std::fprintf(stderr, __VA_ARGS__);                           \
      std::fprintf(stderr, "\n");                                  \
      ++g_fail;                                                    \
    }                                                              \
  } while (0)

// Data of rank r at index i: a small integer, exact in every dtype tested.
double val(int r, size_t i) { return static_cast<double>((r + 1) * static_cast<int>(i % 7 + 1)); }

std::vector<uint8_t> make(DType dt, int r, size_t n, size_t base = 0) {
  std::vector<double> d(n);
  for (size_t i = 0; i < n; ++i) d[i] = val(r, base + i);
  std::vector<uint8_t> out(n * dtype_size(dt));
  if (dt == DType::I64) {
    for (size_t i = 0; i < n; ++i) {
      int64_t v = static_cast<int64_t>(d[i]);
      std::memcpy(&out[i * 8], &v, 8);
    }
  } else {
    convert(d.data(), DType::F64, out.data(), dt, n);
  }
  return out;
}

double at(const std::vector<uint8_t>& b, DType dt, size_t i) {
  if (dt == DType::I64) {
    int64_t v;
    std::memcpy(&v, &b[i * 8], 8);
    return static_cast<double>(v);
  }
  double d;
  convert(&b[i * dtype_size(dt)], dt, &d, DType::F64, 1);
  return d;
}

void collectives(Comm& c, const char* tag) {
  const int n = c.size(), r = c.rank();
  for (DType dt : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64}) {
    const char* dn = dtype_st_name(dt);
    const size_t count = 1000 + 3;  // odd sizes: nothing divides evenly
    // all_gather
    auto send = make(dt, r, count);
    std::vector<uint8_t> recv(count * n * dtype_size(dt));
    c.all_gather(send.data(), recv.data(), count, dt);
    for (int p = 0; p < n; ++p)
      for (size_t i = 0; i < count; i += 97)
        EXPECT(at(recv, dt, p * count + i) == val(p, i), "%s all_gather %s block %d [%zu]", tag, dn, p, i);
    // all_reduce sum / max / avg
    double sum_r = 0;
    for (int p = 0; p < n; ++p) sum_r += p + 1;
    auto buf = make(dt, r, count);
    c.all_reduce(buf.data(), count, dt, ReduceOp::Sum);
    for (size_t i = 0; i < count; i += 89)
      EXPECT(at(buf, dt, i) == sum_r * (i % 7 + 1), "%s all_reduce sum %s [%zu] = %g", tag, dn, i, at(buf, dt, i));
    buf = make(dt, r, count);
    c.all_reduce(buf.data(), count, dt, ReduceOp::Max);
    for (size_t i = 0; i < count; i += 89) EXPECT(at(buf, dt, i) == val(n - 1, i), "%s all_reduce max %s [%zu]", tag, dn, i);
    if (dt != DType::I64) {
      buf = make(dt, r, count);
      c.all_reduce(buf.data(), count, dt, ReduceOp::Avg);
      for (size_t i = 0; i < count; i += 89) {
        double want = sum_r * (i % 7 + 1) / n;
        double tol = dt == DType::BF16 ? 0.01 * want : dt == DType::F16 ? 0.001 * want : 1e-6 * want;
        EXPECT(std::fabs(at(buf, dt, i) - want) <= tol, "%s all_reduce avg %s [%zu] = %g, want %g", tag, dn, i,
               at(buf, dt, i), want);
      }
    }
    // reduce_scatter: block b of every rank's input is val(rank, b*count + i)
    auto rs_in = make(dt, r, count * n);
    std::vector<uint8_t> rs_out(count * dtype_size(dt));
    c.reduce_scatter(rs_in.data(), rs_out.data(), count, dt, ReduceOp::Sum);
    for (size_t i = 0; i < count; i += 83)
      EXPECT(at(rs_out, dt, i) == sum_r * ((r * count + i) % 7 + 1), "%s reduce_scatter %s [%zu]", tag, dn, i);
    // broadcast from the last rank
    auto bc = make(dt, r, count);
    c.broadcast(bc.data(), count, dt, n - 1);
    for (size_t i = 0; i < count; i += 79) EXPECT(at(bc, dt, i) == val(n - 1, i), "%s broadcast %s [%zu]", tag, dn, i);
    // all_to_all: block j of rank r's input is val(r, j*count+i); rank r receives block r of everyone
    auto a2a_in = make(dt, r, count * n);
    std::vector<uint8_t> a2a_out(count * n * dtype_size(dt));
    c.all_to_all(a2a_in.data(), a2a_out.data(), count, dt);
    for (int p = 0; p < n; ++p)
      for (size_t i = 0; i < count; i += 101)
        EXPECT(at(a2a_out, dt, p * count + i) == val(p, r * count + i), "%s all_to_all %s from %d [%zu]", tag, dn, p, i);
  }
  c.barrier();
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "collectives";
  CommOptions opt;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--backend") opt.backend = argv[i + 1];
    else if (k == "--timeout") opt.timeout_s = std::atof(argv[i + 1]);
  }
  try {
    auto comm = make_comm(opt);
    g_rank = comm->rank();
    if (mode == "collectives") {
      collectives(*comm, "world");
      // Hybrid sharding groups: even and odd ranks.
      auto sub = comm->split(comm->rank() % 2, comm->rank());
      const int want = comm->size() / 2 + (comm->rank() % 2 == 0 ? comm->size() % 2 : 0);
      EXPECT(sub->size() == want, "split size %d, want %d", sub->size(), want);
      EXPECT(sub->rank() == comm->rank() / 2, "split rank %d", sub->rank());
      collectives(*sub, "split");
      std::printf("rank %d/%d (%s): %s\n", comm->rank(), comm->size(), comm->name().c_str(), g_fail ? "FAILED" : "OK");
    } else if (mode == "stall" || mode == "die") {
      float x = 1;
      comm->all_reduce(&x, 1, DType::F32, ReduceOp::Sum);  // everyone is up
      if (comm->rank() == 1) {
        if (mode == "die") ::kill(::getpid(), SIGKILL);
        ::raise(SIGSTOP);  // stalls: alive, but never reaches the collective
      }
      comm->all_reduce(&x, 1, DType::F32, ReduceOp::Sum);
      std::printf("rank %d: second all_reduce returned (unexpected)\n", comm->rank());
      g_fail = 1;
    } else {
      std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
      return 2;
    }
    comm.reset();
    finalize_comm();
  } catch (const Error& e) {
    std::fprintf(stderr, "verlcpp: error: %s\n", e.what());
    return 2;
  }
  return g_fail ? 1 : 0;
}
