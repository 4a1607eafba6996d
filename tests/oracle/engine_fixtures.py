"""engine_fixtures.py — small random HF models of each family the engine supports, a batch of
variable-length sequences, and transformers' own log-probs / entropy / values for them
(padded batches, computed directly from the full softmax). Used by tests/engine at test time.

    python engine_fixtures.py OUT_DIR
"""
import copy
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

VOCAB = 256
T_SCALAR = 0.7


def randomize(model, seed):
    # HF init gives near-uniform outputs; spread the weights so log-probs differ per token.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def models():
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, rms_norm_eps=1e-5, max_position_embeddings=256)
    return {
        "qwen2": (transformers.Qwen2ForCausalLM,
                  transformers.Qwen2Config(num_key_value_heads=2, rope_theta=10000.0, **common), {}),
        "llama_tied": (transformers.LlamaForCausalLM,
                       transformers.LlamaConfig(num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
                                                rope_theta=500000.0,
                                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 32},
                                                **common), {"max_shard_size": "40KB"}),
        "llama_linear": (transformers.LlamaForCausalLM,
                         transformers.LlamaConfig(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                                  rope_scaling={"rope_type": "linear", "factor": 2.0}, **common), {}),
        "qwen3": (transformers.Qwen3ForCausalLM,
                  transformers.Qwen3Config(num_key_value_heads=2, head_dim=32, **common), {}),
        "value": (transformers.Qwen2ForTokenClassification,
                  transformers.Qwen2Config(num_key_value_heads=2, num_labels=1, **common), {}),
        # Mixture of experts: sparse and dense layers mixed (mlp_only_layers, decoder_sparse_step),
        # a shared expert (Qwen2-MoE), top-k renormalised or not, a value head.
        "qwen2_moe": (transformers.Qwen2MoeForCausalLM,
                      transformers.Qwen2MoeConfig(num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                                  norm_topk_prob=False, mlp_only_layers=[1],
                                                  **{**common, "num_hidden_layers": 3}), {}),
        "qwen3_moe": (transformers.Qwen3MoeForCausalLM,
                      transformers.Qwen3MoeConfig(num_key_value_heads=2, head_dim=16, num_experts=8,
                                                  num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                                                  decoder_sparse_step=2, **{**common, "num_hidden_layers": 4}), {}),
        "mixtral": (transformers.MixtralForCausalLM,
                    transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                               sliding_window=None, rope_theta=1e6, **common), {}),
        "moe_value": (transformers.Qwen3MoeForTokenClassification,
                      transformers.Qwen3MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=24, num_labels=1, **common), {}),
    }


def padded(seqs):
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def reference(model, seqs, temps, dtype):
    """transformers on a right-padded batch → packed per-token outputs (the CLI's layout)."""
    m = model.to(dtype)
    ids, mask = padded(seqs)
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask).logits
    res = {}
    if type(m).__name__.endswith("ForTokenClassification"):
        res["values"] = torch.cat([out[i, : len(s), 0].float() for i, s in enumerate(seqs)])
        return res
    lps, ents = [], []
    for i, s in enumerate(seqs):
        logits = out[i, : len(s)].float() / temps[i]
        logp = torch.log_softmax(logits, dim=-1)
        lp = torch.zeros(len(s))
        lp[:-1] = logp[:-1].gather(1, s[1:].unsqueeze(1)).squeeze(1)
        ent = -(torch.softmax(logits, -1) * logp).sum(-1)
        lps.append(lp)
        ents.append(ent)
    res["log_probs"] = torch.cat(lps)
    res["entropy"] = torch.cat(ents)
    return res


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    lens = [1, 17, 40, 5, 33, 2, 26, 12]
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lens]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.long)
    flat = torch.cat(seqs)
    save_file({"input_ids": flat, "cu_seqlens": cu}, f"{out}/batch.safetensors")
    temps = torch.tensor([0.5, 1.0, 1.3, 0.9, 2.0, 0.7, 1.1, 0.6], dtype=torch.float32)
    save_file({"input_ids": flat, "cu_seqlens": cu, "temperature": temps}, f"{out}/batch_temp.safetensors")
    info = {}
    for i, (name, (cls, cfg, save_kw)) in enumerate(models().items()):
        cfg.architectures = [cls.__name__]
        model = cls(cfg).eval()
        randomize(model, 100 + i)
        path = f"{out}/{name}"
        model.save_pretrained(path, safe_serialization=True, **save_kw)
        rot = model.model.rotary_emb
        info[name] = {
            "head_dim": model.model.layers[0].self_attn.head_dim,
            "num_kv_heads": cfg.num_key_value_heads,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "num_params": sum(p.numel() for p in model.parameters()),
        }
        save_file({"inv_freq": rot.inv_freq.float().contiguous()}, f"{path}/../{name}_inv_freq.safetensors")
        for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            ref = reference(copy.deepcopy(model), seqs, [T_SCALAR] * len(seqs), dt)
            save_file({k: v.contiguous() for k, v in ref.items()}, f"{out}/ref_{name}_{tag}.safetensors")
        if name == "qwen2":
            ref = reference(model, seqs, temps.tolist(), torch.float32)
            save_file({k: v.contiguous() for k, v in ref.items()}, f"{out}/ref_{name}_fp32_temp.safetensors")
    info["temperature"] = T_SCALAR
    with open(f"{out}/info.json", "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
