"""make_fsdp_ckpt.py — write real verl FSDP checkpoints of tiny random models, plus their
unsharded references, for the merger's tests.

The checkpoint is made the way verl makes it: W CPU processes (forked, gloo backend) shard
the model with torch's own FSDP2 `fully_shard` (or FSDP1 for the `fsdp1` case), run one
optimizer step at warm-up learning rate 0 (so optimizer state is real and weights stay
bit-identical), and each rank `torch.save`s its `model.state_dict()` exactly as
verl/utils/checkpoint/fsdp_checkpoint_manager.py does. Every rank then checks that the
all-gathered (`full_tensor`) state equals the unsharded model, so the reference is exact.

Layout under OUT (one case) or OUT/<case>_w<W>[_bf16] (several cases):
  ckpt/         model_/optim_/extra_state_world_size_W_rank_r.pt, fsdp_config.json,
                huggingface/ (config, tokenizer, generation config), lora_train_meta.json
  ref/          unsharded model (save_pretrained, safetensors) + tokenizer + generation config;
                for LoRA: the base weights with HF names, unfused (what verl's merger writes)
  ref_fused/    LoRA only: peft merge_and_unload() of the same model
  ref_adapter/  LoRA only: PeftModel.save_pretrained (adapter_config.json + adapter_model.safetensors)
  ref_state.safetensors  every state-dict tensor (persistent buffers included), HF names
  Vision-language cases (qwen2_vl, qwen2_5_vl, qwen2_5_vl_tied) also write the processor
  files verl's checkpoint manager saves (preprocessor_config.json, chat_template.json,
  video_preprocessor_config.json) in ckpt/huggingface/ and ref/; ref/ is save_pretrained's,
  so its tensor names are the ones transformers writes (visual.*, model.*).
  case.json     manifest: case, world size, mesh, dtype, flags, and every key's global and
                per-rank local shapes

Usage: make_fsdp_ckpt.py --out DIR --case CASE [--world-size N] [--dtype fp32|bf16] [--seed S]
       make_fsdp_ckpt.py --out DIR --case qwen2:1,qwen2:3,lora:2:bf16,...   (CASE:W[:DTYPE])
"""
import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor, Shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Sizes are chosen so that most dims divide by neither 3 nor 4 (uneven chunks, padded shards).
QWEN2 = dict(vocab_size=301, hidden_size=64, intermediate_size=94, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA = dict(vocab_size=301, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# k/v_proj have 6 rows (2 heads of 6 dims, 1 KV head): at world 4 the chunks are [2,2,2,0];
# intermediate 10 gives [3,3,3,1]; the value head score.weight [1,12] gives [1,0,0,0].
# Vision-language models: the text model as QWEN2 (mrope sections sum to head_dim / 2 = 8), a
# 2-block vision tower of width 32 (patch embedding [32, 3, 2, 14, 14]); vocabulary 320 holds
# the test tokenizer's 299 tokens and the 4 vision tokens (ids 299..302).
VL_TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=94, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
VL_VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
}
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # ids 299..302
IMAGE_HW = (56, 84)  # pixels: a 4 x 6 patch grid, 24 patches, 6 image tokens after the 2 x 2 merge
TINY = dict(vocab_size=301, hidden_size=12, intermediate_size=10, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=6, max_position_embeddings=64)


@dataclass
class Case:
    family: str                 # qwen2 | llama | qwen2_vl | qwen2_5_vl
    sizes: dict
    world_size: int             # default world size
    head: str = "causal"        # causal | value
    tie: bool = False
    lora: bool = False
    mesh: str = "1d"            # 1d | hsdp | none (FSDP1 without device_mesh)
    fsdp: int = 2               # FSDP version
    buffers: bool = False
    placement_fn: bool = False  # verl's get_shard_placement_fn (Shard(1) where dim 0 does not divide)
    notes: str = ""


CASES = {
    "qwen2": Case("qwen2", QWEN2, 2, notes="Qwen2ForCausalLM, attention bias, untied"),
    "llama_tied": Case("llama", LLAMA, 2, tie=True, notes="LlamaForCausalLM, tie_word_embeddings=True"),
    "value": Case("qwen2", QWEN2, 4, head="value", notes="Qwen2ForTokenClassification num_labels=1 (critic)"),
    "lora": Case("qwen2", QWEN2, 2, lora=True, notes="peft LoRA r=8 alpha=16 on all linear layers, lora_B random"),
    "hsdp": Case("qwen2", QWEN2, 4, mesh="hsdp", notes="2-D mesh (ddp, fsdp) = (2, W/2), placements (Replicate, Shard(0))"),
    "tiny_rows": Case("qwen2", TINY, 4, head="value", notes="value model whose k/v_proj and score have fewer rows than ranks"),
    "buffer": Case("qwen2", QWEN2, 2, buffers=True, notes="persistent buffers: 0-d float, [1] float, [5] int64"),
    "fsdp1": Case("qwen2", QWEN2, 2, fsdp=1, notes="FSDP1 FullyShardedDataParallel with device_mesh, SHARDED_STATE_DICT"),
    "fsdp1_sharded_tensor": Case("qwen2", QWEN2, 2, fsdp=1, mesh="none",
                                 notes="FSDP1 without device_mesh: SHARDED_STATE_DICT gives ShardedTensor, not DTensor"),
    "shard_dim": Case("qwen2", QWEN2, 2, placement_fn=True,
                      notes="FSDP2 with verl's get_shard_placement_fn: Shard(1) where dim 0 does not divide W"),
    "qwen2_vl": Case("qwen2_vl", VL_TEXT, 2, notes="Qwen2VLForConditionalGeneration, 2 vision blocks, image in the step"),
    "qwen2_5_vl": Case("qwen2_5_vl", VL_TEXT, 3,
                       notes="Qwen2_5_VLForConditionalGeneration, windowed + full-attention vision blocks"),
    "qwen2_5_vl_tied": Case("qwen2_5_vl", VL_TEXT, 2, tie=True,
                            notes="Qwen2.5-VL with tie_word_embeddings (as Qwen2.5-VL-3B): no lm_head in the output"),
}


def is_vlm(case):
    return case.family in VL_VISION


# ----------------------------------------------------------------------------- models

def build_tokenizer():
    """A tiny byte-level BPE tokenizer trained offline, as a Qwen2Tokenizer with special
    tokens and a chat template (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny tokenizer for tests",
              "verl merges sharded checkpoints into huggingface folders", "1234567890 + - * / = ( ) [ ] { }"] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=296, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], model_max_length=128)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})  # ids 297, 298
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return tok


def build_vlm_tokenizer():
    """The test tokenizer with Qwen2-VL's vision tokens added."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + VISION_TOKENS})
    return tok


def vision_token_ids():
    n = 299
    return {"vision_start_token_id": n, "vision_end_token_id": n + 1, "image_token_id": n + 2, "video_token_id": n + 3}


def build_generation_config():
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=296, eos_token_id=[298, 296], pad_token_id=296, do_sample=True,
                            temperature=0.7, top_p=0.8, top_k=20)


