"""`dschat eval-reward --path DIR`: score answers with a trained reward model.

Pairs come from --prompt/--chosen/--rejected, from --data-path (the eval part of step 2's share),
or by default from the data the model was trained on (its run_config.yaml): its held-out pairs.
--answer scores single answers. Runs in this process, on the GPU when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

from dschat_cli.config.eval_reward import EvalRewardConfig
from dschat_cli.config.schema import ConfigError
from dschat_cli.eval.prompts import as_prompt

# Used when neither pairs nor data are given and the folder has no run config to find its data.
EXAMPLE_PAIRS = [
    (" Human: What is the capital of France? Assistant:",
     " The capital of France is Paris, which is also its largest city.",
     " I don't know. Why don't you look it up yourself?"),
    (" Human: Can you help me write a thank-you note? Assistant:",
     " Of course! Dear Sam, thank you so much for your thoughtful gift. It made my day.",
     " No. Write it yourself."),
]


def _saved_run_config(path: str) -> dict:
    import yaml

    run_cfg = Path(path).expanduser() / "run_config.yaml"
    if not run_cfg.is_file():
        return {}
    try:
        return yaml.safe_load(run_cfg.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}


def training_max_len(saved: dict) -> int:
    """Score with the token limit the model was trained with (512 when unknown)."""
    return int(saved.get("data", {}).get("max_seq_len", 512))


def _rows_from_data(cfg: EvalRewardConfig) -> tuple[list[tuple[str, str, str]], str, int]:
    """-> (pairs, description, max_seq_len) from --data-path or the model's own run config."""
    from dschat_cli.config.sections import DataOptions
    from dschat_cli.data.prepare import load_phase_rows

    saved = _saved_run_config(cfg.path)
    seed, max_len = 1234, training_max_len(saved)
    saved_data = saved.get("data", {})
    if cfg.data_path:
        data = DataOptions(data_path=cfg.data_path, data_dir=cfg.data_dir,
                           data_split=cfg.data_split or saved_data.get("data_split", "2,4,4"))
        seed = saved.get("seed", seed)
        what = ", ".join(cfg.data_path)
    elif saved_data:
        data = DataOptions(data_path=tuple(saved_data["data_path"]), data_dir=saved_data.get("data_dir"),
                           data_split=cfg.data_split or saved_data.get("data_split", "2,4,4"))
        seed = saved.get("seed", seed)
        what = ", ".join(data.data_path) + " (held-out pairs of the model's training data)"
    else:
        return list(EXAMPLE_PAIRS), "built-in example pairs", max_len
    _, eval_rows = load_phase_rows(data, phase=2, seed=seed)
    pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in eval_rows
             if r.get("rejected") not in (None, "")]
    if not pairs:
        raise ConfigError("--data-path", f"the step-2 eval part of {what} has no chosen/rejected "
                          "pairs; pass pairs with --prompt/--chosen/--rejected or another source")
    return pairs, what, max_len


