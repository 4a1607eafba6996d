"""engine.py — VerlcppEngine: verl's BaseEngine (verl/workers/engine/base.py) over the C++ engine.

verl's trainers (SFT trainer, TrainingWorker in PPO) drive engines through BaseEngine; this
class is registered as backend "verlcpp" for `language_model` and `value_model`, so
`engine.strategy=verlcpp` selects it. It mirrors FSDPEngineWithLMHead / FSDPEngineWithValueHead
(verl/workers/engine/fsdp/transformer_impl.py) step for step, with the model itself in C++:

  forward_backward_batch   verl's own code: global loss-token count (all-reduced over dp),
                           prepare_micro_batches (fixed or token-balanced), postprocess_batch_func
  forward_step             packed row of the micro-batch -> C++ forward (FSDP units gathered just
                           in time, chunked LM head) -> nested log_probs / entropy / values that
                           carry autograd into the C++ graph -> verl's Python loss_function
  backward                 loss.backward() here runs the C++ backward (re-gather, reduce-scatter)
  optimizer_step           C++ AdamW on the fp32 shards, global grad-norm clip, skip if not finite
  checkpoints              verl.cpp's sharded layout in verl's folders (`verlcpp merge` merges it)

Parallel layout, as FSDPEngine._init_device_mesh: FSDP shards over torch.distributed's WORLD
group. With ulysses_sequence_parallel_size = sp > 1 a DeviceMesh (dp = world / sp, sp) with dims
("dp", "sp") is built here, as verl builds it; the data-parallel rank / size / group verl's
trainers see are its "dp" dimension (the ranks of an sp group are given the same data), and the
outputs are collected from the first rank of each sp group (is_mp_src_rank_with_outputs). The C++
side runs its collectives on these same groups (gloo for CPU tensors), resolved by their names,
through shared memory when every rank is on one host. With expert_parallel_size = ep > 1 (MoE models;
VeOmni's field) the experts of each sparse layer are split over groups of ep consecutive ranks, as
VeOmni's ("ep_fsdp", "ep") mesh: the C++ engine makes those groups itself (shared-memory sub-groups,
like the shard / replica groups of hybrid sharding), and data parallelism stays world / sp.
The engine config is either shape verl has (config.py): FSDPEngineConfig's or VeOmniEngineConfig's.
"""
import json
import os
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tensordict import NonTensorData, TensorDict

from verl.utils import tensordict_utils as tu
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.workers.engine.base import BaseEngine, BaseEngineCtx
from verl.workers.engine.utils import postprocess_batch_func, prepare_micro_batches

from . import config as vconfig


def _ext():
    from . import _C  # the extension is loaded only when an engine is built

    return _C


def _collective_timeout_s() -> float:
    v = os.environ.get("VERLCPP_COLLECTIVE_TIMEOUT_S", "1800")
    try:
        t = float(v)
    except ValueError:
        raise ValueError(f"VERLCPP_COLLECTIVE_TIMEOUT_S={v!r}: expected a number of seconds") from None
    if not t > 0:
        raise ValueError(f"VERLCPP_COLLECTIVE_TIMEOUT_S={v!r}: must be positive")
    return t


def _optimizer_settings(opt) -> dict:
    """verl's FSDPOptimizerConfig -> the C++ AdamW and LR schedule (what build_optimizer and
    FSDPEngine._build_lr_scheduler make of it); anything else is refused by name."""
    if opt is None:
        return {}
    if hasattr(opt, "lr_decay_ratio"):
        return _veomni_optimizer_settings(opt)
    name = str(getattr(opt, "optimizer", "AdamW"))
    impl = str(getattr(opt, "optimizer_impl", "torch.optim"))
    if name.lower() != "adamw" or impl != "torch.optim":
        raise ValueError(f"verlcpp engine: optimizer {impl}.{name} is not supported (torch.optim AdamW only)")
    extra = dict(getattr(opt, "override_optimizer_config", None) or {})
    eps = extra.pop("eps", 1e-8)
    if extra:
        raise ValueError(f"verlcpp engine: override_optimizer_config keys {sorted(extra)} are not supported (eps only)")
    sched = str(getattr(opt, "lr_scheduler_type", "constant"))
    if getattr(opt, "warmup_style", None):
        sched = str(opt.warmup_style)
    if sched not in ("constant", "cosine"):
        raise ValueError(f"verlcpp engine: lr_scheduler_type={sched!r} is not supported (constant, cosine), as in verl's FSDP engine")
    clip = float(opt.clip_grad)
    if not clip > 0:
        raise ValueError(f"verlcpp engine: clip_grad={clip} (verl's FSDP engine would zero every gradient); use a positive norm")
    betas = list(opt.betas)
    return {
        "lr": float(opt.lr),
        "betas": [float(b) for b in betas],
        "eps": float(eps),
        "weight_decay": float(opt.weight_decay),
        "grad_clip": clip,
        "lr_scheduler_type": sched,
        "total_training_steps": int(opt.total_training_steps),
        "lr_warmup_steps": int(opt.lr_warmup_steps if opt.lr_warmup_steps is not None else -1),
        "lr_warmup_steps_ratio": float(opt.lr_warmup_steps_ratio),
        "min_lr_ratio": float(getattr(opt, "min_lr_ratio", None) or 0.0),
        "num_cycles": float(getattr(opt, "num_cycles", 0.5)),
        "zero_indexed_step": bool(getattr(opt, "zero_indexed_step", True)),
    }


