"""write_ckpt.py — write tiny verl FSDP checkpoints with the torch that runs this script, for
tests/compat/. Needs only torch (each torch release has its own venv, see make_venvs.sh):
no transformers, no safetensors package.

The model is a hand-built module with Qwen2 names and shapes (1 layer, hidden 8, vocab 37,
2 heads of 4, 1 KV head, intermediate 14): dims that divide neither 2 nor 3 give uneven,
padded shards. Weights come from a fixed seed, so the unsharded reference is the module
before sharding. W CPU processes (gloo, file store) shard it as verl does and each rank
`torch.save`s `model.state_dict()` to model_world_size_W_rank_r.pt — exactly the file verl's
fsdp_checkpoint_manager writes (optimizer / extra state files are not needed to merge).

Cases (each one folder <torch>/<case>/):
  fsdp2_w2, fsdp2_w3   FSDP2 fully_shard on a 1-D ("fsdp",) mesh
  hsdp_2x2             FSDP2 on a ("ddp", "fsdp") 2x2 mesh: (Replicate(), Shard(0))
  fsdp1_mesh_w2        FSDP1 SHARDED_STATE_DICT with a device mesh (DTensors)
  fsdp1_nomesh_w2      FSDP1 SHARDED_STATE_DICT without a mesh (ShardedTensors)
  lora_w2              FSDP2 over a PEFT-named LoRA model (base_layer / lora_A / lora_B)
Each folder: ckpt/ (rank files, fsdp_config.json, huggingface/config.json, LoRA meta) and
ref.safetensors (every tensor, as the merger must write it with --dtype fp32), plus
ref_adapter.safetensors for LoRA.

Usage: python write_ckpt.py --out DIR [--case fsdp2_w2,hsdp_2x2,...]
"""
import argparse
import datetime
import json
import os
import shutil
import struct
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

try:  # torch >= 2.6
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.4, 2.5
    from torch.distributed._composable.fsdp import fully_shard
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

SIZES = dict(vocab_size=37, hidden_size=8, intermediate_size=14, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, head_dim=4)
LORA_R, LORA_ALPHA = 2, 4
CASES = {
    "fsdp2_w2": dict(world=2, kind="fsdp2"),
    "fsdp2_w3": dict(world=3, kind="fsdp2"),
    "hsdp_2x2": dict(world=4, kind="fsdp2", mesh=(2, 2)),
    "fsdp1_mesh_w2": dict(world=2, kind="fsdp1"),
    "fsdp1_nomesh_w2": dict(world=2, kind="fsdp1", mesh=None),
    "lora_w2": dict(world=2, kind="fsdp2", lora=True),
}


class LoraLinear(torch.nn.Module):
    """PEFT's module layout: base_layer + lora_A.default + lora_B.default."""

    def __init__(self, i, o, bias):
        super().__init__()
        self.base_layer = torch.nn.Linear(i, o, bias=bias)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(i, LORA_R, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(LORA_R, o, bias=False)})


def linear(i, o, bias, lora):
    return LoraLinear(i, o, bias) if lora else torch.nn.Linear(i, o, bias=bias)


class Layer(torch.nn.Module):
    def __init__(self, lora):
        super().__init__()
        h, hd = SIZES["hidden_size"], SIZES["head_dim"]
        q, kv, inter = SIZES["num_attention_heads"] * hd, SIZES["num_key_value_heads"] * hd, SIZES["intermediate_size"]
        self.self_attn = torch.nn.Module()
        self.self_attn.q_proj = linear(h, q, True, lora)
        self.self_attn.k_proj = linear(h, kv, True, lora)
        self.self_attn.v_proj = linear(h, kv, True, lora)
        self.self_attn.o_proj = linear(q, h, False, lora)
        self.mlp = torch.nn.Module()
        self.mlp.gate_proj = linear(h, inter, False, lora)
        self.mlp.up_proj = linear(h, inter, False, lora)
        self.mlp.down_proj = linear(inter, h, False, lora)
        self.input_layernorm = torch.nn.Module()
        self.input_layernorm.weight = torch.nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = torch.nn.Module()
        self.post_attention_layernorm.weight = torch.nn.Parameter(torch.ones(h))


