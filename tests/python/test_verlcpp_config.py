"""test_verlcpp_config.py — verlcpp's verl engine configs against verl's own (verl 0.9.1):
VerlcppEngineConfig has FSDPEngineConfig's fields and defaults (plus expert_parallel_size);
VerlcppVeOmniEngineConfig has VeOmniEngineConfig's; engine/verlcpp.yaml and
engine/verlcpp_veomni.yaml match verl's engine/fsdp.yaml and engine/veomni.yaml; every setting
verl.cpp does not implement is refused by name (for the VeOmni shape: every field of verl's
dataclass that is not on the accepted list, set to another value, so a field a later verl adds
fails here until it is handled); both shapes map to the same engine settings; verl's SFT trainer
config composes with `engine=verlcpp` and `engine=verlcpp_veomni` through the Hydra search-path
plugin, and the backend is registered with verl's EngineRegistry for both model types.
    PYTHONPATH=<build>/python python test_verlcpp_config.py
"""
import dataclasses
import os
import unittest

import yaml

import verl  # noqa: F401  (loads the plugins)
import verlcpp
from verl.workers.config.engine import FSDPEngineConfig, VeOmniEngineConfig
from verlcpp.config import VerlcppEngineConfig, VerlcppVeOmniEngineConfig, engine_settings