def _veomni_optimizer_settings(opt) -> dict:
    """verl's VeOmniOptimizerConfig -> the C++ AdamW: what verl's VeOmniEngine builds with VeOmni's
    build_optimizer (torch AdamW, eps 1e-8, every parameter decayed) and build_lr_scheduler. Only the
    constant schedule without warmup is taken; VeOmni's warmup (from lr_start) and decay schedules
    (lr_min, lr_decay_ratio) are refused by name."""
    name = str(opt.optimizer)
    if name != "adamw":
        raise ValueError(f"verlcpp engine: optim.optimizer={name!r} is not supported (adamw only)")
    if dict(opt.override_optimizer_config or {}):
        raise ValueError("verlcpp engine: optim.override_optimizer_config is not supported with the VeOmni "
                         "optimizer config (verl's VeOmni engine does not read it either)")
    sched = str(opt.lr_scheduler_type)
    if sched != "constant":
        raise ValueError(f"verlcpp engine: optim.lr_scheduler_type={sched!r}: VeOmni's decay schedules (lr_min, "
                         "lr_decay_ratio) are not implemented; use constant, or optim=fsdp for verl's cosine")
    warm = opt.lr_warmup_steps
    if float(opt.lr_warmup_steps_ratio) != 0 or (warm is not None and int(warm) > 0):
        raise ValueError("verlcpp engine: optim.lr_warmup_steps_ratio / lr_warmup_steps: VeOmni's warmup (from "
                         "lr_start) is not implemented; use no warmup, or optim=fsdp for verl's warmup")
    clip = float(opt.clip_grad)
    if not clip > 0:
        raise ValueError(f"verlcpp engine: clip_grad={clip}; use a positive norm")
    return {
        "lr": float(opt.lr),
        "betas": [float(b) for b in list(opt.betas)],
        "eps": 1e-8,
        "weight_decay": float(opt.weight_decay),
        "grad_clip": clip,
        "lr_scheduler_type": "constant",
        "total_training_steps": int(opt.total_training_steps),
    }


def _model_settings(model_config) -> dict:
    if getattr(model_config, "lora_rank", 0) > 0:
        raise ValueError("verlcpp engine: LoRA (model.lora_rank > 0) is not implemented yet")
    if getattr(model_config, "enable_activation_offload", False):
        raise ValueError("verlcpp engine: model.enable_activation_offload is not implemented")
    if getattr(model_config, "use_fused_kernels", False):
        raise ValueError("verlcpp engine: model.use_fused_kernels is not implemented (the LM head is chunked already)")
    path = getattr(model_config, "local_path", None) or model_config.path
    hf_cfg = getattr(model_config, "local_hf_config_path", None) or ""
    return {
        "model_path": str(path),
        "hf_config_path": str(hf_cfg) if hf_cfg and str(hf_cfg) != str(path) else "",
        "gradient_checkpointing": bool(getattr(model_config, "enable_gradient_checkpointing", False)),
    }


def _per_token(value, lengths: torch.Tensor, what: str) -> torch.Tensor:
    """A scalar or per-sample [B] value spread over each sample's tokens (verl_F.expand_as_nested)."""
    if isinstance(value, torch.Tensor):
        v = value.detach().to("cpu", torch.float32).reshape(-1)
        if v.numel() != lengths.numel():
            raise ValueError(f"verlcpp engine: '{what}' has {v.numel()} values for {lengths.numel()} samples")
        return torch.repeat_interleave(v, lengths)
    return torch.full((int(lengths.sum()),), float(value), dtype=torch.float32)


