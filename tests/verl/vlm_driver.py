# Vision-language models through verl's TrainingWorker with strategy=verlcpp, on the CPU under
# `torchrun --nproc_per_node 2` (gloo): the data arrive as verl passes them — jagged input_ids and
# loss_mask, position_ids [bsz, 4, j] (the text row + the three mRoPE rows of the model's
# get_rope_index, as verl's datasets and agent loop build them) and per-sample multi_modal_inputs
# (pixel_values, image_grid_thw; mm_token_type_ids on some samples, as transformers >= 5.3
# processors emit it) in the batch's non-tensor part. Checked against transformers, computed here:
#   (a) infer_batch log-probs (temperature 1) and log-probs + entropy (temperature 0.7) vs the
#       *ForConditionalGeneration model run on each sequence alone, fp32, max abs diff <= 1e-4
#   (b) three train_batch steps with verl's sft_loss, 4 of the fixture's 8 sequences per step (each
#       dp rank its share), then the full parameters from get_per_tensor_param are written as an HF
#       folder that tests/oracle/vlm_train_ref.py `check` compares with transformers + torch AdamW
#       trained on the same batches (vlm_train_ref.py `ref --steps 3 --bs 4`, the protocol of the
#       `verlcpp train` test in tests/engine/test_vision.cpp), and the per-step losses with the
#       reference's.
#   (c) a sample whose pixel_values do not fit its image_grid_thw, and a mm_token_type_ids that does
#       not mark the image tokens: one clear error each, after which (b) still trains correctly.
# The fixture is vlm_train_ref.py `make` (a tiny Qwen2-VL or Qwen2.5-VL, image+text and text-only
# sequences; its loss_mask weights log-prob t, verl's weights token t: rolled here).
#
#   torchrun --standalone --nproc_per_node 2 tests/verl/vlm_driver.py OUTDIR --fixture DIR [--sp N]
#   (tests/verl/run_vlm.sh wraps this, fixture and reference included.)
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
os.environ.setdefault("VERL_PLATFORM", "cpu")
os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", "verlcpp")
sys.path.insert(0, os.environ.get("VERLCPP_PYTHONPATH", os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "python")))
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))

from functools import partial  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPOptimizerConfig, HFModelConfig  # noqa: E402
from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig  # noqa: E402
from verl.workers.utils.losses import sft_loss  # noqa: E402

from vlm_train_ref import IMAGE, VIDEO, classes, sequences  # noqa: E402

ATOL_VS_HF = 1e-4
STEPS, BS, LR = 3, 4, 1e-3  # vlm_train_ref.py ref --steps 3 --bs 4 --lr 1e-3


def log(msg):
    if dist.get_rank() == 0:
        print(f"[vlm_driver] {msg}", flush=True)


def make_worker(path, sp):
    from verlcpp import VerlcppEngineConfig

    model_config = HFModelConfig(path=path, load_tokenizer=False, use_remove_padding=True,
                                 enable_gradient_checkpointing=False, override_config={"attn_implementation": "sdpa"})
    engine_config = VerlcppEngineConfig(
        strategy="verlcpp", forward_only=False, param_offload=False, optimizer_offload=False, use_dynamic_bsz=False,
        use_remove_padding=True, micro_batch_size_per_gpu=2, infer_micro_batch_size_per_gpu=2,
        max_token_len_per_gpu=256, infer_max_token_len_per_gpu=256, model_dtype="fp32",
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_torch_compile=False, seed=42, ulysses_sequence_parallel_size=sp)
    # vlm_train_ref.py's optimizer: AdamW betas 0.9/0.999, eps 1e-8, weight decay 0.01, clip 1, constant lr
    optimizer_config = FSDPOptimizerConfig(lr=LR, lr_warmup_steps=0, weight_decay=0.01, clip_grad=1.0)
    optimizer_config.total_training_steps = 10
    config = TrainingWorkerConfig(model_type="language_model", model_config=model_config, engine_config=engine_config,
                                  optimizer_config=optimizer_config, checkpoint_config=None)
    worker = TrainingWorker(config=config)
    worker.reset()
    return worker