class CausalLM(torch.nn.Module):
    """Qwen2ForCausalLM's parameter names and shapes (no forward: only the state is saved)."""

    def __init__(self, lora=False):
        super().__init__()
        h, v = SIZES["hidden_size"], SIZES["vocab_size"]
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(v, h)
        self.model.layers = torch.nn.ModuleList([Layer(lora) for _ in range(SIZES["num_hidden_layers"])])
        self.model.norm = torch.nn.Module()
        self.model.norm.weight = torch.nn.Parameter(torch.ones(h))
        self.lm_head = torch.nn.Linear(h, v, bias=False)


def build(case, seed=1234):
    torch.manual_seed(seed)
    m = CausalLM(lora=case.get("lora", False))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape))  # norms and lora_B too: nothing is trivially zero or one
    if case.get("lora"):
        peft = torch.nn.Module()  # PeftModel -> LoraModel -> model: base_model.model.<hf names>
        peft.base_model = torch.nn.Module()
        peft.base_model.model = m
        return peft
    return m


def hf_config():
    s = SIZES
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": s["vocab_size"],
            "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
            "num_hidden_layers": s["num_hidden_layers"], "num_attention_heads": s["num_attention_heads"],
            "num_key_value_heads": s["num_key_value_heads"], "head_dim": s["head_dim"],
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu"}


def write_safetensors(path, tensors):
    """The safetensors format (8-byte length, JSON header, raw little-endian data), by hand."""
    names = sorted(tensors)
    header, blobs, off = {}, [], 0
    for n in names:
        t = tensors[n].detach().contiguous().cpu()
        assert t.dtype == torch.float32, n
        b = t.numpy().tobytes()
        header[n] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def references(case, model):
    """What `verlcpp merge --dtype fp32` must write: the base weights under HF names, and for
    LoRA the adapter under PEFT's saved names (".default" dropped)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not case.get("lora"):
        return sd, None
    base, adapter = {}, {}
    for k, v in sd.items():
        if ".lora_" in k:
            adapter[k.replace(".default.weight", ".weight")] = v
        else:
            base[k[len("base_model.model."):].replace(".base_layer.", ".")] = v
    return base, adapter


def rank_main(rank, name, case, ckpt, store):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    world = case["world"]
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = build(case)
        shape = case.get("mesh", (world,))
        mesh = None
        if shape is not None:
            names = ("ddp", "fsdp") if len(shape) == 2 else ("fsdp",)
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        if case["kind"] == "fsdp2":
            for layer in model.modules():
                if isinstance(layer, (Layer, torch.nn.Embedding)):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            sd = model.state_dict()
        else:
            wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Layer}), device_mesh=mesh,
                           device_id=torch.device("cpu"), use_orig_params=False)
            with FSDP.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig()):
                sd = wrapped.state_dict()
        torch.save(sd, os.path.join(ckpt, f"model_world_size_{world}_rank_{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make(name, out):
    case = CASES[name]
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    ckpt = os.path.join(folder, "ckpt")
    os.makedirs(os.path.join(ckpt, "huggingface"))
    with open(os.path.join(ckpt, "huggingface", "config.json"), "w") as f:
        json.dump(hf_config(), f, indent=2)
    with open(os.path.join(ckpt, "fsdp_config.json"), "w") as f:
        json.dump({"FSDP_version": 2 if case["kind"] == "fsdp2" else 1, "world_size": case["world"]}, f, indent=4)
    if case.get("lora"):
        with open(os.path.join(ckpt, "lora_train_meta.json"), "w") as f:
            json.dump({"r": LORA_R, "lora_alpha": LORA_ALPHA, "task_type": "CAUSAL_LM"}, f, indent=4)
    base, adapter = references(case, build(case))
    write_safetensors(os.path.join(folder, "ref.safetensors"), base)
    if adapter:
        write_safetensors(os.path.join(folder, "ref_adapter.safetensors"), adapter)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(rank_main, args=(name, case, ckpt, os.path.join(tmp, "store")), nprocs=case["world"],
                               start_method="spawn")
        except mp.ProcessRaisedException as e:
            # A release that cannot write this layout itself (torch 2.4: no 2-D FSDP2 state dict).
            shutil.rmtree(folder)
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1]
            return f"not written by this release: {last.strip()}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", default=",".join(CASES))
    a = ap.parse_args()
    for name in a.case.split(","):
        skipped = make(name, a.out)
        print(f"write_ckpt: torch {torch.__version__}: {name}" + (f": SKIPPED, {skipped}" if skipped else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
