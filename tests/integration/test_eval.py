"""`dschat eval` on CPU: the same prompts through a baseline and a fine-tuned model, side by side.

    dschat eval --baseline TINY --finetuned OUT --output-file answers.jsonl

The fine-tuned model is the tiny OPT after an in-process SFT run (shared with test_sft through the
session's `sft_run` cache); the baseline is the tiny OPT it started from.
"""

from __future__ import annotations

import json

import pytest

from dschat_cli.eval.prompts import DEFAULT_PROMPTS, as_prompt


@pytest.fixture(scope="module")
def finetuned(sft_run):
    result, out = sft_run("opt", 0, 8)
    assert result.code == 0, result.explain()
    return out


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _printable(text: str) -> bool:
    return text.isprintable() and "\ufffd" not in text


def test_eval_builtin_prompts_table_and_output_file(tmp_path, tiny_opt, finetuned, run_dschat):
    answers = tmp_path / "answers" / "eval.jsonl"
    r = run_dschat("eval", "--baseline", tiny_opt, "--finetuned", finetuned, "--max-new-tokens",
                   "8", "--output-file", answers, timeout=120, columns=400)
    assert r.code == 0, r.explain()
    assert "Traceback" not in r.output
    assert "prompt evaluation" in r.output
    header = r.output[:r.output.index("Human:")]
    assert "baseline" in header and "finetuned" in header
    assert str(tiny_opt) in header and str(finetuned) in header

    rows = _read_jsonl(answers)
    assert [row["prompt"] for row in rows] == [as_prompt(p) for p in DEFAULT_PROMPTS]
    table_lines = r.output.splitlines()
    for row in rows:
        assert set(row) == {"prompt", "baseline", "finetuned"}
        assert isinstance(row["baseline"], str) and isinstance(row["finetuned"], str)
        # one table line holds the prompt and both answers, side by side
        line = next((ln for ln in table_lines if row["prompt"].strip() in ln), None)
        assert line is not None, f"prompt {row['prompt']!r} not in the table\n{r.output}"
        for label in ("baseline", "finetuned"):
            if row[label] and _printable(row[label]):
                assert row[label].strip() in line, (label, row[label], line)
    # SFT changed the model: at least one answer differs from the base model's
    assert any(row["baseline"] != row["finetuned"] for row in rows)


@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl"])
def test_eval_prompts_file(fmt, tmp_path, finetuned, invoke_dschat):
    questions = ["How do I bake bread?", " Human: How do I brew coffee? Assistant:"]
    prompts = tmp_path / f"prompts.{fmt}"
    if fmt == "txt":
        prompts.write_text("\n".join(questions) + "\n\n", encoding="utf-8")
    elif fmt == "json":
        prompts.write_text(json.dumps(questions), encoding="utf-8")
    else:
        prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions),
                           encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    # --finetuned alone: one answer column
    r = invoke_dschat("eval", "--finetuned", finetuned, "--prompts", prompts, "--max-new-tokens",
                      "6", "--output-file", answers, "--device", "cpu", "--batch-size", "1")
    assert r.code == 0, r.explain()
    rows = _read_jsonl(answers)
    assert [row["prompt"] for row in rows] == [" Human: How do I bake bread? Assistant:",
                                               " Human: How do I brew coffee? Assistant:"]
    assert all(set(row) == {"prompt", "finetuned"} for row in rows)
    assert "Human: How do I bake bread? Assistant:" in r.output
    assert "baseline" not in r.output
    assert "answers written to" in r.output


def test_eval_greedy_answers_are_reproducible(tmp_path, tiny_opt, finetuned, invoke_dschat):
    """Greedy decoding, batched or not, gives the same answers (left padding is right)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I bake bread?\nHow can I learn to play the guitar well?\n"
                       "Why?\n", encoding="utf-8")
    outs = []
    for batch in ("1", "3"):
        answers = tmp_path / f"a{batch}.jsonl"
        r = invoke_dschat("eval", "--baseline", tiny_opt, "--finetuned", finetuned, "--prompts",
                          prompts, "--max-new-tokens", "8", "--output-file", answers,
                          "--batch-size", batch)
        assert r.code == 0, r.explain()
        outs.append(_read_jsonl(answers))
    assert outs[0] == outs[1]


def test_eval_prints_prompts_and_answers_verbatim(tmp_path, finetuned, invoke_dschat):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What does [/b] mean in a list [1, 2]?\nWhy is [bold]this[/bold] odd?\n",
                       encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    r = invoke_dschat("eval", "--finetuned", finetuned, "--prompts", prompts, "--max-new-tokens",
                      "4", "--output-file", answers)
    assert r.code == 0, r.explain()
    assert "What does [/b] mean in a list [1, 2]?" in r.output
    assert "Why is [bold]this[/bold] odd?" in r.output
    assert len(_read_jsonl(answers)) == 2


@pytest.fixture(scope="module")
def reward_model(tiny_opt, pairs_dir, tmp_path_factory, invoke_dschat):
    out = tmp_path_factory.mktemp("eval_reward") / "rm"
    r = invoke_dschat("reward", "--model", tiny_opt, "--data-path", "local/jsonfile", "--data-dir",
                      pairs_dir, "--data-split", "0,10,0", "--output-dir", out,
                      "--data-cache-dir", out.parent / "cache", "--num-train-epochs", "1",
                      "--learning-rate", "1e-3", "--max-seq-len", "128", "--launcher", "none")
    assert r.code == 0, r.explain()
    return out


def test_eval_scores_answers_with_a_reward_model(tmp_path, tiny_opt, finetuned, reward_model,
                                                 invoke_dschat):
    """--reward-model: every answer's score in the table and the output file, each side's mean
    with its standard error, and the fine-tuned model's win rate over the baseline (ties half)."""
    import math

    answers = tmp_path / "eval.jsonl"
    r = invoke_dschat("eval", "--baseline", tiny_opt, "--finetuned", finetuned,
                      "--max-new-tokens", "8", "--reward-model", reward_model,
                      "--output-file", answers)
    assert r.code == 0, r.explain()
    rows = _read_jsonl(answers)
    assert len(rows) == len(DEFAULT_PROMPTS)
    for row in rows:
        assert set(row) == {"prompt", "baseline", "finetuned", "baseline_score", "finetuned_score"}
        assert all(math.isfinite(row[k]) for k in ("baseline_score", "finetuned_score"))
    assert "reward model scores" in r.output
    n = len(rows)
    for label in ("baseline", "finetuned"):
        s = [row[f"{label}_score"] for row in rows]
        mean = sum(s) / n
        stderr = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1) / n)
        line = next(ln for ln in r.output.splitlines()
                    if ln.replace("│", " ").split()[:1] == [label] and f"{mean:.3f}" in ln)
        assert f"{mean:.3f}" in line and f"{stderr:.3f}" in line and f" {n}" in line, line
    wins = sum(1.0 if row["finetuned_score"] > row["baseline_score"] else
               0.5 if row["finetuned_score"] == row["baseline_score"] else 0.0 for row in rows)
    win_line = next(ln for ln in r.output.splitlines() if "finetuned wins" in ln)
    assert f"{wins / n:.1%}" in win_line, win_line


def test_eval_refuses_a_reward_model_that_is_not_one(tmp_path, finetuned, invoke_dschat):
    r = invoke_dschat("eval", "--finetuned", finetuned, "--reward-model", finetuned)
    assert r.code == 2, r.explain()
    assert r.output.strip().splitlines()[-1].startswith("error: --reward-model: "), r.output
