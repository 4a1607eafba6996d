"""vlm_fixtures.py — tiny random vision-language models (Qwen2-VL, Qwen2.5-VL made with
from_config), a packed batch of image+text, video+image+text and text-only sequences in
`verlcpp logprob`'s format (input_ids, cu_seqlens, pixel_values, image_grid_thw,
pixel_values_videos, video_grid_thw, second_per_grid_ts), and transformers' own log-probs,
entropy and mRoPE position ids for it (each sequence run alone, computed from the full softmax),
in fp32 and in bf16.
Used by tests/engine/test_vision.cpp at test time.

    python vlm_fixtures.py OUT_DIR
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

VOCAB = 256
IMAGE, VIDEO, START, END = 250, 251, 252, 253
T_SCALAR = 0.7
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def models():
    return {
        "qwen2_vl": (transformers.Qwen2VLForConditionalGeneration,
                     transformers.Qwen2VLConfig(
                         text_config=TEXT, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4,
                                                              mlp_ratio=2, patch_size=4, temporal_patch_size=2,
                                                              spatial_merge_size=2), **TOKENS)),
        # windows of 16 pixels = 2 × 2 merged patches; block 1 attends over whole images
        "qwen2_5_vl": (transformers.Qwen2_5_VLForConditionalGeneration,
                       transformers.Qwen2_5_VLConfig(
                           text_config=TEXT, vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64,
                                                                intermediate_size=48, num_heads=4, patch_size=4,
                                                                temporal_patch_size=2, spatial_merge_size=2,
                                                                window_size=16, fullatt_block_indexes=[1],
                                                                tokens_per_second=2), **TOKENS)),
    }


def randomize(model, seed):
    # HF init gives near-uniform outputs; spread the weights so log-probs differ per token.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


# Each sequence: text lengths, image grids (t, h, w in patches) and videos ("v", t, h, w,
# seconds per temporal patch), in order.
LAYOUT = [
    [7, (1, 4, 4), 5],
    [13],
    [3, (1, 8, 12), 4, (2, 4, 6), 6],
    [2],
    [(1, 6, 10), 9],
    [20],
    [5, ("v", 3, 4, 6, 2.5), 3, (1, 4, 4), 4],
    [4, ("v", 2, 8, 4, 1.0), 6],
]
MERGE = 2
PATCH_DIM = 3 * 2 * 4 * 4


def make_batch(g):
    seqs, grids_per_seq, videos_per_seq = [], [], []
    for parts in LAYOUT:
        ids, grids, videos = [], [], []
        for p in parts:
            if isinstance(p, int):
                ids += torch.randint(0, IMAGE, (p,), generator=g).tolist()
            elif p[0] == "v":
                _, t, h, w, sec = p
                ids += [START] + [VIDEO] * (t * h * w // MERGE**2) + [END]
                videos.append(p[1:])
            else:
                t, h, w = p
                ids += [START] + [IMAGE] * (t * h * w // MERGE**2) + [END]
                grids.append(p)
        seqs.append(torch.tensor(ids, dtype=torch.long))
        grids_per_seq.append(grids)
        videos_per_seq.append(videos)
    pixels = [torch.randn(t * h * w, PATCH_DIM, generator=g) for grids in grids_per_seq for (t, h, w) in grids]
    vpixels = [torch.randn(t * h * w, PATCH_DIM, generator=g) for vs in videos_per_seq for (t, h, w, _) in vs]
    return seqs, grids_per_seq, pixels, videos_per_seq, vpixels


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    seqs, grids_per_seq, pixels, videos_per_seq, vpixels = make_batch(g)
    lens = [len(s) for s in seqs]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.long)
    all_grids = torch.tensor([gr for grids in grids_per_seq for gr in grids], dtype=torch.long)
    all_videos = [v for vs in videos_per_seq for v in vs]
    save_file({"input_ids": torch.cat(seqs), "cu_seqlens": cu, "pixel_values": torch.cat(pixels).contiguous(),
               "image_grid_thw": all_grids, "pixel_values_videos": torch.cat(vpixels).contiguous(),
               "video_grid_thw": torch.tensor([v[:3] for v in all_videos], dtype=torch.long),
               "second_per_grid_ts": torch.tensor([v[3] for v in all_videos], dtype=torch.float32)},
              f"{out}/batch.safetensors")
    info = {"temperature": T_SCALAR, "lens": lens}
    for i, (name, (cls, cfg)) in enumerate(models().items()):
        cfg.architectures = [cls.__name__]
        model = cls(cfg).eval()
        randomize(model, 200 + i)
        model.save_pretrained(f"{out}/{name}", safe_serialization=True)
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            model = model.to(dtype)
            lps, ents, poss = [], [], []
            k = kv = 0
            for s, grids, videos in zip(seqs, grids_per_seq, videos_per_seq):
                kw = {}
                if grids:
                    kw.update(pixel_values=torch.cat(pixels[k:k + len(grids)]), image_grid_thw=torch.tensor(grids))
                    k += len(grids)
                if videos:
                    kw.update(pixel_values_videos=torch.cat(vpixels[kv:kv + len(videos)]),
                              video_grid_thw=torch.tensor([v[:3] for v in videos]))
                    if name == "qwen2_5_vl":
                        kw["second_per_grid_ts"] = torch.tensor([v[3] for v in videos])
                    kv += len(videos)
                if kw:
                    kw["mm_token_type_ids"] = (s == IMAGE).int()[None] + 2 * (s == VIDEO).int()[None]
                    extra = {"second_per_grid_ts": kw["second_per_grid_ts"]} if "second_per_grid_ts" in kw else {}
                    pos, _ = model.model.get_rope_index(s[None], kw["mm_token_type_ids"],
                                                        image_grid_thw=kw.get("image_grid_thw"),
                                                        video_grid_thw=kw.get("video_grid_thw"), **extra)
                    poss.append(pos[:, 0])
                else:
                    poss.append(torch.arange(len(s)).expand(3, -1))
                with torch.no_grad():
                    logits = model(input_ids=s[None], **kw).logits[0].float() / T_SCALAR
                logp = torch.log_softmax(logits, -1)
                lp = torch.zeros(len(s))
                lp[:-1] = logp[:-1].gather(1, s[1:, None]).squeeze(1)
                lps.append(lp)
                ents.append(-(torch.softmax(logits, -1) * logp).sum(-1))
            save_file({"log_probs": torch.cat(lps), "entropy": torch.cat(ents),
                       "position_ids": torch.cat(poss, 1).contiguous()}, f"{out}/ref_{name}_{tag}.safetensors")
        info[name] = {"num_params": sum(p.numel() for p in model.parameters())}
    with open(f"{out}/info.json", "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
