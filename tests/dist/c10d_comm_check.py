"""c10d_comm_check.py — one rank of the c10d collectives test (run_c10d_comm_tests.sh starts
it under torchrun): initialises torch.distributed with gloo, as verl does on the CPU, and runs
the C++ checks on the C++ Comm built over that group.
    torchrun --nproc_per_node N c10d_comm_check.py MODULE_DIR collectives|stall|die|shm_collectives|shm_stall|shm_die [TIMEOUT_S]
"""
import sys

import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
import c10d_comm_check as cc  # noqa: E402

mode = sys.argv[2]
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
dist.init_process_group("gloo")
group = dist.group.WORLD.group_name
try:
    if mode == "collectives":
        failed = cc.collectives(group, timeout)
    elif mode == "shm_collectives":
        failed = cc.shm_collectives(group, timeout)
    elif mode.startswith("shm_"):
        failed = cc.shm_stall_or_die(group, timeout, mode == "shm_die")
    else:
        failed = cc.stall_or_die(group, timeout, mode == "die")
except RuntimeError as e:
    print(str(e).splitlines()[0], file=sys.stderr, flush=True)
    sys.exit(2)
dist.destroy_process_group()
sys.exit(1 if failed else 0)
