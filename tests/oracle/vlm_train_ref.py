"""vlm_train_ref.py — fixtures and the independent reference for `verlcpp train` (SFT) of a
vision-language model (Qwen2-VL / Qwen2.5-VL made with from_config).

  make  --out DIR --family qwen2_vl|qwen2_5_vl
        DIR/model (fp32 safetensors) and DIR/data.safetensors in verlcpp train's format with
        images: input_ids, cu_seqlens, loss_mask, pixel_values, image_grid_thw (image+text and
        text-only sequences).
  ref   --out DIR --steps K --bs B --lr LR [--freeze-vision]
        trains the same model with transformers + torch.optim.AdamW (betas 0.9/0.999, eps 1e-8,
        weight decay 0.01, global grad-norm clip 1) in one process over the same global batches
        (sequences [s*B, (s+1)*B), no shuffle; each sequence run alone), with verl's SFT loss
        (token-mean NLL over the batch); saves DIR/ref_<K> (save_pretrained) and its losses.
  check --merged FOLDER --ref FOLDER [--rtol R]
        the merged folder loads in transformers with no missing / unexpected key, and every
        parameter is within R (max |diff| / max |ref|) of the reference's (key biases, whose
        exact gradient is zero, are not compared).
"""
import argparse
import json
import os
import sys

import torch

IMAGE, VIDEO, START, END = 250, 251, 252, 253


def classes(family):
    import transformers

    return {"qwen2_vl": (transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig),
            "qwen2_5_vl": (transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig)}[family]


def make(a):
    from safetensors.torch import save_file

    torch.manual_seed(a.seed)
    text = dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0})
    if a.family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2)
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=48, intermediate_size=40, num_heads=4, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1])
    cls, cfg_cls = classes(a.family)
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                  vision_start_token_id=START, vision_end_token_id=END)
    cfg.architectures = [cls.__name__]
    model = cls(cfg).float()
    with torch.no_grad():  # larger weights than the default init: visible learning in few steps
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    g = torch.Generator().manual_seed(a.seed + 1)
    grids = [(1, 4, 4), (1, 8, 4), (1, 6, 6), (2, 4, 4)]
    seqs, pix, gr = [], [], []
    for i in range(a.seqs):
        ids = torch.randint(0, IMAGE, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        if i % 2 == 0:  # every other sequence has an image after a few tokens
            t, h, w = grids[(i // 2) % len(grids)]
            ids += [START] + [IMAGE] * (t * h * w // 4) + [END]
            pix.append(torch.randn(t * h * w, 3 * 2 * 4 * 4, generator=g))
            gr.append((t, h, w))
        ids += torch.randint(0, IMAGE, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
        seqs.append(torch.tensor(ids))
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(a.seqs + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lens, 0)
    mask = torch.zeros(int(cu[-1]))
    for i in range(a.seqs):
        s, e = int(cu[i]), int(cu[i + 1])
        mask[s + (e - s) // 3: e - 1] = 1.0
    save_file({"input_ids": torch.cat(seqs), "cu_seqlens": cu, "loss_mask": mask, "pixel_values": torch.cat(pix),
               "image_grid_thw": torch.tensor(gr, dtype=torch.long)}, os.path.join(a.out, "data.safetensors"))


def sequences(d):
    """Each sequence's ids and its images (pixel_values, image_grid_thw, or None)."""
    cu, ids, grid, px = d["cu_seqlens"], d["input_ids"], d["image_grid_thw"], d["pixel_values"]
    out, k, row = [], 0, 0
    for i in range(len(cu) - 1):
        s = ids[int(cu[i]):int(cu[i + 1])]
        runs = int(((s == IMAGE) & torch.cat([torch.tensor([True]), s[:-1] != IMAGE])).sum())
        if runs:
            gi = grid[k:k + runs]
            n = int(gi.prod(1).sum())
            out.append((s, px[row:row + n], gi))
            k, row = k + runs, row + n
        else:
            out.append((s, None, None))
    return out


def ref(a):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cls, _ = classes(json.load(open(os.path.join(a.out, "model", "config.json")))["model_type"])
    model = cls.from_pretrained(os.path.join(a.out, "model"), dtype=torch.float32)
    model.train()
    if a.freeze_vision:
        model.model.visual.requires_grad_(False)
    d = load_file(os.path.join(a.out, "data.safetensors"))
    seqs = sequences(d)
    cu_all = d["cu_seqlens"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for step in range(a.steps):
        idx = [(step * a.bs + j) % len(seqs) for j in range(a.bs)]
        num, den = 0.0, 0.0
        for i in idx:
            s, pv, grid = seqs[i]
            mask = d["loss_mask"][int(cu_all[i]):int(cu_all[i + 1])]
            kw = {}
            if pv is not None:
                kw = dict(pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(s == IMAGE).int()[None])
            logits = model(input_ids=s[None], **kw).logits[0].float()
            lp = torch.log_softmax(logits, -1)[:-1].gather(1, s[1:, None]).squeeze(1)
            num = num + (lp * mask[:-1]).sum()
            den += float(mask.sum())
        loss = -num / den
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    out = os.path.join(a.out, f"ref_{a.steps}")
    model.save_pretrained(out, safe_serialization=True)
    with open(out + ".json", "w") as fh:
        json.dump({"losses": losses}, fh)
    print(json.dumps({"losses": losses}))


def check(a):
    cls, _ = classes(json.load(open(os.path.join(a.ref, "config.json")))["model_type"])
    merged, info = cls.from_pretrained(a.merged, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        print(f"transformers loads {a.merged} with {bad}")
        return 1
    ref = cls.from_pretrained(a.ref, dtype=torch.float32).state_dict()
    got = merged.state_dict()
    if set(ref) != set(got):
        print(f"key sets differ: {sorted(set(ref) ^ set(got))}")
        return 1
    worst, name = 0.0, None
    for k in ref:
        # A key bias has a zero exact gradient (softmax is invariant to a shift of all keys), so
        # AdamW turns rounding noise into lr-sized steps: not comparable. The vision blocks' keep
        # theirs as the middle third of attn.qkv.bias.
        if k.endswith("k_proj.bias"):
            continue
        r, m = ref[k].float(), got[k].float()
        if k.endswith("attn.qkv.bias"):
            w = r.numel() // 3
            r, m = torch.cat([r[:w], r[2 * w:]]), torch.cat([m[:w], m[2 * w:]])
        rel = ((r - m).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        if rel > worst:
            worst, name = rel, k
    print(f"max relative difference {worst:.3e} ({name}), tolerance {a.rtol:g}")
    return 0 if worst <= a.rtol else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["make", "ref", "check"])
    ap.add_argument("--out")
    ap.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--merged")
    ap.add_argument("--ref")
    ap.add_argument("--rtol", type=float, default=1e-5)
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
