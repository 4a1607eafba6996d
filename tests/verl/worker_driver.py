# Drives verl's TrainingWorker (verl/workers/engine_workers.py) in-process on the CPU, one worker per
# rank under `torchrun --nproc_per_node 2` (gloo; no Ray, no GPU pools), on the tiny fixture of
# tests/verl/make_fixture.py. A port of verl's upstream tests/models/test_engine.py
# (test_actor_engine, test_critic_engine, test_per_tensor_generator), with the engine strategy as a
# command-line argument and tight fp32 checks against transformers computed here:
#   (a) actor infer_batch: log-probs (temperature 1) and log-probs + entropy (temperature 0.7) for
#       variable-length left/right-padded sequences (packed by verl's left_right_2_no_padding), vs
#       AutoModelForCausalLM run on each sequence alone; max abs diff <= 1e-5 (asserted)
#   (b) critic infer_batch: values vs AutoModelForTokenClassification(num_labels=1) (how verl loads a
#       value model, verl/utils/model.py load_valuehead_model); max abs diff <= 1e-5 (asserted)
#   (c) two PPO train_batch steps with verl's ppo_loss (verl/workers/utils/losses.py; KL loss and an
#       entropy bonus on) and one critic step with value_loss; loss and grad_norm per step, and all
#       parameters after the steps (full HF tensors from get_per_tensor_param) saved for compare.py
#   (d) get_per_tensor_param right after initialisation: keys, shapes and values == HF state dict
# Each rank feeds its own half of the batch, as verl's SPMD trainers (sft_trainer) do.
#
#   torchrun --standalone --nproc_per_node 2 tests/verl/worker_driver.py STRATEGY OUTDIR --fixture DIR
#   (tests/verl/run_worker.sh wraps this.)  Writes OUTDIR/worker.json (metrics, checks) and
#   OUTDIR/worker_tensors.pt (log-probs, entropy, values, parameters after training) on rank 0.
# Options: --dynamic (token-budget micro-batches instead of fixed ones), --sp N (the engine's
# ulysses_sequence_parallel_size: the batch is split over the engine's data-parallel ranks, which the
# ranks of a sequence-parallel group share, and outputs are gathered over its dp group), --engine-config MODULE:CLASS
# (the engine config dataclass for a strategy other than fsdp/fsdp2; default for verlcpp:
# verlcpp:VerlcppEngineConfig), --ep N (expert_parallel_size, for a MoE fixture of make_moe_fixture.py).

import argparse
import importlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# verl on the CPU: the verlcpp package (its cpu platform and engine backend), loaded by `import verl`;
# the built package is <build>/python (python/verlcpp + the extension), VERLCPP_PYTHONPATH overrides.
os.environ.setdefault("VERL_PLATFORM", "cpu")
os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", "verlcpp")
sys.path.insert(0, os.environ.get("VERLCPP_PYTHONPATH", os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "python")))

from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification  # noqa: E402

from verl import DataProto  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.model import compute_position_id_with_mask, create_random_mask  # noqa: E402
from verl.workers.config import ActorConfig, CriticConfig, FSDPOptimizerConfig, HFModelConfig  # noqa: E402
from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss, value_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

ATOL_VS_HF = 1e-5
BATCH, SEQLEN, RESPONSE = 8, 48, 24
DEFAULT_ENGINE_CONFIGS = {
    "fsdp": "verl.workers.config:FSDPEngineConfig",
    "fsdp2": "verl.workers.config:FSDPEngineConfig",
    "verlcpp": "verlcpp:VerlcppEngineConfig",
}


def log(msg):
    if dist.get_rank() == 0:
        print(f"[worker_driver] {msg}", flush=True)