def randomize_(model, seed):
    """Overwrite every parameter with seeded random values (norm weights around 1), and put
    bf16 rounding ties and fp32 subnormals into one weight so casts are exercised. (No -0.0:
    the zero-lr AdamW step adds a signed zero, which can flip its sign.)"""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if re.search(r"(norm\d?|ln_q)\.weight$", name):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.05 * r)
        for name, p in model.named_parameters():
            if name.endswith("layers.0.mlp.down_proj.weight") or name.endswith("layers.0.mlp.down_proj.base_layer.weight"):
                tie = 2.0 ** -8
                special = torch.tensor([1 + tie, 1 + 3 * tie, -(1 + tie), 0.5 + tie / 2, 1e-40, -3e-39, 0.0])
                p[0, : special.numel()] = special.to(p.dtype)


def build_vlm_config(case):
    import transformers

    cfg_cls = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig}[case.family]
    text = dict(case.sizes, bos_token_id=296, eos_token_id=298, pad_token_id=296)
    return cfg_cls(text_config=text, vision_config=dict(VL_VISION[case.family]), tie_word_embeddings=case.tie,
                   **vision_token_ids())


def build_model(case: Case, dtype, seed):
    import transformers

    if is_vlm(case):
        config = build_vlm_config(case)
        cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
               "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[case.family]
        torch.manual_seed(seed)
        model = cls._from_config(config)
        model.config.architectures = [cls.__name__]
        randomize_(model, seed)
        model.to(dtype)
        model.config.dtype = dtype
        return model.eval()
    cfg_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[case.family]
    kw = dict(case.sizes, tie_word_embeddings=case.tie, bos_token_id=296, eos_token_id=298, pad_token_id=296)
    if case.family == "llama":
        kw.update(attention_bias=False, mlp_bias=False)
    if case.head == "value":
        kw.update(num_labels=1, classifier_dropout=0.0)
    config = cfg_cls(**kw)
    prefix = {"qwen2": "Qwen2", "llama": "Llama"}[case.family]
    cls = getattr(transformers, prefix + ("ForTokenClassification" if case.head == "value" else "ForCausalLM"))
    torch.manual_seed(seed)
    model = cls(config)
    model.config.architectures = [cls.__name__]  # as in a config read from a pretrained folder
    if case.buffers:
        model.model.register_buffer("my_scalar", torch.tensor(3.25), persistent=True)
        model.model.register_buffer("my_counts", torch.arange(5, dtype=torch.int64) * 7 - 3, persistent=True)
        model.model.layers[1].mlp.register_buffer("my_buf", torch.tensor([0.1 + 2.0 ** -9]), persistent=True)
    if case.lora:
        import peft

        lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lcfg)
    randomize_(model, seed)
    model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    return model


