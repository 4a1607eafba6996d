"""config.py — VerlcppEngineConfig: verl's engine config for strategy "verlcpp".

It has exactly the fields of verl's FSDPEngineConfig (verl/workers/config/engine.py), with
the same names, defaults and meaning, because it *is* one (a subclass), and differs only in
`strategy="verlcpp"` and in what it refuses: a setting verl.cpp does not implement yet is an
error naming it, never silently ignored. `unsupported_settings` lists them; `check_supported`
runs at construction (verl builds engine configs from Hydra / omegaconf through
`omega_conf_to_dataclass`, which calls __post_init__) and again in the engine (verl's PPO
actor hands an FSDPEngineConfig whose strategy it set to "verlcpp").

Used: mixed_precision.param_dtype (the compute dtype), fsdp_size, reshard_after_forward,
forward_only, ulysses_sequence_parallel_size (a ("dp", "sp") device mesh as verl's FSDP engine
builds it; it must divide the world size and the model's attention heads, checked when the engine
is built), param_offload / optimizer_offload (verl's BaseEngineCtx moves the engine through
engine.to around each phase), and verl's micro-batching keys (through verl's own prepare_micro_batches).
Accepted with no effect, because they change nothing in what verl.cpp computes: wrap_policy
(the units are always one per decoder layer + the root), use_orig_params, use_torch_compile,
entropy_from_logits_with_chunking / entropy_from_logits_chunk_size / entropy_checkpointing (the
LM head always works in row chunks and recomputes them in backward), forward_prefetch and
use_no_sync_for_gradient_accumulation (collectives are blocking; gradients are reduced per
micro-batch, which sums the same values), seed / full_determinism (the engine is deterministic),
dtype (verl's FSDP engine reads mixed_precision, not dtype), turbo_config (fsdp_turbo only).
"""
from dataclasses import dataclass, fields
from typing import Any, Optional

from verl.workers.config.engine import EngineConfig, FSDPEngineConfig

# field -> (the value we support, why the others are refused)
_UNSUPPORTED = {
    "offload_policy": (False, "FSDP2 CPU offload policy is not implemented in verl.cpp yet"),
    "use_fused_kernels": (False, "fused kernels are not implemented in verl.cpp (its LM head is chunked already)"),
    "pad_to_length": (False, "pad_to_length is not implemented in verl.cpp"),
}

_PRECISIONS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


def _precision(value, what):
    key = str(value).lower().replace("torch.", "")
    if key not in _PRECISIONS:
        raise ValueError(f"verlcpp engine: {what}={value!r} is not supported (fp32 or bf16; fp16 is not implemented)")
    return _PRECISIONS[key]


@dataclass
class VerlcppEngineConfig(FSDPEngineConfig):
    """FSDPEngineConfig for the verl.cpp engine (`engine.strategy=verlcpp`)."""

    strategy: str = "verlcpp"

    def __post_init__(self):
        # FSDPEngineConfig.__post_init__ asserts an FSDP strategy; keep everything else it inherits.
        EngineConfig.__post_init__(self)
        if self.strategy != "verlcpp":
            raise ValueError(f"VerlcppEngineConfig: strategy must be 'verlcpp', got {self.strategy!r}")
        check_supported(self)


def unsupported_settings(cfg) -> list[str]:
    """The settings of `cfg` that verl.cpp does not implement, each with the reason."""
    bad = []
    for name, (ok, why) in _UNSUPPORTED.items():
        v = getattr(cfg, name, ok)
        if v != ok and not (v is None and ok in (False, 1)):
            bad.append(f"{name}={v!r}: {why}")
    if _precision(getattr(cfg, "model_dtype", "fp32"), "model_dtype") != "fp32":
        bad.append(f"model_dtype={cfg.model_dtype!r}: verl.cpp keeps fp32 master weights (model_dtype fp32)")
    qat = getattr(cfg, "qat", None)
    if qat is not None and getattr(qat, "enable", False):
        bad.append("qat.enable=True: quantization-aware training is not implemented in verl.cpp")
    mp = cfg.mixed_precision
    if mp:
        if "param_dtype" in mp:
            _precision(mp["param_dtype"], "mixed_precision.param_dtype")
        for k in ("reduce_dtype", "buffer_dtype"):
            if k in mp and _precision(mp[k], f"mixed_precision.{k}") != "fp32":
                bad.append(f"mixed_precision.{k}={mp[k]!r}: verl.cpp reduces gradients and keeps buffers in fp32")
        extra = set(mp) - {"param_dtype", "reduce_dtype", "buffer_dtype", "_target_"}
        if extra:
            bad.append(f"mixed_precision keys {sorted(extra)}: unknown (param_dtype, reduce_dtype, buffer_dtype)")
    sp = getattr(cfg, "ulysses_sequence_parallel_size", 1)
    if sp is not None and (not isinstance(sp, int) or sp < 1):
        bad.append(f"ulysses_sequence_parallel_size={sp!r}: must be an integer >= 1")
    return bad


def check_supported(cfg):
    bad = unsupported_settings(cfg)
    if bad:
        raise ValueError("verlcpp engine: unsupported settings: " + "; ".join(bad))


def compute_dtype(cfg) -> str:
    """The compute dtype verl's FSDP engine would use: mixed_precision.param_dtype, bf16 when unset
    (FSDPEngine._build_fsdp_module)."""
    mp = cfg.mixed_precision or {}
    return _precision(mp.get("param_dtype", "bf16"), "mixed_precision.param_dtype")


def fsdp_field_names() -> list[str]:
    return [f.name for f in fields(FSDPEngineConfig)]