def _multi_modal_inputs(micro_batch: TensorDict, input_ids, token_ids) -> list:
    """verl's per-sample multi_modal_inputs (the batch's non-tensor part; None or {} for a text-only
    sample) as one dict of tensors per sample, for the C++ engine (which runs the vision tower on
    them and places the features at the image / video tokens). `mm_token_type_ids` (transformers
    >= 5.3 processors) only marks the image (1) and video (2) tokens the engine finds by id: it is
    checked against the ids and not passed on. Returns [] when no sample has any."""
    raw = micro_batch.get("multi_modal_inputs", None)
    if raw is None:
        return []
    items = [x.data if isinstance(x, NonTensorData) else x for x in raw]
    if len(items) != input_ids.size(0):
        raise ValueError(f"verlcpp engine: multi_modal_inputs has {len(items)} entries for {input_ids.size(0)} samples")
    out, any_media = [], False
    for i, item in enumerate(items):
        if item is None:
            out.append({})
            continue
        if not isinstance(item, dict):
            raise TypeError(f"verlcpp engine: multi_modal_inputs[{i}] is a {type(item).__name__}, expected a dict")
        d = {}
        for k, v in item.items():
            if v is None:
                continue
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"verlcpp engine: multi_modal_inputs[{i}]['{k}'] is a {type(v).__name__}, expected a tensor")
            if k == "mm_token_type_ids":
                ids = input_ids[i]
                image_id, video_id = token_ids
                want = (ids == image_id).to(torch.long) + 2 * (ids == video_id).to(torch.long)
                if v.reshape(-1).numel() != ids.numel() or not torch.equal(v.reshape(-1).to(torch.long).cpu(), want.cpu()):
                    raise ValueError(f"verlcpp engine: multi_modal_inputs[{i}]['mm_token_type_ids'] does not mark the "
                                     f"image ({image_id}) and video ({video_id}) tokens of its input_ids")
                continue
            d[k] = v
        any_media |= bool(d)
        out.append(d)
    return out if any_media else []


class VerlcppEngineCtx(BaseEngineCtx):
    """train_mode / eval_mode: BaseEngineCtx (its offload and reload through engine.to), and in
    training the gradients are zeroed on exit as EngineTrainModeCtx does."""

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self.mode == "train" and (self.zero_grad_on_exit or exc_type is not None):
            self.engine.optimizer_zero_grad()
        super().__exit__(exc_type, exc_val, exc_tb)