def lora_base_name(key):
    """verl's own renaming of peft base keys into HF names (model_merger.save_lora_adapter)."""
    return key.replace("base_model.model.", "").replace(".base_layer.weight", ".weight").replace(".base_layer.bias", ".bias")


def hf_state(model, case):
    """State dict with HF names, tied aliases removed, as safetensors would hold it."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if case.lora:
        sd = {lora_base_name(k): v for k, v in sd.items() if "lora_" not in k}
    if case.tie:
        sd.pop("lm_head.weight", None)
    return sd


# ----------------------------------------------------------------------------- references

def vlm_image_inputs(case, gen):
    """One random image of IMAGE_HW pixels as the model takes it (pixel_values of the patches,
    image_grid_thw), and text ids around its image tokens."""
    v = VL_VISION[case.family]
    p, m, t = v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"]
    gh, gw = IMAGE_HW[0] // p, IMAGE_HW[1] // p
    pixel_values = torch.randn(gh * gw, 3 * t * p * p, generator=gen)
    ids = vision_token_ids()
    n_img = gh * gw // (m * m)
    row = ([ids["vision_start_token_id"]] + [ids["image_token_id"]] * n_img + [ids["vision_end_token_id"]]
           + torch.randint(0, 296, (5,), generator=gen).tolist())
    input_ids = torch.tensor([row])
    mm_token_type_ids = (input_ids == ids["image_token_id"]).int()  # what the processor returns: 1 = image
    return dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=torch.tensor([[1, gh, gw]]),
                mm_token_type_ids=mm_token_type_ids)


VLM_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                     "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                     "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
                     "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}")


def write_processor_files(case, folder):
    """What a Qwen2-VL processor's save_pretrained writes beside the tokenizer: the image
    processor's preprocessor_config.json, the processor's chat_template.json and the video
    processor's config (written by hand: transformers' video processors need torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    v = VL_VISION[case.family]
    proc = "Qwen2_5_VLProcessor" if case.family == "qwen2_5_vl" else "Qwen2VLProcessor"
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=v["patch_size"],
                                  merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"])
    ip.save_pretrained(folder)
    with open(os.path.join(folder, "chat_template.json"), "w") as f:
        json.dump({"chat_template": VLM_CHAT_TEMPLATE}, f, indent=2)
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": proc, "do_resize": True,
             "min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": v["patch_size"],
             "temporal_patch_size": v["temporal_patch_size"], "merge_size": v["spatial_merge_size"],
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    with open(os.path.join(folder, "video_preprocessor_config.json"), "w") as f:
        json.dump(video, f, indent=2)


