"""config.py — verl's engine configs for strategy "verlcpp", in the two shapes verl has.

VerlcppEngineConfig is verl's FSDPEngineConfig (verl/workers/config/engine.py; Hydra option
`engine=verlcpp`, and what verl's PPO actor hands over as `fsdp_config` with strategy "verlcpp"):
the same fields, names, defaults and meaning (it is a subclass), plus one field verl's FSDP engine
lacks, `expert_parallel_size` (VeOmni's name; MoE models only). VerlcppVeOmniEngineConfig is
verl's VeOmniEngineConfig (Hydra option `engine=verlcpp_veomni`; for the PPO actor, its `veomni`
section with `_target_: verlcpp.VerlcppVeOmniEngineConfig`), so VeOmni-shaped configs drive the
same engine. Both differ from verl's only in `strategy="verlcpp"` and in what they refuse: a
setting verl.cpp does not implement is an error naming it, never silently ignored.
`unsupported_settings` lists them; `check_supported` runs at construction (verl builds engine
configs from Hydra / omegaconf through `omega_conf_to_dataclass`, which calls __post_init__) and
again in the engine. `engine_settings` turns either shape into the C++ engine's settings.

Used (FSDP shape): mixed_precision.param_dtype (the compute dtype), fsdp_size,
reshard_after_forward, forward_only, ulysses_sequence_parallel_size (a ("dp", "sp") device mesh as
verl's FSDP engine builds it; it must divide the world size and the model's attention heads,
checked when the engine is built), expert_parallel_size (experts split over groups of this many
consecutive ranks, as VeOmni's ("ep_fsdp", "ep") mesh; it must divide the world size and the
model's num_experts), param_offload / optimizer_offload (verl's BaseEngineCtx moves the engine
through engine.to around each phase; the same in the VeOmni shape), verl's micro-batching keys
(through verl's own prepare_micro_batches), and wrap_policy.transformer_layer_cls_to_wrap (verl's
FSDP2 wraps those classes instead of the model's _no_split_modules; checked like VeOmni's
basic_modules when the engine is built: only the decoder-layer class, the unit here, is accepted;
wrap_policy.disable and unknown wrap_policy keys are refused; min_num_params is accepted, verl's
FSDP2 does not read it either).
Accepted with no effect, because they change nothing in what verl.cpp computes: use_orig_params, use_torch_compile,
entropy_from_logits_with_chunking / entropy_from_logits_chunk_size / entropy_checkpointing (the
LM head always works in row chunks and recomputes them in backward), forward_prefetch and
use_no_sync_for_gradient_accumulation (collectives are blocking; gradients are reduced per
micro-batch, which sums the same values), seed / full_determinism (the engine is deterministic),
dtype (verl's FSDP engine reads mixed_precision, not dtype), turbo_config (fsdp_turbo only),
pad_to_length_bucket (read only with pad_to_length, which is refused).

VeOmni shape, as verl's VeOmniEngine (verl/workers/engine/veomni/transformer_impl.py) reads it:
fsdp_size, ulysses_parallel_size (= ulysses_sequence_parallel_size), expert_parallel_size,
mixed_precision (a bool there: true = bf16 compute over fp32 master weights, verl.cpp's bf16;
false = VeOmni's pure-bf16 parameters, refused; verl.cpp also takes the FSDP shape's dict
{param_dtype: fp32|bf16, ...} here, e.g. for fp32 runs), init_device (meta or cpu: both read
each rank's shard straight from the safetensors files onto the engine's device; cuda / npu are
refused, as in `verlcpp train`),
enable_full_shard (false: a whole replica per rank, gradients averaged, i.e. fsdp_size 1 as
`verlcpp train` has it), enable_reentrant (gradient checkpointing recomputes each layer either
way: same numbers), moe_implementation eager | fused (both run the one grouped implementation),
attn_implementation eager, sdpa and the flash-attention names (SDPA inside each packed sequence:
the same math; native-sparse is refused), ckpt_manager (verl's only value, "dcp"; verl.cpp writes
its own sharded layout, merged by `verlcpp merge --backend fsdp`), activation_offload_host_cache_
limit_gb (read only with enable_async_activation_offload, which is refused). Every kernel selector
(*_implementation) must be "eager" (qat_implementation "none"); basic_modules (extra FSDP units by
class name, added to the model's own no-split units) may name only the model's decoder-layer class,
already a unit, anything else is refused when the engine is built (it knows the model);
load_checkpoint_path, enable_fsdp_offload, force_use_huggingface,
enable_async_activation_offload and activation_offload_modules are refused when set.
"""
from dataclasses import dataclass, fields
from typing import Any, Optional

