"""bench_verl_engine.py — verl's own SFT trainer on the CPU with verl's FSDP2 engine vs the verlcpp
engine, side by side on the same input in one run (issue 10 §4):

  fsdp2:   torchrun -m verl.trainer.sft_trainer ... engine.strategy=fsdp2   (verl's FSDPEngine)
  verlcpp: the same command with engine=verlcpp                            (python/verlcpp, built
           into build/python; Hydra finds engine/verlcpp.yaml through build/python/hydra_plugins)

2 ranks (torchrun --nproc_per_node 2, gloo), one intra-op thread per rank, on the ~100M-parameter
Qwen2 shape of bench/train (vocab 32000, hidden 768, intermediate 2048, 12 layers, tied embeddings,
random weights), a byte-level BPE tokenizer trained here with 32000 ids (the model accepts every id),
`messages` parquet data with long-tailed lengths (~150..1800 tokens), packed sequences
(use_remove_padding=True, pad_mode=no_padding), fixed micro-batches, in fp32 and in bf16
(mixed_precision param_dtype bf16, reduce/buffer fp32; set explicitly for both strategies). The two
strategies alternate within each round. Everything else is the working set of tests/verl/run_sft.sh.

Measured, per run:
  tokens/s  sum of verl's `train/global_tokens` over steps 2..N (all tokens of the batch) divided
            by the wall time from step 1's FileLogger record to step N's (rank.py stamps each
            record with `bench/time`); step 1 is warm-up. This is trainer throughput: it includes
            verl's data loading (num_workers=0) and its per-step metric all-gathers.
  peak RSS  per rank, getrusage(RUSAGE_SELF).ru_maxrss of the rank's own process at the start of
            verl's final checkpoint save (training only; the peak including the save is also
            kept), max over the 2 ranks.
  outside   "to step 1": process start to the end of step 1 (imports, data set, model build and
            sharding, step 1); "save": verl's final checkpoint save (always done after the last step).
It prints a table and the ratios verlcpp/fsdp2 (speed: tokens/s ÷; memory: RSS ÷). It asserts
nothing; the goal (issue 10) is >= 1.5x tokens/s at <= 0.7x memory in fp32 and in bf16.

    python bench/verl_engine/bench_verl_engine.py [--steps 5] [--rounds 1] [--dtype fp32|bf16|both]
                                                  [--strategies fsdp2,verlcpp] [--grad-ckpt on|off] [--quick]
"""
import argparse
import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "bench", "out", "verl_engine")
VOCAB = 32000
MAX_LEN = 2048

