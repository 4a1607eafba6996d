"""bench_merge.py — side-by-side benchmark of verl's FSDP model merger and `verlcpp merge`.

Builds once (cached under --work) a random Qwen2-shaped fp32 checkpoint of about --params
parameters (default 1.5e9: the Qwen2.5-1.5B shape, tied embeddings; --quick: ~1e8, untied),
sharded over each world size in --sizes, then runs, alternating, --runs merges of each:
    python -m verl.model_merger merge --backend fsdp --local_dir CKPT --target_dir OUT
    build/verlcpp merge --backend fsdp --local_dir CKPT --target_dir OUT --overwrite --quiet --dtype bf16
measuring wall time and peak RSS (the child's ru_maxrss from wait4). Both write bf16 (verl
always does). It also measures a disk floor: reading every shard byte plus writing as many
bytes as the merged output holds; page-cache state is whatever the runs left (warm: there
is no way to drop caches here), so the floor is a warm floor as well. Every run (and the floor) starts after a sync, so that writeback of
the previous run's output does not throttle it. The floor is measured right before each of
our runs, in the same state (previous output deleted, caches as left): on a shared machine
the cost of the kernel's page-cache writes (page allocation, reclaim) swings 2-5x between
minutes, so "ours/floor" is the median of the per-run ratios, and "floor" the median floor.

Shard files are written directly, in exactly the format FSDP2 gives: for each rank, under a
single-process "fake" process group of that rank, DTensors (mesh ("fsdp",), Shard(0)) over
local views into padded per-parameter storages, with DTensorSpecs shared between tensors
of equal shape, the state dict's `_metadata`, and tied weights sharing one storage. (This
was checked against real gloo FSDP2 runs of tests/oracle/make_fsdp_ckpt.py: the pickles are
identical except for Python hash values.) Weights are seeded per row block, so every world
size holds the same model, and memory stays near one rank's shard. Optimizer files are not
written: no merger reads them.

Usage: bench_merge.py [--quick] [--sizes 4,8] [--runs 3] [--work DIR] [--params 1.5e9]
                      [--verlcpp build/verlcpp] [--threads N] [--no-verify]
"""
import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import OrderedDict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORMAT_VERSION = 1  # bump when the generated checkpoint changes, to invalidate caches
BUF = 16 << 20


# ----------------------------------------------------------------------------- model shape

def model_config(params):
    """A Qwen2 config of about `params` parameters: the widths of Qwen2.5-1.5B (tied), or
    small widths (untied) below 1e9; the layer count is what makes up the total."""
    from transformers import Qwen2Config

    if params >= 1e9:
        w = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=True)
    else:
        w = dict(hidden_size=640, intermediate_size=1728, num_attention_heads=10, num_key_value_heads=2,
                 vocab_size=32000, tie_word_embeddings=False)
    h, i, v = w["hidden_size"], w["intermediate_size"], w["vocab_size"]
    kv = w["num_key_value_heads"] * h // w["num_attention_heads"]
    per_layer = 2 * h * h + 2 * kv * h + h + 2 * kv + 3 * h * i + 2 * h
    embed = v * h * (1 if w["tie_word_embeddings"] else 2) + h
    layers = max(1, math.ceil((params - embed) / per_layer))
    cfg = Qwen2Config(num_hidden_layers=layers, max_position_embeddings=4096, bos_token_id=296,
                      eos_token_id=298, pad_token_id=296, **w)
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.dtype = "float32"
    return cfg