def samples(fixture, hf_model):
    """Each sequence as verl carries it: ids, position_ids [4, L], multi_modal_inputs (or None),
    verl's loss_mask (token-aligned), plus what the transformers reference needs."""
    d = load_file(os.path.join(fixture, "data.safetensors"))
    cu = d["cu_seqlens"]
    out = []
    for i, (s, pv, grid) in enumerate(sequences(d)):
        mask = d["loss_mask"][int(cu[i]):int(cu[i + 1])]
        verl_mask = torch.cat([torch.zeros(1), mask[:-1]]).to(torch.int64)  # verl's sft_loss rolls it left
        type_ids = (s == IMAGE).to(torch.int64) + 2 * (s == VIDEO).to(torch.int64)
        mm = None
        if pv is not None:
            mm = {"pixel_values": pv, "image_grid_thw": grid}
            if i % 4 == 0:
                mm["mm_token_type_ids"] = type_ids[None]
            pos, _ = hf_model.model.get_rope_index(s[None], type_ids[None].int(), image_grid_thw=grid)
            pos = pos[:, 0]
        else:
            pos = torch.arange(len(s)).expand(3, -1)
        pos4 = torch.cat([torch.arange(len(s))[None], pos], 0)
        out.append({"ids": s, "pos": pos4, "mm": mm, "mask": verl_mask, "pv": pv, "grid": grid})
    return out


def to_td(part, **meta):
    nested = lambda ts: torch.nested.as_nested_tensor(ts, layout=torch.jagged)  # noqa: E731
    td = tu.get_tensordict(
        {"input_ids": nested([x["ids"] for x in part]), "position_ids": nested([x["pos"] for x in part]),
         "loss_mask": nested([x["mask"] for x in part]), "multi_modal_inputs": [x["mm"] for x in part]})
    tu.assign_non_tensor(td, **meta)
    return td


@torch.no_grad()
def hf_outputs(model, part, temperature):
    logp, ent = [], []
    for x in part:
        s = x["ids"]
        kw = {}
        if x["pv"] is not None:
            kw = dict(pixel_values=x["pv"], image_grid_thw=x["grid"], mm_token_type_ids=(s == IMAGE).int()[None])
        logits = model(input_ids=s[None], **kw).logits[0].float() / temperature
        lsm = torch.log_softmax(logits, -1)
        logp.append(lsm[:-1].gather(1, s[1:, None])[:, 0])
        ent.append(-(lsm.exp() * lsm).sum(-1))
    return logp, ent