def save_references(case, model, tokenizer, gen_config, out):
    """ref/ (and for LoRA ref_adapter/, ref_fused/). Fuses LoRA into `model` in place."""
    ref = os.path.join(out, "ref")
    if case.lora:
        base = model.get_base_model()
        plain = type(base)(base.config)  # a fresh HF model without LoRA layers
        plain.load_state_dict(hf_state(model, case), strict=True)
        plain.to(base.dtype)
        plain.config.dtype = base.dtype
        plain.generation_config = gen_config
        plain.save_pretrained(ref)
        model.save_pretrained(os.path.join(out, "ref_adapter"))
        fused = model.merge_and_unload()
        fused.generation_config = gen_config
        fused.save_pretrained(os.path.join(out, "ref_fused"))
        tokenizer.save_pretrained(os.path.join(out, "ref_fused"))
    else:
        if case.head == "causal":
            model.generation_config = gen_config
        model.save_pretrained(ref)
    tokenizer.save_pretrained(ref)
    if is_vlm(case):
        write_processor_files(case, ref)


def write_hf_side_files(case, model, tokenizer, gen_config, ckpt, world_size):
    """What verl's rank 0 writes next to the shards (fsdp_checkpoint_manager.save_checkpoint)."""
    hf = os.path.join(ckpt, "huggingface")
    os.makedirs(hf, exist_ok=True)
    if case.head == "causal":
        gen_config.save_pretrained(hf)
    model.config.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    if is_vlm(case):
        write_processor_files(case, hf)
    with open(os.path.join(ckpt, "fsdp_config.json"), "w") as f:
        json.dump({"FSDP_version": case.fsdp, "world_size": world_size}, f, indent=4)
    if case.lora:
        pc = model.peft_config["default"]
        tt = pc.task_type.value if hasattr(pc.task_type, "value") else str(pc.task_type)
        with open(os.path.join(ckpt, "lora_train_meta.json"), "w", encoding="utf-8") as f:
            json.dump({"r": int(pc.r), "lora_alpha": int(pc.lora_alpha), "task_type": tt}, f, indent=4)


# ----------------------------------------------------------------------------- sharded ranks

def select_fsdp2_wrap_targets(model):
    """verl.utils.fsdp_utils._select_fsdp2_wrap_targets: decoder layers, and embeddings /
    lm_head on their own unless the embeddings are tied."""
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    tie = getattr(model.config, "tie_word_embeddings", False)
    by_name = set() if tie else {"embed_tokens", "lm_head"}
    out = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (type(module).__name__ in layer_names or (isinstance(module, torch.nn.Embedding) and not tie)
                or (leaf in by_name and hasattr(module, "weight"))):
            out.append(module)
    return out


def shard_placement_fn(world):
    """verl.utils.fsdp_utils.get_shard_placement_fn."""
    def fn(param):
        for i, s in enumerate(param.shape):
            if s % world == 0:
                return Shard(i)
        return Shard(0)

    return fn


