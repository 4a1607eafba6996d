"""ref_balance.py — random micro-batching cases partitioned by verl's own
verl.utils.seqlen_balancing (get_seqlen_balanced_partitions, rearrange_micro_batches), written
as JSON for tests/engine/test_balance.cpp to compare with the C++ port.

    python ref_balance.py OUT_DIR [SEED] [N]   (writes OUT_DIR/cases.json)
"""
import json
import random
import sys

import torch
from tensordict import TensorDict

from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions, rearrange_micro_batches


def main(out_dir, seed=0, n=300):
    out = out_dir + "/cases.json"
    rng = random.Random(seed)
    kk, rearr = [], []
    for case in range(n):
        size = rng.randint(1, 40)
        hi = rng.choice([3, 50, 1000, 5000])
        vals = [rng.randint(1, hi) for _ in range(size)]
        if rng.random() < 0.3:  # many ties
            vals = [rng.choice(vals[:3]) for _ in range(size)]
        k = rng.randint(1, size)
        equal = rng.random() < 0.3 and size % k == 0
        kk.append({"values": vals, "k": k, "equal_size": equal,
                   "partitions": get_seqlen_balanced_partitions(vals, k, equal)})
        # rearrange_micro_batches on a padded attention mask with these lengths.
        lens = [rng.randint(1, hi) for _ in range(size)]
        width = max(lens)
        max_tok = rng.randint(width, max(width, sum(lens) // rng.randint(1, 6)) + width)
        kw = {}
        if rng.random() < 0.3:
            kw["min_num_micro_batch"] = rng.randint(1, size)
        if rng.random() < 0.3:
            kw["num_batches_divided_by"] = rng.randint(1, 3)
        kw["use_dynamic_bsz_balance"] = rng.random() < 0.8
        mask = torch.zeros(size, width, dtype=torch.long)
        for i, L in enumerate(lens):
            mask[i, :L] = 1
        batch = TensorDict({"attention_mask": mask, "input_ids": mask.clone()}, batch_size=[size])
        try:
            _, parts = rearrange_micro_batches(batch, max_token_len=max_tok, **kw)
            err = None
        except (ValueError, AssertionError) as e:
            parts, err = None, str(e)
        rearr.append({"lengths": lens, "max_token_len": max_tok, "options": kw, "partitions": parts, "error": err})
    with open(out, "w") as f:
        json.dump({"karmarkar_karp": kk, "rearrange": rearr}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0, int(sys.argv[3]) if len(sys.argv) > 3 else 300)
