"""verlcpp — verl.cpp's C++ model engine as a verl engine backend.

    pip install --no-build-isolation .      # builds verlcpp._C against the installed torch
    ... engine=verlcpp                      # verl's SFT trainer (Hydra group engine/verlcpp.yaml)
    ... actor_rollout_ref.actor.strategy=verlcpp critic.strategy=verlcpp   # PPO

At `import verl`, verl loads the `verl.plugins` entry point `verlcpp = verlcpp.plugin`, which
registers backend "verlcpp" for language_model and value_model on cuda and cpu, the `cpu`
platform (VERL_PLATFORM=cpu), and the Hydra config. The same registration happens when verl
is told `VERL_USE_EXTERNAL_MODULES=verlcpp`.
"""
# The cpu platform first: importing verl.workers.engine already resolves the platform.
from . import cpu_platform as _cpu_platform  # noqa: F401,E402  (registers at import)
from .config import VerlcppEngineConfig, VerlcppVeOmniEngineConfig  # noqa: F401,E402
from . import plugin as _plugin  # noqa: F401,E402  (registers the backend)


def __getattr__(name):
    if name in ("VerlcppEngine", "VerlcppValueEngine"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