def rank_main(rank, world, case, model, orig, ckpt, store_path, seed):
    """One rank: shard, one zero-lr optimizer step, save exactly what verl saves, verify."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # FSDP1 state_dict_type deprecation, as verl does
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.")  # FSDP1 chatter
    warnings.filterwarnings("ignore", message=".*NO_SHARD.*")  # FSDP1 at world size 1
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a stuck collective fails, never hangs
    try:
        if case.mesh == "hsdp":
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ddp", "fsdp"))
        elif case.mesh == "none":
            mesh = None
        else:
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))

        if case.fsdp == 2:
            kw = dict(mesh=mesh)
            if case.placement_fn:
                kw["shard_placement_fn"] = shard_placement_fn(world)
            for m in select_fsdp2_wrap_targets(model):
                fully_shard(m, **kw)
            fully_shard(model, **kw)
            wrapped = model
            state_ctx = contextlib.nullcontext
        else:
            layer_cls = {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}
            # device_id=cpu: FSDP1 otherwise refuses to run without an accelerator.
            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls)
            wrapped = FSDP(model, auto_wrap_policy=policy, device_mesh=mesh, device_id=torch.device("cpu"),
                           use_orig_params=False)  # no sync_module_states: it wants GPU tensors
            state_ctx = functools.partial(FSDP.state_dict_type, wrapped, StateDictType.SHARDED_STATE_DICT,
                                          ShardedStateDictConfig(), ShardedOptimStateDictConfig())

        # One training step at warm-up lr 0: real optimizer state, unchanged weights.
        opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)
        gen = torch.Generator().manual_seed(seed + 1)
        inputs = vlm_image_inputs(case, gen) if is_vlm(case) else dict(input_ids=torch.randint(0, 299, (2, 7), generator=gen))
        wrapped.train()
        out = wrapped(**inputs)
        out.logits.float().pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        tag = f"world_size_{world}_rank_{rank}.pt"
        with state_ctx():
            sd = wrapped.state_dict()
            torch.save(sd, os.path.join(ckpt, "model_" + tag))
            torch.save(opt.state_dict(), os.path.join(ckpt, "optim_" + tag))
        rng = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
        torch.save({"lr_scheduler": sched.state_dict(), "rng": rng}, os.path.join(ckpt, "extra_state_" + tag))

        # The saved shards must reassemble to exactly the unsharded model.
        bad = []
        if set(sd) != set(orig):
            bad.append(f"key sets differ: {sorted(set(sd) ^ set(orig))}")
        for k in sorted(set(sd) & set(orig)):
            v = sd[k]
            full = gather_full(v, rank)
            if full is not None and not bits_equal(full, orig[k]):
                bad.append(k)
        if bad:
            raise RuntimeError(f"rank {rank}: sharded state differs from the reference model: {bad}")
        with open(os.path.join(os.path.dirname(store_path), f"layout_{rank}.json"), "w") as f:
            json.dump(local_layout(sd), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def gather_full(v, rank):
    """The whole tensor behind a state-dict value (a collective: every rank calls it);
    None where only rank 0 receives it."""
    if isinstance(v, DTensor):
        return v.full_tensor()
    if isinstance(v, ShardedTensor):
        out = torch.empty(v.shape, dtype=v.dtype) if rank == 0 else None
        v.gather(dst=0, out=out)
        return out
    return v


def bits_equal(a, b):
    """Same dtype, shape and bytes (so -0.0 differs from 0.0 and NaN equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


# ----------------------------------------------------------------------------- manifest

def local_layout(sd):
    """What this rank holds for every key (written by each rank: a ShardedTensor cannot
    even be unpickled without a process group)."""
    out = {}
    for k, v in sd.items():
        info = {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        if isinstance(v, DTensor):
            lt = v._local_tensor
            info.update(kind="dtensor", placements=[repr(p) for p in v.placements], local_shape=list(lt.shape),
                        storage_numel=lt.untyped_storage().nbytes() // lt.element_size(),
                        mesh_shape=list(v.device_mesh.mesh.shape), mesh_dim_names=list(v.device_mesh.mesh_dim_names or []))
        elif isinstance(v, ShardedTensor):
            shards = v.local_shards()
            info.update(kind="sharded_tensor", local_shape=list(shards[0].tensor.shape) if shards else [0],
                        shard_offsets=[list(s.metadata.shard_offsets) for s in shards])
        else:
            info.update(kind="plain")
        out[k] = info
    return out


def describe(layouts, world, case, dtype_name):
    """Manifest fields from every rank's local_layout."""
    keys, empty, uneven = {}, [], []
    for k, info in layouts[0].items():
        info = {f: x for f, x in info.items() if f not in ("local_shape", "storage_numel", "shard_offsets",
                                                               "mesh_shape", "mesh_dim_names")}
        if info["kind"] != "plain":
            locs = [lay[k]["local_shape"] for lay in layouts]
            info["local_shapes"] = locs
            if info["kind"] == "dtensor":
                info["storage_numel"] = [lay[k]["storage_numel"] for lay in layouts]
            else:
                info["shard_offsets"] = [lay[k]["shard_offsets"] for lay in layouts]
            if any(0 in s for s in locs):
                empty.append(k)
            if len({tuple(s) for s in locs}) > 1:
                uneven.append(k)
        keys[k] = info
    first = next((x for x in layouts[0].values() if x["kind"] == "dtensor"), None)
    return {
        "world_size": world,
        "fsdp_version": case.fsdp,
        "mesh_shape": first["mesh_shape"] if first else None,  # None: no DTensor (FSDP1 NO_SHARD / ShardedTensor)
        "mesh_dim_names": first["mesh_dim_names"] if first else None,
        "dtype": dtype_name,
        "tie_word_embeddings": case.tie,
        "is_value_model": case.head == "value",
        "lora": case.lora,
        "persistent_buffers": case.buffers,
        "keys_with_empty_shard": empty,
        "keys_with_uneven_shards": uneven,
        "keys": keys,
    }


# ----------------------------------------------------------------------------- driver

def make_case(name, world, dtype_name, seed, out, tokenizer, gen_config):
    case = CASES[name]
    if case.mesh == "hsdp" and (world < 4 or world % 2):
        raise SystemExit(f"make_fsdp_ckpt: case hsdp needs an even world size >= 4, got {world}")
    t0 = time.time()
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, "case.json")):
            raise SystemExit(f"make_fsdp_ckpt: {out} is not empty and holds no case.json: not replacing it")
        shutil.rmtree(out)
    ckpt = os.path.join(out, "ckpt")
    os.makedirs(ckpt)
    case_seed = seed + zlib.crc32(name.encode()) % 10000
    model = build_model(case, DTYPES[dtype_name], case_seed)
    orig = {k: v.detach().clone() for k, v in model.state_dict().items()}

    from safetensors.torch import save_file

    save_file(hf_state(model, case), os.path.join(out, "ref_state.safetensors"), metadata={"format": "pt"})
    write_hf_side_files(case, model, tokenizer, gen_config, ckpt, world)

    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(rank_main, args=(world, case, model, orig, ckpt, store, case_seed), nprocs=world,
                           start_method="fork")
        layouts = []
        for r in range(world):
            with open(os.path.join(tmp, f"layout_{r}.json")) as f:
                layouts.append(json.load(f))

    save_references(case, model, tokenizer, gen_config, out)  # after: LoRA fusing changes the model
    manifest = {"case": name, "description": case.notes, "seed": case_seed,
                **describe(layouts, world, case, dtype_name),
                "ref": "ref", "ref_state": "ref_state.safetensors"}
    if case.lora:
        manifest.update(ref_fused="ref_fused", ref_adapter="ref_adapter", lora_r=8, lora_alpha=16)
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return time.time() - t0


