"""The demo's inputs, built locally under its output folder (once): a tiny OPT model with a
tokenizer trained on the demo's own texts, and the synthetic preference data.

    base, data = build_demo_inputs(Path("out"))   # out/demo-base, out/demo-data

`dschat pipeline --demo` trains on them; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from dschat_cli.demo.synthetic import demo_corpus, write_jsonfile_dir

# The split of the demo data over steps 1, 2 and 3 (--data-split).
DEMO_SPLIT = "4,3,3"


def build_demo_inputs(root: Path) -> tuple[Path, Path]:
    """-> (the base model folder, the local/jsonfile data folder) under `root`, built if missing."""
    from dschat_cli.models.local_tokenizer import build_local_tokenizer
    from dschat_cli.models.tiny import save_tiny_model
    from dschat_cli.ui.console import console

    base, data = root / "demo-base", root / "demo-data"
    if not (base / "config.json").is_file():
        with console.status("demo: building a tiny model and tokenizer"):
            tok = build_local_tokenizer(texts=demo_corpus())
            save_tiny_model("opt", base, tokenizer=tok, hidden=64, layers=2, dropout=0.0)
    if not (data / "train.json").is_file():
        write_jsonfile_dir(data, n_train=1000, n_eval=640, seed=0)
    return base, data
