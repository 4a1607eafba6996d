// c10d_comm.cpp — Comm over c10d::ProcessGroup (see c10d_comm.h). Raw buffers become tensors
// without a copy (at::from_blob) and go to the group's _allgather_base / _reduce_scatter_base /
// allreduce / broadcast / alltoall_base / barrier, as torch.distributed's
// all_gather_into_tensor, reduce_scatter_tensor, all_reduce, broadcast and all_to_all_single do.
#include "c10d_comm.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <algorithm>
#include <chrono>
#include <vector>

#include "core/error.h"
#include "model/torch_dtype.h"

namespace verl {
namespace {

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return c10d::ReduceOp::SUM;
    case ReduceOp::Avg: return c10d::ReduceOp::AVG;
    case ReduceOp::Max: return c10d::ReduceOp::MAX;
    case ReduceOp::Min: return c10d::ReduceOp::MIN;
  }
  fail("c10d comm: unknown reduce op");
}

class C10dComm final : public Comm {
 public:
  C10dComm(c10::intrusive_ptr<c10d::ProcessGroup> pg, double timeout_s)
      : pg_(std::move(pg)), timeout_(static_cast<int64_t>(timeout_s * 1000)) {}
  int rank() const override { return pg_->getRank(); }
  int size() const override { return pg_->getSize(); }
  std::string name() const override { return "c10d:" + pg_->getBackendName(); }

  void all_gather(const void* send, void* recv, size_t count, DType dt) override {
    at::Tensor in = wrap(const_cast<void*>(send), count, dt), out = wrap(recv, count * size(), dt);
    wait("all_gather", pg_->_allgather_base(out, in));
  }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dt, ReduceOp op) override {
    at::Tensor in = wrap(const_cast<void*>(send), count * size(), dt), out = wrap(recv, count, dt);
    c10d::ReduceScatterOptions o;
    o.reduceOp = to_c10d(op);
    wait("reduce_scatter", pg_->_reduce_scatter_base(out, in, o));
  }
  void all_reduce(void* buf, size_t count, DType dt, ReduceOp op) override {
    std::vector<at::Tensor> t{wrap(buf, count, dt)};
    c10d::AllreduceOptions o;
    o.reduceOp = to_c10d(op);
    wait("all_reduce", pg_->allreduce(t, o));
  }
  void broadcast(void* buf, size_t count, DType dt, int root) override {
    std::vector<at::Tensor> t{wrap(buf, count, dt)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait("broadcast", pg_->broadcast(t, o));
  }
  void all_to_all(const void* send, void* recv, size_t count, DType dt) override {
    at::Tensor in = wrap(const_cast<void*>(send), count * size(), dt), out = wrap(recv, count * size(), dt);
    std::vector<int64_t> even;  // empty split sizes: equal blocks
    wait("all_to_all", pg_->alltoall_base(out, in, even, even));
  }
  void barrier() override { wait("barrier", pg_->barrier()); }

  // MPI_Comm_split semantics, for the identity split only (one color, keys in rank order): it
  // shares this group. Any other split is an Error (see below).
  std::unique_ptr<Comm> split(int color, int key) override {
    const int n = size();
    std::vector<int64_t> mine{color, key}, all(2 * static_cast<size_t>(n));
    all_gather(mine.data(), all.data(), 2, DType::I64);
    std::vector<std::pair<int64_t, int>> members;  // (key, rank) of my color
    for (int r = 0; r < n; ++r)
      if (all[2 * r] == color) members.emplace_back(all[2 * r + 1], r);
    std::sort(members.begin(), members.end());
    std::vector<int> ranks;
    for (auto& m : members) ranks.push_back(m.second);
    bool identity = static_cast<int>(ranks.size()) == n;
    for (int i = 0; identity && i < n; ++i) identity = ranks[i] == i;
    if (identity) return std::make_unique<C10dComm>(pg_, timeout_.count() / 1000.0);
    // Sub-groups through ProcessGroup::splitGroup hung intermittently on gloo (a sub-group's first
    // all_gather never met its peer, 1 run in 3 at 4 ranks), so hybrid sharding is refused here
    // until that is understood; the MPI comm has it.
    fail("fsdp_size ", ranks.size(), " < ", n, " ranks (hybrid sharding) over torch.distributed needs every rank on one "
         "host (sub-groups are made in shared memory; VERLCPP_SHM must not be 0); "
         "use fsdp_size=-1");

  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::chrono::milliseconds timeout_;

  at::Tensor wrap(void* p, size_t count, DType dt) const {
    return at::from_blob(p, {static_cast<int64_t>(count)}, at::TensorOptions().dtype(to_scalar_type(dt, "c10d comm")));
  }
  void wait(const char* what, const c10::intrusive_ptr<c10d::Work>& w) {
    bool ok = false;
    try {
      ok = w->wait(timeout_);
    } catch (const std::exception& e) {
      fail("collective ", what, " over torch.distributed group '", pg_->getGroupName(), "' (",
           pg_->getBackendName(), ", rank ", rank(), " of ", size(), ") failed or timed out after ",
           timeout_.count() / 1000.0, " s: ", first_line(e.what()));
    }
    if (!ok)
      fail("collective ", what, " over torch.distributed group '", pg_->getGroupName(), "' did not finish within ",
           timeout_.count() / 1000.0, " s (rank ", rank(), " of ", size(), "): another rank stalled or died");
  }
  static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }
};

}  // namespace

std::unique_ptr<Comm> make_c10d_comm(const std::string& group_name, double timeout_s) {
  if (timeout_s <= 0) fail("collective timeout must be positive, got ", timeout_s);
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(group_name);
  } catch (const std::exception& e) {
    fail("no torch.distributed process group named '", group_name, "' (is torch.distributed initialised?)");
  }
  return std::make_unique<C10dComm>(std::move(pg), timeout_s);
}

}  // namespace verl
