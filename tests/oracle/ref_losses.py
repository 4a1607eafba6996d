"""ref_losses.py — random loss cases evaluated by verl's own functions (pinned verl 0.9.1:
core_algos.agg_loss / compute_policy_loss_vanilla / kl_penalty / compute_value_loss /
compute_entropy_loss / compute_grpo_outcome_advantage, workers/utils/losses.sft_loss / ppo_loss),
inputs, outputs and input gradients written for tests/engine/test_losses.cpp.

    python ref_losses.py OUT_DIR [SEED]   (writes OUT_DIR/losses.safetensors, OUT_DIR/cases.json)
"""
import json
import sys

import torch
from safetensors.torch import save_file
from tensordict import TensorDict

import verl.trainer.ppo.core_algos as ca
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig
from verl.workers.utils import losses as engine_losses
from verl.workers.utils.padding import no_padding_2_padding

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KL_TYPES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]
KL_TYPES = KL_TYPES + [t + "+" for t in KL_TYPES]

tensors = {}


def put(name, t):
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)  # the C++ side turns "mask_bool" back into bool
    tensors[name] = t.clone()
    return name


def rand_mask(g, B, T, full_rows=True):
    m = (torch.rand(B, T, generator=g) < 0.75).float()
    if B > 1:
        m[torch.randint(0, B, (1,), generator=g)] = 0.0  # an all-masked row
    if full_rows:
        m[0] = 1.0
    return m


def ginfo_variants(mask):
    n_tok = int(mask.sum().item())
    n_seq = int((mask.sum(-1) > 0).sum().item())
    return [
        {},
        {"dp_size": 2, "batch_num_tokens": 2 * n_tok + 3, "global_batch_size": 2 * mask.shape[0] + 1},
        {"dp_size": 1, "batch_num_tokens": n_tok, "global_batch_size": n_seq, "loss_scale_factor": 7},
        {"dp_size": 4, "batch_num_tokens": 1234567, "global_batch_size": 4096, "loss_scale_factor": 4096},
    ]


