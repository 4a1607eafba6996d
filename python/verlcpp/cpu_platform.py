# A "cpu" platform for verl (0.9.1), so that `VERL_PLATFORM=cpu` runs verl's own trainers and
# workers on a machine without GPUs (gloo collectives, CPU tensors). It mirrors verl's
# verl/plugin/platform/platform_cuda.py (PlatformCUDA) with a torch.cuda-like device module for the
# CPU, and patches, from outside verl (each patch below names the verl file:line it addresses):
#   - verl/utils/distributed.py:63,83  process-group backend "cpu:gloo,cpu:gloo" -> "gloo"
#   - verl/workers/engine/base.py:399  fsdp/fsdp2 engines (registered for cuda/npu) also serve device cpu
#   - verl/utils/model.py:645-650      the critic's value-head model loads with the config's attention
#                                      (sdpa) instead of a hard-coded flash_attention_2
# Every patch only acts while the platform is "cpu"; on other platforms verl's code runs unchanged.
#
# Loaded by verl at `import verl`, either through the `verl.plugins` entry point (the verlcpp package
# calls register(); it must do so before anything imports verl.workers.engine, whose import already
# resolves the platform) or with VERL_USE_EXTERNAL_MODULES=verlcpp.cpu_platform (verl/__init__.py:49-52
# only imports the module, so importing it registers). It imports nothing else from verlcpp.

import importlib.abc
import importlib.util
import os
import sys
import types
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Optional

import torch

PLATFORM_NAME = "cpu"
_registered = False


# ---------------------------------------------------------------------------
# torch.cuda-like device module. verl calls these through get_torch_device() (verl/utils/device.py:107):
# empty_cache, synchronize, is_available, current_stream, stream, Stream, Event, set_device, device_count,
# mem_get_info, memory_allocated/reserved (+ max_), get_rng_state/set_rng_state, manual_seed, ipc_collect,
# set_per_process_memory_fraction, get_device_name. Memory queries answer 0 (there is no device memory).
# ---------------------------------------------------------------------------
def _make_device_module() -> types.ModuleType:
    m = types.ModuleType("verlcpp_cpu_device", "torch.cuda-like shim over torch.cpu for verl's cpu platform")
    cpu = torch.cpu

    # what torch.cpu already has (streams and events are no-op stand-ins there)
    m.is_available = lambda: True
    m.synchronize = lambda device=None: None
    m.current_stream = cpu.current_stream
    m.stream = cpu.stream
    m.Stream = cpu.Stream
    m.Event = cpu.Event
    m.StreamContext = cpu.StreamContext
    m.device_count = lambda: 1
    m.current_device = lambda: 0
    m.set_device = lambda device=None: None
    m.get_device_name = lambda device=None: "CPU"
    m.get_device_capability = lambda device=None: (None, None)
    m.get_device_properties = lambda device=None: types.SimpleNamespace(name="CPU", total_memory=0)

    # memory: no device memory to report, nothing cached to free
    m.empty_cache = lambda: None
    m.ipc_collect = lambda: None
    m.set_per_process_memory_fraction = lambda fraction, device=None: None
    m.mem_get_info = lambda device=None: (0, 0)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(m, name, lambda device=None: 0)
    m.reset_peak_memory_stats = lambda device=None: None
    m.memory_stats = lambda device=None: {}

    # random numbers: the CPU generator is the only one
    m.manual_seed = lambda seed: torch.manual_seed(seed)
    m.manual_seed_all = lambda seed: torch.manual_seed(seed)
    m.seed = torch.seed
    m.initial_seed = torch.initial_seed
    m.get_rng_state = lambda device="cpu": torch.get_rng_state()
    m.set_rng_state = lambda new_state, device="cpu": torch.set_rng_state(new_state)
    m.get_rng_state_all = lambda: [torch.get_rng_state()]
    m.set_rng_state_all = lambda states: torch.set_rng_state(states[0])

    # profiling stand-ins (torch.cuda.nvtx / torch.cuda.profiler)
    m.nvtx = types.SimpleNamespace(range_push=lambda msg: None, range_pop=lambda: None, mark=lambda msg: None)
    m.profiler = types.SimpleNamespace(start=lambda: None, stop=lambda: None)
    return m


def _make_platform_class():
    from verl.plugin.platform import PlatformBase

    class PlatformCPU(PlatformBase):
        """verl platform for CPU-only processes: device 'cpu', collectives over gloo."""

        _device_module = _make_device_module()

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return self._device_module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            # never auto-detected: chosen only with VERL_PLATFORM=cpu (platform_manager.py:99-102)
            return False

        def current_device(self) -> str:
            # verl passes get_device_id() (verl/utils/device.py:112) straight to .to() / device= (e.g.
            # verl/utils/fsdp_utils.py:507, fsdp/transformer_impl.py:730,935), where an int means a CUDA
            # device: answer the device "cpu" itself.
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: Optional[int] = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
            return {"num_cpus": num_gpus}

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def cudart(self) -> Any:
            return None

    return PlatformCPU