from verl.workers.config.engine import EngineConfig, FSDPEngineConfig, VeOmniEngineConfig

# field -> (the value we support, why the others are refused); both shapes
_UNSUPPORTED = {
    "offload_policy": (False, "FSDP2 CPU offload policy is not implemented in verl.cpp yet"),
    "use_fused_kernels": (False, "fused kernels are not implemented in verl.cpp (its LM head is chunked already)"),
    "pad_to_length": (False, "pad_to_length is not implemented in verl.cpp"),
    # VeOmni shape
    "load_checkpoint_path": (None, "load checkpoints through verl's trainer (resume_mode / load_checkpoint)"),
    "enable_fsdp_offload": (False, "FSDP CPU offload is not implemented in verl.cpp yet"),
    "force_use_huggingface": (False, "verl.cpp runs its own model code (checked against transformers'), never HF's modules"),
    "enable_async_activation_offload": (False, "activation offload is not implemented in verl.cpp"),
    "qat_implementation": ("none", "quantization-aware training is not implemented in verl.cpp"),
}

# VeOmni's kernel selectors: verl.cpp has one implementation of each, the eager math
_KERNEL_SELECTORS = (
    "cross_entropy_loss_implementation", "rms_norm_implementation", "swiglu_mlp_implementation",
    "rotary_pos_emb_implementation", "load_balancing_loss_implementation", "rms_norm_gated_implementation",
    "causal_conv1d_implementation", "chunk_gated_delta_rule_implementation", "dsa_indexer_implementation",
    "dsa_attention_implementation", "mhc_implementation",
)
# attention is SDPA inside each packed sequence on the CPU, the same math as these
_ATTN = {"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
         "veomni_flash_attention_2_with_sp", "veomni_flash_attention_3_with_sp", "veomni_flash_attention_4_with_sp"}

_PRECISIONS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


def _precision(value, what):
    key = str(value).lower().replace("torch.", "")
    if key not in _PRECISIONS:
        raise ValueError(f"verlcpp engine: {what}={value!r} is not supported (fp32 or bf16; fp16 is not implemented)")
    return _PRECISIONS[key]


@dataclass
class VerlcppEngineConfig(FSDPEngineConfig):
    """FSDPEngineConfig for the verl.cpp engine (`engine.strategy=verlcpp`), plus expert_parallel_size."""

    strategy: str = "verlcpp"
    # MoE models: experts split over groups of this many consecutive ranks (VeOmni's field)
    expert_parallel_size: int = 1

    def __post_init__(self):
        # FSDPEngineConfig.__post_init__ asserts an FSDP strategy; keep everything else it inherits.
        EngineConfig.__post_init__(self)
        if self.strategy != "verlcpp":
            raise ValueError(f"VerlcppEngineConfig: strategy must be 'verlcpp', got {self.strategy!r}")
        check_supported(self)


@dataclass
class VerlcppVeOmniEngineConfig(VeOmniEngineConfig):
    """VeOmniEngineConfig for the verl.cpp engine (`engine=verlcpp_veomni`)."""

    strategy: str = "verlcpp"
    # verl's engine/veomni.yaml sets true (bf16 compute over fp32 weights); the dataclass's false
    # (VeOmni's pure-bf16 parameters) is refused here, so the default follows the yaml
    mixed_precision: Any = True

    def __post_init__(self):
        # VeOmniEngineConfig.__post_init__ asserts strategy "veomni" and renames flash_attention_N to
        # veomni_flash_attention_N_with_sp; both names mean the same here.
        EngineConfig.__post_init__(self)
        if self.strategy != "verlcpp":
            raise ValueError(f"VerlcppVeOmniEngineConfig: strategy must be 'verlcpp', got {self.strategy!r}")
        check_supported(self)


