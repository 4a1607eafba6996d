"""ref_optim.py — optimizer and LR-schedule references for tests/engine/test_optim.cpp, run
through verl 0.9.1's own engine code: FSDPEngine.optimizer_step (torch clip_grad_norm_, skip +
zero_grad on a non-finite norm, torch.optim.AdamW step) and FSDPEngine._build_lr_scheduler
(warmup steps / ratio, constant and cosine LambdaLR), on a plain module (one process: the
clip_grad_norm_ branch). "linear" comes from transformers.get_linear_schedule_with_warmup.

    python ref_optim.py OUT_DIR [SEED]   (writes OUT_DIR/optim.safetensors, OUT_DIR/cases.json)
"""
import json
import sys
import types

import torch
from safetensors.torch import save_file
from transformers import get_linear_schedule_with_warmup

from verl.workers.config.optimizer import FSDPOptimizerConfig, build_optimizer
from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

tensors = {}


def put(name, t):
    tensors[name] = t.detach().contiguous().clone()
    return name


def fake_engine(cfg, params):
    module = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in params])
    opt = build_optimizer(module.parameters(), cfg)  # torch.optim.AdamW(lr, weight_decay, betas)
    for group in opt.param_groups:
        group["eps"] = cfg_eps[id(cfg)]
        group["foreach"] = False  # the single-tensor path (the CPU default too)
    eng = types.SimpleNamespace(optimizer_config=cfg, rank=1, module=module, optimizer=opt, _qat_enabled=False,
                                scaler=None)
    eng.lr_scheduler = FSDPEngine._build_lr_scheduler(eng, opt)
    return eng


cfg_eps = {}

ADAM_CASES = [
    # lr, betas, eps, weight_decay, clip_grad, schedule kwargs, grad scale, steps, special steps
    dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, clip_grad=1.0,
         sched=dict(lr_scheduler_type="cosine", lr_warmup_steps=2, min_lr_ratio=0.1), scale=0.3, steps=8),
    dict(lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0, clip_grad=0.5,
         sched=dict(lr_scheduler_type="constant", lr_warmup_steps=0), scale=1.0, steps=6),
    dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, clip_grad=1e9,
         sched=dict(lr_scheduler_type="cosine", lr_warmup_steps_ratio=0.3, num_cycles=1.0), scale=0.05, steps=9,
         inf_at=[3], nan_at=[6], none_at={4: 1}),
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, clip_grad=2.0,
         sched=dict(lr_scheduler_type="constant", lr_warmup_steps=3), scale=2.0, steps=7, none_at={0: 2}),
]
SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (64, 33)]


