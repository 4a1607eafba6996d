"""train_ref.py — fixtures and the independent reference for `verlcpp train`.

  make  --out DIR [--family qwen2|llama|qwen2_moe] [--seqs N] [--seed S]
        a tiny random HF model (DIR/model, fp32 safetensors) and a data file DIR/data.safetensors
        in verlcpp train's format: input_ids, cu_seqlens, loss_mask, advantages, old_log_probs,
        ref_log_probs (every per-token field aligned like log-probs: position t is about token t+1).
  ref   --out DIR --task sft|ppo --steps K --bs B --lr LR --grad-clip C [--clip-ratio ...]
        trains the same model with transformers + torch.optim.AdamW on one process over the same
        global batches (samples [s*B, (s+1)*B) of the file, no shuffle), with verl's loss
        (SFT: token-mean NLL over the batch, + router_aux_loss_coef × transformers' load-balancing
        loss per --aux-groups group when the config has output_router_logits; PPO: verl's compute_policy_loss_vanilla token-mean),
        and writes DIR/ref_<task>_<K>.safetensors (final parameters, HF names) + .json (losses).
  check --merged FOLDER --ref FILE.safetensors [--rtol R] [--load]
        max relative difference of every parameter (vs max |ref|), non-zero exit above rtol.
"""
import argparse
import json
import os
import sys

import torch


