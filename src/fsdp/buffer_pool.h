// buffer_pool.h — reuse of the large host buffers FSDP allocates and frees on every
// micro-batch: a unit's gathered parameters, the compute-dtype copy of its shard, its flat
// gradient. glibc hands blocks over 32 MB (and trimmed heap tops) back to the kernel at free,
// so every fresh allocation page-faults and zero-fills again: profiled on the CPU engine, a
// 24 MB copy into a fresh buffer took ~15x as long as into a warm one, and these copies were
// the largest cost after the matmuls. The pool keeps up to two freed buffers per byte size
// (a unit and the next one are what FSDP holds at once), so it never keeps more than was live
// together. Thread-safe (thread ranks share one process). What PyTorch's CUDA caching
// allocator does for FSDP2 on GPUs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstddef>

namespace verl {

// A buffer of exactly `nbytes` (uninitialised) from the pool or the CPU allocator.
c10::DataPtr pool_take(size_t nbytes);
// Hands a buffer of `nbytes` back (freed at once when the pool already holds two of that size).
void pool_give(c10::DataPtr p, size_t nbytes);

// An uninitialised contiguous 1-D tensor over a pooled buffer; pool_give_tensor returns its
// memory (the tensor must be the only owner of its storage; otherwise it is simply dropped).
// On a device other than the CPU: a plain at::empty (the device's caching allocator pools).
at::Tensor pool_tensor(int64_t numel, at::ScalarType dtype, c10::Device device = c10::Device(c10::kCPU));
void pool_give_tensor(at::Tensor t);

// Process-wide host memory for large tensors, for an engine that runs inside a Python process
// (verl's trainers), where glibc's defaults apply: blocks of >= 1 MiB, of whatever size, are
// served from their own anonymous mappings, rounded up to one of 8 size classes per power of two
// (untouched pages cost nothing), and a freed block is kept for reuse by its class (no page
// faults on the next micro-batch's activations) up to an eighth of the bytes in use in blocks
// (at least 64 MiB) idle in all, the least recently freed given back to the kernel first. glibc's heap instead splits and
// coalesces these blocks among the long-lived ones and cannot return its holes: in the bf16
// verl benchmark ~300 MiB per rank sat free but resident at the peak. Installs itself as torch's
// CPU allocator once (later calls do nothing); tensors allocated before keep their own deleters.
// With it installed, the pool above keeps nothing (the cache does). VERLCPP_HOST_CACHE_MIB sets
// a fixed cap instead (0: no caching, every block mapped and unmapped; off: not installed).
void install_host_block_cache();

// `t` on `device`; a device tensor coming to the host lands in pinned (page-locked) memory, so
// that moving it back (offload / reload around a rollout) is one fast DMA copy.
at::Tensor offload_copy(const at::Tensor& t, c10::Device device);

}  // namespace verl
