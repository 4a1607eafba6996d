# Compares two runs of the verl-on-CPU harness, e.g. strategy=verlcpp against strategy=fsdp2 (verl's
# own FSDP2 engine), and exits non-zero with one line per mismatch. Whatever both folders hold is
# compared:
#   metrics.jsonl   from tests/verl/run_sft.sh (verl's sft_trainer, its FileLogger lines): the same steps,
#                   the same train/global_tokens and train/lr, train/loss and train/grad_norm within --rtol
#   worker.json + worker_tensors.pt   from tests/verl/worker_driver.py (verl's TrainingWorker): both runs'
#                   own checks passed; PPO / critic loss and grad_norm per step within --rtol; log-probs,
#                   entropy and values within --atol; every parameter after training within --rtol
#                   (max |a-b| / max |b| per tensor), the same names and shapes
# It mirrors the spirit of verl's tests/special_e2e/sft/compare_sft_engine_results.py with fp32 tolerances.
#
#   compare.py RUN_A RUN_B [--rtol 1e-4] [--atol 1e-5]

import argparse
import json
import math
import os
import sys

SFT_KEYS = ("train/loss", "train/grad_norm")


def rel(a, b):
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def read_metrics(path):
    steps = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                steps[int(rec["step"])] = rec["data"]
    return steps


def compare_sft(a_dir, b_dir, rtol, errors, report):
    a, b = read_metrics(os.path.join(a_dir, "metrics.jsonl")), read_metrics(os.path.join(b_dir, "metrics.jsonl"))
    if sorted(a) != sorted(b):
        errors.append(f"sft: steps differ: {sorted(a)} vs {sorted(b)}")
        return
    if not a:
        errors.append("sft: no steps in metrics.jsonl")
        return
    for step in sorted(a):
        for key in ("train/global_tokens", "train/lr"):
            if key in a[step] or key in b[step]:
                va, vb = a[step].get(key), b[step].get(key)
                if va is None or vb is None or rel(va, vb) > 1e-6:
                    errors.append(f"sft step {step}: {key} {va} vs {vb} (the runs did not see the same data/schedule)")
        for key in SFT_KEYS:
            va, vb = a[step].get(key), b[step].get(key)
            if va is None or vb is None:
                errors.append(f"sft step {step}: {key} missing ({va} vs {vb})")
                continue
            r = rel(va, vb)
            report.append(f"sft step {step}: {key} {va:.8g} vs {vb:.8g} rel {r:.2e}")
            if r > rtol:
                errors.append(f"sft step {step}: {key} {va:.8g} vs {vb:.8g}, rel {r:.2e} > {rtol:g}")


def compare_worker(a_dir, b_dir, rtol, atol, errors, report):
    import torch

    ja = json.load(open(os.path.join(a_dir, "worker.json")))
    jb = json.load(open(os.path.join(b_dir, "worker.json")))
    for name, j in (("A", ja), ("B", jb)):
        if not j.get("ok"):
            bad = [k for k, v in j["checks"].items() if not v.get("ok")]
            errors.append(f"worker run {name} ({j.get('strategy')}) failed its own checks: {bad}")
    for series in ("ppo_steps", "critic_steps"):
        sa, sb = ja.get(series, []), jb.get(series, [])
        if len(sa) != len(sb) or not sa:
            errors.append(f"worker {series}: {len(sa)} vs {len(sb)} steps")
            continue
        for i, (ra, rb) in enumerate(zip(sa, sb), start=1):
            for key in ("loss", "grad_norm"):
                if key not in ra or key not in rb:
                    errors.append(f"worker {series} step {i}: {key} missing")
                    continue
                r = rel(ra[key], rb[key])
                report.append(f"worker {series} step {i}: {key} {ra[key]:.8g} vs {rb[key]:.8g} rel {r:.2e}")
                if r > rtol:
                    errors.append(f"worker {series} step {i}: {key} {ra[key]:.8g} vs {rb[key]:.8g}, rel {r:.2e} > {rtol:g}")

    ta = torch.load(os.path.join(a_dir, "worker_tensors.pt"), weights_only=True)
    tb = torch.load(os.path.join(b_dir, "worker_tensors.pt"), weights_only=True)
    if sorted(ta) != sorted(tb):
        errors.append(f"worker tensors: entries differ: {sorted(ta)} vs {sorted(tb)}")
    for key in sorted(set(ta) & set(tb)):
        a, b = ta[key], tb[key]
        if isinstance(a, list):  # per-sequence outputs: log-probs, entropy, values
            if len(a) != len(b):
                errors.append(f"worker {key}: {len(a)} vs {len(b)} sequences")
                continue
            worst = 0.0
            for i, (x, y) in enumerate(zip(a, b)):
                if x.shape != y.shape:
                    errors.append(f"worker {key}[{i}]: shape {tuple(x.shape)} vs {tuple(y.shape)}")
                    break
                worst = max(worst, (x.float() - y.float()).abs().max().item())
            report.append(f"worker {key}: max abs diff {worst:.2e}")
            if worst > atol:
                errors.append(f"worker {key}: max abs diff {worst:.2e} > {atol:g}")
        else:  # {name: tensor}: parameters after training
            if sorted(a) != sorted(b):
                errors.append(f"worker {key}: names differ: only A {sorted(set(a) - set(b))}, only B {sorted(set(b) - set(a))}")
            worst, worst_name = 0.0, "-"
            for name in sorted(set(a) & set(b)):
                x, y = a[name].float(), b[name].float()
                if x.shape != y.shape:
                    errors.append(f"worker {key}.{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
                    continue
                r = (x - y).abs().max().item() / max(y.abs().max().item(), x.abs().max().item(), 1e-12)
                if r > worst:
                    worst, worst_name = r, name
                if r > rtol:
                    errors.append(f"worker {key}.{name}: max|a-b|/max|b| {r:.2e} > {rtol:g}")
            report.append(f"worker {key}: {len(a)} tensors, worst rel {worst:.2e} ({worst_name})")


def main():
    ap = argparse.ArgumentParser(description="compare two verl-on-CPU harness runs")
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--rtol", type=float, default=1e-4, help="losses, grad norms, parameters (relative)")
    ap.add_argument("--atol", type=float, default=1e-5, help="log-probs, entropy, values (absolute)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()

    errors, report, compared = [], [], []
    have = lambda d, f: os.path.isfile(os.path.join(d, f))  # noqa: E731
    for d in (args.run_a, args.run_b):
        if not os.path.isdir(d):
            print(f"compare.py: {d}: no such folder", file=sys.stderr)
            return 2
    if have(args.run_a, "metrics.jsonl") and have(args.run_b, "metrics.jsonl"):
        compare_sft(args.run_a, args.run_b, args.rtol, errors, report)
        compared.append("sft metrics")
    if all(have(d, f) for d in (args.run_a, args.run_b) for f in ("worker.json", "worker_tensors.pt")):
        compare_worker(args.run_a, args.run_b, args.rtol, args.atol, errors, report)
        compared.append("worker outputs")
    if not compared:
        print(f"compare.py: nothing to compare: neither metrics.jsonl nor worker.json + worker_tensors.pt "
              f"in both {args.run_a} and {args.run_b}", file=sys.stderr)
        return 2
    if not args.quiet:
        for line in report:
            print(line)
    if errors:
        print(f"compare.py: MISMATCH {args.run_a} vs {args.run_b} ({', '.join(compared)}):", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    print(f"compare.py: OK {args.run_a} vs {args.run_b} ({', '.join(compared)}; rtol {args.rtol:g}, atol {args.atol:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
