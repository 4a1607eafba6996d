"""test_verlcpp_config.py — verlcpp's verl engine config against verl's own (verl 0.9.1):
VerlcppEngineConfig has FSDPEngineConfig's fields and defaults; engine/verlcpp.yaml matches
verl's engine/fsdp.yaml; every setting verl.cpp does not implement is refused by name; verl's
SFT trainer config composes with `engine=verlcpp` through the Hydra search-path plugin, and the
backend is registered with verl's EngineRegistry for both model types.
    PYTHONPATH=<build>/python python test_verlcpp_config.py
"""
import dataclasses
import os
import unittest

import yaml

import verl  # noqa: F401  (loads the plugins)
import verlcpp
from verl.workers.config.engine import FSDPEngineConfig
from verlcpp.config import VerlcppEngineConfig


class ConfigTest(unittest.TestCase):
    def test_fields_and_defaults_are_fsdps(self):
        ours = {f.name: f for f in dataclasses.fields(VerlcppEngineConfig)}
        theirs = {f.name: f for f in dataclasses.fields(FSDPEngineConfig)}
        self.assertEqual(sorted(ours), sorted(theirs))
        a, b = VerlcppEngineConfig(), FSDPEngineConfig()
        for name in theirs:
            if name == "strategy":
                continue
            self.assertEqual(getattr(a, name), getattr(b, name), name)
        self.assertEqual(a.strategy, "verlcpp")

    def test_yaml_matches_verls_fsdp_yaml(self):
        here = os.path.dirname(verlcpp.__file__)
        ours = yaml.safe_load(open(os.path.join(here, "hydra_config", "engine", "verlcpp.yaml")))
        verl_dir = os.path.dirname(verl.__file__)
        theirs = yaml.safe_load(open(os.path.join(verl_dir, "trainer", "config", "engine", "fsdp.yaml")))
        fields = {f.name for f in dataclasses.fields(FSDPEngineConfig)}
        for k, v in ours.items():
            if k == "_target_":
                self.assertEqual(v, "verlcpp.VerlcppEngineConfig")
                continue
            self.assertIn(k, fields, f"verlcpp.yaml key {k} is not an FSDPEngineConfig field")
            if k not in ("strategy", "mixed_precision", "qat", "turbo_config"):
                self.assertEqual(v, theirs.get(k), k)

    def test_unsupported_settings_are_refused_by_name(self):
        cases = {
            "offload_policy": True,
            "ulysses_sequence_parallel_size": 0,
            "use_fused_kernels": True,
            "pad_to_length": True,
            "model_dtype": "bf16",
        }
        for name, value in cases.items():
            with self.assertRaises(ValueError, msg=name) as cm:
                VerlcppEngineConfig(**{name: value})
            self.assertIn(name, str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            VerlcppEngineConfig(mixed_precision={"param_dtype": "fp16"})
        self.assertIn("fp16", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            VerlcppEngineConfig(mixed_precision={"param_dtype": "bf16", "reduce_dtype": "bf16"})
        self.assertIn("reduce_dtype", str(cm.exception))
        with self.assertRaises(ValueError):
            VerlcppEngineConfig(strategy="fsdp2")
        # What is supported stays accepted (offload: BaseEngineCtx moves the engine with engine.to).
        VerlcppEngineConfig(param_offload=True, optimizer_offload=True)
        VerlcppEngineConfig(mixed_precision={"param_dtype": "bf16", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
                            fsdp_size=2, reshard_after_forward=False, model_dtype="float32",
                            ulysses_sequence_parallel_size=2)

    def test_compute_dtype_as_verls_fsdp_engine(self):
        from verlcpp.config import compute_dtype

        self.assertEqual(compute_dtype(VerlcppEngineConfig()), "bf16")  # mixed_precision unset: bf16
        self.assertEqual(compute_dtype(VerlcppEngineConfig(mixed_precision={"param_dtype": "fp32"})), "fp32")

    def test_sft_trainer_config_composes_with_engine_verlcpp(self):
        from hydra import compose, initialize_config_module

        from verl.utils.config import omega_conf_to_dataclass

        with initialize_config_module(config_module="verl.trainer.config", version_base=None):
            cfg = compose(config_name="sft_trainer_engine", overrides=["engine=verlcpp"])
        ec = omega_conf_to_dataclass(cfg.engine)
        self.assertIsInstance(ec, VerlcppEngineConfig)
        self.assertEqual(ec.strategy, "verlcpp")

    def test_registered_for_both_model_types(self):
        from verl.workers.engine.base import EngineRegistry

        for mt, cls in (("language_model", "VerlcppEngine"), ("value_model", "VerlcppValueEngine")):
            entry = EngineRegistry._engines[mt]["verlcpp"]
            self.assertIn("cpu", entry)
            self.assertIn("cuda", entry)
            self.assertEqual(entry["cpu"].__name__, cls)


if __name__ == "__main__":
    unittest.main()
