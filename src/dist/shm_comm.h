// shm_comm.h — collectives through one shared-memory segment, for ranks on one host.
//
// Under mpirun with vader's copy-in/copy-out (containers forbid CMA) a 28 MB fp32
// reduce-scatter over 2 ranks took ~20 ms, and over torch.distributed's gloo (TCP loopback)
// ~250 ms, because gloo reduce-scatters with an all-reduce: in verl's SFT trainer on the CPU
// the FSDP collectives were over half of the step. Here each rank copies its part into its
// slot of the segment once, and every rank reads what it needs straight from the others'
// slots (all-gather: N reads of a shard; reduce-scatter: its block from each slot, summed in
// rank order, so every rank's result is the same bit for bit and equal to a sum in rank order).
//
// Large buffers go through in rounds of at most a slot per rank. Every wait polls under the
// watchdog: a peer that stalls makes the others fail with one line within timeout_s, and a
// peer process that exits is noticed at once. The segment is unlinked as soon as every rank has
// mapped it, so nothing is left in /dev/shm whatever happens later. Sub-groups (split) get
// segments of their own, made through this comm: hybrid sharding and expert groups need no
// sub-groups of the base comm (torch.distributed's splitGroup is not needed).
#pragma once
#include <memory>

#include "dist/comm.h"

namespace verl {

// Returns a shared-memory comm over base's ranks when every rank runs on this host and a
// segment can be made (else `base` itself, unchanged, e.g. several hosts, a full /dev/shm, or
// VERLCPP_SHM=0 in the environment). Collective over base: every rank must call it.
// VERLCPP_SHM_SLOT_BYTES sets the per-rank slot (default 8 MiB; small values make tests
// cover many rounds).
std::unique_ptr<Comm> make_shm_comm(std::unique_ptr<Comm> base, double timeout_s);

}  // namespace verl
