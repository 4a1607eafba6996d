"""tamper_ckpt.py — damage one rank file of an FSDP checkpoint in a specific, realistic way,
for the merger's bad-input tests: `--mode shrink` drops the last row of one DTensor's local
shard (shapes then disagree across ranks); `--mode partial` replaces one DTensor's placements
with Partial() (unreduced values, which cannot be merged)."""
import argparse

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--file", required=True)
    ap.add_argument("--mode", choices=["shrink", "partial"], required=True)
    a = ap.parse_args()
    sd = torch.load(a.file, map_location="cpu", weights_only=False)
    key = next(k for k, v in sd.items() if isinstance(v, DTensor) and v._local_tensor.dim() == 2 and v._local_tensor.shape[0] > 1)
    dt = sd[key]
    if a.mode == "shrink":
        dt._local_tensor = dt._local_tensor[:-1].clone()
    else:
        spec = dt._spec
        object.__setattr__(spec, "placements", tuple(Partial() for _ in spec.placements))
    torch.save(sd, a.file)
    print(f"{a.mode}: {key}")


if __name__ == "__main__":
    main()
