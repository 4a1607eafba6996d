"""tamper_ckpt.py — damage one rank file of an FSDP checkpoint in a specific, realistic way,
for the merger's bad-input tests (each is a case verl users hit or a hostile file):
  --mode shrink        drop the last row of one DTensor's local shard (shapes disagree across ranks)
  --mode partial       one DTensor's placements become Partial() (unreduced values)
  --mode int           one tensor value becomes the int 7
  --mode record        one tensor value becomes an instance of an arbitrary class (what a
                       hostile pickle is to a reader that runs nothing)
  --mode only_record   the file's whole state dict is {"x": <such an instance>}
  --mode only_extra    the state dict holds only `_extra_state` bytes (no tensor at all)
  --mode drop_key      one key is removed from this rank only
  --mode global_small  one DTensor's recorded global shape loses 3 rows on its shard dim (the
                       shards are then longer than torch.chunk of it)
and, to make verlcpp's own layout from a torch checkpoint fixture:
  --mode to_verlcpp_flat --file FIXTURE_DIR --out DIR [--world W] [--step S] [--no-rank-key]
      FIXTURE_DIR is a make_fsdp_ckpt.py case (ref_state.safetensors + ckpt/huggingface);
      DIR gets the layout verlcpp's FSDP engine saves: one flat unit per decoder layer plus one
      for the rest, padded to W·S, rank r's slice [r·S, (r+1)·S) as '<unit>.flat' in
      model_world_size_W_rank_r.pt, the unit table in fsdp_config.json, and (unless
      --no-rank-key, as in checkpoints from before it existed) '_verlcpp.rank_world_step'."""
import argparse
import json
import math
import os
import shutil

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial


def first_dtensor_key(sd):
    return next(k for k, v in sd.items() if isinstance(v, DTensor) and v._local_tensor.dim() == 2 and v._local_tensor.shape[0] > 1)


def to_verlcpp_flat(fixture, out, world, step, rank_key):
    from safetensors.torch import load_file
    state = load_file(os.path.join(fixture, "ref_state.safetensors"))
    groups = {}
    for name in sorted(state):
        parts = name.split(".")
        unit = f"layers.{parts[2]}" if name.startswith("model.layers.") else "root"
        groups.setdefault(unit, []).append(name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    shutil.copytree(os.path.join(fixture, "ckpt", "huggingface"), os.path.join(out, "huggingface"))
    units, shards = [], [dict() for _ in range(world)]
    for unit, names in groups.items():
        flat = torch.cat([state[n].float().reshape(-1) for n in names])
        S = math.ceil(flat.numel() / world)
        padded = torch.zeros(S * world)
        padded[: flat.numel()] = flat
        params, off = [], 0
        for n in names:
            params.append({"name": n, "shape": list(state[n].shape), "offset": off})
            off += state[n].numel()
        units.append({"name": unit, "numel": flat.numel(), "shard_numel": S, "params": params})
        for r in range(world):
            shards[r][unit + ".flat"] = padded[r * S:(r + 1) * S].clone()
    for r in range(world):
        if rank_key:
            shards[r]["_verlcpp.rank_world_step"] = torch.tensor([r, world, step], dtype=torch.int64)
        torch.save(shards[r], os.path.join(out, f"model_world_size_{world}_rank_{r}.pt"))
    with open(os.path.join(out, "fsdp_config.json"), "w") as f:
        json.dump({"FSDP_version": "verlcpp-flat-1", "world_size": world, "fsdp_size": world, "units": units}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", required=True)
    ap.add_argument("--mode", required=True, choices=["shrink", "partial", "int", "record", "only_record", "only_extra",
                                                      "drop_key", "global_small", "to_verlcpp_flat"])
    ap.add_argument("--out")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--step", type=int, default=5)
    ap.add_argument("--no-rank-key", action="store_true")
    a = ap.parse_args()
    if a.mode == "to_verlcpp_flat":
        to_verlcpp_flat(a.file, a.out, a.world, a.step, not a.no_rank_key)
        print(f"to_verlcpp_flat: {a.out}")
        return
    sd = torch.load(a.file, map_location="cpu", weights_only=False)
    key = first_dtensor_key(sd)
    dt = sd[key]
    if a.mode == "shrink":
        dt._local_tensor = dt._local_tensor[:-1].clone()
    elif a.mode == "partial":
        spec = dt._spec
        object.__setattr__(spec, "placements", tuple(Partial() for _ in spec.placements))
    elif a.mode == "int":
        sd[key] = 7
    elif a.mode == "record":
        sd[key] = argparse.Namespace(payload="not a tensor")
    elif a.mode == "only_record":
        sd = {"x": argparse.Namespace(payload="not a tensor")}
        key = "x"
    elif a.mode == "only_extra":
        sd = {"model.layers.0.mlp._extra_state": b"\x00" * 8}
        key = "model.layers.0.mlp._extra_state"
    elif a.mode == "drop_key":
        del sd[key]
    elif a.mode == "global_small":
        spec = dt._spec
        meta = spec.tensor_meta
        dim = next(p.dim for p in spec.placements if p.is_shard())
        shape = list(meta.shape)
        shape[dim] -= 3
        object.__setattr__(spec, "tensor_meta", type(meta)(torch.Size(shape), meta.stride, meta.dtype))
    torch.save(sd, a.file)
    print(f"{a.mode}: {key}")


if __name__ == "__main__":
    main()