def meta_state(cfg):
    """(ordered [(name, shape)], {alias: canonical} for tied weights, state-dict _metadata)
    of the HF model, built on the meta device (no memory)."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    canonical, aliases = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in canonical:
            aliases[name] = canonical[id(p)]
        else:
            canonical[id(p)] = name
    sd = model.state_dict()
    return [(k, tuple(v.shape)) for k, v in sd.items()], aliases, sd._metadata


# ----------------------------------------------------------------------------- writing shards

def fill_rows(dst, seed, index, name, start):
    """Rows [start, start+len(dst)) of parameter `index`, seeded per block of rows so that
    every sharding of the parameter holds the same values."""
    import torch

    n = dst.shape[0]
    if n == 0:
        return
    row = int(math.prod(dst.shape[1:]))
    block = max(1, (1 << 20) // max(1, row))
    gen = torch.Generator()
    r = start
    while r < start + n:
        b = r // block
        gen.manual_seed(seed * 1_000_003 + index * 65_537 + b)
        lo = b * block
        hi = min(lo + block, start + n)
        vals = torch.randn((hi - lo,) + tuple(dst.shape[1:]), generator=gen)
        vals = 1.0 + 0.1 * vals if name.endswith("norm.weight") else 0.02 * vals
        dst[r - start: hi - start].copy_(vals[r - lo: hi - lo])
        r = hi


def write_rank(path, rank, world, params, aliases, metadata, seed):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
        sd, specs, locals_ = OrderedDict(), {}, {}
        for index, (name, shape) in enumerate(params):
            if name in aliases:
                local = locals_[aliases[name]]
            else:
                rows = shape[0]
                chunk = -(-rows // world)  # torch.chunk sizes; FSDP2 pads every rank to this
                start = min(rank * chunk, rows)
                n = max(0, min(rows, start + chunk) - start)
                padded = torch.empty((chunk,) + shape[1:], dtype=torch.float32)
                local = padded[:n]
                fill_rows(local, seed, index, name, start)
                locals_[name] = local
            stride = tuple(int(math.prod(shape[i + 1:])) for i in range(len(shape)))
            key = (shape, stride)
            if key in specs:
                dt = DTensor(local, specs[key], requires_grad=False)
            else:
                dt = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)
                specs[key] = dt._spec
            hash(dt._spec)  # FSDP2's specs carry a computed _hash
            sd[name] = dt
        hash(mesh)
        sd._metadata = metadata
        tmp = path + ".tmp"
        torch.save(sd, tmp)
        os.replace(tmp, path)
    finally:
        dist.destroy_process_group()


def build_checkpoint(ckpt, world, cfg, seed, log):
    """Write ckpt/ for one world size unless a complete one with the same recipe exists."""
    recipe = {"format": FORMAT_VERSION, "world_size": world, "seed": seed, "config": cfg.to_dict()}
    recipe.pop("transformers_version", None)
    done = os.path.join(ckpt, "DONE.json")
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f) == json.loads(json.dumps(recipe)):
                return False
    shutil.rmtree(ckpt, ignore_errors=True)
    os.makedirs(ckpt)
    params, aliases, metadata = meta_state(cfg)
    n_params = sum(math.prod(s) for k, s in params if k not in aliases)
    log(f"building {n_params / 1e9:.2f}B-parameter fp32 checkpoint over {world} ranks in {ckpt}")
    t0 = time.time()
    for rank in range(world):
        write_rank(os.path.join(ckpt, f"model_world_size_{world}_rank_{rank}.pt"), rank, world, params, aliases,
                   metadata, seed)
        log(f"  rank {rank + 1}/{world} written ({time.time() - t0:.0f}s)")
    write_hf_side_files(ckpt, cfg, world)
    with open(done, "w") as f:
        json.dump(recipe, f)
    return True


def write_hf_side_files(ckpt, cfg, world):
    from transformers import GenerationConfig

    sys.path.insert(0, os.path.join(REPO, "tests", "oracle"))
    from make_fsdp_ckpt import build_tokenizer  # the same tiny offline tokenizer as the tests

    hf = os.path.join(ckpt, "huggingface")
    cfg.save_pretrained(hf)
    build_tokenizer().save_pretrained(hf)
    GenerationConfig(bos_token_id=296, eos_token_id=[298, 296], pad_token_id=296).save_pretrained(hf)
    with open(os.path.join(ckpt, "fsdp_config.json"), "w") as f:
        json.dump({"FSDP_version": 2, "world_size": world}, f, indent=4)


# ----------------------------------------------------------------------------- measuring

def run_measured(cmd, log_path, env=None):
    """(rc, wall seconds, peak RSS bytes) of one command; output goes to log_path.

    Peak RSS comes from GNU time (a small process that forks the command): the ru_maxrss
    that wait4 gives this Python process for a direct child would include the pages of the
    (v)forked Python image itself, which has torch loaded, and overstate small commands."""
    rss_path = log_path + ".rss"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        try:
            p = subprocess.Popen(["/usr/bin/time", "-o", rss_path, "-f", "%M"] + list(cmd), stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        except OSError as e:
            log.write(f"cannot start: {e}\n")
            return 127, 0.0, 0
        p.wait()
        wall = time.perf_counter() - t0
    rss = 0
    try:
        with open(rss_path) as f:
            lines = [x for x in f.read().split() if x.isdigit()]
        rss = int(lines[-1]) * 1024 if lines else 0
    except OSError:
        pass
    return p.returncode, wall, rss


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def expected_output_bytes(cfg):
    """The merged model's tensor bytes in bf16 (tied weights once), for the floor before the
    first output exists; the safetensors headers add a few KB."""
    shapes, aliases, _ = meta_state(cfg)
    return sum(math.prod(s) for k, s in shapes if k not in aliases) * 2


def disk_floor(ckpt, world, out_bytes, scratch):
    """Seconds to read every shard byte, and to write out_bytes (no fsync, like the mergers)."""
    buf = bytearray(BUF)
    t0 = time.perf_counter()
    for r in range(world):
        with open(os.path.join(ckpt, f"model_world_size_{world}_rank_{r}.pt"), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    read_s = time.perf_counter() - t0
    zeros = bytes(BUF)
    t0 = time.perf_counter()
    with open(scratch, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            left -= f.write(zeros[: min(left, BUF)])
    write_s = time.perf_counter() - t0
    os.unlink(scratch)
    return read_s, write_s


def compare_outputs(a, b):
    """Tensor-by-tensor byte equality of two merged folders, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def files(folder):
        idx = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(idx):
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            return {k: os.path.join(folder, v) for k, v in wm.items()}
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            return {k: os.path.join(folder, "model.safetensors") for k in f.keys()}

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        return f"key sets differ: {sorted(set(fa) ^ set(fb))[:5]}"
    for k in sorted(fa):
        with safe_open(fa[k], "pt") as x, safe_open(fb[k], "pt") as y:
            ta, tb = x.get_tensor(k), y.get_tensor(k)
        same = ta.dtype == tb.dtype and ta.shape == tb.shape and (
            ta.numel() == 0 or torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)))
        if not same:
            return f"{k} differs ({ta.dtype} {tuple(ta.shape)} vs {tb.dtype} {tuple(tb.shape)})"
    return None