def load_class(spec):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def make_worker(args, model_type, path):
    """TrainingWorker config as test_engine.py create_training_config builds it, fp32 and CPU-sized."""
    model_config = HFModelConfig(
        path=path,
        use_remove_padding=True,
        enable_gradient_checkpointing=False,
        override_config={"attn_implementation": "sdpa"},
    )
    engine_cls = load_class(args.engine_config or DEFAULT_ENGINE_CONFIGS.get(args.strategy, ""))
    engine_config = engine_cls(
        strategy=args.strategy,
        forward_only=False,
        param_offload=False,
        optimizer_offload=False,
        use_dynamic_bsz=args.dynamic,
        use_remove_padding=True,
        micro_batch_size_per_gpu=2,
        infer_micro_batch_size_per_gpu=2,
        max_token_len_per_gpu=64,
        infer_max_token_len_per_gpu=64,
        model_dtype="fp32",
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_torch_compile=False,
        seed=42,
        ulysses_sequence_parallel_size=args.sp,
        **({"expert_parallel_size": args.ep} if args.ep != 1 else {}),
    )
    optimizer_config = FSDPOptimizerConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.01, clip_grad=1.0)
    optimizer_config.total_training_steps = 10
    config = TrainingWorkerConfig(
        model_type=model_type,
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=None,
    )
    worker = TrainingWorker(config=config)
    worker.reset()  # engine.initialize(): model, optimizer, scheduler
    return worker


def make_batch(vocab_size, rank, world):
    """The global batch (same on every rank), as test_engine.py makes it; returns data-parallel rank
    `rank`'s part of `world` (the engine's dp rank / size: under sp the ranks of a group share it)."""
    torch.manual_seed(1)
    np.random.seed(1)
    input_ids = torch.randint(0, vocab_size, (BATCH, SEQLEN))
    attention_mask = create_random_mask(
        input_ids=input_ids, max_ratio_of_valid_token=0.9, max_ratio_of_left_padding=0.1, min_ratio_of_valid_token=0.6
    )
    position_ids = compute_position_id_with_mask(attention_mask)
    advantages = torch.randn(BATCH, RESPONSE)
    ref_log_prob = -torch.rand(BATCH, RESPONSE) * 6
    returns = torch.randn(BATCH, RESPONSE)
    responses = input_ids[:, SEQLEN - RESPONSE :]
    response_mask = attention_mask[:, SEQLEN - RESPONSE :]
    assert torch.all(response_mask[:, 0] == 1) and torch.all(attention_mask[:, : SEQLEN - RESPONSE].sum(1) > 0)
    full = {
        "input_ids": input_ids,
        "prompts": input_ids[:, : SEQLEN - RESPONSE],
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "responses": responses,
        "response_mask": response_mask,
        "advantages": advantages,
        "ref_log_prob": ref_log_prob,
        "returns": returns,
    }
    per = BATCH // world
    return {k: v[rank * per : (rank + 1) * per].clone() for k, v in full.items()}


def to_td(batch, keys, **meta):
    global_token_num = batch["attention_mask"].sum(-1).tolist()
    data = DataProto.from_single_dict({k: batch[k] for k in keys}, meta_info={"global_token_num": global_token_num, **meta})
    return left_right_2_no_padding(data.to_tensordict())


def hf_sequences(batch):
    """Each sequence without its padding: a list of [L] token-id tensors."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        m = batch["attention_mask"][i].bool()
        out.append(batch["input_ids"][i][m])
    return out


@torch.no_grad()
def hf_actor(path, seqs, temperature):
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    logp, ent = [], []
    for ids in seqs:
        logits = model(ids[None]).logits[0].float() / temperature  # [L, V]
        lsm = F.log_softmax(logits, dim=-1)
        logp.append(lsm[:-1].gather(-1, ids[1:, None])[:, 0])  # next-token log-prob at positions 0..L-2
        ent.append(-(lsm.exp() * lsm).sum(-1))
    return logp, ent


@torch.no_grad()
def hf_critic(path, seqs):
    model = AutoModelForTokenClassification.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    return [model(ids[None]).logits[0, :, 0].float() for ids in seqs]


def split_nested(t):
    """A jagged nested tensor -> list of per-sequence tensors."""
    t = t.detach()
    return list(t.unbind()) if t.is_nested else [t]


def max_abs(a_list, b_list, trim_last=False):
    worst = 0.0
    for a, b in zip(a_list, b_list, strict=True):
        a = a[:-1] if trim_last else a
        assert a.shape == b.shape, f"shape {tuple(a.shape)} vs transformers {tuple(b.shape)}"
        worst = max(worst, (a.float() - b.float()).abs().max().item())
    return worst


def all_max(x):
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


DP_GROUP = None  # the engine's data-parallel group (set in main)


def gather_list(items):
    """Per-dp-rank lists -> the global list in batch order (dp rank 0's shard first), on every rank."""
    out = [None] * dist.get_world_size(DP_GROUP)
    dist.all_gather_object(out, [x.clone() for x in items], group=DP_GROUP)
    return [x for part in out for x in part]


def check(name, value, limit, results):
    ok = value <= limit
    results["checks"][name] = {"value": value, "limit": limit, "ok": ok}
    log(f"{name}: {value:.3g} (limit {limit:g}) {'ok' if ok else 'FAIL'}")
    return ok


def per_tensor_params(worker):
    gen, peft = worker.engine.get_per_tensor_param()
    assert peft is None
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in gen}