def is_veomni(cfg) -> bool:
    """Whether `cfg` has VeOmni's shape (ulysses_parallel_size, init_device, ...) rather than FSDP's."""
    return isinstance(cfg, VeOmniEngineConfig) or hasattr(cfg, "ulysses_parallel_size")


def _positive_int(cfg, name, bad):
    v = getattr(cfg, name, 1)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        bad.append(f"{name}={v!r}: must be an integer >= 1")


def _mixed_precision_dict(mp, bad):
    if "param_dtype" in mp:
        _precision(mp["param_dtype"], "mixed_precision.param_dtype")
    for k in ("reduce_dtype", "buffer_dtype"):
        if k in mp and _precision(mp[k], f"mixed_precision.{k}") != "fp32":
            bad.append(f"mixed_precision.{k}={mp[k]!r}: verl.cpp reduces gradients and keeps buffers in fp32")
    extra = set(mp) - {"param_dtype", "reduce_dtype", "buffer_dtype", "_target_"}
    if extra:
        bad.append(f"mixed_precision keys {sorted(extra)}: unknown (param_dtype, reduce_dtype, buffer_dtype)")


def _veomni_unsupported(cfg, bad):
    mp = cfg.mixed_precision
    if isinstance(mp, bool):
        if not mp:
            bad.append("mixed_precision=False: VeOmni's pure-bf16 parameters are not implemented (verl.cpp keeps "
                       "fp32 master weights: mixed_precision=True for bf16 compute, or {param_dtype: fp32} for fp32)")
    elif hasattr(mp, "keys"):
        _mixed_precision_dict(mp, bad)
    else:
        bad.append(f"mixed_precision={mp!r}: expected true/false or {{param_dtype: fp32|bf16}}")
    init = str(cfg.init_device)
    if init not in ("meta", "cpu"):
        bad.append(f"init_device={init!r}: meta or cpu (both read each rank's shard straight from the safetensors "
                   "files onto the engine's device; as in `verlcpp train`)")
    if not cfg.enable_full_shard and cfg.fsdp_size not in (-1, 1):
        bad.append(f"enable_full_shard=False (a whole replica per rank) contradicts fsdp_size={cfg.fsdp_size}")
    moe = str(cfg.moe_implementation)
    if moe not in ("eager", "fused"):
        bad.append(f"moe_implementation={moe!r}: eager or fused (both run verl.cpp's grouped experts)")
    attn = str(cfg.attn_implementation)
    if attn not in _ATTN:
        bad.append(f"attn_implementation={attn!r}: not implemented (verl.cpp runs exact attention: "
                   f"{', '.join(sorted(_ATTN))})")
    for k in _KERNEL_SELECTORS:
        v = getattr(cfg, k, "eager")
        if v != "eager":
            bad.append(f"{k}={v!r}: verl.cpp has one implementation of each kernel (eager)")
    if cfg.ckpt_manager != "dcp":
        bad.append(f"ckpt_manager={cfg.ckpt_manager!r}: unknown (verl's only value is 'dcp')")
    if list(cfg.activation_offload_modules or []):
        bad.append(f"activation_offload_modules={list(cfg.activation_offload_modules)!r}: activation offload "
                   "is not implemented in verl.cpp")
    _positive_int(cfg, "ulysses_parallel_size", bad)