def main(out_dir, seed=0):
    g = torch.Generator().manual_seed(seed)
    cases = {"adamw": [], "sched": []}
    for ci, c in enumerate(ADAM_CASES):
        cfg = FSDPOptimizerConfig(lr=c["lr"], betas=c["betas"], weight_decay=c["weight_decay"],
                                  clip_grad=c["clip_grad"], total_training_steps=c["steps"], **c["sched"])
        cfg_eps[id(cfg)] = c["eps"]
        init = [torch.randn(*s, generator=g) for s in SHAPES]
        eng = fake_engine(cfg, init)
        p = f"adamw/{ci}/"
        rec = {"lr": c["lr"], "beta1": c["betas"][0], "beta2": c["betas"][1], "eps": c["eps"],
               "weight_decay": c["weight_decay"], "clip_grad": c["clip_grad"], "sched": c["sched"],
               "total_training_steps": c["steps"], "nparams": len(SHAPES), "steps": c["steps"],
               "init": [put(p + f"init/{j}", t) for j, t in enumerate(init)], "step": []}
        for s in range(c["steps"]):
            grads = [torch.randn(*sh, generator=g) * c["scale"] * (1 + s % 3) for sh in SHAPES]
            if s in c.get("inf_at", []):
                grads[0][0, 0] = float("inf")
            if s in c.get("nan_at", []):
                grads[2][1, 1, 1] = float("nan")
            none = c.get("none_at", {}).get(s)
            lr_used = eng.optimizer.param_groups[0]["lr"]
            for j, (prm, gr) in enumerate(zip(eng.module.parameters(), grads)):
                prm.grad = None if j == none else gr.clone()
            grad_norm = FSDPEngine.optimizer_step(eng)
            new_lr = FSDPEngine.lr_scheduler_step(eng)
            q = p + f"{s}/"
            st = {"lr_used": lr_used, "grad_norm": put(q + "grad_norm", torch.tensor(grad_norm, dtype=torch.float64)), "new_lr": new_lr, "none": -1 if none is None else none,
                  "grads": [put(q + f"grad/{j}", t) for j, t in enumerate(grads)],
                  "params": [put(q + f"param/{j}", t) for j, t in enumerate(eng.module.parameters())],
                  "grads_after": [prm.grad is not None for prm in eng.module.parameters()]}
            state = eng.optimizer.state
            st["state"] = {}
            for j, prm in enumerate(eng.module.parameters()):
                if prm in state and "step" in state[prm]:
                    st["state"][str(j)] = {"exp_avg": put(q + f"exp_avg/{j}", state[prm]["exp_avg"]),
                                           "exp_avg_sq": put(q + f"exp_avg_sq/{j}", state[prm]["exp_avg_sq"]),
                                           "step": float(state[prm]["step"])}
            rec["step"].append(st)
        cases["adamw"].append(rec)

    # LR schedules over every step (plus a few past the end), through the engine's builder.
    sched_cases = [
        dict(lr_scheduler_type="constant", lr_warmup_steps=0, total=10),
        dict(lr_scheduler_type="constant", lr_warmup_steps=4, total=10),
        dict(lr_scheduler_type="constant", lr_warmup_steps=-1, lr_warmup_steps_ratio=0.33, total=17),
        dict(lr_scheduler_type="cosine", lr_warmup_steps=0, total=12),
        dict(lr_scheduler_type="cosine", lr_warmup_steps=3, total=20, min_lr_ratio=0.1),
        dict(lr_scheduler_type="cosine", lr_warmup_steps=-1, lr_warmup_steps_ratio=0.1, total=57, min_lr_ratio=0.05,
             num_cycles=1.5),
        dict(lr_scheduler_type="cosine", lr_warmup_steps=5, total=25, num_cycles=0.5, zero_indexed_step=False),
        dict(lr_scheduler_type="cosine", lr_warmup_steps=0, lr_warmup_steps_ratio=0.5, total=9, min_lr_ratio=1.0),
        dict(lr_scheduler_type="linear", lr_warmup_steps=4, total=20),
        dict(lr_scheduler_type="linear", lr_warmup_steps=-1, lr_warmup_steps_ratio=0.25, total=13),
    ]
    for sc in sched_cases:
        sc = dict(sc)
        total = sc.pop("total")
        base_lr = 3e-4
        prm = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([prm], lr=base_lr)
        if sc["lr_scheduler_type"] == "linear":
            w = sc["lr_warmup_steps"]
            if w <= 0:
                w = int(sc["lr_warmup_steps_ratio"] * total)
            sched = get_linear_schedule_with_warmup(opt, w, total)
        else:
            cfg = FSDPOptimizerConfig(lr=base_lr, total_training_steps=total, **sc)
            sched = FSDPEngine._build_lr_scheduler(types.SimpleNamespace(optimizer_config=cfg, rank=1), opt)
        lrs = [opt.param_groups[0]["lr"]]
        for _ in range(total + 3):
            sched.step()
            lrs.append(sched.get_last_lr()[0])
            assert lrs[-1] == opt.param_groups[0]["lr"]
        cases["sched"].append({"opts": sc, "total": total, "base_lr": base_lr, "lrs": lrs})

    save_file(tensors, out_dir + "/optim.safetensors")
    with open(out_dir + "/cases.json", "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