def compare_state_dict(exported, path, what, results):
    """(d) keys, shapes and values of the exported tensors vs the HF safetensors state dict."""
    ref = load_file(os.path.join(path, "model.safetensors"))
    problems = []
    missing, extra = sorted(set(ref) - set(exported)), sorted(set(exported) - set(ref))
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"not in the HF state dict {extra}")
    worst = 0.0
    for k in sorted(set(ref) & set(exported)):
        if tuple(exported[k].shape) != tuple(ref[k].shape):
            problems.append(f"{k}: shape {tuple(exported[k].shape)} vs HF {tuple(ref[k].shape)}")
            continue
        worst = max(worst, (exported[k] - ref[k].float()).abs().max().item())
    results["checks"][f"{what}_per_tensor_keys_shapes"] = {"ok": not problems, "problems": problems, "n": len(exported)}
    log(f"{what} get_per_tensor_param: {len(exported)} tensors, {'ok' if not problems else problems}")
    return check(f"{what}_per_tensor_values_max_abs", worst, 0.0, results) and not problems


def main():
    ap = argparse.ArgumentParser(description="verl TrainingWorker on the CPU, strategy as a parameter")
    ap.add_argument("strategy")
    ap.add_argument("out")
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--dynamic", action="store_true", help="use_dynamic_bsz (token-budget micro-batches)")
    ap.add_argument("--engine-config", default=None, help="MODULE:CLASS of the engine config dataclass")
    ap.add_argument("--ppo-steps", type=int, default=2)
    ap.add_argument("--sp", type=int, default=1, help="ulysses_sequence_parallel_size")
    ap.add_argument("--ep", type=int, default=1, help="expert_parallel_size (MoE fixtures; engine configs that have it)")
    args = ap.parse_args()

    t0 = time.time()
    actor_path, critic_path = os.path.join(args.fixture, "model"), os.path.join(args.fixture, "critic")
    results = {"strategy": args.strategy, "dynamic": args.dynamic, "checks": {}, "ppo_steps": [], "critic_steps": []}
    tensors = {}
    ok = True

    actor = make_worker(args, "language_model", actor_path)
    rank = dist.get_rank()
    log(f"actor engine {type(actor.engine).__module__}.{type(actor.engine).__name__}, dp={actor.engine.get_data_parallel_size()}")
    global DP_GROUP
    DP_GROUP = actor.engine.get_data_parallel_group()
    log(f"sp={args.sp}: dp rank {actor.engine.get_data_parallel_rank()} of {actor.engine.get_data_parallel_size()}")
    batch = make_batch(actor.model_config.hf_config.vocab_size, actor.engine.get_data_parallel_rank(),
                       actor.engine.get_data_parallel_size())
    seqs = hf_sequences(batch)

    # (d) exported parameters right after initialisation == the HF checkpoint
    ok &= compare_state_dict(per_tensor_params(actor), actor_path, "actor", results)

    # (a) infer_batch log-probs (temperature 1), then log-probs + entropy at temperature 0.7
    base_keys = ["input_ids", "prompts", "attention_mask", "position_ids", "responses", "response_mask"]
    actor.set_loss_fn(None)
    for temperature, with_entropy in ((1.0, False), (0.7, True)):
        td = to_td(batch, base_keys, temperature=temperature, compute_loss=False, calculate_entropy=with_entropy)
        out = actor.infer_batch(td)
        logp = split_nested(tu.get(out, "log_probs"))
        ref_logp, ref_ent = hf_actor(actor_path, seqs, temperature)
        tag = f"t{temperature:g}"
        ok &= check(f"actor_log_probs_{tag}_max_abs_vs_hf", all_max(max_abs(logp, ref_logp, trim_last=True)), ATOL_VS_HF, results)
        tensors[f"log_probs_{tag}"] = gather_list([x[:-1] for x in logp])
        if with_entropy:
            ent = split_nested(tu.get(out, "entropy"))
            ok &= check(f"actor_entropy_{tag}_max_abs_vs_hf", all_max(max_abs(ent, ref_ent)), ATOL_VS_HF, results)
            tensors[f"entropy_{tag}"] = gather_list(ent)
        if temperature == 1.0:
            old_log_probs = no_padding_2_padding(tu.get(out, "log_probs"), td).detach()  # [b, RESPONSE]

    # (c) two PPO steps with verl's ppo_loss on the same batch (ratio 1 at step 1, clipped later)
    actor_config = ActorConfig(
        strategy=args.strategy,  # only the loss reads this config; no strategy-specific checks
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=-1,
        use_kl_loss=True,
        kl_loss_coef=0.1,
        entropy_coeff=0.01,
        clip_ratio=0.1,
    )
    actor.set_loss_fn(partial(ppo_loss, config=actor_config))
    batch["old_log_probs"] = old_log_probs * batch["response_mask"]
    ppo_keys = base_keys + ["old_log_probs", "advantages", "ref_log_prob"]
    for step in range(args.ppo_steps):
        td = to_td(batch, ppo_keys, temperature=1.0, calculate_entropy=True)
        tu.assign_non_tensor(td, global_batch_size=BATCH, update_lr_scheduler=True)
        out = actor.train_batch(td)
        m = tu.get(out, "metrics")
        rec = {k: float(m[k]) for k in ("loss", "grad_norm", "lr") if k in m}
        results["ppo_steps"].append(rec)
        log(f"ppo step {step + 1}: {rec}")
    tensors["actor_params_after"] = per_tensor_params(actor)
    results["actor_param_names"] = sorted(tensors["actor_params_after"])
    del actor

    # (b) critic: values vs transformers, then one value_loss step
    critic = make_worker(args, "value_model", critic_path)
    log(f"critic engine {type(critic.engine).__module__}.{type(critic.engine).__name__}")
    ok &= compare_state_dict(per_tensor_params(critic), critic_path, "critic", results)
    critic.set_loss_fn(None)
    td = to_td(batch, base_keys, temperature=1.0, compute_loss=False)
    out = critic.infer_batch(td)
    values_nested = tu.get(out, "values")
    values = split_nested(values_nested)
    ok &= check("critic_values_max_abs_vs_hf", all_max(max_abs(values, hf_critic(critic_path, seqs))), ATOL_VS_HF, results)
    tensors["values"] = gather_list(values)

    critic_config = CriticConfig(strategy=args.strategy, rollout_n=1, ppo_micro_batch_size_per_gpu=-1, cliprange_value=0.5)
    critic.set_loss_fn(partial(value_loss, config=critic_config))
    batch["values"] = no_padding_2_padding(values_nested, td).detach() * batch["response_mask"]
    td = to_td(batch, base_keys + ["values", "returns"], temperature=1.0)
    tu.assign_non_tensor(td, global_batch_size=BATCH, update_lr_scheduler=True)
    out = critic.train_batch(td)
    m = tu.get(out, "metrics")
    rec = {k: float(m[k]) for k in ("loss", "grad_norm") if k in m}
    results["critic_steps"].append(rec)
    log(f"critic step 1: {rec}")
    tensors["critic_params_after"] = per_tensor_params(critic)

    results["ok"] = bool(ok)
    results["wall_s"] = round(time.time() - t0, 1)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "worker.json"), "w") as f:
            json.dump(results, f, indent=1)
        torch.save(tensors, os.path.join(args.out, "worker_tensors.pt"))
        log(f"{'PASS' if ok else 'FAIL'} in {results['wall_s']} s -> {args.out}/worker.json, worker_tensors.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