def unsupported_settings(cfg) -> list[str]:
    """The settings of `cfg` (either shape) that verl.cpp does not implement, each with the reason."""
    bad = []
    for name, (ok, why) in _UNSUPPORTED.items():
        if not hasattr(cfg, name):
            continue
        v = getattr(cfg, name)
        if v != ok and not (v is None and ok in (False, 1)):
            bad.append(f"{name}={v!r}: {why}")
    if _precision(getattr(cfg, "model_dtype", "fp32"), "model_dtype") != "fp32":
        bad.append(f"model_dtype={cfg.model_dtype!r}: verl.cpp keeps fp32 master weights (model_dtype fp32)")
    qat = getattr(cfg, "qat", None)
    if qat is not None and getattr(qat, "enable", False):
        bad.append("qat.enable=True: quantization-aware training is not implemented in verl.cpp")
    rr = getattr(cfg, "router_replay", None)
    mode = getattr(rr, "mode", "disabled") if rr is not None else "disabled"
    if mode != "disabled":
        bad.append(f"router_replay.mode={mode!r}: MoE router replay is not implemented in verl.cpp")
    if is_veomni(cfg):
        _veomni_unsupported(cfg, bad)
    else:
        if cfg.mixed_precision:
            _mixed_precision_dict(cfg.mixed_precision, bad)
        _positive_int(cfg, "ulysses_sequence_parallel_size", bad)
        wp = dict(cfg.wrap_policy or {})
        if wp.get("disable", False):
            bad.append("wrap_policy.disable=True: the whole model as one FSDP unit is not implemented (the units are "
                       "each decoder layer and the root)")
        extra = set(wp) - {"min_num_params", "transformer_layer_cls_to_wrap", "disable", "_target_"}
        if extra:
            bad.append(f"wrap_policy keys {sorted(extra)}: unknown (min_num_params, transformer_layer_cls_to_wrap, disable)")
    _positive_int(cfg, "expert_parallel_size", bad)
    return bad


def check_supported(cfg):
    bad = unsupported_settings(cfg)
    if bad:
        raise ValueError("verlcpp engine: unsupported settings: " + "; ".join(bad))


def compute_dtype(cfg) -> str:
    """The compute dtype verl's engine would use. FSDP shape: mixed_precision.param_dtype, bf16 when
    unset (FSDPEngine._build_fsdp_module). VeOmni shape: mixed_precision true = bf16 compute over fp32
    weights (VeOmni's MixedPrecisionConfig); a dict is read as in the FSDP shape."""
    mp = cfg.mixed_precision
    if isinstance(mp, bool):
        return "bf16"
    mp = mp or {}
    return _precision(mp.get("param_dtype", "bf16"), "mixed_precision.param_dtype")


def engine_settings(cfg) -> dict:
    """The C++ engine's parallel and precision settings from either shape (after check_supported)."""
    veomni = is_veomni(cfg)
    fsdp_size = int(cfg.fsdp_size)
    if veomni and not cfg.enable_full_shard:
        fsdp_size = 1  # a replica per rank: DDP
    sp = cfg.ulysses_parallel_size if veomni else cfg.ulysses_sequence_parallel_size
    return {
        "param_dtype": compute_dtype(cfg),
        # VeOmni's FSDP2 units reshard after forward (with enable_full_shard off there is nothing to reshard)
        "reshard_after_forward": True if veomni else bool(cfg.reshard_after_forward),
        "forward_prefetch": bool(cfg.forward_prefetch),
        "fsdp_size": fsdp_size,
        "forward_only": bool(cfg.forward_only),
        "ulysses_sequence_parallel_size": int(sp or 1),
        "expert_parallel_size": int(getattr(cfg, "expert_parallel_size", 1) or 1),
        # checked against the model when the engine is built (engine_config.h check_basic_modules)
        "basic_modules": _wrap_classes(cfg, veomni),
    }


def _wrap_classes(cfg, veomni) -> list[str]:
    """VeOmni's basic_modules, or FSDP's wrap_policy.transformer_layer_cls_to_wrap (a name or a list)."""
    if veomni:
        names = getattr(cfg, "basic_modules", None) or []
    else:
        names = dict(cfg.wrap_policy or {}).get("transformer_layer_cls_to_wrap") or []
    if isinstance(names, str):
        names = [names]
    return [str(m) for m in names]


def fsdp_field_names() -> list[str]:
    return [f.name for f in fields(FSDPEngineConfig)]
