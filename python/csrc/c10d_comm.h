// c10d_comm.h — the engine's Comm (dist/comm.h) over a torch.distributed process group that
// Python created (torchrun, Ray, verl's own init): gloo for host buffers, NCCL for device
// buffers. The group is looked up by its name (c10d::resolve_process_group, the registry
// torch.distributed fills), so the processes need no MPI world. Collectives wait under the
// same watchdog rule as the MPI comm: past `timeout_s` the call fails with one line naming
// the collective, and Python sees a RuntimeError instead of a hang.
#pragma once
#include <memory>
#include <string>

#include "dist/comm.h"

namespace verl {

// `group_name`: torch.distributed's ProcessGroup.group_name of the group to use.
std::unique_ptr<Comm> make_c10d_comm(const std::string& group_name, double timeout_s);

}  // namespace verl
