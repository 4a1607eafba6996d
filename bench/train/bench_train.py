"""bench_train.py — FSDP training throughput and memory, 2 ranks on the CPU, side by side:

  peer:    PyTorch FSDP2 driven from Python — torch.distributed (gloo), `fully_shard` per decoder
           layer and on the root, transformers' Qwen2ForCausalLM, the same fixed micro-batches
           (padded, as HF runs them), verl's SFT loss (token-mean over the global batch),
           torch.optim.AdamW, grad-norm clipping.
  verlcpp: `mpirun -np 2 verlcpp train` with the same model, data, micro-batches and settings.

Model: a random Qwen2-shaped ~100M-parameter model (fp32). Data: long-tailed sequence lengths.
Both use one thread per rank. Runs alternate. fp32, and bf16 mixed precision (bf16 compute, fp32
master weights and gradient reduction: FSDP2's MixedPrecisionPolicy(bf16, reduce fp32), as verl
sets it; verlcpp's dtype=bf16). Prints tokens/s (steps 2..N; step 1 is warm-up), per-rank peak RSS
of both, the ratios, and the model FLOP utilisation 6·params·tokens/s ÷ the matmul peak of that
dtype on the same 2 threads, measured in the same run (bench/common/peak.py).

    python bench/train/bench_train.py [--dtype both|fp32|bf16] [--steps 6] [--rounds 2] [--bs 16] [--mbs 2] [--verlcpp build/verlcpp]
    python bench/train/bench_train.py --scaling     # per-rank memory with 1, 2 and 4 ranks
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "bench", "out", "train")

PEER = r'''
import json, os, resource, sys, time, datetime
import torch, torch.distributed as dist
import transformers
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh

def main(rank, world, a):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=a["port"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    model = transformers.AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    model.train()
    kw = {}
    if a["dtype"] == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    d = load_file(a["data"])
    cu = d["cu_seqlens"].tolist()
    n = len(cu) - 1
    bs, mbs = a["bs"], a["mbs"]
    times, tokens = [], 0
    for step in range(a["steps"]):
        t0 = time.perf_counter()
        idx = [(step * bs + j) % n for j in range(bs)]
        mine = idx[rank * (bs // world):(rank + 1) * (bs // world)]
        # global loss tokens (all-reduced), as verl's engine normalises
        def mask_of(i): return d["loss_mask"][cu[i]:cu[i + 1]]
        tot = torch.tensor([float(sum(mask_of(i).sum() for i in mine))])
        dist.all_reduce(tot)
        step_tokens = 0
        for m in range(0, len(mine), mbs):
            chunk = mine[m:m + mbs]
            L = max(cu[i + 1] - cu[i] for i in chunk)
            x = torch.zeros(len(chunk), L, dtype=torch.long)
            am = torch.zeros(len(chunk), L, dtype=torch.long)
            lm = torch.zeros(len(chunk), L)
            for r, i in enumerate(chunk):
                l = cu[i + 1] - cu[i]
                x[r, :l] = d["input_ids"][cu[i]:cu[i + 1]]
                am[r, :l] = 1
                lm[r, :l] = mask_of(i)
                step_tokens += l
            logits = model(input_ids=x, attention_mask=am).logits.float()
            lp = torch.log_softmax(logits, -1)[:, :-1].gather(2, x[:, 1:].unsqueeze(2)).squeeze(2)
            loss = -(lp * lm[:, :-1]).sum() / tot * world
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        dist.barrier()
        if step > 0:
            times.append(time.perf_counter() - t0)
            tokens += step_tokens
    t = torch.tensor([float(tokens)])
    dist.all_reduce(t)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"tokens": t.item(), "seconds": sum(times), "peak_rss_mib": rss.item()}))
    dist.destroy_process_group()

if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    torch.multiprocessing.start_processes(main, args=(2, a), nprocs=2, start_method="fork")
'''


def make_inputs(a):
    import torch
    import transformers
    from safetensors.torch import save_file

    os.makedirs(OUT, exist_ok=True)
    model_dir = os.path.join(OUT, "qwen2-100m")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                       max_position_embeddings=4096)
        model = transformers.Qwen2ForCausalLM(cfg).float()
        model.save_pretrained(model_dir, safe_serialization=True)
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {model_dir}")
    g = torch.Generator().manual_seed(3)
    # long-tailed lengths: mostly short, a few long (32..512)
    n = a.bs * a.steps
    lens = (32 + (torch.distributions.Exponential(1 / 90.0).sample((n,)))).clamp(max=512).long()
    ids, cu, mask = [], [0], []
    for l in lens.tolist():
        ids.append(torch.randint(0, 32000, (l,), generator=g))
        cu.append(cu[-1] + l)
        m = torch.zeros(l)
        m[l // 3:l - 1] = 1
        mask.append(m)
    data = os.path.join(OUT, "data.safetensors")
    save_file({"input_ids": torch.cat(ids), "cu_seqlens": torch.tensor(cu), "loss_mask": torch.cat(mask)}, data)
    return model_dir, data, int(lens.sum())


def run_peer(a, model_dir, data, port, dtype):
    args = json.dumps({"model": model_dir, "data": data, "bs": a.bs, "mbs": a.mbs, "steps": a.steps, "port": str(port),
                       "dtype": dtype})
    out = subprocess.run([sys.executable, "-c", PEER, args], capture_output=True, text=True, cwd=OUT)
    if out.returncode != 0:
        raise SystemExit(f"peer failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["tokens"] / r["seconds"], r["peak_rss_mib"]


def run_ours(a, model_dir, data, k, dtype):
    ck = os.path.join(OUT, f"ck_{k}")
    subprocess.run(["rm", "-rf", ck])
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2", a.verlcpp, "train",
           f"path={model_dir}", f"train_files={data}", f"train_batch_size={a.bs}", f"micro_batch_size_per_gpu={a.mbs}",
           f"total_training_steps={a.steps}", "shuffle=false", "lr=1e-5", "save_freq=-1", "resume_mode=disable",
           f"default_local_dir={ck}", "stop_after_steps=100000", "num_threads=1", f"dtype={dtype}"]
    env = dict(os.environ, OMPI_MCA_btl_vader_single_copy_mechanism="none")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"verlcpp failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(ck, "metrics.jsonl")) if line.strip()]
    steps = [r for r in rows if "step" in r and r["step"] > 1]
    rss = [r for r in rows if r.get("summary")][-1]["peak_rss_mib_max_rank"]
    return sum(r["tokens"] for r in steps) / sum(r["step_time_s"] for r in steps), rss


def scaling(a, model_dir, data):
    """Per-rank peak RSS of verlcpp train with 1, 2 and 4 ranks (one step, micro-batch 1), and
    the sharded training state per rank: fp32 parameters + gradients + two AdamW moments."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())
    print(f"\nper-rank memory vs ranks ({params / 1e6:.1f}M parameters; state = 16 bytes x params / N)")
    print(f"{'ranks':>6}{'state/rank':>12}{'peak RSS/rank':>15}")
    for n in (1, 2, 4):
        ck = os.path.join(OUT, f"ck_scaling_{n}")
        subprocess.run(["rm", "-rf", ck])
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(n), a.verlcpp, "train",
               f"path={model_dir}", f"train_files={data}", f"train_batch_size={4 * n}", "micro_batch_size_per_gpu=1",
               "total_training_steps=1", "shuffle=false", "resume_mode=disable", f"default_local_dir={ck}",
               "num_threads=1", "stop_after_steps=1"]
        env = dict(os.environ, OMPI_MCA_btl_vader_single_copy_mechanism="none")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"verlcpp failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        rows = [json.loads(line) for line in open(os.path.join(ck, "metrics.jsonl")) if line.strip()]
        rss = [r for r in rows if r.get("summary")][-1]["peak_rss_mib_max_rank"]
        print(f"{n:>6}{16 * params / n / 2**20:>9.0f} MiB{rss:>12.0f} MiB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="both", choices=["both", "fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--verlcpp", default=os.path.join(ROOT, "build", "verlcpp"))
    ap.add_argument("--scaling", action="store_true", help="only the per-rank memory for 1, 2, 4 ranks")
    a = ap.parse_args()
    model_dir, data, total = make_inputs(a)
    if a.scaling:
        scaling(a, model_dir, data)
        return 0
    print(f"data: {a.bs * a.steps} sequences, {total} tokens; batch {a.bs}, micro-batch {a.mbs}, {a.steps} steps, "
          f"2 ranks x 1 thread")
    import transformers
    sys.path.insert(0, os.path.join(ROOT, "bench", "common"))
    from peak import matmul_peak_gflops, mfu

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())
    summary = []
    for dtype in (("fp32", "bf16") if a.dtype == "both" else (a.dtype,)):
        peer, ours = [], []
        for k in range(a.rounds):
            for who in (("peer", "ours") if k % 2 == 0 else ("ours", "peer")):
                t0 = time.time()
                r = run_peer(a, model_dir, data, 29500 + k, dtype) if who == "peer" else run_ours(a, model_dir, data, k, dtype)
                (peer if who == "peer" else ours).append(r)
                print(f"{dtype} round {k} {who}: {r[0]:.0f} tokens/s, peak RSS per rank {r[1]:.0f} MiB "
                      f"({time.time() - t0:.0f}s)", flush=True)
        peak = matmul_peak_gflops(dtype, threads=2)
        p_tps, o_tps = statistics.median(x[0] for x in peer), statistics.median(x[0] for x in ours)
        p_rss, o_rss = max(x[1] for x in peer), max(x[1] for x in ours)
        summary.append((dtype, peak, p_tps, o_tps, p_rss, o_rss))
    print(f"\n{params / 1e6:.1f}M parameters; MFU = 6 x params x tokens/s / the matmul peak of the dtype on 2 threads, "
          f"measured in this run")
    print(f"{'':16}{'tokens/s':>10}{'MFU':>8}{'peak RSS/rank':>16}")
    for dtype, peak, p_tps, o_tps, p_rss, o_rss in summary:
        print(f"{'FSDP2 ' + dtype:16}{p_tps:10.0f}{mfu(6 * params * p_tps / 1e9, peak):7.1f}%{p_rss:13.0f} MiB")
        print(f"{'verlcpp ' + dtype:16}{o_tps:10.0f}{mfu(6 * params * o_tps / 1e9, peak):7.1f}%{o_rss:13.0f} MiB"
              f"   (peak {peak:.0f} GFLOP/s)")
    for dtype, peak, p_tps, o_tps, p_rss, o_rss in summary:
        print(f"ratio {dtype}: {o_tps / p_tps:.2f}x tokens/s, {o_rss / p_rss:.2f}x memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