# ----------------------------------------------------------------------------- main

def fmt_s(x):
    return "-" if x is None else f"{x:.2f}s" if x < 10 else f"{x:.1f}s"


def fmt_gb(x):
    return "-" if x is None else f"{x / 2**30:.2f}G"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def bench_world(world, a, cfg, work, have_ours, log):
    """Build (or reuse) the checkpoint for one world size, run both mergers alternately, and
    return one table row."""
    base = os.path.join(work, f"w{world}")
    ckpt = os.path.join(base, "ckpt")
    build_checkpoint(ckpt, world, cfg, a.seed, log)
    in_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.startswith("model_world_size"))
    outs = {"verl": os.path.join(base, "out_verl"), "ours": os.path.join(base, "out_ours")}
    cmds = {"verl": [a.python, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", ckpt,
                     "--target_dir", outs["verl"]],
            "ours": [a.verlcpp, "merge", "--backend", "fsdp", "--local_dir", ckpt, "--target_dir", outs["ours"],
                     "--overwrite", "--quiet", "--dtype", "bf16"] + (["--threads", str(a.threads)] if a.threads else [])}
    results, failed, floors = {"verl": [], "ours": []}, {}, []
    expected_out = expected_output_bytes(cfg)
    for i in range(a.runs):
        for who in (("verl", "ours") if i % 2 == 0 else ("ours", "verl")):
            if (who == "ours" and not have_ours) or who in failed:
                continue
            shutil.rmtree(outs[who], ignore_errors=True)
            logp = os.path.join(base, f"{who}_run{i}.log")
            # Start every run with no dirty pages left by the previous one (writeback of the
            # last run's 3 GB output would otherwise throttle this run's writes).
            os.sync()
            if who == "ours":
                # The floor in the same state as this run (paired: see the docstring).
                floors.append(disk_floor(ckpt, world, expected_out, os.path.join(base, "floor_write.tmp")))
                os.sync()
            rc, wall, rss = run_measured(cmds[who], logp)
            if rc != 0:
                failed[who] = f"rc={rc}, see {logp}"
                log(f"world {world}: {who} run {i} FAILED ({failed[who]})")
                continue
            results[who].append((wall, rss))
            paired = f", floor {sum(floors[-1]):.2f}s ({wall / sum(floors[-1]):.2f}x)" if who == "ours" else ""
            log(f"world {world}: {who} run {i}: {wall:.1f}s, peak RSS {rss / 2**30:.2f} GiB{paired}")

    verdict = "-"
    if results["verl"] and results["ours"] and not a.no_verify:
        diff = compare_outputs(outs["verl"], outs["ours"])
        verdict = "identical" if diff is None else f"DIFFER: {diff}"
        log(f"world {world}: outputs {verdict}")
    done = [w for w in ("ours", "verl") if results[w]]
    out_bytes = folder_bytes(outs[done[0]]) if done else 0
    if not floors:  # verl alone: one floor after its runs
        os.sync()
        floors.append(disk_floor(ckpt, world, out_bytes or expected_out, os.path.join(base, "floor_write.tmp")))
    med = {w: statistics.median(x[0] for x in results[w]) if results[w] else None for w in results}
    rss = {w: max(x[1] for x in results[w]) if results[w] else None for w in results}
    ours_ratio = (statistics.median(r[0] / sum(f) for r, f in zip(results["ours"], floors))
                  if results["ours"] else None)
    return dict(world=world, in_bytes=in_bytes, out_bytes=out_bytes, verl=med["verl"], ours=med["ours"],
                verl_rss=rss["verl"], ours_rss=rss["ours"], floor=statistics.median(sum(f) for f in floors),
                read=statistics.median(f[0] for f in floors), write=statistics.median(f[1] for f in floors),
                ours_floor=ours_ratio, floors=len(floors), verdict=verdict, failed=failed)