class ConfigTest(unittest.TestCase):
    def test_fields_and_defaults_are_fsdps(self):
        ours = {f.name: f for f in dataclasses.fields(VerlcppEngineConfig)}
        theirs = {f.name: f for f in dataclasses.fields(FSDPEngineConfig)}
        self.assertEqual(sorted(ours), sorted(list(theirs) + ["expert_parallel_size"]))
        a, b = VerlcppEngineConfig(), FSDPEngineConfig()
        self.assertEqual(a.expert_parallel_size, 1)
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
            if k == "expert_parallel_size":
                self.assertEqual(v, 1)
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
            "expert_parallel_size": 0,
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
        for wp, name in (({"disable": True}, "wrap_policy.disable"), ({"min_params": 3}, "min_params")):
            with self.assertRaises(ValueError, msg=name) as cm:
                VerlcppEngineConfig(wrap_policy=wp)
            self.assertIn(name, str(cm.exception))
        # What is supported stays accepted (offload: BaseEngineCtx moves the engine with engine.to).
        VerlcppEngineConfig(param_offload=True, optimizer_offload=True)
        VerlcppEngineConfig(mixed_precision={"param_dtype": "bf16", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
                            fsdp_size=2, reshard_after_forward=False, model_dtype="float32",
                            ulysses_sequence_parallel_size=2)

    def test_veomni_fields_and_yaml_are_verls(self):
        ours = {f.name for f in dataclasses.fields(VerlcppVeOmniEngineConfig)}
        theirs = {f.name: f for f in dataclasses.fields(VeOmniEngineConfig)}
        self.assertEqual(sorted(ours), sorted(theirs))
        a = VerlcppVeOmniEngineConfig()
        self.assertEqual(a.strategy, "verlcpp")
        here = os.path.dirname(verlcpp.__file__)
        mine = yaml.safe_load(open(os.path.join(here, "hydra_config", "engine", "verlcpp_veomni.yaml")))
        verl_dir = os.path.dirname(verl.__file__)
        ref = yaml.safe_load(open(os.path.join(verl_dir, "trainer", "config", "engine", "veomni.yaml")))
        self.assertEqual(sorted(mine), sorted(ref))
        for k, v in ref.items():
            if k == "_target_":
                self.assertEqual(mine[k], "verlcpp.VerlcppVeOmniEngineConfig")
            elif k == "strategy":
                self.assertEqual(mine[k], "verlcpp")
            else:
                self.assertEqual(mine[k], v, k)

    # VeOmniEngineConfig fields verl.cpp reads or accepts (config.py says what each does); every
    # other field, set to a value other than its default, must be refused by name.
    VEOMNI_ACCEPTED = {
        "_target_", "strategy", "fsdp_size", "ulysses_parallel_size", "expert_parallel_size", "mixed_precision", "init_device",
        "enable_full_shard", "enable_reentrant", "attn_implementation", "moe_implementation", "ckpt_manager",
        "forward_prefetch", "entropy_from_logits_with_chunking", "entropy_from_logits_chunk_size",
        "use_torch_compile", "entropy_checkpointing", "seed", "full_determinism", "forward_only",
        "activation_offload_host_cache_limit_gb", "pad_to_length_bucket",
        "basic_modules",  # checked against the model when the engine is built (run_ep.sh, case bad)
        "param_offload", "optimizer_offload",  # verl's BaseEngineCtx moves the engine through engine.to
        # EngineConfig's, read by verl's workers and trainers (micro-batching) or meaningless here
        "dtype", "use_dynamic_bsz", "max_token_len_per_gpu", "micro_batch_size_per_gpu",
        "infer_max_token_len_per_gpu", "infer_micro_batch_size_per_gpu", "use_remove_padding",
    }

    def test_every_other_veomni_field_is_refused_by_name(self):
        from verl.workers.config.engine import EngineRouterReplayConfig

        refused = []
        for f in dataclasses.fields(VeOmniEngineConfig):
            if f.name in self.VEOMNI_ACCEPTED:
                continue
            default = getattr(VerlcppVeOmniEngineConfig(), f.name)
            if f.name == "router_replay":
                other = EngineRouterReplayConfig(mode="R2")
            elif isinstance(default, bool):
                other = not default
            elif isinstance(default, str):
                other = "triton" if default == "eager" else "other"
            elif isinstance(default, list):
                other = ["Qwen3MoeSparseMoeBlock"]
            elif default is None:
                other = "/some/path"
            else:
                self.fail(f"VeOmniEngineConfig.{f.name} (default {default!r}): no rule for another value; "
                          "handle the field in verlcpp/config.py and here")
            with self.assertRaises(ValueError, msg=f.name) as cm:
                VerlcppVeOmniEngineConfig(**{f.name: other})
            self.assertIn(f.name, str(cm.exception))
            refused.append(f.name)
        for name in ("load_checkpoint_path", "enable_fsdp_offload", "rms_norm_implementation",
                     "router_replay", "enable_async_activation_offload", "qat_implementation"):
            self.assertIn(name, refused)

    def test_veomni_values_refused_and_accepted(self):
        bad = {
            "init_device": "cuda",
            "mixed_precision": False,
            "moe_implementation": "triton",
            "attn_implementation": "native-sparse",
            "expert_parallel_size": 0,
            "ulysses_parallel_size": 0,
        }
        for name, value in bad.items():
            with self.assertRaises(ValueError, msg=name) as cm:
                VerlcppVeOmniEngineConfig(**{name: value})
            self.assertIn(name, str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            VerlcppVeOmniEngineConfig(enable_full_shard=False, fsdp_size=2)
        self.assertIn("enable_full_shard", str(cm.exception))
        for impl in ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "veomni_flash_attention_2_with_sp"):
            VerlcppVeOmniEngineConfig(attn_implementation=impl)
        VerlcppVeOmniEngineConfig(init_device="cpu", moe_implementation="eager", enable_reentrant=True)

    def test_both_shapes_give_the_same_engine_settings(self):
        fsdp = VerlcppEngineConfig(mixed_precision={"param_dtype": "fp32"}, fsdp_size=2, ulysses_sequence_parallel_size=2,
                                   expert_parallel_size=2, reshard_after_forward=True)
        veomni = VerlcppVeOmniEngineConfig(mixed_precision={"param_dtype": "fp32"}, fsdp_size=2, ulysses_parallel_size=2,
                                           expert_parallel_size=2, enable_full_shard=True, forward_prefetch=False)
        self.assertEqual(engine_settings(fsdp), engine_settings(veomni))
        self.assertEqual(engine_settings(veomni)["expert_parallel_size"], 2)
        self.assertEqual(engine_settings(veomni)["ulysses_sequence_parallel_size"], 2)
        self.assertEqual(engine_settings(VerlcppVeOmniEngineConfig(basic_modules=["Qwen3MoeDecoderLayer"]))["basic_modules"],
                         ["Qwen3MoeDecoderLayer"])
        # FSDP's wrap_policy.transformer_layer_cls_to_wrap goes the same way (checked by the engine)
        for cls in ("Qwen2DecoderLayer", ["Qwen2DecoderLayer"]):
            wp = {"min_num_params": 0, "transformer_layer_cls_to_wrap": cls}
            self.assertEqual(engine_settings(VerlcppEngineConfig(wrap_policy=wp))["basic_modules"], ["Qwen2DecoderLayer"])
        self.assertEqual(engine_settings(VerlcppEngineConfig())["basic_modules"], [])
        # VeOmni's mixed_precision=true: bf16 compute over fp32 weights; enable_full_shard=false: a replica per rank
        s = engine_settings(VerlcppVeOmniEngineConfig(mixed_precision=True, enable_full_shard=False))
        self.assertEqual((s["param_dtype"], s["fsdp_size"]), ("bf16", 1))

    def test_veomni_optimizer_config(self):
        from verl.workers.config.optimizer import VeOmniOptimizerConfig

        from verlcpp.engine import _optimizer_settings

        s = _optimizer_settings(VeOmniOptimizerConfig(lr=2e-3, lr_scheduler_type="constant", weight_decay=0.1,
                                                      betas=(0.8, 0.9), clip_grad=0.5, total_training_steps=4))
        self.assertEqual((s["lr"], s["weight_decay"], s["betas"], s["grad_clip"], s["eps"], s["lr_scheduler_type"]),
                         (2e-3, 0.1, [0.8, 0.9], 0.5, 1e-8, "constant"))
        for kw, name in ((dict(lr_scheduler_type="cosine"), "lr_scheduler_type"),
                         (dict(lr_scheduler_type="constant", lr_warmup_steps_ratio=0.1), "lr_warmup_steps"),
                         (dict(lr_scheduler_type="constant", optimizer="anyprecision_adamw"), "optimizer")):
            with self.assertRaises(ValueError, msg=name) as cm:
                _optimizer_settings(VeOmniOptimizerConfig(**kw))
            self.assertIn(name, str(cm.exception))

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
        with initialize_config_module(config_module="verl.trainer.config", version_base=None):
            cfg = compose(config_name="sft_trainer_engine",
                          overrides=["engine=verlcpp_veomni", "engine.expert_parallel_size=2"])
        ec = omega_conf_to_dataclass(cfg.engine)
        self.assertIsInstance(ec, VerlcppVeOmniEngineConfig)
        self.assertEqual((ec.strategy, ec.expert_parallel_size), ("verlcpp", 2))

    def test_ppo_actor_configs_carry_expert_parallel_size(self):
        """main_ppo's actor config, in both shapes, selecting our config classes (as README says)."""
        from hydra import compose, initialize_config_module

        from verl.utils.config import omega_conf_to_dataclass

        a = "actor_rollout_ref.actor"
        shapes = {
            "fsdp": [f"{a}.strategy=verlcpp", f"{a}.fsdp_config._target_=verlcpp.VerlcppEngineConfig",
                     f"{a}.fsdp_config.strategy=verlcpp", f"+{a}.fsdp_config.expert_parallel_size=2"],
            "veomni": ["model_engine=veomni", f"{a}.veomni._target_=verlcpp.VerlcppVeOmniEngineConfig",
                       f"{a}.veomni.strategy=verlcpp", f"{a}.veomni.expert_parallel_size=2"],
        }
        for shape, overrides in shapes.items():
            with initialize_config_module(config_module="verl.trainer.config", version_base=None):
                cfg = compose(config_name="ppo_trainer", overrides=overrides + [f"{a}.ppo_micro_batch_size_per_gpu=2"])
            actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
            want = VerlcppEngineConfig if shape == "fsdp" else VerlcppVeOmniEngineConfig
            self.assertIsInstance(actor.engine, want, shape)
            self.assertEqual((actor.engine.strategy, engine_settings(actor.engine)["expert_parallel_size"]),
                             ("verlcpp", 2), shape)

    def test_registered_for_both_model_types(self):
        from verl.workers.engine.base import EngineRegistry

        for mt, cls in (("language_model", "VerlcppEngine"), ("value_model", "VerlcppValueEngine")):
            entry = EngineRegistry._engines[mt]["verlcpp"]
            self.assertIn("cpu", entry)
            self.assertIn("cuda", entry)
            self.assertEqual(entry["cpu"].__name__, cls)


if __name__ == "__main__":
    unittest.main()
