# Makes the fixture for the verl-on-CPU tests: a tiny random Qwen2 as a HuggingFace folder (with a
# byte-level BPE tokenizer built here with the `tokenizers` library and a ChatML-like chat template),
# the same weights as a value model (Qwen2ForTokenClassification, num_labels=1, as verl's critic loads
# it in verl/utils/model.py load_valuehead_model), and SFT parquet files in the format of verl's
# MultiTurnSFTDataset (verl/utils/dataset/multiturn_sft_dataset.py), the dataset class the engine-based
# trainer verl/trainer/sft_trainer.py uses by default: one column `messages` = list of {role, content}.
#
# usage: make_fixture.py OUT   ->  OUT/model, OUT/critic, OUT/data/{train,val}.parquet
# Deterministic: the same OUT contents on every run (fixed seeds, fixed word lists).

import argparse
import json
import os
import random
import sys

import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForTokenClassification, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# No system prompt, so verl's per-turn tokenisation (each message through the template alone,
# concatenated) equals tokenising the whole conversation (MultiTurnSFTDataset.sanity_check).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = (
    "the a one two three four five six seven eight nine ten cat dog bird fish tree river stone "
    "red blue green small big fast slow runs sees eats likes finds and or but with from to of "
    "what is how many plus minus times answer question because so then"
).split()
NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def conversations(n, rng):
    """n conversations of varied length: 1-3 user/assistant turns, 3-40 words a message."""
    out = []
    for i in range(n):
        turns = 1 + (i % 3)
        msgs = []
        for _ in range(turns):
            a, b = rng.randrange(6), rng.randrange(5)
            q = f"what is {NUM[a]} plus {NUM[b]}? " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 18)))
            ans = f"the answer is {NUM[a + b]}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 24)))
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        out.append(msgs)
    return out


def build_tokenizer(corpus, vocab_size, model_max_length=512):
    """A byte-level BPE trained on `corpus`, with the chat template (also used by bench/verl_engine)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=48, help="train conversations")
    ap.add_argument("--val", type=int, default=16, help="validation conversations")
    ap.add_argument("--tie", action="store_true", help="tie_word_embeddings (default: separate lm_head)")
    args = ap.parse_args()

    rng = random.Random(1234)
    train, val = conversations(args.train, rng), conversations(args.val, rng)
    corpus = [m["content"] for c in train + val for m in c] + [" ".join(WORDS)] * 4 + ["\n", "user", "assistant"]

    vocab_size = 320  # model vocabulary; the tokenizer uses at most this many ids
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size - 8)
    assert len(tokenizer) <= vocab_size, len(tokenizer)

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=args.tie,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # the default init (std 0.02, zero biases, unit norms) hides mistakes; vary all
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # q/k/v biases
                p.normal_(0.0, 0.05)

    model_dir = os.path.join(args.out, "model")
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    # the critic: same backbone, a 1-output score head (random), as verl loads a value model
    critic_config = Qwen2Config.from_pretrained(model_dir)
    critic_config.num_labels = 1
    critic_config.architectures = ["Qwen2ForTokenClassification"]
    torch.manual_seed(1)
    critic = AutoModelForTokenClassification.from_config(critic_config).float()
    critic.model.load_state_dict(model.model.state_dict(), strict=True)
    critic_dir = os.path.join(args.out, "critic")
    critic.save_pretrained(critic_dir, safe_serialization=True)
    tokenizer.save_pretrained(critic_dir)

    data_dir = os.path.join(args.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    for name, convs in (("train", train), ("val", val)):
        pd.DataFrame({"messages": convs}).to_parquet(os.path.join(data_dir, f"{name}.parquet"))

    lengths = [len(tokenizer.apply_chat_template(c, tokenize=False)) for c in train]  # characters
    summary = {
        "model": model_dir,
        "critic": critic_dir,
        "train": os.path.join(data_dir, "train.parquet"),
        "val": os.path.join(data_dir, "val.parquet"),
        "tokenizer_size": len(tokenizer),
        "train_chars_min_max": [min(lengths), max(lengths)],
        "params": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(args.out, "fixture.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