def print_table(rows, n_params, runs, have_ours):
    print()
    print(f"FSDP merge, {n_params / 1e9:.2f}B params fp32 -> bf16, median of {runs} warm runs (page cache not dropped)")
    head = ("world", "input", "output", "verl", "ours", "verl/ours", "verl RSS", "ours RSS", "RSS v/o",
            "floor", "verl/floor", "ours/floor", "outputs")
    lines = [head]
    for r in rows:
        lines.append((str(r["world"]), fmt_gb(r["in_bytes"]), fmt_gb(r["out_bytes"]), fmt_s(r["verl"]),
                      "FAILED" if "ours" in r["failed"] else fmt_s(r["ours"]) if have_ours else "n/a",
                      ratio(r["verl"], r["ours"]), fmt_gb(r["verl_rss"]), fmt_gb(r["ours_rss"]),
                      ratio(r["verl_rss"], r["ours_rss"]), fmt_s(r["floor"]), ratio(r["verl"], r["floor"]),
                      "-" if r["ours_floor"] is None else f"{r['ours_floor']:.2f}x", r["verdict"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    print("floor = read every shard byte (16 MiB reads) + write the output's byte count (no fsync), measured before"
          " each of our runs; ours/floor = median of the per-run ratios")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for r in rows:
        print(f"  world {r['world']}: median of {r['floors']} floors: read {r['read']:.2f}s + write {r['write']:.2f}s"
              + "".join(f"; {w} failed: {m}" for w, m in r["failed"].items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1e8 parameters (smoke test)")
    ap.add_argument("--sizes", default="4,8", help="world sizes, comma separated")
    ap.add_argument("--runs", type=int, default=3, help="runs of each merger per world size")
    ap.add_argument("--work", default=os.path.join(REPO, "bench", "out"), help="cache and scratch folder")
    ap.add_argument("--params", type=float, default=None, help="model size (default 1.5e9, or 1e8 with --quick)")
    ap.add_argument("--verlcpp", default=os.path.join(REPO, "build", "verlcpp"), help="verlcpp binary")
    ap.add_argument("--python", default=sys.executable, help="Python with verl installed")
    ap.add_argument("--threads", type=int, default=None, help="passed to verlcpp --threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-verify", action="store_true", help="skip comparing the two outputs")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)  # "pickling of the DeviceMesh"
    import transformers

    transformers.utils.logging.set_verbosity_error()

    def log(msg):
        print(msg, flush=True)

    params = a.params or (1e8 if a.quick else 1.5e9)
    cfg = model_config(params)
    work = os.path.join(os.path.abspath(a.work), f"qwen2_{params / 1e9:g}b")
    os.makedirs(work, exist_ok=True)
    have_ours = os.path.isfile(a.verlcpp) and os.access(a.verlcpp, os.X_OK)
    if not have_ours:
        log(f"note: {a.verlcpp} not found or not executable: only verl's merger is measured (build it with `make build`)")

    log(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    rows = [bench_world(int(w), a, cfg, work, have_ours, log) for w in a.sizes.split(",") if w]
    shapes, aliases, _ = meta_state(cfg)
    print_table(rows, sum(math.prod(s) for k, s in shapes if k not in aliases), a.runs, have_ours)
    # The merger's memory target: 2 x the largest output tensor (bf16) + 256 MB.
    largest = max(math.prod(s) for k, s in shapes) * 2
    bound = 2 * largest + 256e6
    for r in rows:
        if r["ours_rss"]:
            ok = "meets" if r["ours_rss"] <= bound else "EXCEEDS"
            print(f"  world {r['world']}: our peak RSS {r['ours_rss'] / 1e6:.0f} MB {ok} the bound 2 x largest tensor "
                  f"({largest / 1e6:.0f} MB) + 256 MB = {bound / 1e6:.0f} MB")
    return 0 if all(not r["failed"] and not r["verdict"].startswith("DIFFER") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
