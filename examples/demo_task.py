"""demo_task.py — the Python side of `make demo` (the product itself never runs Python).

  make   --out DIR      a tiny random Qwen2 (DIR/model) and a synthetic SFT task (DIR/data.safetensors):
                        each sequence is a prompt "a, a+d" followed by the arithmetic sequence
                        a+2d, a+3d, ... (mod the vocabulary); the loss is on the continuation.
                        Also DIR/probe.safetensors: a few sequences to score after training.
  plot   --metrics F --png P     the loss curve of verlcpp train's metrics.jsonl as a PNG
  check  --merged DIR --probe F --ours F   log-probs of the merged folder by transformers vs
                        `verlcpp logprob`'s output on the same sequences
"""
import argparse
import json
import os
import sys

import torch

V = 64


def make(out):
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    transformers.Qwen2ForCausalLM(cfg).float().save_pretrained(os.path.join(out, "model"), safe_serialization=True)

    def sequences(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids, cu, mask = [], [0], []
        for _ in range(n):
            a, d = int(torch.randint(0, V, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
            length = int(torch.randint(10, 33, (1,), generator=g))
            seq = [(a + k * d) % V for k in range(length)]
            ids += seq
            cu.append(cu[-1] + length)
            # position t trains the prediction of token t+1: from the 3rd token on, not past the end
            mask += [0.0] + [1.0] * (length - 2) + [0.0]
        return torch.tensor(ids), torch.tensor(cu), torch.tensor(mask)

    ids, cu, mask = sequences(256, 1)
    save_file({"input_ids": ids, "cu_seqlens": cu, "loss_mask": mask}, os.path.join(out, "data.safetensors"))
    ids, cu, _ = sequences(8, 2)
    save_file({"input_ids": ids, "cu_seqlens": cu}, os.path.join(out, "probe.safetensors"))
    print(f"model: {out}/model (Qwen2, {sum(p.numel() for p in transformers.Qwen2ForCausalLM(cfg).parameters())} params); "
          f"data: {out}/data.safetensors (256 sequences, {len(ids)} probe tokens)")


def plot(metrics, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in (json.loads(line) for line in open(metrics) if line.strip()) if "step" in r]
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, marker=".", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("SFT loss (token mean)")
    ax.set_title("verlcpp train: tiny Qwen2, 2 ranks (FSDP)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    print(f"loss {loss[0]:.3f} -> {loss[-1]:.3f} over {len(rows)} steps; plot: {png}")
    return 0 if loss[-1] < 0.5 * loss[0] else 1


def check(merged, probe, ours):
    import transformers
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    p = load_file(probe)
    o = load_file(ours)["log_probs"]
    ids, cu = p["input_ids"], p["cu_seqlens"]
    worst = 0.0
    with torch.no_grad():
        for i in range(len(cu) - 1):
            s, e = int(cu[i]), int(cu[i + 1])
            lp = torch.log_softmax(model(input_ids=ids[s:e].unsqueeze(0)).logits[0].float(), -1)
            ref = lp[:-1].gather(1, ids[s + 1:e].unsqueeze(1)).squeeze(1)
            worst = max(worst, (ref - o[s:e - 1]).abs().max().item())
    mean_lp = o.sum().item() / (len(ids) - (len(cu) - 1))
    print(f"merged model: transformers vs verlcpp logprob, max |delta log-prob| = {worst:.2e} "
          f"(mean log-prob of the probe continuation {mean_lp:.3f})")
    return 0 if worst < 1e-4 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["make", "plot", "check"])
    ap.add_argument("--out")
    ap.add_argument("--metrics")
    ap.add_argument("--png")
    ap.add_argument("--merged")
    ap.add_argument("--probe")
    ap.add_argument("--ours")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if a.mode == "make":
        os.makedirs(a.out, exist_ok=True)
        make(a.out)
        return 0
    if a.mode == "plot":
        return plot(a.metrics, a.png)
    return check(a.merged, a.probe, a.ours)


if __name__ == "__main__":
    sys.exit(main())