def lexicon(rng, n):
    """n distinct pseudo-words from syllables, in a fixed order (their Zipf rank)."""
    cons, vows = "bcdfghjklmnprstvwz", "aeiouy"
    syl = [c + v for c in cons for v in vows] + [c + v + e for c in cons for v in vows for e in "nrst"]
    words, seen = [], set()
    while len(words) < n:
        w = "".join(rng.choice(syl) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def build_tokenizer(corpus):
    """tests/verl/make_fixture.py's byte-level BPE and chat template, with VOCAB ids."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "verl"))
    from make_fixture import build_tokenizer as fixture_tokenizer

    return fixture_tokenizer(corpus, vocab_size=VOCAB, model_max_length=4096)


def make_tokenizer_and_data(n_seqs, seed=7):
    """The tokenizer (once) and n_seqs conversations whose token lengths are long-tailed."""
    import pandas as pd
    from transformers import AutoTokenizer

    tok_dir = os.path.join(OUT, "tokenizer")
    rng = random.Random(1234)
    words = lexicon(rng, 60000)
    weights = [1.0 / (i + 10) for i in range(len(words))]  # Zipf-like
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        corpus = [" ".join(rng.choices(words, weights, k=200)) for _ in range(20000)] + ["\n", "user", "assistant"]
        build_tokenizer(corpus).save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) <= VOCAB, len(tok)

    data = os.path.join(OUT, f"data_{n_seqs}_{seed}.parquet")
    if os.path.exists(data):
        return tok_dir, data, json.load(open(data + ".json"))
    # tokens of " word" (space-prefixed): byte-level BPE never merges across the space, so the
    # token count of a message is the sum over its words (the first one has no leading space)
    enc = tok.backend_tokenizer
    cost = {w: len(enc.encode(" " + w, add_special_tokens=False).ids) for w in words}
    g = random.Random(seed)

    def message(n_tokens):
        out, used = [], 0
        while used < n_tokens:
            w = g.choices(words, weights)[0]
            out.append(w)
            used += cost[w]
        return " ".join(out)

    convs, lens = [], []
    for _ in range(n_seqs):
        total = int(min(1800, 150 + g.expovariate(1 / 350.0)))  # long tail: median ~390, max 1800
        turns = 1 if total < 600 else 2
        msgs = []
        for _ in range(turns):
            per = total // turns
            q = max(16, per // 4)
            msgs += [{"role": "user", "content": message(q)}, {"role": "assistant", "content": message(per - q - 10)}]
        convs.append(msgs)
        text = tok.apply_chat_template(msgs, tokenize=False)
        lens.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    assert max(lens) < MAX_LEN, max(lens)
    pd.DataFrame({"messages": convs}).to_parquet(data)
    info = {"sequences": n_seqs, "tokens": sum(lens), "min": min(lens), "median": statistics.median(lens),
            "max": max(lens)}
    json.dump(info, open(data + ".json", "w"))
    return tok_dir, data, info


def make_model(tok_dir, quick):
    import torch
    import transformers

    name = "qwen2-quick" if quick else "qwen2-100m"
    model_dir = os.path.join(OUT, name)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
        shape = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
                 if quick else dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12))
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, tie_word_embeddings=True,
                                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                                       bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                       torch_dtype="float32", **shape)
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg).float()
        tmp = model_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, model_dir)
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())
    return model_dir, params


PRECISION = {"fp32": "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
             "bf16": "{param_dtype:bf16,reduce_dtype:fp32,buffer_dtype:fp32}"}


def run_one(a, strategy, dtype, model_dir, data, tag, port):
    """One torchrun of verl's sft_trainer; returns a dict of measurements."""
    d = os.path.join(OUT, "runs", tag)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    engine = [f"engine.strategy={strategy}"] if strategy in ("fsdp", "fsdp2") else [f"engine={strategy}"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.join(HERE, "rank.py"),
           f"data.train_files={data}", "data.val_files=null",
           f"data.train_batch_size={a.bs}", f"data.micro_batch_size_per_gpu={a.mbs}", "data.use_dynamic_bsz=False",
           f"data.max_token_len_per_gpu={MAX_LEN * a.mbs}", "data.pad_mode=no_padding", f"data.max_length={MAX_LEN}",
           "data.num_workers=0",
           f"model.path={model_dir}", "model.use_remove_padding=True", f"model.enable_gradient_checkpointing={a.grad_ckpt == 'on'}",
           "+model.override_config.attn_implementation=sdpa",
           *engine, f"++engine.mixed_precision={PRECISION[dtype]}", "engine.use_torch_compile=False",
           "optim.lr=1e-5", "optim.lr_warmup_steps=0",
           "trainer.total_epochs=1", f"trainer.total_training_steps={a.steps}", "trainer.logger=[console,file]",
           "trainer.device=cpu", "trainer.n_gpus_per_node=2", "trainer.nnodes=1",
           "trainer.project_name=bench-verl-engine", f"trainer.experiment_name={tag}",
           f"trainer.default_local_dir={d}/ckpt", "trainer.resume_mode=disable", "trainer.save_freq=-1",
           "trainer.test_freq=-1", f"hydra.run.dir={d}/hydra"]
    env = dict(os.environ, VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_MODULES="verlcpp",
               PYTHONPATH=os.pathsep.join(filter(None, [a.pythonpath, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1",
               WANDB_MODE="disabled", VERL_FILE_LOGGER_PATH=f"{d}/metrics.jsonl", BENCH_RANK_DIR=d)
    with open(f"{d}/command.txt", "w") as f:
        f.write(" ".join(cmd) + "\n")
    t0 = time.time()
    with open(f"{d}/log.txt", "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=a.timeout, cwd=d)
    wall = time.time() - t0
    if p.returncode != 0:
        lines = [l for l in open(f"{d}/log.txt", errors="replace") if l.strip()]
        err = [l for l in lines if ("Error" in l or "Exception" in l) and "ChildFailedError" not in l][:3]
        raise SystemExit(f"{tag}: torchrun exited {p.returncode}; log {d}/log.txt; command {d}/command.txt\n"
                         + "".join(lines[-15:]) + "first errors:\n" + "".join(err))
    recs = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if l.strip()]
    recs = [r for r in recs if "train/global_tokens" in r["data"]]
    assert [r["step"] for r in recs] == list(range(1, a.steps + 1)), [r["step"] for r in recs]
    ranks = [json.load(open(f)) for f in sorted(glob.glob(f"{d}/rank*.json"))]
    assert len(ranks) == 2, f"{d}: {len(ranks)} rank probes"
    t = [r["data"]["bench/time"] for r in recs]
    tokens = sum(r["data"]["train/global_tokens"] for r in recs[1:])
    t_start = min(r["t_start"] for r in ranks)
    shutil.rmtree(f"{d}/ckpt", ignore_errors=True)  # ~1.3 GB per run at 100M
    return {"strategy": strategy, "dtype": dtype, "tokens_per_s": tokens / (t[-1] - t[0]),
            "step_s": (t[-1] - t[0]) / (len(t) - 1), "to_step1_s": t[0] - t_start,
            "save_s": max(r["t_save_end"] - r["t_save_start"] for r in ranks),
            "rss_mib": max(r["peak_rss_train_mib"] for r in ranks),
            "rss_all_mib": max(r["peak_rss_mib"] for r in ranks),
            "threads": sorted({r["threads"] for r in ranks}), "wall_s": wall,
            "losses": [round(r["data"]["train/loss"], 5) for r in recs]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--strategies", default="fsdp2,verlcpp")
    ap.add_argument("--bs", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--mbs", type=int, default=2, help="micro-batch per rank (sequences)")
    ap.add_argument("--grad-ckpt", choices=["on", "off"], default="on",
                    help="model.enable_gradient_checkpointing (verl's default: on)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer hidden-128 model, 3 steps: a smoke run")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per torchrun")
    ap.add_argument("--pythonpath", default=os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "python"),
                    help="where the built verlcpp package is")
    a = ap.parse_args()
    if a.quick and a.steps == 5:
        a.steps = 3
    assert a.steps >= 2, "--steps >= 2 (step 1 is warm-up)"
    strategies = a.strategies.split(",")
    dtypes = ["fp32", "bf16"] if a.dtype == "both" else [a.dtype]
    os.makedirs(OUT, exist_ok=True)

    tok_dir, data, info = make_tokenizer_and_data(a.bs * a.steps)
    model_dir, params = make_model(tok_dir, a.quick)
    print(f"model {os.path.basename(model_dir)}: {params / 1e6:.1f}M parameters; data: {info['sequences']} sequences, "
          f"{info['tokens']} tokens (min {info['min']}, median {info['median']:.0f}, max {info['max']}); batch {a.bs}, "
          f"micro-batch {a.mbs}/rank, {a.steps} steps, 2 ranks x 1 thread; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    res = []
    port = 29600 + os.getpid() % 200
    for k in range(a.rounds):
        for dtype in dtypes:
            order = strategies if k % 2 == 0 else strategies[::-1]
            for s in order:
                port += 1
                load0 = os.getloadavg()[0]
                r = run_one(a, s, dtype, model_dir, data, f"r{k}-{dtype}-{s}", port)
                r["load"] = (load0 + os.getloadavg()[0]) / 2
                res.append(r)
                print(f"round {k} {dtype} {s:8}: {r['tokens_per_s']:7.1f} tokens/s ({r['step_s']:.1f} s/step), "
                      f"peak RSS/rank {r['rss_mib']:.0f} MiB (with save {r['rss_all_mib']:.0f}), to step 1 "
                      f"{r['to_step1_s']:.0f} s, save {r['save_s']:.0f} s, run {r['wall_s']:.0f} s, threads "
                      f"{r['threads']}, load {r['load']:.2f}; loss {r['losses']}", flush=True)

    print(f"\n{'strategy':10}{'dtype':6}{'tokens/s':>10}{'s/step':>8}{'RSS/rank MiB':>14}{'to step1 s':>11}"
          f"{'save s':>8}{'load':>6}")
    summary = {}
    for dtype in dtypes:
        for s in strategies:
            rs = [r for r in res if r["dtype"] == dtype and r["strategy"] == s]
            tps, rss = statistics.median(r["tokens_per_s"] for r in rs), max(r["rss_mib"] for r in rs)
            summary[(s, dtype)] = (tps, rss)
            print(f"{s:10}{dtype:6}{tps:10.1f}{statistics.median(r['step_s'] for r in rs):8.1f}{rss:14.0f}"
                  f"{statistics.median(r['to_step1_s'] for r in rs):11.0f}{statistics.median(r['save_s'] for r in rs):8.0f}"
                  f"{statistics.mean(r['load'] for r in rs):6.2f}")
    if {"fsdp2", "verlcpp"} <= set(strategies):
        for dtype in dtypes:
            (pt, pr), (ot, orr) = summary[("fsdp2", dtype)], summary[("verlcpp", dtype)]
            print(f"ratio verlcpp/fsdp2 {dtype}: {ot / pt:.2f}x tokens/s (goal >= 1.5x), "
                  f"{orr / pr:.2f}x peak RSS/rank (goal <= 0.7x)")
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
