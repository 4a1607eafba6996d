"""bench_logprob.py — per-token log-probs of 64 long-tailed sequences (32–1024 tokens) with a
random ~100M-parameter Qwen2-shaped model: transformers the way most users run it (padded
batches, full logits, log_softmax, gather) against `verlcpp logprob` with dynamic batching
(packed, token-balanced micro-batches). Same dtype and thread count; runs alternate; each run
is a fresh process whose peak RSS is read from wait4(). Prints tokens/s, peak RSS and ratios.

    python bench/logprob/bench_logprob.py [--rounds 2] [--dtype both|fp32|bf16] [--batch-size 8] [--max-token-len 4096]

Also prints the model FLOP utilisation of both: 2·params·tokens/s ÷ the matmul peak of the dtype on
the same threads, measured in the same run (bench/common/peak.py).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "bench", "out", "logprob")

HF_RUN = r'''
import json, sys, time, torch, transformers
from safetensors.torch import load_file
model_dir, batch_path, dtype, bsz, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
b = load_file(batch_path)
ids, cu = b["input_ids"], b["cu_seqlens"].tolist()
seqs = [ids[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]
t0 = time.perf_counter()
out = []
with torch.no_grad():
    for s in range(0, len(seqs), bsz):
        chunk = seqs[s:s + bsz]
        L = max(len(x) for x in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for i, q in enumerate(chunk):
            x[i, :len(q)] = q
            mask[i, :len(q)] = 1
        logits = model(input_ids=x, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, -1)[:, :-1].gather(2, x[:, 1:].unsqueeze(2)).squeeze(2)
        for i, q in enumerate(chunk):
            out.append(torch.cat([logp[i, :len(q) - 1], torch.zeros(1)]))
dt_s = time.perf_counter() - t0
print(json.dumps({"forward_s": dt_s, "tokens": int(ids.numel())}))
torch.save(torch.cat(out), sys.argv[6])
'''


def make_inputs(dtype):
    import torch
    import transformers
    from safetensors.torch import save_file

    model_dir = os.path.join(OUT, "qwen2-100m")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                       max_position_embeddings=4096)
        cfg.architectures = ["Qwen2ForCausalLM"]
        model = transformers.Qwen2ForCausalLM(cfg)
        model.save_pretrained(model_dir, safe_serialization=True)
    g = torch.Generator().manual_seed(0)
    # Long tail: most sequences short, a few near the 1024 cap.
    lens = (32 * torch.exp(torch.randn(64, generator=g).abs() * 1.4)).clamp(32, 1024).long()
    lens[torch.randint(0, 64, (2,), generator=g)] = 1024
    ids = torch.randint(0, 32000, (int(lens.sum()),), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    batch = os.path.join(OUT, "batch.safetensors")
    save_file({"input_ids": ids, "cu_seqlens": cu}, batch)
    nparams = sum(v.numel() for v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        os.path.join(model_dir, "model.safetensors")).values())
    return model_dir, batch, lens.tolist(), nparams


def run_with_rss(cmd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_chunks, err_chunks = [], []
    import threading

    def pump(stream, dst):
        dst.append(stream.read())

    ts = [threading.Thread(target=pump, args=(p.stdout, out_chunks)), threading.Thread(target=pump, args=(p.stderr, err_chunks))]
    for t in ts:
        t.start()
    _, status, ru = os.wait4(p.pid, 0)
    for t in ts:
        t.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out, err = "".join(out_chunks), "".join(err_chunks)
    if p.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd[:3])} failed:\n{err[-3000:]}")
    return out, err, wall, ru.ru_maxrss / 1024.0


def run_dtype(a, dtype):
    """Both sides at one dtype: (tokens/s transformers, tokens/s verlcpp, RSS transformers, RSS verlcpp, params)."""
    py = sys.executable
    binary = os.environ.get("VERLCPP_BIN", os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "verlcpp"))
    model_dir, batch, lens, nparams = make_inputs(dtype)
    tokens = sum(lens)
    padded = sum(max(lens[s:s + a.batch_size]) * len(lens[s:s + a.batch_size]) for s in range(0, len(lens), a.batch_size))
    print(f"model: Qwen2-shaped, {nparams / 1e6:.1f}M parameters, {dtype}, {a.threads} threads")
    print(f"batch: {len(lens)} sequences, {tokens} tokens (min {min(lens)}, median {sorted(lens)[32]}, max {max(lens)}); "
          f"padded batches of {a.batch_size}: {padded} token slots")
    hf_script = os.path.join(OUT, "hf_run.py")
    with open(hf_script, "w") as f:
        f.write(HF_RUN)
    res = {"transformers": [], "verlcpp": []}
    hf_out, cpp_out = os.path.join(OUT, "hf_logp.pt"), os.path.join(OUT, "verlcpp_out.safetensors")
    for r in range(a.rounds):
        out, _, wall, rss = run_with_rss([py, hf_script, model_dir, batch, dtype, str(a.batch_size), str(a.threads), hf_out])
        fwd = json.loads(out.strip().splitlines()[-1])["forward_s"]
        res["transformers"].append((fwd, wall, rss))
        print(f"{dtype} round {r}: transformers  forward {fwd:7.2f}s  {tokens / fwd:8.0f} tokens/s  wall {wall:6.2f}s  "
              f"peak RSS {rss:7.0f} MiB", flush=True)
        _, err, wall, rss = run_with_rss([binary, "logprob", "--model", model_dir, "--batch", batch, "--out", cpp_out,
                                          "--dtype", dtype, "--max-token-len", str(a.max_token_len), "--threads", str(a.threads)])
        fwd = float(re.search(r"forward ([0-9.]+)s", err).group(1))
        res["verlcpp"].append((fwd, wall, rss))
        print(f"{dtype} round {r}: verlcpp       forward {fwd:7.2f}s  {tokens / fwd:8.0f} tokens/s  wall {wall:6.2f}s  "
              f"peak RSS {rss:7.0f} MiB", flush=True)
    # Same answer?
    import torch
    from safetensors.torch import load_file
    d = (torch.load(hf_out) - load_file(cpp_out)["log_probs"]).abs()
    print(f"{dtype} agreement: max |Δ log-prob| {d.max().item():.2e}, mean {d.mean().item():.2e}")
    best = {k: (min(x[0] for x in v), max(x[2] for x in v)) for k, v in res.items()}
    (hf_f, hf_rss), (c_f, c_rss) = best["transformers"], best["verlcpp"]
    return tokens / hf_f, tokens / c_f, hf_rss, c_rss, nparams


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="both", choices=["both", "fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=8, help="transformers padded batch size")
    ap.add_argument("--max-token-len", type=int, default=4096, help="verlcpp dynamic batching token budget")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    sys.path.insert(0, os.path.join(ROOT, "bench", "common"))
    from peak import matmul_peak_gflops, mfu

    rows = []
    for dtype in (("fp32", "bf16") if a.dtype == "both" else (a.dtype,)):
        hf_tps, c_tps, hf_rss, c_rss, nparams = run_dtype(a, dtype)
        rows.append((dtype, matmul_peak_gflops(dtype, a.threads), hf_tps, c_tps, hf_rss, c_rss, nparams))
    print(f"\nMFU = 2 x params x tokens/s / the matmul peak of the dtype on {a.threads} threads, measured in this run")
    print(f"{'':22s}{'tokens/s':>10s}{'MFU':>8s}{'peak RSS MiB':>15s}")
    for dtype, peak, hf_tps, c_tps, hf_rss, c_rss, nparams in rows:
        print(f"{'transformers ' + dtype:22s}{hf_tps:10.0f}{mfu(2 * nparams * hf_tps / 1e9, peak):7.1f}%{hf_rss:15.0f}")
        print(f"{'verlcpp ' + dtype:22s}{c_tps:10.0f}{mfu(2 * nparams * c_tps / 1e9, peak):7.1f}%{c_rss:15.0f}"
              f"   (peak {peak:.0f} GFLOP/s)")
    for dtype, peak, hf_tps, c_tps, hf_rss, c_rss, nparams in rows:
        print(f"ratio {dtype} verlcpp/transformers: tokens/s {c_tps / hf_tps:.2f}x (target >= 1.5x), "
              f"peak RSS {c_rss / hf_rss:.2f}x (target <= 1.0x)")


if __name__ == "__main__":
    main()
