"""make_megatron_ckpt.py — write real Megatron-Core distributed checkpoints (torch_dist, i.e.
PyTorch DCP) of tiny random HF models, plus their unsharded references, for the merger's tests.

Each case runs TP×PP×EP CPU processes (forked, gloo). Every rank builds megatron-core's own
GPTModel (local layer spec) for its pipeline stage, fills it from the random HF model with the
HF→Megatron conversion written below (fused QKV grouped per KV head, [gate; up] in
linear_fc1, vocab / rows / columns split over tensor-parallel ranks, experts over
expert-parallel ranks), and saves with megatron-core's `dist_checkpointing.save` — the same
call verl's Megatron checkpoint manager makes — so keys, layer stacking, chunk offsets and
the swiglu split of linear_fc1 are Megatron's, not ours. For cases without pipeline stages
the Megatron model then runs a forward pass and its logits must match the HF model's: this
checks the conversion independently of the merger under test.

megatron-core wants CUDA in two places of its save path (a stream synchronize and the
device of a one-int all_reduce); both are patched to CPU in the ranks only.

The `dcp_per_layer` case is written with torch.distributed.checkpoint.save directly: per-layer
keys (decoder.layers.<i>.…), experts as TEGroupedMLP names them (experts.linear_fc1.weight<e>)
and as SequentialMLP state dicts do (local_experts.<e>.…), DTensor chunks, and the
safetensors serialization format instead of torch.save items.

Layout under OUT/<case>:
  ckpt/model/dist_ckpt/     .metadata, __R_I.distcp, common.pt, metadata.json
  ckpt/model/huggingface/   config.json, tokenizer, generation config
  ref/                      save_pretrained of the HF model (+ tokenizer)

Usage: make_megatron_ckpt.py --out DIR --case qwen2_tp2,llama_tied_pp2,...
"""
import argparse
import contextlib
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fsdp_ckpt import build_generation_config, build_tokenizer, randomize_  # noqa: E402

DENSE = dict(vocab_size=302, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# --tiny: the same structure at a few KB per checkpoint (for the committed tests/compat corpus).
TINY_DENSE = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TINY_MOE = dict(TINY_DENSE)
MOE = dict(vocab_size=302, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@dataclass
class Case:
    arch: str                   # HF class name
    sizes: dict
    tp: int = 1
    pp: int = 1
    ep: int = 1
    tie: bool = False
    extra: dict = field(default_factory=dict)  # more HF config fields
    writer: str = "mcore"       # mcore | dcp (torch DCP directly, per-layer keys, safetensors items)
    dtype: torch.dtype = torch.float32
    vocab_multiple: int = 0     # Megatron-LM's make_vocab_size_divisible_by: vocabulary padded to a multiple of it x TP
    singleton: bool = False     # sharded_state_dict(metadata={"singleton_local_shards": True}) (megatron-core >= 0.16)
    notes: str = ""


CASES = {
    "qwen2_tp2": Case("Qwen2ForCausalLM", DENSE, tp=2, notes="GQA 4/2 heads, QKV bias, TP 2"),
    "qwen2_pp2": Case("Qwen2ForCausalLM", DENSE, pp=2, notes="PP 2, layers split 1 + 2"),
    "qwen2_tp2_singleton": Case("Qwen2ForCausalLM", DENSE, tp=2, singleton=True,
                                notes="singleton_local_shards: per-layer keys, linear_fc1 as weight_w / weight_v"),
    "qwen3_moe_ep2_singleton": Case("Qwen3MoeForCausalLM", MOE, ep=2, singleton=True,
                                    extra=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                                               head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]),
                                    notes="singleton_local_shards with experts over EP 2"),
    "qwen2_tp2_padvocab": Case("Qwen2ForCausalLM", DENSE, tp=2, vocab_multiple=16,
                               notes="vocabulary padded to a multiple of 16 x TP (302 -> 320, tiny 40 -> 64): "
                                     "random extra rows in the embedding and output layer"),
    "qwen2_tp2pp2": Case("Qwen2ForCausalLM", DENSE, tp=2, pp=2, notes="TP 2 x PP 2"),
    "llama_tied_tp2": Case("LlamaForCausalLM", DENSE, tp=2, tie=True, notes="tied embeddings, no biases"),
    "qwen3_tp2": Case("Qwen3ForCausalLM", DENSE, tp=2, extra=dict(head_dim=24),
                      notes="q/k norms, head_dim 24 != hidden/heads"),
    "value_tp2pp2": Case("Qwen2ForTokenClassification", DENSE, tp=2, pp=2,
                         extra=dict(num_labels=1, classifier_dropout=0.0), notes="critic: output layer [1, hidden]"),
    "qwen3_moe_ep2": Case("Qwen3MoeForCausalLM", MOE, ep=2,
                          extra=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, head_dim=16,
                                     decoder_sparse_step=1, mlp_only_layers=[]), notes="4 experts over EP 2"),
    "qwen2_moe_tp2ep2": Case("Qwen2MoeForCausalLM", MOE, tp=2, ep=2,
                             extra=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                                        shared_expert_intermediate_size=56, decoder_sparse_step=1, mlp_only_layers=[]),
                             notes="shared expert + its gate, TP 2 x EP 2"),
    "mixtral_ep2": Case("MixtralForCausalLM", MOE, ep=2, extra=dict(num_local_experts=4, num_experts_per_tok=2),
                        notes="block_sparse_moe w1/w2/w3 names"),
    "dcp_per_layer": Case("Qwen3MoeForCausalLM", MOE, tp=2, writer="dcp",
                          extra=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, head_dim=16,
                                     decoder_sparse_step=1, mlp_only_layers=[]),
                          notes="torch DCP, per-layer keys, expert name forms, safetensors items"),
}


