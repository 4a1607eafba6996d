"""make_dcp_seeds.py — seed inputs for fuzz_dcp: real single-rank checkpoints written by
torch.distributed.checkpoint.save (default torch.save items, and the safetensors item format
where this torch has it), each packed as fuzz_dcp expects: 4-byte little-endian length of
.metadata, .metadata, then __0_0.distcp.
Usage: python fuzz/make_dcp_seeds.py OUT_DIR"""
import io
import os
import struct
import sys
import tempfile

import torch
import torch.distributed.checkpoint as dcp


def pack(folder):
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        md = f.read()
    with open(os.path.join(folder, "__0_0.distcp"), "rb") as f:
        data = f.read()
    return struct.pack("<I", len(md)) + md + data


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    states = {
        "small": {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)},
        "mixed": {"embed": torch.randn(7, 2).to(torch.bfloat16), "scalar": torch.tensor(1.5),
                  "empty": torch.zeros(0, 3), "extra": io.BytesIO(b"\x00\x01"), "strided": torch.randn(4, 6)[:, ::2]},
    }
    n = 0
    for name, sd in states.items():
        writers = [("default", dcp.FileSystemWriter)]
        try:
            from torch.distributed.checkpoint.filesystem import SerializationFormat
            writers.append(("safetensors", lambda p: dcp.FileSystemWriter(p, serialization_format=SerializationFormat.SAFETENSORS)))
        except ImportError:
            pass
        for wname, make in writers:
            with tempfile.TemporaryDirectory() as d:
                try:
                    dcp.save(sd, storage_writer=make(d), no_dist=True)
                except Exception as e:  # a format this torch cannot write for these values
                    print(f"make_dcp_seeds: {name}/{wname}: skipped ({type(e).__name__})")
                    continue
                files = sorted(x for x in os.listdir(d) if x.endswith(".distcp"))
                if files != ["__0_0.distcp"]:
                    continue
                with open(os.path.join(out, f"{name}_{wname}"), "wb") as f:
                    f.write(pack(d))
                n += 1
    print(f"make_dcp_seeds: {n} seeds in {out}")


if __name__ == "__main__":
    main()
