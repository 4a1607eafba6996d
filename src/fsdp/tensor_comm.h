// tensor_comm.h — the engine's collectives over tensors, wherever they live: the one place
// where libtorch tensors meet dist/'s raw-buffer Comm. A single-rank group is a copy (or
// nothing) done by torch on the tensors' own device, so a one-GPU run needs no communicator
// at all; a CPU tensor goes to the comm as it is; a device tensor goes to a comm that takes
// device buffers (NCCL, torch.distributed over NCCL) once the device's current stream has
// finished producing it, and is staged through host memory for a host-only comm (MPI, shared
// memory, gloo) — correct everywhere, fast where the comm matches the device.
#pragma once
#include <ATen/core/Tensor.h>

#include "dist/comm.h"

namespace verl {

// recv [size · send.numel()] (contiguous) ← every rank's send, in rank order.
void all_gather_into(Comm& c, const at::Tensor& send, const at::Tensor& recv);
// recv [send.numel() / size] ← the reduction of this rank's block of every rank's send.
void reduce_scatter_into(Comm& c, const at::Tensor& send, const at::Tensor& recv, ReduceOp op);
// In place over a contiguous tensor.
void all_reduce_(Comm& c, const at::Tensor& t, ReduceOp op);
// recv (same shape as send): block j of send goes to rank j, block i of recv came from rank i.
void all_to_all_into(Comm& c, const at::Tensor& send, const at::Tensor& recv);

// Waits until the device's current stream has finished its queued work (no-op on the CPU):
// a raw buffer handed to code outside torch's streams must be complete.
void sync_device(const at::Tensor& t);

}  // namespace verl
