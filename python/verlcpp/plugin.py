"""plugin.py — what `import verl` loads from the `verl.plugins` entry point (verl/__init__.py):
registers backend "verlcpp" with verl's EngineRegistry (verl/workers/engine/base.py) for
language_model and value_model on cuda and cpu, and the `cpu` platform (cpu_platform.py,
selected with VERL_PLATFORM=cpu).
Idempotent: the registry refuses a key twice, so a second call does nothing.
"""
_done = False


def register():
    global _done
    if _done:
        return
    _done = True
    from . import cpu_platform  # before verl.workers.engine, which resolves the platform at import

    cpu_platform.register()
    from verl.workers.engine.base import EngineRegistry

    from .engine import VerlcppEngine, VerlcppValueEngine

    for model_type, cls in (("language_model", VerlcppEngine), ("value_model", VerlcppValueEngine)):
        have = EngineRegistry._engines.get(model_type, {}).get("verlcpp", {})
        devices = [d for d in ("cuda", "cpu") if d not in have]
        if devices:
            EngineRegistry.register(model_type=model_type, backend="verlcpp", device=devices)(cls)


register()
