"""`dschat eval`: the same prompts through a baseline and a fine-tuned model, side by side."""

from __future__ import annotations

import json
from pathlib import Path

from dschat_cli.config.eval import EvalConfig
from dschat_cli.checks import check_output_file
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
    check_output_file(cfg.output_file, "--output-file", "results.jsonl")
    device = pick_device(cfg.inference.device)
    dtype = pick_dtype(cfg.inference.dtype, device)
    models = [(label, path, flag) for label, path, flag in
              (("baseline", cfg.baseline, "--baseline"), ("finetuned", cfg.finetuned, "--finetuned"))
              if path]
    from dschat_cli.models.inference import check_causal_lm_dir

    trust = cfg.inference.trust_remote_code
    for _, path, flag in models:  # fail before loading anything
        check_causal_lm_dir(path, flag, trust_remote_code=trust)
    if cfg.reward_model:
        from dschat_cli.config.sections import ModelOptions
        from dschat_cli.models.loading import check_model_source
        from dschat_cli.models.reward import check_reward_dir

        check_reward_dir(cfg.reward_model, "--reward-model")
        check_model_source(ModelOptions(model=cfg.reward_model, trust_remote_code=trust),
                           "--reward-model")
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
    scores: dict[str, list[float]] = {}
    if cfg.reward_model:
        with console.status(f"scoring the answers with {cfg.reward_model}"):
            scores = score_answers(cfg.reward_model, prompts, answers, device=device, dtype=dtype,
                                   batch_size=cfg.inference.batch_size, trust_remote_code=trust)
        for i, row in enumerate(rows):
            row.update({f"{label}_score": s[i] for label, s in scores.items()})
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
        if scores:
            table.add_column("score", justify="right")

    def cells(label: str, i: int) -> list:
        answer = plain_text(answers[label][i]) or Text("(empty)", style="dim")
        return [answer, f"{scores[label][i]:.3f}"] if scores else [answer]

    for i, prompt in enumerate(prompts):  # model text is shown verbatim, never as markup
        table.add_row(Text(prompt.strip()), *[c for label, _, _ in models for c in cells(label, i)])
    console.print(table)
    summary = score_summary(scores) if scores else {}
    if summary:
        console.print(score_table(summary, cfg.reward_model))
    if cfg.output_file:
        console.print(Text(f"answers written to {Path(cfg.output_file).expanduser()}"))
    return {"rows": rows, "scores": summary}


def score_answers(reward_model: str, prompts: list[str], answers: dict[str, list[str]], *, device,
                  dtype, batch_size: int, trust_remote_code: bool) -> dict[str, list[float]]:
    """{label: reward score of each answer} (the answer in DeepSpeed-Chat's " {answer}" form, at
    the token limit the reward model was trained with)."""
    from transformers import AutoTokenizer

    from dschat_cli.eval.reward import _saved_run_config, _score, training_max_len
    from dschat_cli.models.reward import load_reward_model

    tokenizer = AutoTokenizer.from_pretrained(reward_model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_reward_model(reward_model, dtype=dtype,
                              trust_remote_code=trust_remote_code).to(device).eval()
    max_len = training_max_len(_saved_run_config(reward_model))
    return {label: _score(model, tokenizer, prompts, [" " + a.strip() for a in texts],
                          max_len=max_len, batch_size=batch_size, device=device)
            for label, texts in answers.items()}


def score_summary(scores: dict[str, list[float]]) -> dict:
    """Per side: mean score, its standard error and n; with both sides, the fine-tuned model's
    win rate over the baseline on the same prompts (a tie counts half) and its standard error."""
    import math

    out: dict = {}
    for label, s in scores.items():
        n = len(s)
        mean = sum(s) / n
        var = sum((x - mean) ** 2 for x in s) / (n - 1) if n > 1 else math.nan
        out[label] = {"mean": mean, "stderr": math.sqrt(var / n), "n": n}
    if "baseline" in scores and "finetuned" in scores:
        wins = [1.0 if f > b else 0.5 if f == b else 0.0
                for b, f in zip(scores["baseline"], scores["finetuned"])]
        n = len(wins)
        p = sum(wins) / n
        out["win_rate"] = {"finetuned_over_baseline": p, "stderr": math.sqrt(p * (1 - p) / n),
                           "n": n}
    return out


def score_table(summary: dict, reward_model: str):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"reward model scores ({reward_model})"), title_justify="left")
    for col in ("", "mean score", "± standard error", "answers"):
        table.add_column(col, justify="left" if not col else "right")
    for label in ("baseline", "finetuned"):
        if label in summary:
            s = summary[label]
            table.add_row(label, f"{s['mean']:.3f}", f"{s['stderr']:.3f}", str(s["n"]))
    if "win_rate" in summary:
        w = summary["win_rate"]
        table.add_row("finetuned wins", f"{w['finetuned_over_baseline']:.1%}",
                      f"{w['stderr']:.1%}", str(w["n"]))
    return table