# ---------------------------------------------------------------------------
# Process-group patches. verl/utils/distributed.py:63 (initialize_global_process_group, used by
# verl/trainer/sft_trainer.py:453) and :83 (initialize_global_process_group_ray, used by
# verl/workers/engine_workers.py:89 in TrainingWorker.__init__) build
# f"cpu:gloo,{device}:{backend}", which is "cpu:gloo,cpu:gloo" on the cpu platform and rejected by
# torch.distributed. On the cpu platform the backend becomes plain "gloo"; elsewhere verl's own
# function runs unchanged.
# ---------------------------------------------------------------------------
def _on_cpu_platform() -> bool:
    from verl.utils.device import get_device_name

    return get_device_name() == "cpu"


def _patch_process_group_init() -> None:
    import verl.utils.distributed as vdist

    if getattr(vdist, "_verlcpp_cpu_patched", False):
        return
    orig_global = vdist.initialize_global_process_group
    orig_ray = vdist.initialize_global_process_group_ray

    def initialize_global_process_group(timeout_second=36000):
        if not _on_cpu_platform():
            return orig_global(timeout_second)
        # verl/utils/distributed.py:62-75, with backend "gloo" instead of "cpu:gloo,cpu:gloo"
        torch.distributed.init_process_group(
            backend="gloo",
            timeout=timedelta(seconds=timeout_second),
            init_method=os.environ.get("DIST_INIT_METHOD", None),
        )
        return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if not _on_cpu_platform():
            return orig_ray(timeout_second=timeout_second, backend=backend)
        # verl/utils/distributed.py:78-95; any "cpu:gloo[,cpu:gloo]" request is plain gloo here
        if backend is None or all(part.split(":")[-1] == "gloo" for part in backend.split(",")):
            backend = "gloo"
        return orig_ray(timeout_second=timeout_second, backend=backend)

    vdist.initialize_global_process_group = initialize_global_process_group
    vdist.initialize_global_process_group_ray = initialize_global_process_group_ray
    vdist._verlcpp_cpu_patched = True

    # modules that did `from verl.utils.distributed import initialize_global_process_group_ray` before
    # this patch ran hold the old function: rebind it there too (engine_workers.py:38,
    # checkpoint_engine/base.py:25)
    for modname in ("verl.workers.engine_workers", "verl.checkpoint_engine.base"):
        mod = sys.modules.get(modname)
        if mod is not None and getattr(mod, "initialize_global_process_group_ray", None) is orig_ray:
            mod.initialize_global_process_group_ray = initialize_global_process_group_ray


# ---------------------------------------------------------------------------
# Patches applied when a verl module is first imported (importing verl's engines at `import verl` time
# would cost seconds and pull in megatron): a one-shot meta-path finder runs `fn(module)` right after
# the named module has executed.
# ---------------------------------------------------------------------------
class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, fn = spec.loader.exec_module, self.fn

        def exec_then_patch(module):
            exec_module(module)
            fn(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def _after_import(name, fn) -> None:
    if name in sys.modules:
        fn(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, fn))


def _patch_engine_registry(base) -> None:
    # verl/workers/engine/fsdp/transformer_impl.py:1143,1594 register the fsdp/fsdp2 engines for devices
    # cuda and npu only, so EngineRegistry.get_engine_cls (verl/workers/engine/base.py:399) finds none for
    # device "cpu". Those engines run on CPU tensors as they are: on the cpu platform, a backend with no
    # "cpu" registration falls back to its "cuda" one. VERL_ENGINE_DEVICE, if set, still wins.
    registry = base.EngineRegistry
    orig = registry.get_engine_cls.__func__

    def get_engine_cls(cls, model_type, backend):
        if _on_cpu_platform() and not os.getenv("VERL_ENGINE_DEVICE"):
            by_device = cls._engines.get(model_type, {}).get(backend, {})
            if "cpu" not in by_device and "cuda" in by_device:
                return by_device["cuda"]
        return orig(cls, model_type, backend)

    registry.get_engine_cls = classmethod(get_engine_cls)


def _patch_valuehead_loader(vmodel) -> None:
    # verl/utils/model.py:645-650 (load_valuehead_model, called from
    # verl/workers/engine/fsdp/transformer_impl.py:300 for a critic) hard-codes
    # attn_implementation="flash_attention_2", which fails without flash-attn; on the cpu platform load the
    # AutoModelForTokenClassification with the config's own attention (sdpa from model.override_config).
    orig = vmodel.load_valuehead_model

    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        if not _on_cpu_platform():
            return orig(local_path, torch_dtype, model_config, trust_remote_code)
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            pretrained_model_name_or_path=local_path,
            torch_dtype=torch_dtype,
            config=model_config,
            attn_implementation=getattr(model_config, "_attn_implementation", None) or "sdpa",
            trust_remote_code=trust_remote_code,
        )

    vmodel.load_valuehead_model = load_valuehead_model


def register() -> None:
    """Register the 'cpu' platform with verl's PlatformRegistry and patch process-group init. Idempotent."""
    global _registered
    if _registered:
        return
    from verl.plugin.platform import PlatformRegistry

    PlatformRegistry.register(platform=PLATFORM_NAME)(_make_platform_class())
    _patch_process_group_init()
    _after_import("verl.workers.engine.base", _patch_engine_registry)
    _after_import("verl.utils.model", _patch_valuehead_loader)
    _registered = True


# VERL_USE_EXTERNAL_MODULES=verlcpp.cpu_platform only imports this module (verl/utils/import_utils.py
# import_external_libs), so registering happens at import.
register()
