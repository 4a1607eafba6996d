// test_tensor_comm.cpp — fsdp/tensor_comm.h, the engine's collectives over tensors: values
// against closed forms over 1, 2 and 4 thread ranks, and the property FSDP relies on: what a
// collective writes into a buffer does not bump that buffer's autograd version counter (a
// unit's gathered parameters are refilled under the views an earlier forward saved; an
// in-place bump made backward fail on one rank, where the gather is a torch copy).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "dist/comm.h"
#include "fsdp/tensor_comm.h"
#include "thread_comm.h"

namespace verl::test {
namespace {

TEST(TensorComm, OneRankCopiesWithoutBumpingTheVersion) {
  auto c = make_comm({"local"});
  const at::Tensor send = at::arange(6, at::kFloat);
  at::Tensor recv = at::zeros({6}, at::kFloat);
  const auto v0 = recv._version();
  all_gather_into(*c, send, recv);
  EXPECT_TRUE(recv.equal(send));
  at::Tensor rs = at::zeros({2, 3}, at::kFloat);
  const auto rv0 = rs._version();
  reduce_scatter_into(*c, send, rs, ReduceOp::Avg);
  EXPECT_TRUE(rs.reshape({-1}).equal(send));
  at::Tensor a2a = at::zeros({6}, at::kFloat);
  all_to_all_into(*c, send, a2a);
  EXPECT_TRUE(a2a.equal(send));
  at::Tensor ar = send.clone();
  all_reduce_(*c, ar, ReduceOp::Sum);
  EXPECT_TRUE(ar.equal(send));
  EXPECT_EQ(recv._version(), v0);
  EXPECT_EQ(rs._version(), rv0);
}

TEST(TensorComm, ClosedFormsOverThreadRanks) {
  for (int n : {2, 4}) {
    SCOPED_TRACE(n);
    ThreadComm::run(n, [n](Comm& c) {
      const int r = c.rank();
      // all_gather: rank r sends [r, r] → recv = 0,0,1,1,...
      const at::Tensor mine = at::full({2}, double(r), at::kFloat);
      at::Tensor all = at::empty({2 * n}, at::kFloat);
      all_gather_into(c, mine, all);
      EXPECT_TRUE(all.equal(at::arange(n, at::kFloat).repeat_interleave(2)));
      // reduce_scatter (avg): every rank sends arange(2n) + r → block r = mean over ranks.
      const at::Tensor send = at::arange(2 * n, at::kFloat) + r;
      at::Tensor out = at::empty({2}, at::kFloat);
      reduce_scatter_into(c, send, out, ReduceOp::Avg);
      const at::Tensor want = at::arange(2 * r, 2 * r + 2, at::kFloat) + (n - 1) / 2.0;
      EXPECT_TRUE(at::allclose(out, want)) << out << want;
      // all_reduce (sum) of fp64.
      at::Tensor s = at::full({3}, double(r + 1), at::kDouble);
      all_reduce_(c, s, ReduceOp::Sum);
      EXPECT_TRUE(s.equal(at::full({3}, double(n * (n + 1) / 2), at::kDouble)));
      // all_to_all: block j of rank r holds 10r + j → recv block i holds 10i + r.
      const at::Tensor blocks = at::arange(n, at::kLong) + 10 * r;
      at::Tensor got = at::empty({n}, at::kLong);
      all_to_all_into(c, blocks, got);
      EXPECT_TRUE(got.equal(at::arange(n, at::kLong) * 10 + r));
    });
  }
}

TEST(TensorComm, ShapesThatDoNotMatchAreAnError) {
  auto c = make_comm({"local"});
  at::Tensor small = at::zeros({3}, at::kFloat);
  EXPECT_THROW(all_gather_into(*c, at::zeros({4}, at::kFloat), small), Error);
  EXPECT_THROW(reduce_scatter_into(*c, at::zeros({4}, at::kFloat), small, ReduceOp::Sum), Error);
}

}  // namespace
}  // namespace verl::test
