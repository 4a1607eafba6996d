# Makes the mixture-of-experts fixture for the verl-on-CPU expert-parallel tests (tests/verl/run_ep.sh):
# a tiny random Qwen3-MoE (transformers' Qwen3MoeForCausalLM: 8 experts, top-2, one dense layer
# through mlp_only_layers) with the tokenizer and SFT data of an existing fixture of make_fixture.py,
# so verl's sft_trainer runs it exactly as it runs the dense fixture.
#
# usage: make_moe_fixture.py BASE OUT   ->  OUT/model (+ tokenizer), OUT/critic (Qwen3MoeForTokenClassification,
#        num_labels=1, the same backbone), OUT/data -> BASE/data, OUT/fixture.json
# Deterministic: the same OUT contents on every run.

import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("base", help="a fixture folder made by make_fixture.py (its tokenizer and data are reused)")
    ap.add_argument("out")
    args = ap.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.base, "model"))
    base_cfg = json.load(open(os.path.join(args.base, "model", "config.json")))
    config = Qwen3MoeConfig(
        vocab_size=base_cfg["vocab_size"],
        hidden_size=64,
        intermediate_size=96,  # the dense layer's MLP
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],  # layer 1 dense, layers 0 and 2 sparse
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        output_router_logits=False,  # verl's engines train on the token loss only
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():  # vary every parameter (the default init hides mistakes); routers spread wide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("gate.weight") and "experts" not in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.08)

    model_dir = os.path.join(args.out, "model")
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    # the critic: same backbone, a 1-output score head (random), as verl loads a value model
    critic_config = Qwen3MoeConfig.from_pretrained(model_dir)
    critic_config.num_labels = 1
    critic_config.architectures = ["Qwen3MoeForTokenClassification"]
    torch.manual_seed(1)
    critic = AutoModelForTokenClassification.from_config(critic_config).float()
    critic.model.load_state_dict(model.model.state_dict(), strict=True)
    critic_dir = os.path.join(args.out, "critic")
    critic.save_pretrained(critic_dir, safe_serialization=True)
    tokenizer.save_pretrained(critic_dir)

    data = os.path.join(args.out, "data")
    if not os.path.exists(data):
        os.symlink(os.path.abspath(os.path.join(args.base, "data")), data)
    summary = {"model": model_dir, "critic": critic_dir, "base": os.path.abspath(args.base),
               "params": sum(p.numel() for p in model.parameters()), "num_experts": config.num_experts}
    with open(os.path.join(args.out, "fixture.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
