"""check.py — the engine on a GPU, checked and timed in one run (driven by bench/gpu/check.sh).

Parity (fp32, TF32 off), each against a reference computed here:
  1. `verlcpp logprob --device cuda` on a tiny random Qwen2: log-probs and entropy vs
     transformers on the same GPU (≤ 1e-4), and vs `--device cpu` of the same binary.
  2. bf16 on the GPU: varlen flash attention (the default on CUDA) vs per-sequence SDPA
     (VERLCPP_ATTENTION=sdpa), both vs transformers bf16: max |Δ log-prob| printed.
  3. `verlcpp train device=cuda`, 2 SFT steps, vs `device=cpu` of the same binary: per-step loss and
     grad norm (rel ≤ 1e-4).
Speed (bf16 mixed precision, one process, one GPU):
  4. a Qwen2-0.5B-shaped random model, batch 16 × 1024 tokens, micro-batches of 4: verlcpp train
     tokens/s (steps 2..N), peak GPU memory (nvidia-smi, sampled), MFU = 6·params·tokens/s ÷ the
     bf16 matmul peak measured in this run; the same batch through a plain FSDP2 loop (transformers'
     Qwen2ForCausalLM, fully_shard per layer, MixedPrecisionPolicy(bf16, reduce fp32), AdamW) as
     the peer, and the ratios.

Results: one JSON line per check on stdout and in <out>/gpu_check.json. Exit 1 if a parity check
fails. `--device cpu --shape tiny` runs the same script on a machine without a GPU (to test it).
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

RESULTS = []
FAILED = []


def report(name, ok=None, **kv):
    row = {"check": name, **kv}
    if ok is not None:
        row["ok"] = bool(ok)
        if not ok:
            FAILED.append(name)
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def run(cmd, env=None, timeout=600):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exit {p.returncode}:\n{p.stdout[-1500:]}\n{p.stderr[-2500:]}")
    return p, time.time() - t0


def make_model(path, cfg_kw, dtype=torch.float32, seed=0):
    import transformers
    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**cfg_kw)
    m = transformers.Qwen2ForCausalLM(cfg).to(dtype)
    m.save_pretrained(path, safe_serialization=True)


def make_batch(path, lens, vocab, seed=1, loss_mask=False):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, vocab, (n,), generator=g) for n in lens]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int64)
    d = {"input_ids": torch.cat(ids), "cu_seqlens": cu}
    if loss_mask:
        d["loss_mask"] = torch.cat([torch.cat([torch.zeros(n // 3), torch.ones(n - n // 3)]) for n in lens])
    save_file(d, path)
    return ids


def hf_logprobs(model_dir, ids, device, dtype):
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    lp, ent = [], []
    with torch.no_grad():
        for x in ids:
            logits = m(input_ids=x.unsqueeze(0).to(device)).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            l = torch.zeros(len(x), device=device)
            l[:-1] = logp[:-1].gather(1, x[1:].to(device).unsqueeze(1)).squeeze(1)
            lp.append(l.cpu())
            ent.append(-(logp.exp() * logp).sum(-1).cpu())
    del m
    return torch.cat(lp), torch.cat(ent)


def ours_logprobs(a, model_dir, batch, out, device, dtype="fp32", env=None):
    from safetensors.torch import load_file
    run([a.verlcpp, "logprob", "--model", model_dir, "--batch", batch, "--out", out, "--entropy", "--device", device,
         "--dtype", dtype, "-q"], env=env)
    o = load_file(out)
    return o["log_probs"], o["entropy"]


def parity(a, work):
    tiny = os.path.join(work, "tiny")
    make_model(tiny, dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=False))
    lens = [5, 37, 1, 64, 19, 120]
    batch = os.path.join(work, "tiny_batch.safetensors")
    ids = make_batch(batch, lens, 512)
    ref_lp, ref_ent = hf_logprobs(tiny, ids, a.device, torch.float32)
    lp, ent = ours_logprobs(a, tiny, batch, os.path.join(work, "o1.safetensors"), a.device)
    d_lp, d_ent = (lp - ref_lp).abs().max().item(), (ent - ref_ent).abs().max().item()
    report("logprob_fp32_vs_transformers", d_lp <= 1e-4 and d_ent <= 1e-4, device=a.device, max_abs_logprob=d_lp,
           max_abs_entropy=d_ent)
    lp_c, _ = ours_logprobs(a, tiny, batch, os.path.join(work, "o2.safetensors"), "cpu")
    d = (lp - lp_c).abs().max().item()
    report("logprob_fp32_device_vs_cpu", d <= 1e-4, max_abs_logprob=d)
    # bf16: flash varlen (default on CUDA) and per-sequence SDPA, both against transformers bf16.
    ref_b, _ = hf_logprobs(tiny, ids, a.device, torch.bfloat16)
    lp_f, _ = ours_logprobs(a, tiny, batch, os.path.join(work, "o3.safetensors"), a.device, "bf16")
    lp_s, _ = ours_logprobs(a, tiny, batch, os.path.join(work, "o4.safetensors"), a.device, "bf16",
                            env={"VERLCPP_ATTENTION": "sdpa"})
    report("logprob_bf16_attention", bool(torch.isfinite(lp_f).all()) and (lp_f - lp_s).abs().max().item() < 0.1,
           max_abs_flash_vs_transformers=(lp_f - ref_b).abs().max().item(),
           max_abs_sdpa_vs_transformers=(lp_s - ref_b).abs().max().item(),
           max_abs_flash_vs_sdpa=(lp_f - lp_s).abs().max().item())
    # Two SFT steps on the device vs on the CPU (same binary, same data, fp32).
    data = os.path.join(work, "tiny_train.safetensors")
    make_batch(data, [30, 50, 17, 64, 9, 41, 33, 28], 512, seed=2, loss_mask=True)
    steps = {}
    for dev in (a.device, "cpu"):
        ck = os.path.join(work, f"ck_{dev.replace(':', '_')}")
        subprocess.run(["rm", "-rf", ck])
        run([a.verlcpp, "train", f"path={tiny}", f"train_files={data}", "train_batch_size=4", "micro_batch_size_per_gpu=2",
             "total_training_steps=2", "shuffle=false", "lr=1e-3", "save_freq=-1", "resume_mode=disable",
             f"default_local_dir={ck}", f"device={dev}"])
        steps[dev] = [json.loads(l) for l in open(os.path.join(ck, "metrics.jsonl")) if '"step"' in l]
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-12)  # noqa: E731
    worst = max(max(rel(p["loss"], q["loss"]), rel(p["grad_norm"], q["grad_norm"]))
                for p, q in zip(steps[a.device], steps["cpu"]))
    report("train_fp32_device_vs_cpu", len(steps[a.device]) == 2 and worst <= 1e-4, worst_rel=worst,
           losses=[p["loss"] for p in steps[a.device]], grad_norms=[p["grad_norm"] for p in steps[a.device]])


def matmul_peak(device):
    n = 8192 if device != "cpu" else 1024
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        x @ y
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


class GpuMemory:
    """Peak used GPU memory (MiB) of the whole device, sampled with nvidia-smi every 0.2 s."""

    def __init__(self, device):
        self.on = device != "cpu"
        self.peak = 0
        self.stop = False
        self.idx = torch.device(device).index or 0 if self.on else 0

    def __enter__(self):
        if self.on:
            self.t = threading.Thread(target=self._poll, daemon=True)
            self.t.start()
        return self

    def _poll(self):
        while not self.stop:
            try:
                out = subprocess.run(["nvidia-smi", f"--id={self.idx}", "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
                self.peak = max(self.peak, int(out.strip().splitlines()[0]))
            except Exception:
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop = True
        if self.on:
            self.t.join()


PEER = r'''
import json, os, sys, time
import torch, torch.distributed as dist, transformers
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
a = json.loads(sys.argv[1])
dev = torch.device(a["device"])
if dev.type == "cuda":
    torch.cuda.set_device(dev)
dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="tcp://127.0.0.1:" + a["port"], rank=0, world_size=1)
m = transformers.AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32, attn_implementation="sdpa").to(dev)
m.train()
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for layer in m.model.layers:
    fully_shard(layer, mp_policy=mp)
fully_shard(m, mp_policy=mp)
opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.01)
d = load_file(a["data"])
cu = d["cu_seqlens"].tolist()
ids = [d["input_ids"][cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]
mask = [d["loss_mask"][cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]
bs, mbs = a["bs"], a["mbs"]
times, tokens = [], 0
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
for step in range(a["steps"]):
    sync(); t0 = time.perf_counter()
    idx = [(step * bs + j) % len(ids) for j in range(bs)]
    tot = float(sum(mask[i][1:].sum() for i in idx))
    for s in range(0, bs, mbs):
        x = torch.stack([ids[i] for i in idx[s:s + mbs]]).to(dev)
        lm = torch.stack([mask[i] for i in idx[s:s + mbs]]).to(dev)
        logits = m(input_ids=x).logits.float()
        lp = torch.log_softmax(logits, -1)[:, :-1].gather(2, x[:, 1:].unsqueeze(2)).squeeze(2)
        loss = -(lp * lm[:, 1:]).sum() / tot
        loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step(); opt.zero_grad()
    sync()
    if step > 0:
        times.append(time.perf_counter() - t0); tokens += sum(len(ids[i]) for i in idx)
peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0
print(json.dumps({"tokens_per_s": tokens / sum(times), "max_allocated_mib": peak}))
dist.destroy_process_group()
'''


def speed(a, work):
    shapes = {
        "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
        "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
    }
    model = os.path.join(work, f"qwen2-{a.shape}")
    make_model(model, shapes[a.shape])
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())
    seq = 1024 if a.shape == "0.5b" else 128
    data = os.path.join(work, f"speed_{a.shape}.safetensors")
    make_batch(data, [seq] * 16, shapes[a.shape]["vocab_size"], seed=5, loss_mask=True)
    peak = matmul_peak(a.device)
    ck = os.path.join(work, "ck_speed")
    subprocess.run(["rm", "-rf", ck])
    with GpuMemory(a.device) as mem:
        run([a.verlcpp, "train", f"path={model}", f"train_files={data}", "train_batch_size=16",
             "micro_batch_size_per_gpu=4", f"total_training_steps={a.steps}", "shuffle=false", "lr=1e-5", "save_freq=-1",
             "resume_mode=disable", f"default_local_dir={ck}", f"device={a.device}", "dtype=bf16"])
    rows = [json.loads(l) for l in open(os.path.join(ck, "metrics.jsonl")) if '"step"' in l]
    timed = [r for r in rows if r["step"] > 1]
    ours = sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed)
    p, _ = run([sys.executable, "-c", PEER, json.dumps({"model": model, "data": data, "bs": 16, "mbs": 4, "steps": a.steps,
                                                        "device": a.device, "port": "29533"})])
    peer = json.loads(p.stdout.strip().splitlines()[-1])
    mfu = lambda tps: 6 * params * tps / (peak * 1e12) * 100  # noqa: E731
    report("train_bf16_speed", shape=a.shape, params=params, tokens_per_step=16 * seq, bf16_peak_tflops=round(peak, 1),
           verlcpp_tokens_per_s=round(ours), verlcpp_mfu_pct=round(mfu(ours), 1), verlcpp_peak_gpu_mib=mem.peak,
           fsdp2_tokens_per_s=round(peer["tokens_per_s"]), fsdp2_mfu_pct=round(mfu(peer["tokens_per_s"]), 1),
           fsdp2_max_allocated_mib=round(peer["max_allocated_mib"]), speed_ratio=round(ours / peer["tokens_per_s"], 3),
           losses=[r["loss"] for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verlcpp", required=True, help="the verlcpp binary")
    ap.add_argument("--out", required=True, help="folder for gpu_check.json")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (to test this script)")
    ap.add_argument("--shape", default="0.5b", choices=["0.5b", "tiny"], help="model of the speed check")
    ap.add_argument("--steps", type=int, default=4, help="training steps of the speed check (step 1 is warm-up)")
    ap.add_argument("--skip", default="", help="comma-separated: parity, speed")
    a = ap.parse_args()
    if a.device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(os.environ.get("TMPDIR", "/tmp"), "verlcpp-gpu-check")
    os.makedirs(work, exist_ok=True)
    report("environment", torch=torch.__version__, cuda=torch.version.cuda,
           gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    for name, fn in (("parity", parity), ("speed", speed)):
        if name in a.skip.split(","):
            continue
        try:
            fn(a, work)
        except Exception as e:  # one failed check does not hide the others
            report(name, False, error=str(e)[-3000:])
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    if FAILED:
        print(f"FAILED: {', '.join(FAILED)}", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