def _score(model, tokenizer, prompts: list[str], answers: list[str], *, max_len: int,
           batch_size: int, device) -> list[float]:
    import torch

    from dschat_cli.data.reward import encode_answer
    from dschat_cli.rlhf.reward import sequence_scores

    scores: list[float] = []
    for i in range(0, len(prompts), batch_size):
        seqs = [encode_answer(tokenizer, p, a, max_len)
                for p, a in zip(prompts[i:i + batch_size], answers[i:i + batch_size])]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        with torch.no_grad():
            values = model(ids.to(device), mask.to(device))
        scores.extend(sequence_scores(values, mask.to(device)).float().cpu().tolist())
    return scores


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    if text.startswith("Human:") and text.endswith("Assistant:"):  # show the question only
        text = text[len("Human:"):-len("Assistant:")].strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def run_eval_reward(cfg: EvalRewardConfig) -> dict:
    from rich.table import Table
    from rich.text import Text
    from transformers import AutoTokenizer

    from dschat_cli.ui.console import plain_text

    from dschat_cli.models.inference import pick_device, pick_dtype
    from dschat_cli.models.reward import check_reward_dir, load_reward_model
    from dschat_cli.ui.console import console, quiet_libraries

    quiet_libraries()

    from dschat_cli.config.sections import ModelOptions
    from dschat_cli.checks import check_output_file
    from dschat_cli.models.loading import check_model_source

    check_reward_dir(cfg.path, "--path")
    trust = cfg.inference.trust_remote_code
    check_model_source(ModelOptions(model=cfg.path, trust_remote_code=trust), "--path")
    check_output_file(cfg.output_file, "--output-file", "results.jsonl")
    device = pick_device(cfg.inference.device)
    dtype = pick_dtype(cfg.inference.dtype, device)
    single = bool(cfg.answer)
    if cfg.prompt:
        prompts = [as_prompt(p) for p in cfg.prompt]
        what = "--prompt pairs" if not single else "--prompt answers"
        max_len = training_max_len(_saved_run_config(cfg.path))
        pairs = list(zip(prompts, cfg.answer if single else cfg.chosen,
                         [""] * len(prompts) if single else cfg.rejected))
    else:
        pairs, what, max_len = _rows_from_data(cfg)
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]
    max_len = cfg.max_seq_len or max_len

    with console.status(f"loading {cfg.path}"):
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=trust)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = load_reward_model(cfg.path, dtype=dtype,
                                  trust_remote_code=trust).to(device).eval()
    bs = cfg.inference.batch_size
    prompts = [p for p, _, _ in pairs]
    with console.status(f"scoring {len(pairs)} {'answers' if single else 'pairs'}"):
        chosen = _score(model, tokenizer, prompts, [c for _, c, _ in pairs], max_len=max_len,
                        batch_size=bs, device=device)
        rejected = [] if single else _score(model, tokenizer, prompts, [r for _, _, r in pairs],
                                            max_len=max_len, batch_size=bs, device=device)

    if single:
        table = Table(title=Text(f"reward scores ({cfg.path})"))
        for col in ("#", "prompt", "answer", "score"):
            table.add_column(col, justify="right" if col in ("#", "score") else "left")
        for i, ((p, a, _), s) in enumerate(zip(pairs, chosen)):
            if i < cfg.show:
                table.add_row(str(i + 1), plain_text(_short(p)), plain_text(_short(a)), f"{s:.3f}")
        console.print(table)
        rows = [{"prompt": p, "answer": a, "score": s} for (p, a, _), s in zip(pairs, chosen)]
        result = {"rows": rows, "mean_score": sum(chosen) / len(chosen)}
    else:
        table = Table(title=Text(f"reward model {cfg.path} on {what}"))
        for col in ("#", "prompt", "chosen", "rejected", "chosen score", "rejected score",
                    "margin", "correct"):
            table.add_column(col, justify="right" if "score" in col or col in ("#", "margin")
                             else "left")
        rows = []
        for i, ((p, c, r), sc, sr) in enumerate(zip(pairs, chosen, rejected)):
            ok = sc > sr
            rows.append({"prompt": p, "chosen": c, "rejected": r, "chosen_score": sc,
                         "rejected_score": sr, "margin": sc - sr, "correct": ok})
            if i < cfg.show:
                table.add_row(str(i + 1), plain_text(_short(p, 40)), plain_text(_short(c, 40)),
                              plain_text(_short(r, 40)), f"{sc:.3f}",
                              f"{sr:.3f}", f"{sc - sr:+.3f}", "[ok]yes[/ok]" if ok else "[err]no[/err]")
        n = len(rows)
        result = {"rows": rows, "pairs": n, "accuracy": sum(r["correct"] for r in rows) / n,
                  "mean_chosen": sum(chosen) / n, "mean_rejected": sum(rejected) / n,
                  "mean_margin": sum(r["margin"] for r in rows) / n}
        if n > cfg.show:
            table.caption = f"first {cfg.show} of {n} pairs shown (--show)"
        console.print(table)
        summary = Table(title="summary", show_header=False, title_justify="left")
        summary.add_column(style="bold")
        summary.add_column(justify="right")
        summary.add_row("pairs scored", str(n))
        summary.add_row("accuracy (chosen > rejected)", f"{result['accuracy']:.3f}")
        summary.add_row("mean chosen score", f"{result['mean_chosen']:.3f}")
        summary.add_row("mean rejected score", f"{result['mean_rejected']:.3f}")
        summary.add_row("mean margin", f"{result['mean_margin']:+.3f}")
        console.print(summary)
    if cfg.output_file:
        out = Path(cfg.output_file).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in result["rows"]), encoding="utf-8")
        console.print(Text(f"scores written to {out}"))
    return result
