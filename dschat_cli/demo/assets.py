"""The demo's inputs, built locally under its output folder (once): a word-level tokenizer
trained on the demo's own texts (~900 words, one token per word or punctuation mark, so an answer
is a few dozen tokens), an OPT model of ~2M parameters, and the synthetic preference data with
hard negatives and a known true reward (demo/judge.py).

    base, data = build_demo_inputs(Path("out"))   # out/demo-base, out/demo-data

`dschat pipeline --demo` trains on them; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from dschat_cli.demo.synthetic import demo_corpus, write_jsonfile_dir

# The split of the demo data over steps 1, 2 and 3 (--data-split).
DEMO_SPLIT = "4,4,2"
# The model: big enough to write whole sentences, small enough to train on 2 CPU cores in a minute.
DEMO_MODEL = {"hidden": 192, "layers": 4, "heads": 6, "ffn_mult": 4, "max_positions": 256}
# Training rows (split DEMO_SPLIT over the steps) and held-out rows (the training topics in
# question phrasings never seen in training).
DEMO_ROWS = {"n_train": 3000, "n_eval": 640}


def build_demo_inputs(root: Path) -> tuple[Path, Path]:
    """-> (the base model folder, the local/jsonfile data folder) under `root`, built if missing."""
    from dschat_cli.models.local_tokenizer import build_word_tokenizer
    from dschat_cli.models.tiny import save_tiny_model
    from dschat_cli.ui.console import console

    base, data = root / "demo-base", root / "demo-data"
    if not (base / "config.json").is_file():
        with console.status("demo: building a word-level tokenizer and a tiny model"):
            tok = build_word_tokenizer(texts=demo_corpus(),
                                       model_max_length=DEMO_MODEL["max_positions"])
            save_tiny_model("opt", base, tokenizer=tok, dropout=0.0, **DEMO_MODEL)
    if not (data / "train.json").is_file():
        write_jsonfile_dir(data, seed=0, **DEMO_ROWS)
    return base, data
