// comm_checks.h — the collectives checks shared by the MPI / local driver (comm_check.cpp)
// and the torch.distributed one (c10d_comm_check.cpp): every Comm collective on 1..N ranks
// against closed-form values (each rank's data is a known function of rank and index, so
// sums, maxima and gathers have exact expected values, also in bf16 / fp16 with small
// integers), a hybrid-sharding split, and the stall / die failure modes.
#pragma once
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

namespace verl::comm_checks {

inline int g_fail = 0;
inline int g_rank = 0;
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
inline double val(int r, size_t i) { return static_cast<double>((r + 1) * static_cast<int>(i % 7 + 1)); }

inline std::vector<uint8_t> make(DType dt, int r, size_t n, size_t base = 0) {
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

inline double at(const std::vector<uint8_t>& b, DType dt, size_t i) {
  if (dt == DType::I64) {
    int64_t v;
    std::memcpy(&v, &b[i * 8], 8);
    return static_cast<double>(v);
  }
  double d;
  convert(&b[i * dtype_size(dt)], dt, &d, DType::F64, 1);
  return d;
}

inline void collectives(Comm& c, const char* tag) {
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

// collectives on the whole group, then on even / odd sub-groups (hybrid sharding). Returns
// the number of failed checks on this rank.
// hybrid=false: only the identity split (one color), which must share the group.
inline int world_and_split(Comm& comm, bool hybrid = true) {
  g_rank = comm.rank();
  collectives(comm, "world");
  if (!hybrid) {
    auto same = comm.split(0, comm.rank());
    EXPECT(same->size() == comm.size() && same->rank() == comm.rank(), "identity split %d/%d", same->rank(), same->size());
    collectives(*same, "identity split");
    std::printf("rank %d/%d (%s): %s\n", comm.rank(), comm.size(), comm.name().c_str(), g_fail ? "FAILED" : "OK");
    std::fflush(stdout);
    return g_fail;
  }
  auto sub = comm.split(comm.rank() % 2, comm.rank());
  const int want = comm.size() / 2 + (comm.rank() % 2 == 0 ? comm.size() % 2 : 0);
  EXPECT(sub->size() == want, "split size %d, want %d", sub->size(), want);
  EXPECT(sub->rank() == comm.rank() / 2, "split rank %d", sub->rank());
  collectives(*sub, "split");
  std::printf("rank %d/%d (%s): %s\n", comm.rank(), comm.size(), comm.name().c_str(), g_fail ? "FAILED" : "OK");
  std::fflush(stdout);
  return g_fail;
}

// Rank 1 stops (SIGSTOP: alive, never reaching the collective) or dies (SIGKILL) after a first
// all_reduce; the others' second all_reduce must fail with the watchdog's message. Returns 1
// when that collective returned instead.
inline int stall_or_die(Comm& comm, bool die) {
  float x = 1;
  comm.all_reduce(&x, 1, DType::F32, ReduceOp::Sum);  // everyone is up
  if (comm.rank() == 1) {
    if (die) ::kill(::getpid(), SIGKILL);
    ::raise(SIGSTOP);
  }
  comm.all_reduce(&x, 1, DType::F32, ReduceOp::Sum);
  std::printf("rank %d: second all_reduce returned (unexpected)\n", comm.rank());
  return 1;
}

}  // namespace verl::comm_checks