def make(a):
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(a.seed)
    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    moe = {}
    if a.family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif a.family == "qwen2_moe":
        # A shared expert, one dense layer of three, and the load-balancing loss on (a large
        # coefficient, so that it visibly moves the routers).
        common["num_hidden_layers"] = 3
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                   mlp_only_layers=[1], output_router_logits=True, router_aux_loss_coef=0.2)
        cfg = transformers.Qwen2MoeConfig(**common, **moe, tie_word_embeddings=False)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    model = model.float()
    with torch.no_grad():  # larger weights than the default init: visible learning in few steps
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    # A critic of the same family: token classification with one label (verl's value model).
    vcls = getattr(transformers, type(model).__name__.replace("ForCausalLM", "ForTokenClassification"))
    # No dropout in the head (the engine implements none; RL critics train without it).
    vcfg = type(cfg)(**common, **moe, num_labels=1, classifier_dropout=0.0)
    critic = vcls(vcfg).float()
    with torch.no_grad():
        for p in critic.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    critic.save_pretrained(os.path.join(a.out, "value_model"), safe_serialization=True)
    g = torch.Generator().manual_seed(a.seed + 1)
    lens = torch.randint(6, 40, (a.seqs,), generator=g)
    nnz = int(lens.sum())
    ids = torch.randint(0, 96, (nnz,), generator=g)
    cu = torch.zeros(a.seqs + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lens, 0)
    mask = torch.zeros(nnz)
    for i in range(a.seqs):
        s, e = int(cu[i]), int(cu[i + 1])
        mask[s + (e - s) // 3: e - 1] = 1.0  # "response" predictions; never past the last token
    adv = torch.randn(nnz, generator=g) * mask
    old = -2.0 - torch.rand(nnz, generator=g)
    ref = old + 0.1 * torch.randn(nnz, generator=g)
    returns = torch.randn(nnz, generator=g) * mask
    values = 0.3 * torch.randn(nnz, generator=g) * mask
    save_file({"input_ids": ids, "cu_seqlens": cu, "loss_mask": mask, "advantages": adv, "old_log_probs": old,
               "ref_log_probs": ref, "returns": returns, "values": values}, os.path.join(a.out, "data.safetensors"))


def token_log_probs(model, ids, cu, router_logits=None):
    """Per-token log p(token t+1 | <= t) of each sequence (0 at its last position), concatenated.
    `router_logits` (a list): receives each sequence's per-layer router logits (MoE models)."""
    out = []
    for i in range(len(cu) - 1):
        s, e = int(cu[i]), int(cu[i + 1])
        x = ids[s:e].unsqueeze(0)
        if router_logits is not None:
            o = model(input_ids=x, output_router_logits=True)
            router_logits.append(o.router_logits)
        else:
            o = model(input_ids=x)
        logits = o.logits[0].float()
        lp = torch.log_softmax(logits, -1)
        picked = lp[:-1].gather(1, x[0, 1:].unsqueeze(1)).squeeze(1)
        out.append(torch.cat([picked, picked.new_zeros(1)]))
    return torch.cat(out)


def aux_loss(model, router_logits, lens, groups):
    """transformers' load_balancing_loss_func over each of `groups` contiguous groups of the
    batch's sequences (one forward each: the engine's micro-batches), weighted by its tokens."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    c = model.config
    n, total = len(router_logits), sum(lens)
    per = n // groups
    loss = 0.0
    for g in range(groups):
        seqs = router_logits[g * per:(g + 1) * per]
        layers = tuple(torch.cat([r[layer] for r in seqs], 0) for layer in range(len(seqs[0])))
        tok = sum(lens[g * per:(g + 1) * per])
        loss = loss + load_balancing_loss_func(layers, c.num_experts, c.num_experts_per_tok) * (tok / total)
    return loss


def pad(flat, cu):
    lens = [int(cu[i + 1] - cu[i]) for i in range(len(cu) - 1)]
    t = max(lens)
    return torch.stack([torch.nn.functional.pad(flat[int(cu[i]):int(cu[i + 1])], (0, t - lens[i]))
                        for i in range(len(lens))])


def ref(a):
    import transformers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    if a.task == "value":
        model = transformers.AutoModelForTokenClassification.from_pretrained(os.path.join(a.out, "value_model"),
                                                                             torch_dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(a.out, "model"), torch_dtype=torch.float32)
    model.train()
    d = load_file(os.path.join(a.out, "data.safetensors"))
    cu_all = d["cu_seqlens"]
    n = len(cu_all) - 1
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for step in range(a.steps):
        idx = [(step * a.bs + j) % n for j in range(a.bs)]
        ids, cu, fields = [], [0], {k: [] for k in ("loss_mask", "advantages", "old_log_probs", "returns", "values")}
        for i in idx:
            s, e = int(cu_all[i]), int(cu_all[i + 1])
            ids.append(d["input_ids"][s:e])
            for k in fields:
                fields[k].append(d[k][s:e])
            cu.append(cu[-1] + e - s)
        ids = torch.cat(ids)
        cu = torch.tensor(cu)
        f = {k: torch.cat(v) for k, v in fields.items()}
        mask = f["loss_mask"]
        if a.task == "value":
            from verl.trainer.ppo.core_algos import compute_value_loss

            vpreds = torch.cat([model(input_ids=ids[int(cu[i]):int(cu[i + 1])].unsqueeze(0)).logits[0, :, 0].float()
                                for i in range(len(cu) - 1)])
            loss = compute_value_loss(pad(vpreds, cu), pad(f["returns"], cu), pad(f["values"], cu), pad(mask, cu),
                                      cliprange_value=0.5, loss_agg_mode="token-mean")[0]
        else:
            rl = [] if getattr(model.config, "output_router_logits", False) else None
            lp = token_log_probs(model, ids, cu, rl)
        if a.task == "value":
            pass
        elif a.task == "sft":
            loss = -(lp * mask).sum() / mask.sum()
            if rl is not None:
                lens = [int(cu[i + 1] - cu[i]) for i in range(len(cu) - 1)]
                loss = loss + model.config.router_aux_loss_coef * aux_loss(model, rl, lens, a.aux_groups)
        else:
            from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
            from omegaconf import OmegaConf

            cfg = OmegaConf.create({"clip_ratio": a.clip_ratio, "clip_ratio_low": a.clip_ratio,
                                    "clip_ratio_high": a.clip_ratio, "clip_ratio_c": 3.0,
                                    "global_batch_info": {}})
            out = compute_policy_loss_vanilla(pad(f["old_log_probs"], cu), pad(lp, cu), pad(f["advantages"], cu),
                                              pad(mask, cu), loss_agg_mode="token-mean", config=cfg)
            loss = out[0]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        losses.append(loss.item())
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        # transformers 5 keeps a layer's experts fused ([E, 2I, H] / [E, H, I]); checkpoints and
        # the engine name them one by one (what save_pretrained writes).
        if k.endswith(".experts.gate_up_proj"):
            half = v.shape[1] // 2
            for e in range(v.shape[0]):
                sd[k[: -len("gate_up_proj")] + f"{e}.gate_proj.weight"] = v[e, :half].contiguous()
                sd[k[: -len("gate_up_proj")] + f"{e}.up_proj.weight"] = v[e, half:].contiguous()
        elif k.endswith(".experts.down_proj"):
            for e in range(v.shape[0]):
                sd[k[: -len("down_proj")] + f"{e}.down_proj.weight"] = v[e].contiguous()
        else:
            sd[k] = v.contiguous()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    base = os.path.join(a.out, f"ref_{a.task}_{a.steps}")
    save_file(sd, base + ".safetensors")
    with open(base + ".json", "w") as fh:
        json.dump({"losses": losses}, fh)
    print(json.dumps({"losses": losses}))


def check(a):
    from safetensors.torch import load_file

    if a.load:
        # The merged folder loads in transformers with no missing or unexpected key.
        import transformers

        _, info = transformers.AutoModelForCausalLM.from_pretrained(a.merged, output_loading_info=True)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            print(f"transformers loads {a.merged} with {bad}")
            return 1
    ref = load_file(a.ref)
    merged = {}
    for fn in os.listdir(a.merged):
        if fn.endswith(".safetensors"):
            merged.update(load_file(os.path.join(a.merged, fn)))
    if set(ref) != set(merged):
        print(f"key sets differ: {sorted(set(ref) ^ set(merged))}")
        return 1
    if a.update_rtol is not None:
        # Mixed precision: the whole update must follow the reference's, and so must the losses.
        init = load_file(os.path.join(a.init, "model.safetensors"))
        num = sum(((ref[k].double() - merged[k].double()) ** 2).sum() for k in ref)
        den = sum(((ref[k].double() - init[k].double()) ** 2).sum() for k in ref)
        upd = (num / den).sqrt().item()
        with open(a.ref.replace(".safetensors", ".json")) as fh:
            ref_losses = json.load(fh)["losses"]
        with open(a.metrics) as fh:
            ours = [r["loss"] for r in (json.loads(line) for line in fh if line.strip()) if "loss" in r]
        loss_rel = max(abs(x - y) / abs(y) for x, y in zip(ours, ref_losses))
        print(f"update difference {upd:.3e} (tolerance {a.update_rtol:g}), loss difference {loss_rel:.3e} "
              f"(tolerance {a.loss_rtol:g}) over {len(ours)} steps")
        return 0 if upd <= a.update_rtol and loss_rel <= a.loss_rtol and len(ours) == len(ref_losses) else 1
    worst, name = 0.0, None
    skipped = []
    for k in ref:
        if a.exact:
            if not torch.equal(ref[k], merged[k]):
                print(f"{k}: not bit-identical")
                return 1
            continue
        if any(k.endswith(s) for s in a.skip):
            # The exact gradient of a key bias is zero (softmax is invariant to a shift of all
            # keys), so AdamW turns pure rounding noise into lr-sized steps: not comparable.
            skipped.append(k)
            continue
        r, m = ref[k].float(), merged[k].float()
        if r.shape != m.shape:
            print(f"{k}: shape {tuple(m.shape)} vs {tuple(r.shape)}")
            return 1
        rel = ((r - m).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        if rel > worst:
            worst, name = rel, k
    if a.exact:
        print(f"{len(ref)} tensors bit-identical")
        return 0
    print(f"max relative difference {worst:.3e} ({name}), tolerance {a.rtol:g}; not compared: {len(skipped)} "
          f"zero-gradient key biases")
    return 0 if worst <= a.rtol else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["make", "ref", "check"])
    ap.add_argument("--out")
    ap.add_argument("--family", default="qwen2")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="sft", choices=["sft", "ppo", "value"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--clip-ratio", type=float, default=0.2)
    ap.add_argument("--aux-groups", type=int, default=1,
                    help="MoE: the load-balancing loss over this many contiguous groups of each batch (micro-batches)")
    ap.add_argument("--merged")
    ap.add_argument("--ref")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--exact", action="store_true", help="bit-identical tensors")
    ap.add_argument("--load", action="store_true", help="check: also load the merged folder with transformers")
    ap.add_argument("--update-rtol", type=float, default=None,
                    help="compare ||ours - ref|| / ||ref - init|| over all parameters instead (needs --init, --metrics)")
    ap.add_argument("--loss-rtol", type=float, default=1e-3)
    ap.add_argument("--init", help="the initial model folder")
    ap.add_argument("--metrics", help="verlcpp train's metrics.jsonl")
    ap.add_argument("--skip", action="append", default=["k_proj.bias"], help="name suffixes not compared")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if a.mode == "make":
        os.makedirs(a.out, exist_ok=True)
        make(a)
        return 0
    if a.mode == "ref":
        ref(a)
        return 0
    return check(a)


if __name__ == "__main__":
    sys.exit(main())