def max_abs(got, ref, trim_last=False):
    """The largest |got - ref| over this rank's samples (got None: none here), max over all ranks."""
    worst = 0.0
    for a, b in zip(got or [], ref if got is not None else [], strict=True):
        a = a[:-1] if trim_last else a
        assert a.shape == b.shape, f"shape {tuple(a.shape)} vs transformers {tuple(b.shape)}"
        worst = max(worst, (a.float() - b.float()).abs().max().item())
    t = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main():
    ap = argparse.ArgumentParser(description="a vision-language model through verl's TrainingWorker (strategy=verlcpp)")
    ap.add_argument("out")
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--sp", type=int, default=1, help="ulysses_sequence_parallel_size")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    path = os.path.join(args.fixture, "model")
    family = json.load(open(os.path.join(path, "config.json")))["model_type"]
    cls, _ = classes(family)
    worker = make_worker(path, args.sp)
    eng = worker.engine
    dp_rank, dp_size = eng.get_data_parallel_rank(), eng.get_data_parallel_size()
    log(f"{family}: engine {type(eng).__name__}, world {dist.get_world_size()}, sp={args.sp}, dp={dp_size}")
    hf = cls.from_pretrained(path, dtype=torch.float32).eval()
    all_samples = samples(args.fixture, hf)
    per = len(all_samples) // dp_size
    part = all_samples[dp_rank * per:(dp_rank + 1) * per]
    results, ok = {"family": family, "sp": args.sp, "checks": {}}, True

    def check(name, value, limit):
        nonlocal ok
        good = value <= limit
        ok &= good
        results["checks"][name] = {"value": value, "limit": limit, "ok": good}
        log(f"{name}: {value:.3g} (limit {limit:g}) {'ok' if good else 'FAIL'}")

    # (a) log-probs, then log-probs + entropy at temperature 0.7
    worker.set_loss_fn(None)
    for temperature, with_entropy in ((1.0, False), (0.7, True)):
        td = to_td(part, temperature=temperature, compute_loss=False, calculate_entropy=with_entropy)
        out = worker.infer_batch(td)  # None on the ranks of an sp group other than its first
        ref_logp, ref_ent = hf_outputs(hf, part, temperature)
        got = lambda key: list(tu.get(out, key).unbind()) if out is not None else None  # noqa: E731
        check(f"log_probs_t{temperature:g}_max_abs_vs_hf", max_abs(got("log_probs"), ref_logp, trim_last=True),
              ATOL_VS_HF)
        if with_entropy:
            check(f"entropy_t{temperature:g}_max_abs_vs_hf", max_abs(got("entropy"), ref_ent), ATOL_VS_HF)

    # (c) bad input is one clear error, and the engine goes on: every rank's first image sample with
    # its pixel_values cut short by one patch row; a mm_token_type_ids that does not match the ids
    for what, expect in (("pixel_values", "pixel_values must be"), ("mm_token_type_ids", "does not mark the image")):
        bad = [dict(x) for x in part]
        k = next(i for i, x in enumerate(bad) if x["mm"] is not None)
        mm = dict(bad[k]["mm"])
        if what == "pixel_values":
            mm["pixel_values"] = mm["pixel_values"][:-1]
        else:
            mm["mm_token_type_ids"] = torch.zeros_like(bad[k]["ids"])[None]
        bad[k]["mm"] = mm
        try:
            worker.infer_batch(to_td(bad, temperature=1.0, compute_loss=False, calculate_entropy=False))
            msg = "no error"
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        good = expect in msg
        ok &= good
        results["checks"][f"bad_{what}"] = {"message": msg, "ok": good}
        log(f"bad {what}: {msg!r} {'ok' if good else 'FAIL (expected ' + repr(expect) + ')'}")

    # (b) SFT steps with verl's sft_loss on the reference's batches: step s takes sequences
    # [s*BS, (s+1)*BS) (mod 8), each dp rank its share
    worker.set_loss_fn(partial(sft_loss, config=None))
    losses = []
    for step in range(STEPS):
        batch = [all_samples[(step * BS + j) % len(all_samples)] for j in range(BS)]
        share = BS // dp_size
        td = to_td(batch[dp_rank * share:(dp_rank + 1) * share], temperature=1.0, calculate_entropy=False,
                   global_batch_size=BS, update_lr_scheduler=True)
        out = worker.train_batch(td)
        if out is not None:  # rank 0 always has them
            m = tu.get(out, "metrics")
            losses.append(float(m["loss"]))
            log(f"step {step + 1}: loss {losses[-1]:.6f} grad_norm {float(m['grad_norm']):.6f}")
    gen, _ = eng.get_per_tensor_param()
    params = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in gen}
    if dist.get_rank() == 0:
        ref_losses = json.load(open(os.path.join(args.fixture, f"ref_{STEPS}.json")))["losses"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
        check("sft_loss_rel_vs_transformers", worst, 1e-5)
        folder = os.path.join(args.out, "exported")
        os.makedirs(folder, exist_ok=True)
        save_file(params, os.path.join(folder, "model.safetensors"))
        for f in ("config.json", "generation_config.json"):
            if os.path.exists(os.path.join(path, f)):
                with open(os.path.join(path, f)) as src, open(os.path.join(folder, f), "w") as dst:
                    dst.write(src.read())
        results["losses"], results["ref_losses"], results["ok"] = losses, ref_losses, bool(ok)
        with open(os.path.join(args.out, "vlm.json"), "w") as f:
            json.dump(results, f, indent=1)
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if flag.item() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
