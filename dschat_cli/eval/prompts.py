"""`dschat eval`: the same prompts through a baseline and a fine-tuned model, side by side."""

from __future__ import annotations

import json
from pathlib import Path

from dschat_cli.config.eval import EvalConfig
from dschat_cli.config.schema import ConfigError

# The six prompts DeepSpeed-Chat's prompt_eval.py used by default.
DEFAULT_PROMPTS = [
    "Please tell me about Microsoft in a few sentence?",
    "Explain the moon landing to a 6 year old in a few sentences.",
    "Write a short poem about a wise frog.",
    "Who was president of the United States in 1955?",
    "How does a telescope work?",
    "Why do birds migrate south for the winter?",
]


def as_prompt(text: str) -> str:
    """Wrap a plain question in the DeepSpeed-Chat format; keep prompts already in it."""
    t = text.strip()
    if "Human:" in t:
        return " " + t if not t.startswith(" ") else t
    return f" Human: {t} Assistant:"


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return [as_prompt(p) for p in DEFAULT_PROMPTS]
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("--prompts", f"file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("--prompts", f"{path} is not UTF-8 text") from None
    try:
        if p.suffix == ".json":
            rows = json.loads(text)
        elif p.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = [line for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError("--prompts", f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    prompts = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            if "prompt" not in row:
                raise ConfigError("--prompts", f"{path}: entry {i} has no \"prompt\" key")
            row = row["prompt"]
        if not isinstance(row, str):
            raise ConfigError("--prompts", f"{path}: entry {i} is not text")
        prompts.append(as_prompt(row))
    if not prompts:
        raise ConfigError("--prompts", f"{path} holds no prompts")
    return prompts


def check_output_file(path: str | None, flag: str = "--output-file") -> None:
    """Before any model loads: the results file can be written (failing after minutes of
    generation would lose the results). The file itself is written only at the end."""
    if not path:
        return
    import os

    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(flag, f"{path} is a folder; give a file name, e.g. {p / 'results.jsonl'}")
    parent = next((q for q in p.parents if q.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(flag, f"{parent} is a file, so {path} cannot be created; give another "
                          "path")
    target = p if p.exists() else parent
    if not os.access(target, os.W_OK):
        raise ConfigError(flag, f"{target} is not writable; give another path")


def run_eval(cfg: EvalConfig) -> dict:
    import torch
    from rich.table import Table
    from rich.text import Text

    from dschat_cli.ui.console import plain_text

    from dschat_cli.models.inference import (generate_answers, load_for_inference, pick_device,
                                             pick_dtype)
    from dschat_cli.ui.console import console, quiet_libraries

    quiet_libraries()

    prompts = read_prompts(cfg.prompts)
    check_output_file(cfg.output_file)
    device = pick_device(cfg.inference.device)
    dtype = pick_dtype(cfg.inference.dtype, device)
    models = [(label, path, flag) for label, path, flag in
              (("baseline", cfg.baseline, "--baseline"), ("finetuned", cfg.finetuned, "--finetuned"))
              if path]
    from dschat_cli.models.inference import check_causal_lm_dir

    trust = cfg.inference.trust_remote_code
    for _, path, flag in models:  # fail before loading anything
        check_causal_lm_dir(path, flag, trust_remote_code=trust)
    answers: dict[str, list[str]] = {}
    for label, path, flag in models:
        torch.manual_seed(cfg.inference.seed)
        with console.status(f"{label}: loading {path} and generating {len(prompts)} answers"):
            model, tok = load_for_inference(path, device=device, dtype=dtype, flag=flag,
                                            trust_remote_code=trust)
            answers[label] = generate_answers(model, tok, prompts, cfg.generation,
                                              cfg.inference.batch_size)
            del model
    rows = [{"prompt": p, **{label: answers[label][i] for label, _, _ in models}}
            for i, p in enumerate(prompts)]
    if cfg.output_file:  # before printing: a terminal problem must not lose the answers
        out = Path(cfg.output_file).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    table = Table(title=f"prompt evaluation ({device}, "
                        f"{'sampling' if cfg.generation.do_sample else 'greedy'})",
                  show_lines=True)
    table.add_column("prompt", ratio=1)
    for label, path, _ in models:
        table.add_column(Text(f"{label}\n{path}"), ratio=2)
    for i, prompt in enumerate(prompts):  # model text is shown verbatim, never as markup
        table.add_row(Text(prompt.strip()), *[plain_text(answers[label][i]) or Text("(empty)", style="dim")
                                              for label, _, _ in models])
    console.print(table)
    if cfg.output_file:
        console.print(Text(f"answers written to {Path(cfg.output_file).expanduser()}"))
    return {"rows": rows}