def main(out_dir, seed=0):
    g = torch.Generator().manual_seed(seed)
    cases = {"agg": [], "policy": [], "kl": [], "value": [], "entropy": [], "grpo": [], "sft": [], "ppo": []}

    # --- agg_loss -----------------------------------------------------------------------
    for i in range(24):
        B, T = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
        mask = rand_mask(g, B, T)
        mat = torch.randn(B, T, generator=g) * 3
        as_bool = i % 2 == 1
        if i % 6 == 0:
            mat = torch.where(mask.bool(), mat, torch.full_like(mat, float("nan")))  # NaN off-mask
        for mode in MODES:
            for gi, ginfo in enumerate(ginfo_variants(mask)):
                m = mask.bool() if as_bool else mask
                x = mat.clone().requires_grad_(True)
                loss = ca.agg_loss(x, m, mode, **ginfo)
                loss.backward()
                p = f"agg/{i}/{mode}/{gi}/"
                cases["agg"].append({"mode": mode, "ginfo": ginfo, "mask_bool": as_bool,
                                     "mat": put(p + "mat", mat), "mask": put(p + "mask", mask),
                                     "loss": put(p + "loss", loss), "grad": put(p + "grad", x.grad)})

    # --- compute_policy_loss_vanilla ---------------------------------------------------------
    clip_cfgs = [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5), (0.2, 0.2, 10.0)]
    for i in range(16):
        B, T = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 11, (1,), generator=g))
        scale = [0.05, 0.5, 2.0, 30.0][i % 4]
        old = -torch.rand(B, T, generator=g) * 3
        lp = old + torch.randn(B, T, generator=g) * scale
        adv = torch.randn(B, T, generator=g) * 2
        if i % 5 == 4:
            adv = -adv.abs()  # all negative: dual clip everywhere
        mask = rand_mask(g, B, T)
        weights = torch.rand(B, T, generator=g) * 2 if i % 3 == 2 else None
        low, high, c = clip_cfgs[i % len(clip_cfgs)]
        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                          clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c)
        for mode in MODES:
            for gi, ginfo in enumerate(ginfo_variants(mask)[:3]):
                m = mask.bool() if i % 2 else mask
                cfg.global_batch_info.clear()
                cfg.global_batch_info.update(ginfo)
                x = lp.clone().requires_grad_(True)
                loss, metrics = ca.compute_policy_loss_vanilla(old, x, adv, m, loss_agg_mode=mode, config=cfg,
                                                               rollout_is_weights=weights)
                loss.backward()
                p = f"policy/{i}/{mode}/{gi}/"
                cases["policy"].append({
                    "mode": mode, "ginfo": ginfo, "mask_bool": bool(i % 2), "clip_low": low, "clip_high": high,
                    "clip_c": c, "old": put(p + "old", old), "lp": put(p + "lp", lp), "adv": put(p + "adv", adv),
                    "mask": put(p + "mask", mask), "weights": put(p + "w", weights) if weights is not None else "",
                    "loss": put(p + "loss", loss), "grad": put(p + "grad", x.grad),
                    "pg_clipfrac": metrics["actor/pg_clipfrac"], "ppo_kl": metrics["actor/ppo_kl"],
                    "pg_clipfrac_lower": metrics["actor/pg_clipfrac_lower"]})

    # --- kl_penalty ------------------------------------------------------------------------------
    for i in range(4):
        B, T = 4, 9
        ref = -torch.rand(B, T, generator=g) * 5
        lp = ref + torch.randn(B, T, generator=g) * [0.1, 1.0, 5.0, 40.0][i]
        for kt in KL_TYPES:
            x = lp.clone().requires_grad_(True)
            kld = ca.kl_penalty(x, ref, kt)
            (kld * torch.linspace(0.5, 1.5, B * T).view(B, T)).sum().backward()
            p = f"kl/{i}/{kt}/"
            cases["kl"].append({"type": kt, "lp": put(p + "lp", lp), "ref": put(p + "ref", ref),
                                "kl": put(p + "kl", kld), "grad": put(p + "grad", x.grad)})

    # --- compute_value_loss ----------------------------------------------------------------------
    for i in range(8):
        B, T = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 11, (1,), generator=g))
        values = torch.randn(B, T, generator=g)
        vpreds = values + torch.randn(B, T, generator=g) * [0.05, 0.5, 2.0, 0.3][i % 4]
        returns = torch.randn(B, T, generator=g) * 2
        mask = rand_mask(g, B, T)
        cr = [0.5, 0.2, 0.05, 1.0][i % 4]
        for mode in MODES:
            for gi, ginfo in enumerate(ginfo_variants(mask)):
                x = vpreds.clone().requires_grad_(True)
                m = mask.bool() if i % 2 else mask
                loss, clipfrac = ca.compute_value_loss(x, returns, values, m, cr, loss_agg_mode=mode, **ginfo)
                loss.backward()
                p = f"value/{i}/{mode}/{gi}/"
                cases["value"].append({"mode": mode, "ginfo": ginfo, "mask_bool": bool(i % 2), "cliprange": cr,
                                       "vpreds": put(p + "vpreds", vpreds), "returns": put(p + "returns", returns),
                                       "values": put(p + "values", values), "mask": put(p + "mask", mask),
                                       "loss": put(p + "loss", loss), "grad": put(p + "grad", x.grad),
                                       "clipfrac": float(clipfrac)})

    # --- compute_entropy_loss -----------------------------------------------------------------
    for i in range(3):
        B, T, V = 3, 5, 11
        logits = torch.randn(B, T, V, generator=g) * [1.0, 4.0, 20.0][i]
        mask = rand_mask(g, B, T)
        for mode in MODES:
            x = logits.clone().requires_grad_(True)
            loss = ca.compute_entropy_loss(x, mask, loss_agg_mode=mode)
            loss.backward()
            p = f"entropy/{i}/{mode}/"
            cases["entropy"].append({"mode": mode, "logits": put(p + "logits", logits), "mask": put(p + "mask", mask),
                                     "loss": put(p + "loss", loss), "grad": put(p + "grad", x.grad)})

    # --- compute_grpo_outcome_advantage ----------------------------------------------------------
    for i in range(8):
        B, T = int(torch.randint(1, 17, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        ngroups = int(torch.randint(1, B + 1, (1,), generator=g))
        ids = torch.randint(0, ngroups, (B,), generator=g)
        rewards = torch.zeros(B, T)
        mask = rand_mask(g, B, T)
        last = torch.randint(0, T, (B,), generator=g)
        rewards[torch.arange(B), last] = torch.randint(0, 3, (B,), generator=g).float() * 0.5
        if i % 2:
            rewards += torch.randn(B, T, generator=g) * 0.1  # dense rewards
        if i == 3:
            rewards[:] = 1.0  # equal scores: std 0
        index = [f"uid-{int(k)}" for k in ids]
        for norm in (True, False):
            for eps in (1e-6, 1e-2):
                adv, ret = ca.compute_grpo_outcome_advantage(rewards, mask, index, epsilon=eps,
                                                             norm_adv_by_std_in_grpo=norm)
                p = f"grpo/{i}/{norm}/{eps}/"
                cases["grpo"].append({"norm": norm, "eps": eps, "index": index,
                                      "rewards": put(p + "rewards", rewards), "mask": put(p + "mask", mask),
                                      "adv": put(p + "adv", adv), "ret": put(p + "ret", ret)})

    # --- sft_loss (engine, no-padding layout) -------------------------------------------------------
    for i in range(4):
        B = int(torch.randint(1, 6, (1,), generator=g))
        lens = torch.randint(2, 9, (B,), generator=g).tolist()
        lp = [-torch.rand(n, generator=g) * 4 for n in lens]
        lm = [(torch.rand(n, generator=g) < 0.6).to(torch.int64) for n in lens]
        lm[0][0] = 1  # first token of the batch in the loss: the roll wraps it onto the last token
        dp = [1, 2, 4, 1][i]
        flat_mask = torch.cat(lm)
        batch_num_tokens = int(flat_mask.sum()) * dp + i
        data = TensorDict({"loss_mask": torch.nested.as_nested_tensor(lm, layout=torch.jagged)}, batch_size=[B])
        tu.assign_non_tensor(data, dp_size=dp, batch_num_tokens=batch_num_tokens)
        x = torch.cat(lp).requires_grad_(True)
        nested = torch.nested.nested_tensor_from_jagged(x, offsets=torch.tensor([0] + lens).cumsum(0))
        loss, _ = engine_losses.sft_loss(None, {"log_probs": nested}, data)
        loss.backward()
        p = f"sft/{i}/"
        cases["sft"].append({"dp": dp, "batch_num_tokens": batch_num_tokens, "lp": put(p + "lp", torch.cat(lp)),
                             "mask": put(p + "mask", flat_mask), "loss": put(p + "loss", loss),
                             "grad": put(p + "grad", x.grad)})

    # --- ppo_loss (engine: pg + entropy bonus + KL loss, global normalisation) ---------------------
    ppo_cfgs = [
        dict(loss_agg_mode="token-mean", entropy_coeff=0.0, use_kl_loss=False),
        dict(loss_agg_mode="token-mean", entropy_coeff=0.01, use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.1),
        dict(loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.02, use_kl_loss=True, kl_loss_type="k3+", kl_loss_coef=0.5),
        dict(loss_agg_mode="seq-mean-token-sum", entropy_coeff=0.0, use_kl_loss=True, kl_loss_type="kl", kl_loss_coef=0.2),
        dict(loss_agg_mode="seq-mean-token-sum-norm", entropy_coeff=0.05, use_kl_loss=True, kl_loss_type="mse", kl_loss_coef=1.0,
             loss_scale_factor=16),
        dict(loss_agg_mode="token-mean", entropy_coeff=0.1, use_kl_loss=True, kl_loss_type="abs", kl_loss_coef=0.3,
             clip_ratio_low=0.1, clip_ratio_high=0.4, clip_ratio_c=2.0),
    ]
    for i, extra in enumerate(ppo_cfgs):
        B = int(torch.randint(2, 6, (1,), generator=g))
        plens = torch.randint(1, 5, (B,), generator=g).tolist()
        rlens = torch.randint(1, 7, (B,), generator=g).tolist()
        slens = [a + b for a, b in zip(plens, rlens)]
        nnz = sum(slens)

        def nested(ts):
            return torch.nested.as_nested_tensor(ts, layout=torch.jagged)

        resp_mask = [(torch.rand(n, generator=g) < 0.8).to(torch.int64) for n in rlens]
        resp_mask[-1][:] = 0 if B > 2 else resp_mask[-1]  # an all-masked response
        old = [-torch.rand(n, generator=g) * 3 for n in rlens]
        adv = [torch.randn(n, generator=g) for n in rlens]
        ref = [-torch.rand(n, generator=g) * 3 for n in rlens]
        lp_flat = -torch.rand(nnz, generator=g) * 3
        ent_flat = torch.rand(nnz, generator=g) * 2
        dp = [1, 2, 1, 2, 4, 1][i]
        ntok = int(sum(int(m.sum()) for m in resp_mask))
        data = TensorDict({
            "prompts": nested([torch.randint(0, 100, (n,), generator=g) for n in plens]),
            "responses": nested([torch.randint(0, 100, (n,), generator=g) for n in rlens]),
            "response_mask": nested(resp_mask), "old_log_probs": nested(old), "advantages": nested(adv),
            "ref_log_prob": nested(ref)}, batch_size=[B])
        tu.assign_non_tensor(data, dp_size=dp, batch_num_tokens=ntok * dp + i, global_batch_size=B * dp + (i % 2))
        kw = dict(extra)
        lsf = kw.pop("loss_scale_factor", None)
        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_scale_factor=lsf, **kw)
        x = lp_flat.clone().requires_grad_(True)
        e = ent_flat.clone().requires_grad_(True)
        offs = torch.tensor([0] + slens).cumsum(0)
        out = {"log_probs": torch.nested.nested_tensor_from_jagged(x, offsets=offs),
               "entropy": torch.nested.nested_tensor_from_jagged(e, offsets=offs)}
        loss, metrics = engine_losses.ppo_loss(cfg, out, data)
        loss.backward()
        # verl's own map from the flat per-token outputs to the padded response layout.
        where = no_padding_2_padding(torch.arange(nnz, dtype=torch.float64) + 1, data).round().long() - 1
        padded = data.select("response_mask", "old_log_probs", "advantages", "ref_log_prob").to_padded_tensor()
        p = f"ppo/{i}/"
        c = {"cfg": extra, "dp": dp, "batch_num_tokens": ntok * dp + i, "global_batch_size": B * dp + (i % 2),
             "where": put(p + "where", where), "lp": put(p + "lp", lp_flat), "ent": put(p + "ent", ent_flat),
             "mask": put(p + "mask", padded["response_mask"]), "old": put(p + "old", padded["old_log_probs"]),
             "adv": put(p + "adv", padded["advantages"]), "ref": put(p + "ref", padded["ref_log_prob"]),
             "loss": put(p + "loss", loss), "grad_lp": put(p + "grad_lp", x.grad),
             "grad_ent": put(p + "grad_ent", e.grad)}
        for k, v in metrics.items():
            v = v.values[0] if hasattr(v, "values") else v
            c["m:" + k] = float(v.detach().item() if torch.is_tensor(v) else v)
        cases["ppo"].append(c)

    save_file(tensors, out_dir + "/losses.safetensors")
    with open(out_dir + "/cases.json", "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