# ----------------------------------------------------------------------------- HF model

def build_hf(case, seed):
    import transformers

    cls = getattr(transformers, case.arch)
    cfg_cls = cls.config_class
    kw = dict(case.sizes, tie_word_embeddings=case.tie, bos_token_id=296, eos_token_id=298, pad_token_id=296)
    if "Llama" in case.arch:
        kw.update(attention_bias=False, mlp_bias=False)
    kw.update(case.extra)
    config = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = cls(config)
    model.config.architectures = [cls.__name__]
    randomize_(model, seed)
    model.to(case.dtype)
    model.config.dtype = case.dtype
    return model.eval()


def hf_state(model):
    """HF-named weights as save_pretrained writes them (per-expert names, no tied lm_head)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        from safetensors.torch import load_file
        return load_file(os.path.join(d, "model.safetensors"))


def rope_theta(config):
    rp = getattr(config, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


# ----------------------------------------------------------------------------- HF -> Megatron

class Conv:
    """Full (unsharded) Megatron tensors from HF weights, and their tensor-parallel slices."""

    def __init__(self, case, config, sd):
        self.case, self.c, self.sd = case, config, sd
        self.heads, self.kv = config.num_attention_heads, config.num_key_value_heads
        self.hd = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.mix = "Mixtral" in case.arch
        self.moe_prefix = "block_sparse_moe" if self.mix else "mlp"
        self.shared = "mlp.shared_expert" if "Qwen2Moe" in case.arch else "mlp.shared_experts"

    def qkv(self, layer, kind):
        p = f"model.layers.{layer}.self_attn."
        q, k, v = (self.sd[p + f"{n}_proj.{kind}"] for n in "qkv")
        qpg = self.heads // self.kv
        parts = []
        for g in range(self.kv):  # Megatron groups rows per KV head: [q_g; k_g; v_g]
            parts += [q[g * qpg * self.hd:(g + 1) * qpg * self.hd], k[g * self.hd:(g + 1) * self.hd],
                      v[g * self.hd:(g + 1) * self.hd]]
        return torch.cat(parts)

    def expert_names(self):
        return ("w1", "w3", "w2") if self.mix else ("gate_proj", "up_proj", "down_proj")

    def full(self, name, layer=None, expert=None):
        """(tensor, tp_split) for a Megatron parameter suffix; tp_split: 'fc1', 0, 1 or None."""
        sd, L = self.sd, f"model.layers.{layer}."
        g, u, d = self.expert_names()
        table = {
            "embedding.word_embeddings.weight": (lambda: sd["model.embed_tokens.weight"], 0),
            "decoder.final_layernorm.weight": (lambda: sd["model.norm.weight"], None),
            "output_layer.weight": (lambda: sd["score.weight"] if "score.weight" in sd else sd["lm_head.weight"],
                                    None if "score.weight" in sd else 0),
            "output_layer.bias": (lambda: sd["score.bias"], None),
            "input_layernorm.weight": (lambda: sd[L + "input_layernorm.weight"], None),
            "pre_mlp_layernorm.weight": (lambda: sd[L + "post_attention_layernorm.weight"], None),
            "self_attention.linear_qkv.weight": (lambda: self.qkv(layer, "weight"), 0),
            "self_attention.linear_qkv.bias": (lambda: self.qkv(layer, "bias"), 0),
            "self_attention.q_layernorm.weight": (lambda: sd[L + "self_attn.q_norm.weight"], None),
            "self_attention.k_layernorm.weight": (lambda: sd[L + "self_attn.k_norm.weight"], None),
            "self_attention.linear_proj.weight": (lambda: sd[L + "self_attn.o_proj.weight"], 1),
            "mlp.linear_fc1.weight": (lambda: (sd[L + "mlp.gate_proj.weight"], sd[L + "mlp.up_proj.weight"]), "fc1"),
            "mlp.linear_fc2.weight": (lambda: sd[L + "mlp.down_proj.weight"], 1),
            "mlp.router.weight": (lambda: sd[L + self.moe_prefix + ".gate.weight"], None),
            "mlp.shared_experts.linear_fc1.weight": (
                lambda: (sd[L + self.shared + ".gate_proj.weight"], sd[L + self.shared + ".up_proj.weight"]), "fc1"),
            "mlp.shared_experts.linear_fc2.weight": (lambda: sd[L + self.shared + ".down_proj.weight"], 1),
            "mlp.shared_experts.gate_weight": (lambda: sd[L + "mlp.shared_expert_gate.weight"], None),
            "expert.linear_fc1.weight": (
                lambda: (sd[L + f"{self.moe_prefix}.experts.{expert}.{g}.weight"],
                         sd[L + f"{self.moe_prefix}.experts.{expert}.{u}.weight"]), "fc1"),
            "expert.linear_fc2.weight": (lambda: sd[L + f"{self.moe_prefix}.experts.{expert}.{d}.weight"], 1),
        }
        if name not in table:
            raise KeyError(f"no HF source for Megatron parameter {name}")
        fn, split = table[name]
        return fn(), split

    @staticmethod
    def shard(t, split, tp, r):
        if split == "fc1":  # each TP rank holds [gate_r; up_r]
            gate, up = t
            return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
        if split is None or tp == 1:
            return t
        return t.chunk(tp, dim=split)[r]

    @staticmethod
    def whole(t, split):
        return torch.cat(t) if split == "fc1" else t


def padded_vocab(case, vocab):
    """Megatron-LM's _vocab_size_with_padding: up to a multiple of make_vocab_size_divisible_by x TP."""
    m = case.vocab_multiple * case.tp
    return vocab if not m else -(-vocab // m) * m


def pad_vocab_rows(t, rows, seed):
    """The padded vocabulary's extra rows: random (what training leaves there), never read by HF."""
    if t.shape[0] >= rows:
        return t
    gen = torch.Generator().manual_seed(seed)
    extra = 0.05 * torch.randn((rows - t.shape[0],) + tuple(t.shape[1:]), generator=gen, dtype=torch.float32)
    return torch.cat([t, extra.to(t.dtype)])


def megatron_param_source(name, global_layer_of, ep_rank, local_experts):
    """Parse a GPTModel parameter name -> (suffix for Conv.full, layer, expert)."""
    if not name.startswith("decoder.layers."):
        return name, None, None
    rest = name[len("decoder.layers."):]
    local, rest = rest.split(".", 1)
    layer = global_layer_of(int(local))
    if rest.startswith("mlp.experts.local_experts."):
        e, suf = rest[len("mlp.experts.local_experts."):].split(".", 1)
        return "expert." + suf, layer, ep_rank * local_experts + int(e)
    return rest, layer, None


# ----------------------------------------------------------------------------- ranks (megatron-core)

def patch_cuda():
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


def mcore_config(case, hf_cfg):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=hf_cfg.num_hidden_layers, hidden_size=hf_cfg.hidden_size,
              num_attention_heads=hf_cfg.num_attention_heads, num_query_groups=hf_cfg.num_key_value_heads,
              ffn_hidden_size=hf_cfg.intermediate_size, kv_channels=Conv(case, hf_cfg, {}).hd,
              use_cpu_initialization=True, perform_initialization=False, gated_linear_unit=True,
              activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=hf_cfg.rms_norm_eps,
              add_bias_linear=False, add_qkv_bias="Qwen2" in case.arch, params_dtype=case.dtype,
              bf16=case.dtype == torch.bfloat16,
              tensor_model_parallel_size=case.tp, pipeline_model_parallel_size=case.pp,
              expert_model_parallel_size=case.ep, expert_tensor_parallel_size=case.tp,
              qk_layernorm="Qwen3" in case.arch, hidden_dropout=0.0, attention_dropout=0.0,
              bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
              gradient_accumulation_fusion=False, persist_layer_norm=False)
    if case.pp > 1:  # verl's get_dynamic_pipeline_shards: 3 layers over 2 stages -> [1, 2]
        kw.update(num_layers_in_first_pipeline_stage=hf_cfg.num_hidden_layers // 2, pipeline_dtype=case.dtype)
    ne = getattr(hf_cfg, "num_experts", None) or getattr(hf_cfg, "num_local_experts", None)
    if ne:
        kw.update(num_moe_experts=ne, moe_router_topk=hf_cfg.num_experts_per_tok,
                  moe_ffn_hidden_size=getattr(hf_cfg, "moe_intermediate_size", None) or hf_cfg.intermediate_size,
                  moe_grouped_gemm=False, moe_router_load_balancing_type="none", moe_token_dispatcher_type="allgather",
                  moe_aux_loss_coeff=0.0)
        if getattr(hf_cfg, "shared_expert_intermediate_size", None):
            kw.update(moe_shared_expert_intermediate_size=hf_cfg.shared_expert_intermediate_size,
                      moe_shared_expert_gate=True)
    return TransformerConfig(**kw)


def rank_main(rank, world, case, hf_cfg, sd, ckpt, store, ref_logits, ids):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    patch_cuda()
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel

        ps.initialize_model_parallel(tensor_model_parallel_size=case.tp, pipeline_model_parallel_size=case.pp,
                                     expert_model_parallel_size=case.ep, expert_tensor_parallel_size=case.tp)
        tcfg = mcore_config(case, hf_cfg)
        spec = get_gpt_layer_local_spec(num_experts=tcfg.num_moe_experts, moe_grouped_gemm=False,
                                        qk_layernorm=tcfg.qk_layernorm, normalization="RMSNorm")
        pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        value = "score.weight" in sd
        vocab = padded_vocab(case, hf_cfg.vocab_size)
        model = GPTModel(tcfg, spec, vocab_size=vocab, max_sequence_length=128, pre_process=pre,
                         post_process=post, share_embeddings_and_output_weights=case.tie,
                         position_embedding_type="rope", rotary_base=rope_theta(hf_cfg))
        if value and post:
            # verl's critic: the output layer is a [1, hidden] value head, replicated over TP.
            model.output_layer = torch.nn.Linear(hf_cfg.hidden_size, 1, bias="score.bias" in sd)
        conv = Conv(case, hf_cfg, sd)
        tp, tpr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        ep_rank = ps.get_expert_model_parallel_rank()
        layer_no = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
        local_experts = (tcfg.num_moe_experts or 0) // case.ep
        with torch.no_grad():
            for name, p in model.named_parameters():
                suffix, layer, expert = megatron_param_source(name, layer_no.__getitem__, ep_rank, local_experts)
                t, split = conv.full(suffix, layer, expert)
                if value and suffix == "output_layer.weight":
                    split = None
                elif suffix in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    t = pad_vocab_rows(t, vocab, zlib.crc32(suffix.encode()))
                t = conv.shard(t, split, tp, tpr)
                if tuple(t.shape) != tuple(p.shape):
                    raise RuntimeError(f"{name}: HF gives {tuple(t.shape)}, Megatron wants {tuple(p.shape)}")
                p.copy_(t)
        if case.singleton:
            # The layout verl's checkpoint manager asks for with singleton_local_shards (it writes
            # False today): per-layer keys, each swiglu half its own key (..._w / ..._v).
            ssd = model.sharded_state_dict(metadata={"singleton_local_shards": True})
        else:
            ssd = model.sharded_state_dict()
        dist_checkpointing.save(ssd, ckpt)

        if ref_logits is not None:
            # The Megatron model must compute what the HF model computes.
            from megatron.core import tensor_parallel

            # Dropout is off; the CUDA RNG tracker it would fork does not exist on the CPU.
            tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
            model.eval()
            with torch.no_grad():
                pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
                causal = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)[None, None]
                out = model(input_ids=ids, position_ids=pos, attention_mask=causal)
                gathered = [torch.empty_like(out) for _ in range(tp)]
                dist.all_gather(gathered, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(gathered, dim=-1)[..., :hf_cfg.vocab_size]  # the padded rows are no tokens
            if not torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"rank {rank}: Megatron logits differ from HF: max |diff| "
                                   f"{(logits - ref_logits).abs().max():.3g}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- ranks (torch DCP)

def dcp_rank_main(rank, world, case, hf_cfg, sd, ckpt, store):
    """Per-layer keys, DTensor row shards over TP, safetensors items."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.filesystem import SerializationFormat
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        conv = Conv(case, hf_cfg, sd)
        out = {}

        def put(key, t, split):
            t = Conv.whole(t, split).contiguous()
            out[key] = distribute_tensor(t, mesh, [Shard(0)]) if t.shape[0] % world == 0 else t

        for key in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"):
            put(key, *conv.full(key))
        n_exp = hf_cfg.num_experts
        for layer in range(hf_cfg.num_hidden_layers):
            P = f"decoder.layers.{layer}."
            for suf in ("input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.weight",
                        "self_attention.linear_proj.weight", "self_attention.q_layernorm.weight",
                        "self_attention.k_layernorm.weight", "mlp.router.weight"):
                put(P + suf, *conv.full(suf, layer))
            for e in range(n_exp):
                # Both expert key forms: TEGroupedMLP (weight<e>) on even layers, SequentialMLP on odd.
                for fc in ("linear_fc1", "linear_fc2"):
                    key = (P + f"mlp.experts.{fc}.weight{e}" if layer % 2 == 0
                           else P + f"mlp.experts.local_experts.{e}.{fc}.weight")
                    put(key, *conv.full(f"expert.{fc}.weight", layer, e))
        out["decoder.layers.0.self_attention.linear_proj._extra_state"] = b"te fp8 meta"  # a byte item
        dcp.save(out, storage_writer=FileSystemWriter(ckpt, serialization_format=SerializationFormat.SAFETENSORS))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver

def make_case(name, seed, out, tokenizer, gen_config):
    case = CASES[name]
    t0 = time.time()
    if os.path.isdir(out):
        shutil.rmtree(out)
    dist_dir = os.path.join(out, "ckpt", "model", "dist_ckpt")
    hf_dir = os.path.join(out, "ckpt", "model", "huggingface")
    os.makedirs(dist_dir)
    model = build_hf(case, seed + zlib.crc32(name.encode()) % 10000)
    sd = hf_state(model)
    ref = os.path.join(out, "ref")
    causal = "ForCausalLM" in case.arch
    if causal:
        model.generation_config = gen_config
    model.save_pretrained(ref)
    tokenizer.save_pretrained(ref)
    model.config.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    if causal:
        gen_config.save_pretrained(hf_dir)

    world = case.tp * case.pp * case.ep
    ref_logits = ids = None
    if case.writer == "mcore" and case.pp == 1 and "Moe" not in case.arch and "Mixtral" not in case.arch and causal:
        ids = torch.randint(0, case.sizes["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ref_logits = model(input_ids=ids).logits  # [b, s, vocab], as GPTModel returns them
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if case.writer == "mcore":
            args = (world, case, model.config, sd, dist_dir, store, ref_logits, ids)
            mp.start_processes(rank_main, args=args, nprocs=world, start_method="fork")
        else:
            args = (world, case, model.config, sd, dist_dir, store)
            mp.start_processes(dcp_rank_main, args=args, nprocs=world, start_method="fork")
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump({"case": name, "arch": case.arch, "tp": case.tp, "pp": case.pp, "ep": case.ep, "tie": case.tie,
                   "padded_vocab": padded_vocab(case, case.sizes["vocab_size"]),
                   "writer": case.writer, "description": case.notes, "logits_checked": ref_logits is not None}, f,
                  indent=1)
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="parent folder; each case lands in OUT/<case>")
    ap.add_argument("--case", required=True, help=f"comma-separated cases: {', '.join(CASES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true",
                    help="hidden 16, vocab 40, 2 layers (tests/compat corpus entries of a few KB)")
    a = ap.parse_args()
    if a.tiny:
        for c in CASES.values():
            c.sizes = dict(TINY_MOE if c.sizes is MOE else TINY_DENSE)
            for k, v in (("moe_intermediate_size", 8), ("head_dim", 4), ("shared_expert_intermediate_size", 12)):
                if k in c.extra:
                    c.extra[k] = v
            c.extra.update(bos_token_id=1, eos_token_id=2, pad_token_id=1)  # inside the small vocabulary
    names = [c for c in a.case.split(",") if c]
    for n in names:
        if n not in CASES:
            raise SystemExit(f"make_megatron_ckpt: unknown case {n!r}; known: {', '.join(CASES)}")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.simplefilter("ignore")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tokenizer, gen_config = build_tokenizer(), build_generation_config()
    if any(CASES[n].writer == "mcore" for n in names):
        # Imported once here, so that the forked ranks share it (seconds per case otherwise).
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        import megatron.core.models.gpt.gpt_model  # noqa: F401
    for n in names:
        try:
            dt = make_case(n, a.seed, os.path.join(a.out, n), tokenizer, gen_config)
        except mp.ProcessRaisedException as e:
            print(f"make_megatron_ckpt: case {n} failed in a rank:\n{e}", file=sys.stderr)
            return 1
        print(f"{n}: {os.path.join(a.out, n)} ({dt:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