class VerlcppEngine(BaseEngine):
    """verl.cpp's engine for a causal LM (log-probs, entropy); VerlcppValueEngine for critics."""

    value_model = False

    def __init__(self, model_config, engine_config, optimizer_config, checkpoint_config):
        super().__init__()
        vconfig.check_supported(engine_config)
        self.model_config = model_config
        self.engine_config = engine_config
        self.optimizer_config = optimizer_config
        self.checkpoint_config = checkpoint_config
        self.mode = None
        self._cpp = None
        hf = getattr(model_config, "hf_config", None)
        self._image_token_ids = (getattr(hf, "image_token_id", None), getattr(hf, "video_token_id", None))
        if not dist.is_initialized():
            raise RuntimeError("verlcpp engine: torch.distributed is not initialised (verl's trainers do this; "
                               "under torchrun call torch.distributed.init_process_group first)")
        self._init_device_mesh()

    def _init_device_mesh(self):
        """verl's FSDPEngine._init_device_mesh: the ("dp", "sp") mesh when sp > 1."""
        settings = vconfig.engine_settings(self.engine_config)
        sp = settings["ulysses_sequence_parallel_size"]
        sp_name = "ulysses_parallel_size" if vconfig.is_veomni(self.engine_config) else "ulysses_sequence_parallel_size"
        world = dist.get_world_size()
        if sp < 1 or world % sp != 0:
            raise ValueError(f"verlcpp engine: {sp_name}={sp} must be >= 1 and divide the world size ({world} ranks)")
        ep = settings["expert_parallel_size"]
        if ep < 1 or world % ep != 0:
            raise ValueError(f"verlcpp engine: expert_parallel_size={ep} must be >= 1 and divide the world size "
                             f"({world} ranks)")
        self.ulysses_sequence_parallel_size = sp
        self.ulysses_device_mesh = None
        if sp > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from verl.utils.device import get_device_name

            self.ulysses_device_mesh = init_device_mesh(
                get_device_name(), mesh_shape=(world // sp, sp), mesh_dim_names=["dp", "sp"]
            )

    # ---- building -------------------------------------------------------------------------
    def initialize(self):
        from verl.utils.device import get_device_name

        device = get_device_name()
        if device == "cuda":
            # This worker's GPU (verl sets it to the local rank's before building engines).
            device = f"cuda:{torch.cuda.current_device()}"
        elif device != "cpu":
            raise NotImplementedError(f"verlcpp engine: device '{device}': the engine computes on cpu or cuda")
        self._device = torch.device(device)
        ec = self.engine_config
        settings = vconfig.engine_settings(ec)
        settings["device"] = device
        settings.update(_model_settings(self.model_config))
        if not ec.forward_only:
            settings.update(_optimizer_settings(self.optimizer_config))
        sp_name = dp_name = ""
        if self.ulysses_device_mesh is not None:
            sp_name = self.ulysses_device_mesh.get_group(mesh_dim="sp").group_name
            dp_name = self.ulysses_device_mesh.get_group(mesh_dim="dp").group_name
        self._cpp = _ext().Engine(json.dumps(settings), dist.group.WORLD.group_name, _collective_timeout_s(),
                                  sp_group_name=sp_name, dp_group_name=dp_name)
        if dist.get_rank() == 0:
            print(f"verlcpp engine: {dist.get_world_size()} ranks, ulysses sp={self._cpp.sp_size}, "
                  f"dp={self._cpp.dp_size}, expert parallel ep={self._cpp.ep_size}, collectives {self._cpp.comm_name}",
                  flush=True)
        if self._cpp.is_value_model != self.value_model:
            kind = "a value model (...ForTokenClassification, num_labels=1)" if self.value_model else "a causal LM"
            raise ValueError(f"verlcpp engine: {settings['model_path']} is not {kind}")

    # verl's BaseEngineCtx moves the engine with these around each train / eval phase
    # (engine.to: shards and gradients / AdamW state to pinned host memory and back); on the CPU
    # platform the engine already lives in host memory and the moves are no-ops.
    @property
    def is_param_offload_enabled(self) -> bool:
        return bool(self.engine_config.param_offload)

    @property
    def is_optimizer_offload_enabled(self) -> bool:
        return bool(self.engine_config.optimizer_offload)

    def train_mode(self, **kwargs):
        return VerlcppEngineCtx(self, "train", **kwargs)

    def eval_mode(self, **kwargs):
        return VerlcppEngineCtx(self, "eval", **kwargs)

    # ---- parallel layout ------------------------------------------------------------------
    def get_data_parallel_rank(self):
        if self.ulysses_device_mesh is not None:
            return self.ulysses_device_mesh["dp"].get_local_rank()
        return dist.get_rank()

    def get_data_parallel_size(self):
        return dist.get_world_size() // self.ulysses_sequence_parallel_size

    def get_data_parallel_group(self):
        if self.ulysses_device_mesh is not None:
            return self.ulysses_device_mesh.get_group(mesh_dim="dp")
        return dist.group.WORLD

    def is_mp_src_rank_with_outputs(self):
        if self.ulysses_device_mesh is not None:
            return self.ulysses_device_mesh["sp"].get_local_rank() == 0
        return True

    # ---- forward / backward ---------------------------------------------------------------
    def forward_backward_batch(self, data: TensorDict, loss_function: Callable, forward_only=False):
        tu.assign_non_tensor(data, sp_size=self.ulysses_sequence_parallel_size)
        return_model_output = tu.get_non_tensor_data(data=data, key="return_model_output", default=False)
        # On the data's device (the worker's: an NCCL group reduces device tensors only).
        batch_num_tokens = data["loss_mask"].sum().to(torch.int64)
        dist.all_reduce(batch_num_tokens, op=dist.ReduceOp.SUM, group=self.get_data_parallel_group())
        tu.assign_non_tensor(data, batch_num_tokens=batch_num_tokens.item())
        tu.assign_non_tensor(data, dp_size=self.get_data_parallel_size())
        micro_batches, indices = prepare_micro_batches(
            data=data, dp_group=self.get_data_parallel_group(), same_micro_num_in_dp=True
        )
        outputs = []
        ctx = torch.no_grad() if forward_only else nullcontext()
        for micro_batch in micro_batches:
            with ctx:
                loss, meta = self.forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
                if not forward_only:
                    loss.backward()
                    if not return_model_output:
                        meta.pop("model_output", None)
            outputs.append(meta)
        return postprocess_batch_func(output_lst=outputs, indices=indices, data=data)

    def _model_output(self, micro_batch: TensorDict) -> dict:
        pad_mode = tu.get_non_tensor_data(data=micro_batch, key="pad_mode", default=DatasetPadMode.NO_PADDING)
        if pad_mode != DatasetPadMode.NO_PADDING:
            raise NotImplementedError(f"verlcpp engine: pad_mode {pad_mode} is not supported (no_padding)")
        for key in ("calculate_sum_pi_squared", "distillation_use_topk", "distillation_only"):
            if tu.get_non_tensor_data(data=micro_batch, key=key, default=False):
                raise NotImplementedError(f"verlcpp engine: {key}=True is not implemented yet")
        calculate_entropy = bool(tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False))
        input_ids = micro_batch["input_ids"]
        position_ids = micro_batch["position_ids"]
        cu_seqlens = input_ids.offsets().to(torch.int64)
        lengths = cu_seqlens.diff()
        # Vision-language samples: verl's position_ids are [bsz, 4, j] (text row + 3 mRoPE rows),
        # packed here to [4, nnz] as FSDPEngineWithLMHead.prepare_model_inputs packs them.
        positions = position_ids.values()
        multi_modal = _multi_modal_inputs(micro_batch, input_ids, self._image_token_ids)
        temperature = micro_batch["temperature"] if "temperature" in micro_batch.keys() else 1.0
        out = self._cpp.forward_micro(
            input_ids.values(), cu_seqlens, positions, _per_token(temperature, lengths, "temperature"),
            calculate_entropy and not self.value_model, multi_modal,
        )
        nested = lambda t: torch.nested.nested_tensor_from_jagged(t, cu_seqlens)  # noqa: E731
        if self.value_model:
            return {"values": nested(out["values"])}
        model_output = {"log_probs": nested(out["log_probs"])}
        if calculate_entropy:
            model_output["entropy"] = nested(out["entropy"])
        return model_output

    def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
        model_output = self._model_output(micro_batch)
        if loss_function is not None:
            loss, metrics = loss_function(model_output=model_output, data=micro_batch, dp_group=self.get_data_parallel_group())
        else:
            assert forward_only, "forward_only must be True when loss_function is None"
            loss, metrics = torch.tensor(1.0), {}
        detached = {k: v.detach() for k, v in model_output.items()}
        return loss, {"model_output": detached, "loss": loss.detach().item(), "metrics": metrics}

    # ---- optimizer ------------------------------------------------------------------------
    def optimizer_zero_grad(self):
        self._cpp.zero_grad()

    def optimizer_step(self):
        grad_norm, stepped = self._cpp.optimizer_step()
        if not stepped:
            print(f"WARN: grad_norm is not finite: {grad_norm}")
        return grad_norm

    def lr_scheduler_step(self):
        return self._cpp.lr_scheduler_step()

    def to(self, device: str, model: bool = True, optimizer: bool = True, grad: bool = True):
        super().to(device=device, model=model, optimizer=optimizer, grad=grad)
        if not (model or optimizer):
            return
        # FSDPEngine.to: the model's shards (and gradients) and the optimizer state between the
        # host and this worker's device ("cuda" is this engine's own GPU).
        target = "cpu" if torch.device(device).type == "cpu" else str(self._device)
        self._cpp.to(target, model=model, optimizer=optimizer)

    # ---- weights out ----------------------------------------------------------------------
    def get_per_tensor_param(self, **kwargs):
        """(generator of (HF name, full fp32 tensor), None): one FSDP unit is gathered at a time (under
        expert parallelism a layer's experts come from every rank of its ep group). A collective: every
        rank must run the generator to the end."""
        cpp = self._cpp

        def gen():
            for i in range(cpp.num_units()):
                for name, t in cpp.unit_params(i):
                    yield name, t

        return gen(), None

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, local_path: str, hdfs_path: Optional[str] = None, global_step: int = 0,
                        max_ckpt_to_keep: Optional[int] = None, **kwargs) -> None:
        if hdfs_path:
            raise NotImplementedError("verlcpp engine: hdfs_path is not supported; save locally")
        self._cpp.save_checkpoint(str(local_path), int(global_step), json.dumps({"global_step": int(global_step)}))

    def load_checkpoint(self, local_path: str, hdfs_path: Optional[str] = None, del_local_after_load: bool = True,
                        **kwargs) -> None:
        if hdfs_path:
            raise NotImplementedError("verlcpp engine: hdfs_path is not supported; load locally")
        self._cpp.load_checkpoint(str(local_path))


class VerlcppValueEngine(VerlcppEngine):
    """The critic: per-token values from a ...ForTokenClassification (num_labels=1) model."""

    value_model = True
