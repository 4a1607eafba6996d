// comm_impl.h — internals shared by the Comm implementations (not part of the API).
#pragma once
#include <memory>

#include "dist/comm.h"

namespace verl {

// Divides `count` elements of type dt in place by n (for ReduceOp::Avg after a Sum);
// floating types round as torch does, integers truncate toward zero.
void divide_by(void* buf, size_t count, DType dt, int n);

std::unique_ptr<Comm> make_local_comm();
#ifdef VERLCPP_WITH_MPI
std::unique_ptr<Comm> make_mpi_comm(double timeout_s);
void finalize_mpi();
void abort_mpi(int code);
#endif
#ifdef VERLCPP_WITH_NCCL
std::unique_ptr<Comm> make_nccl_comm(double timeout_s, int device);
#endif

}  // namespace verl
