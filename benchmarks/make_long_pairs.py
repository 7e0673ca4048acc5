"""Write a local/jsonfile folder whose samples are long enough to fill --max-seq-len tokens.

    python benchmarks/make_long_pairs.py OUT_DIR [N_TRAIN] [WORDS]

Used by the step-1 throughput benchmark in docs/benchmarks.md: with random weights the content
does not matter, only that every sample is truncated to exactly max_seq_len tokens.
"""

import json
import random
import sys
from pathlib import Path

out = Path(sys.argv[1])
n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
words = int(sys.argv[3]) if len(sys.argv) > 3 else 900
rng = random.Random(0)
vocab = ("the a of to and in is it you that he was for on are with as I his they be at one have "
         "this from or had by word but what some we can out other were all there when up use your "
         "how said an each she which do their time if will way about many then them write would "
         "like so these her long make thing see him two has look more day could go come did number "
         "sound no most people my over know water than call first who may down side been now "
         "find").split()


def row():
    q = " ".join(rng.choice(vocab) for _ in range(20))
    a = " ".join(rng.choice(vocab) for _ in range(words))
    return {"prompt": f" Human: {q}? Assistant:", "chosen": f" {a}.", "rejected": f" {a[::-1]}."}


out.mkdir(parents=True, exist_ok=True)
(out / "train.json").write_text(json.dumps([row() for _ in range(n_train)]))
(out / "eval.json").write_text(json.dumps([row() for _ in range(64)]))
print(f"wrote {n_train} train / 64 eval samples to {out}")