def parse_specs(text, world, dtype):
    specs = []
    for part in filter(None, text.split(",")):
        bits = part.split(":")
        name = bits[0]
        if name not in CASES:
            raise SystemExit(f"make_fsdp_ckpt: unknown case {name!r}; known: {', '.join(CASES)}")
        w = int(bits[1]) if len(bits) > 1 and bits[1] else (world or CASES[name].world_size)
        d = bits[2] if len(bits) > 2 else dtype
        if d not in DTYPES:
            raise SystemExit(f"make_fsdp_ckpt: unknown dtype {d!r} in {part!r}")
        specs.append((name, w, d))
    return specs


def quiet():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)  # "pickling of the DeviceMesh"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (one case) or parent folder (several)")
    ap.add_argument("--case", required=True, help=f"CASE or CASE:W[:DTYPE], comma separated; cases: {', '.join(CASES)}")
    ap.add_argument("--world-size", type=int, default=None, help="default: per case")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the sharded model")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    specs = parse_specs(a.case, a.world_size, a.dtype)
    quiet()
    tokenizer, gen_config = build_tokenizer(), build_generation_config()
    vlm_tokenizer = build_vlm_tokenizer() if any(is_vlm(CASES[n]) for n, _, _ in specs) else None
    for name, w, d in specs:
        tok = vlm_tokenizer if is_vlm(CASES[name]) else tokenizer
        out = a.out if len(specs) == 1 else os.path.join(a.out, f"{name}_w{w}" + ("_bf16" if d == "bf16" else ""))
        try:
            dt = make_case(name, w, d, a.seed, out, tok, gen_config)
        except mp.ProcessRaisedException as e:
            print(f"make_fsdp_ckpt: case {name} world {w} failed in a rank:\n{e}", file=sys.stderr)
            return 1
        print(f"{name} world_size={w} dtype={d}: {out} ({dt:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
