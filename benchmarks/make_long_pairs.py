"""Write a local/jsonfile folder whose samples are long enough to fill --max-seq-len tokens.

    python benchmarks/make_long_pairs.py OUT_DIR [N_TRAIN] [WORDS] [PROMPT_TOKENS]

Used by the throughput benchmarks in docs/benchmarks.md: with random weights the content does not
matter, only that every sample is truncated to exactly max_seq_len tokens. With PROMPT_TOKENS,
every prompt is exactly that many tokens for the byte-level tokenizer dschat builds when a preset's
real tokenizer is not available offline (step 3 benchmarks: 256-token prompts).
"""

import json
import random
import sys
from pathlib import Path

out = Path(sys.argv[1])
n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
words = int(sys.argv[3]) if len(sys.argv) > 3 else 900
prompt_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 0
rng = random.Random(0)
vocab = ("the a of to and in is it you that he was for on are with as I his they be at one have "
         "this from or had by word but what some we can out other were all there when up use your "
         "how said an each she which do their time if will way about many then them write would "
         "like so these her long make thing see him two has look more day could go come did number "
         "sound no most people my over know water than call first who may down side been now "
         "find").split()


def exact_prompt(n_tokens: int) -> str:
    """' Human: the the ... Assistant:' with exactly n_tokens tokens."""
    from dschat_cli.models.local_tokenizer import build_local_tokenizer

    tok = build_local_tokenizer(vocab_size=4096)
    k = n_tokens
    while k > 0:
        text = " Human:" + " the" * k + "? Assistant:"
        n = len(tok(text)["input_ids"])
        if n == n_tokens:
            return text
        k -= max(1, n - n_tokens)
    raise SystemExit(f"cannot build a {n_tokens}-token prompt")


fixed_prompt = exact_prompt(prompt_tokens) if prompt_tokens else None


def row():
    q = " ".join(rng.choice(vocab) for _ in range(20))
    if fixed_prompt:
        a = " ".join(rng.choice(vocab) for _ in range(words))
        return {"prompt": fixed_prompt, "chosen": f" {a}.", "rejected": f" {a[::-1]}."}
    a = " ".join(rng.choice(vocab) for _ in range(words))
    return {"prompt": f" Human: {q}? Assistant:", "chosen": f" {a}.", "rejected": f" {a[::-1]}."}


out.mkdir(parents=True, exist_ok=True)
(out / "train.json").write_text(json.dumps([row() for _ in range(n_train)]))
(out / "eval.json").write_text(json.dumps([row() for _ in range(64)]))
print(f"wrote {n_train} train / 64 eval samples to {out}")
