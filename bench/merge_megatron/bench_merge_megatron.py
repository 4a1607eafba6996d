"""bench_merge_megatron.py — `verlcpp merge --backend megatron` against PyTorch's own path
for a Megatron distributed checkpoint: `torch.distributed.checkpoint.format_utils.dcp_to_torch_save`
(DCP → one torch.save file) followed by a Python Megatron→HF conversion (QKV / gate-up
un-fusing, renaming) written with safetensors — i.e. what one does without megatron-core or
GPUs. verl's own Megatron merger cannot run here (it needs CUDA and NCCL).

The checkpoint (built once, cached under --work) is a random Qwen2-1.5B-shaped bf16 model
saved by megatron-core's `dist_checkpointing.save` from TP 2 × PP 2 CPU ranks
(tests/oracle/make_megatron_ckpt.py). Runs alternate (peer, ours, ours, peer, ...); each is
timed (wall) and its peak RSS taken from GNU time. The disk floor is reading every .distcp
byte plus writing as many bytes as the merged output holds (warm page cache: caches cannot be
dropped here). Outputs are compared tensor by tensor at the end.

Usage: bench_merge_megatron.py [--runs 3] [--work DIR] [--verlcpp build/verlcpp] [--quick]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "oracle"))
sys.path.insert(0, os.path.join(REPO, "bench", "merge"))
from bench_merge import disk_floor as _unused  # noqa: E402,F401  (same measuring conventions)
from bench_merge import fmt_gb, fmt_s, folder_bytes, ratio, run_measured  # noqa: E402

BUF = 16 << 20

# The peer: DCP -> torch.save with torch's own utility, then Megatron -> HF names in Python.
PEER = r'''
import json, sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
dist_dir, hf_dir, out, tmp_pt = sys.argv[1:5]
dcp_to_torch_save(dist_dir, tmp_pt)
sd = torch.load(tmp_pt, map_location="cpu", weights_only=False)
c = json.load(open(hf_dir + "/config.json"))
H, nq, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
hd = c.get("head_dim") or H // nq
qpg = nq // nkv
names = {"input_layernorm.weight": "input_layernorm.weight",
         "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
         "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
         "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
         "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
         "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
res = {}
for k, v in sd.items():
    if not torch.is_tensor(v) or "_extra_state" in k:
        continue
    if k == "embedding.word_embeddings.weight": res["model.embed_tokens.weight"] = v[: c["vocab_size"]]
    elif k == "output_layer.weight": res["lm_head.weight"] = v[: c["vocab_size"]]
    elif k == "decoder.final_layernorm.weight": res["model.norm.weight"] = v
    elif k.startswith("decoder.layers."):
        suf = k[len("decoder.layers."):]
        for l in range(v.shape[0]):
            p, t = f"model.layers.{l}.", v[l]
            if suf in names: res[p + names[suf]] = t
            elif suf.startswith("self_attention.linear_qkv."):
                kind = suf.rsplit(".", 1)[1]
                g = t.reshape(nkv, (qpg + 2) * hd, *t.shape[1:])
                res[p + f"self_attn.q_proj.{kind}"] = g[:, : qpg * hd].reshape(-1, *t.shape[1:])
                res[p + f"self_attn.k_proj.{kind}"] = g[:, qpg * hd:(qpg + 1) * hd].reshape(-1, *t.shape[1:])
                res[p + f"self_attn.v_proj.{kind}"] = g[:, (qpg + 1) * hd:].reshape(-1, *t.shape[1:])
            elif suf == "mlp.linear_fc1.weight":
                gate, up = t.chunk(2)
                res[p + "mlp.gate_proj.weight"], res[p + "mlp.up_proj.weight"] = gate, up
            else: raise SystemExit(f"peer: unknown key {k}")
    else: raise SystemExit(f"peer: unknown key {k}")
import os
os.makedirs(out, exist_ok=True)
save_file({k: t.to(torch.bfloat16).contiguous() for k, t in res.items()}, out + "/model.safetensors", metadata={"format": "pt"})
os.unlink(tmp_pt)
'''


def build(work, quick, log):
    import torch
    import make_megatron_ckpt as mm

    name = "bench_small" if quick else "bench_qwen2_1.5b"
    base = os.path.join(work, name)
    if os.path.exists(os.path.join(base, "case.json")):
        return base
    sizes = (dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096) if quick else
             dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096))
    mm.CASES[name] = mm.Case("Qwen2ForCausalLM", sizes, tp=2, pp=2, dtype=torch.bfloat16,
                             notes="benchmark: Qwen2-1.5B shape, untied, TP 2 x PP 2")
    import megatron.core.dist_checkpointing  # noqa: F401  (once, before the ranks fork)
    import megatron.core.models.gpt.gpt_model  # noqa: F401
    t0 = time.time()
    log(f"building {name} (TP 2 x PP 2, megatron-core dist_checkpointing.save) under {base} ...")
    mm.make_case(name, 0, base, mm.build_tokenizer(), mm.build_generation_config())
    shutil.rmtree(os.path.join(base, "ref"), ignore_errors=True)  # not needed: outputs are compared
    log(f"built in {time.time() - t0:.0f}s")
    return base


def floor(dist_dir, out_bytes, scratch):
    buf = bytearray(BUF)
    t0 = time.perf_counter()
    for f in sorted(os.listdir(dist_dir)):
        if f.endswith(".distcp"):
            with open(os.path.join(dist_dir, f), "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    read_s = time.perf_counter() - t0
    zeros = bytes(BUF)
    t0 = time.perf_counter()
    with open(scratch, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(zeros[: min(left, BUF)])
    write_s = time.perf_counter() - t0
    os.unlink(scratch)
    return read_s, write_s


def compare(a, b):
    import torch
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(folder, f), "pt") as h:
                    for k in h.keys():
                        out[k] = (os.path.join(folder, f), k)
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return f"names differ: {sorted(set(ta) ^ set(tb))[:5]}"
    for k in sorted(ta):
        with safe_open(ta[k][0], "pt") as fa, safe_open(tb[k][0], "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            return f"{k} differs"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(REPO, "bench", "out", "megatron"))
    ap.add_argument("--verlcpp", default=os.path.join(REPO, os.environ.get("BUILD_DIR", "build"), "verlcpp"))
    ap.add_argument("--quick", action="store_true", help="a ~0.1B model instead of 1.5B")
    a = ap.parse_args()
    log = lambda m: print(m, flush=True)  # noqa: E731
    base = build(a.work, a.quick, log)
    ckpt = os.path.join(base, "ckpt")
    dist_dir = os.path.join(ckpt, "model", "dist_ckpt")
    hf_dir = os.path.join(ckpt, "model", "huggingface")
    outs = {"peer": os.path.join(base, "out_peer"), "ours": os.path.join(base, "out_ours")}
    peer_py = os.path.join(base, "peer.py")
    with open(peer_py, "w") as f:
        f.write(PEER)
    cmds = {"peer": [sys.executable, peer_py, dist_dir, hf_dir, outs["peer"], os.path.join(base, "peer_tmp.pt")],
            "ours": [a.verlcpp, "merge", "--backend", "megatron", "--local_dir", ckpt, "--target_dir", outs["ours"],
                     "--overwrite", "--quiet", "--dtype", "bf16"]}
    res = {"peer": [], "ours": []}
    for i in range(a.runs):
        for who in (("peer", "ours") if i % 2 == 0 else ("ours", "peer")):
            shutil.rmtree(outs[who], ignore_errors=True)
            logp = os.path.join(base, f"{who}_run{i}.log")
            os.sync()  # no writeback of the previous run's output during this one
            rc, wall, rss = run_measured(cmds[who], logp)
            if rc != 0:
                raise SystemExit(f"{who} run {i} failed (rc={rc}), see {logp}")
            res[who].append((wall, rss))
            log(f"{who} run {i}: {wall:.1f}s, peak RSS {rss / 2**30:.2f} GiB")
    diff = compare(outs["peer"], outs["ours"])
    verdict = "identical" if diff is None else f"DIFFER: {diff}"
    out_bytes = folder_bytes(outs["ours"])
    in_bytes = sum(os.path.getsize(os.path.join(dist_dir, f)) for f in os.listdir(dist_dir) if f.endswith(".distcp"))
    os.sync()
    r, w = floor(dist_dir, out_bytes, os.path.join(base, "floor.tmp"))
    med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
    rss = {k: max(x[1] for x in v) for k, v in res.items()}
    print()
    print(f"Megatron (torch_dist, TP 2 x PP 2) -> HF bf16, {in_bytes / 1e9:.2f} GB of .distcp in, "
          f"{out_bytes / 1e9:.2f} GB out, median of {a.runs} warm runs")
    print(f"  peer (dcp_to_torch_save + Python conversion): {fmt_s(med['peer'])}  peak RSS {fmt_gb(rss['peer'])}")
    print(f"  verlcpp merge --backend megatron:             {fmt_s(med['ours'])}  peak RSS {fmt_gb(rss['ours'])}")
    print(f"  disk floor (read {r:.2f}s + write {w:.2f}s):      {fmt_s(r + w)}")
    print(f"  speed-up {ratio(med['peer'], med['ours'])} (target >= 3x), RSS ratio {ratio(rss['ours'], rss['peer'])} "
          f"of the peer's (target <= 0.20x), ours/floor {ratio(med['ours'], r + w)} (target <= 1.5x); outputs {verdict}")
    return 0 if diff is None else 1


if __name__ == "__main__":
    sys.exit(main())
