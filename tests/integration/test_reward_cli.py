"""`dschat reward` and `dschat eval-reward` end to end on CPU.

    dschat reward --model TINY --data-path local/jsonfile --data-dir PAIRS --data-split 0,10,0 \
        --zero-stage 3 --lora-dim 8 --output-dir out
    dschat eval-reward --path out            # its held-out pairs: table, accuracy

The synthetic pairs (`pairs_dir`: 256 train, 64 eval pairs whose questions use phrasings never
seen in training) prefer a polite answer to a rude one; one epoch (16 steps of 16 pairs at lr 1e-3)
takes a tiny model from about chance to held-out accuracy 1.0 (>= 0.9 is asserted).

    run                                  how                     checked
    opt, ZeRO-3, LoRA 8                  deepspeed.launcher      files, accuracy, eval-reward
                                         (slow, ~25 s)           reproduces the training eval
    llama, ZeRO-0, full                  in process              files, accuracy, eval-reward
                                         (--launcher none)       table, JSONL, modes, reload
    llama, ZeRO-3, LoRA 8                in process              files, accuracy
    opt, ZeRO-0, full, last-token loss   in process              files, accuracy

Error cases (exit 2, one `error: WHERE: ...` line, nothing written) use an untrained reward
folder saved with save_reward_model, so they need no training run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REWARD_FILES = ("model.safetensors", "value_head.safetensors", "config.json", "tokenizer.json",
                "tokenizer_config.json", "run_config.yaml", "resolved.json", "ds_config.json",
                "metrics.jsonl", "train_summary.json", "launch.sh")
MIN_ACCURACY = 0.9
POLITE = " Of course! Start with onions and vegetables, then add stock. I hope this helps!"
RUDE = " Go away, that is a stupid question."
ERROR_LINE = re.compile(r"^error: (?P<where>.+?): \S")


def reward_args(model: Path, out: Path, cache: Path, data_dir: Path, *, zero_stage: int,
                lora_dim: int = 0, extra: tuple = ()) -> list[str]:
    """One epoch on the 256 synthetic train pairs (batch 16 -> 16 steps), all in step 2's share."""
    return ["reward", "--model", model, "--data-path", "local/jsonfile", "--data-dir", data_dir,
            "--data-split", "0,10,0", "--zero-stage", str(zero_stage), "--lora-dim", str(lora_dim),
            "--output-dir", out, "--data-cache-dir", cache, "--num-train-epochs", "1",
            "--learning-rate", "1e-3", "--per-device-train-batch-size", "16",
            "--max-seq-len", "128", *extra]


def check_reward_output(out: Path, *, zero_stage: int, lora_dim: int, launcher: bool) -> dict:
    """What a finished `dschat reward` leaves: record files, a reward folder without LoRA leftovers,
    a loss that fell and held-out accuracy >= MIN_ACCURACY."""
    import yaml
    from safetensors import safe_open

    from dschat_cli.models.reward import is_reward_dir

    files = {p.name for p in out.iterdir()}
    expected = set(REWARD_FILES) | ({"train.log"} if launcher else set())
    assert expected <= files, f"missing {sorted(expected - files)} in {sorted(files)}"
    assert is_reward_dir(out)
    assert json.loads((out / "config.json").read_text())["dschat_role"] == "reward"

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 16, summary
    assert summary["eval_end"]["pairs"] == 64
    assert summary["eval_end"]["accuracy"] >= MIN_ACCURACY, summary["eval_end"]
    assert summary["eval_end"]["chosen"] > summary["eval_end"]["rejected"]
    assert summary["train_loss_last"] < summary["train_loss_first"], summary
    assert summary["eval_start"] is not None and summary["evals"][-1] == summary["eval_end"]
    start, end = summary["eval_start"], summary["eval_end"]
    # trained, not lucky: the mean margin grew by far (the untrained head gives ~0)
    assert end["chosen"] - end["rejected"] > start["chosen"] - start["rejected"] + 1.0, summary

    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    assert len([m for m in metrics if "loss" in m]) == summary["steps"]
    evals = [m for m in metrics if "eval_accuracy" in m]
    assert len(evals) == 2  # before training and after the epoch
    assert evals[-1]["eval_accuracy"] == pytest.approx(summary["eval_end"]["accuracy"])

    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == zero_stage and ds["train_batch_size"] == 16
    run_cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_cfg["lora"]["lora_dim"] == lora_dim
    assert run_cfg["data"]["max_seq_len"] == 128
    launch_sh = (out / "launch.sh").read_text()
    if launcher:
        assert "deepspeed.launcher.runner" in launch_sh and "dschat_cli.worker reward" in launch_sh
    else:
        assert "--launcher none" in launch_sh
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora_" in k or "base_layer" in k or "v_head" in k]
    return summary


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def check_one_line_error(result, where: str) -> None:
    assert result.code == 2, result.explain()
    assert "Traceback" not in result.output, result.explain()
    errors = [ln for ln in result.output.splitlines() if "error:" in ln]
    assert len(errors) == 1, result.explain()
    m = ERROR_LINE.match(errors[0].strip())
    assert m and m.group("where") == where, result.explain()


# --- training runs --------------------------------------------------------------------------------

# (family, zero stage, lora dim, extra flags) of the in-process runs (--launcher none)
IN_PROCESS = [
    ("llama", 0, 0, ()),  # the model the eval-reward tests below score with
    ("llama", 3, 8, ()),
    ("opt", 0, 0, ("--loss", "last-token")),
]


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, pairs_dir, tmp_path_factory, invoke_dschat):
    """Factory: reward_run("llama", 0, 0) -> (CliResult, output folder) of an in-process
    `dschat reward --launcher none` run, trained once per distinct arguments."""
    cache: dict[tuple, tuple] = {}

    def run(family: str, zero_stage: int, lora_dim: int = 0, extra: tuple = ()):
        key = (family, zero_stage, lora_dim, extra)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"reward_{family}_z{zero_stage}_lora{lora_dim}")
            args = reward_args(tiny_model_dir(family), root / "out", root / "data-cache",
                               pairs_dir, zero_stage=zero_stage, lora_dim=lora_dim,
                               extra=("--launcher", "none", *extra))
            cache[key] = (invoke_dschat(*args), root / "out")
        return cache[key]

    return run


@pytest.fixture(scope="module")
def trained(reward_run) -> Path:
    """The folder of the Llama, ZeRO-0 run."""
    result, out = reward_run("llama", 0, 0)
    assert result.code == 0, result.explain()
    return out


def _id(p) -> str:
    fam, stage, lora, extra = p
    return f"{fam}-z{stage}-{'lora' if lora else 'full'}{'-' + extra[-1] if extra else ''}"


@pytest.mark.parametrize("family, zero_stage, lora_dim, extra", IN_PROCESS,
                         ids=[_id(p) for p in IN_PROCESS])
def test_reward_in_process(family, zero_stage, lora_dim, extra, reward_run):
    result, out = reward_run(family, zero_stage, lora_dim, extra)
    assert result.code == 0, result.explain()
    assert "Traceback" not in result.output
    assert "reward summary" in result.output and "eval after training" in result.output
    assert f"ZeRO-{zero_stage}" in result.output and "256 train / 64 eval pairs" in result.output
    loss = extra[-1] if extra else "divergence"
    assert f"{loss} loss" in result.output
    check_reward_output(out, zero_stage=zero_stage, lora_dim=lora_dim, launcher=False)
    assert any((out.parent / "data-cache").iterdir()), "tokenised pairs not cached"


@pytest.mark.slow
def test_reward_launcher_opt_zero3_lora(tmp_path, tiny_opt, pairs_dir, run_dschat, invoke_dschat):
    """The done-when command through deepspeed.launcher (ZeRO-3 partitions, LoRA merged when
    saving); the saved folder then scores the held-out pairs exactly as the live model did at the
    end of training."""
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    result = run_dschat(*reward_args(tiny_opt, out, cache, pairs_dir, zero_stage=3, lora_dim=8),
                        timeout=300)
    assert result.code == 0, result.explain()
    assert "Traceback" not in result.output, result.explain()
    tail = result.output[result.output.index("reward summary"):]
    for row in ("optimizer steps", "train loss (first -> last step)", "eval before training",
                "eval after training", "throughput", "saved"):
        assert row in tail, result.explain()
    assert str(out) in tail
    summary = check_reward_output(out, zero_stage=3, lora_dim=8, launcher=True)
    log = (out / "train.log").read_text()
    assert "reward summary" in log and "\x1b[" not in log
    assert any(cache.iterdir()), "tokenised pairs not cached in --data-cache-dir"

    scores = tmp_path / "scores.jsonl"
    ev = invoke_dschat("eval-reward", "--path", out, "--output-file", scores)
    assert ev.code == 0, ev.explain()
    rows = read_jsonl(scores)
    assert len(rows) == 64
    acc = sum(r["correct"] for r in rows) / len(rows)
    assert acc >= MIN_ACCURACY and acc == pytest.approx(summary["eval_end"]["accuracy"])
    end = summary["eval_end"]
    assert sum(r["chosen_score"] for r in rows) / 64 == pytest.approx(end["chosen"], abs=1e-4)
    assert sum(r["rejected_score"] for r in rows) / 64 == pytest.approx(end["rejected"], abs=1e-4)


# --- eval-reward on the trained model -------------------------------------------------------------

def test_eval_reward_held_out_pairs_through_the_real_command(trained, tmp_path, pairs_dir,
                                                             run_dschat, invoke_dschat):
    """Default data = the model's own held-out pairs (from its run_config.yaml): table, summary,
    accuracy; a second run (in process) gives identical scores."""
    first, second = tmp_path / "a" / "scores.jsonl", tmp_path / "b.jsonl"
    r = run_dschat("eval-reward", "--path", trained, "--output-file", first, timeout=120)
    assert r.code == 0, r.explain()
    assert "Traceback" not in r.output
    assert "held-out pairs of the model's training data" in r.output
    for col in ("chosen score", "rejected score", "margin", "correct"):
        assert col in r.output, r.explain()
    assert "first 20 of 64 pairs shown" in r.output
    m = re.search(r"accuracy \(chosen > rejected\)\s*│\s*([0-9.]+)", r.output)
    assert m, r.explain()
    assert float(m.group(1)) >= MIN_ACCURACY
    assert re.search(r"pairs scored\s*│\s*64\b", r.output), r.explain()

    rows = read_jsonl(first)
    held_out = json.loads((pairs_dir / "eval.json").read_text())
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows) == \
        sorted((r["prompt"], r["chosen"], r["rejected"]) for r in held_out)
    train_prompts = {r["prompt"] for r in json.loads((pairs_dir / "train.json").read_text())}
    assert not {r["prompt"] for r in rows} & train_prompts  # held out: never trained on
    assert all(set(r) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score",
                          "margin", "correct"} for r in rows)
    assert all(r["correct"] == (r["chosen_score"] > r["rejected_score"]) for r in rows)
    assert sum(r["correct"] for r in rows) / len(rows) >= MIN_ACCURACY
    # first row of the table is the first scored pair
    assert f"{rows[0]['chosen_score']:.3f}" in r.output

    again = invoke_dschat("eval-reward", "--path", trained, "--output-file", second)
    assert again.code == 0, again.explain()
    assert read_jsonl(second) == rows  # the folder reloads to the same scores

    # ... which are the training run's own final evaluation
    end = json.loads((trained / "train_summary.json").read_text())["eval_end"]
    assert sum(r["chosen_score"] for r in rows) / 64 == pytest.approx(end["chosen"], abs=1e-4)
    assert sum(r["rejected_score"] for r in rows) / 64 == pytest.approx(end["rejected"], abs=1e-4)


def test_reloaded_folder_gives_identical_scores_in_process(trained, tiny_tokenizer):
    import torch

    from dschat_cli.models.reward import load_reward_model
    from dschat_cli.rlhf.reward import sequence_scores

    enc = tiny_tokenizer([" Human: How do I make soup? Assistant:" + POLITE,
                          " Human: How do I make soup? Assistant:" + RUDE],
                         return_tensors="pt", padding=True)
    scores = []
    for _ in range(2):
        model = load_reward_model(trained).eval()
        with torch.no_grad():
            scores.append(sequence_scores(model(enc["input_ids"], enc["attention_mask"]),
                                          enc["attention_mask"]))
    assert torch.equal(scores[0], scores[1])
    assert scores[0][0] > scores[0][1]


def test_eval_reward_single_answers(trained, tmp_path, invoke_dschat):
    out = tmp_path / "single.jsonl"
    r = invoke_dschat("eval-reward", "--path", trained, "--prompt", "How do I make soup?",
                      "--answer", POLITE, "--prompt", "How do I make soup?", "--answer", RUDE,
                      "--output-file", out)
    assert r.code == 0, r.explain()
    assert "reward scores" in r.output and "How do I make soup?" in r.output
    rows = read_jsonl(out)
    assert [set(row) for row in rows] == [{"prompt", "answer", "score"}] * 2
    assert [row["prompt"] for row in rows] == [" Human: How do I make soup? Assistant:"] * 2
    assert [row["answer"] for row in rows] == [POLITE, RUDE]
    assert rows[0]["score"] > rows[1]["score"], rows
    for row in rows:
        assert f"{row['score']:.3f}" in r.output


def test_eval_reward_explicit_pairs(trained, tmp_path, invoke_dschat):
    out = tmp_path / "pairs.jsonl"
    r = invoke_dschat("eval-reward", "--path", trained,
                      "--prompt", "How do I make soup?", "--chosen", POLITE, "--rejected", RUDE,
                      "--prompt", " Human: Can you help me with chess? Assistant:",
                      "--chosen", " Sure! Control the center and develop your pieces early. "
                      "Thank you for asking.",
                      "--rejected", " Leave me alone, I do not care about chess.",
                      "--output-file", out)
    assert r.code == 0, r.explain()
    assert "--prompt pairs" in r.output and "pairs scored" in r.output
    rows = read_jsonl(out)
    assert [row["prompt"] for row in rows] == [" Human: How do I make soup? Assistant:",
                                               " Human: Can you help me with chess? Assistant:"]
    assert all(row["correct"] and row["margin"] > 0 for row in rows), rows
    assert re.search(r"accuracy \(chosen > rejected\)\s*│\s*1\.000", r.output), r.explain()


def test_eval_reward_max_pairs_and_show(trained, tmp_path, invoke_dschat):
    out = tmp_path / "few.jsonl"
    r = invoke_dschat("eval-reward", "--path", trained, "--max-pairs", "5", "--show", "2",
                      "--output-file", out)
    assert r.code == 0, r.explain()
    assert len(read_jsonl(out)) == 5
    assert "first 2 of 5 pairs shown" in r.output


def test_eval_reward_explicit_data_path(trained, tmp_path, pairs_dir, invoke_dschat):
    """--data-path/--data-dir/--data-split: the step-2 eval rows of that source."""
    out = tmp_path / "data.jsonl"
    r = invoke_dschat("eval-reward", "--path", trained, "--data-path", "local/jsonfile",
                      "--data-dir", pairs_dir, "--data-split", "0,10,0", "--output-file", out)
    assert r.code == 0, r.explain()
    assert "on local/jsonfile" in r.output and "held-out" not in r.output
    rows = read_jsonl(out)
    assert len(rows) == 64 and sum(row["correct"] for row in rows) / 64 >= MIN_ACCURACY


def test_eval_reward_without_run_config_uses_example_pairs(untrained_reward, tmp_path,
                                                           invoke_dschat):
    """A reward folder without run_config.yaml (not from `dschat reward`) still evaluates: the
    built-in example pairs."""
    from dschat_cli.eval.reward import EXAMPLE_PAIRS

    out = tmp_path / "ex.jsonl"
    r = invoke_dschat("eval-reward", "--path", untrained_reward, "--output-file", out)
    assert r.code == 0, r.explain()
    assert "built-in example pairs" in r.output
    rows = read_jsonl(out)
    assert [(row["prompt"], row["chosen"], row["rejected"]) for row in rows] == \
        [tuple(p) for p in EXAMPLE_PAIRS]


@pytest.mark.parametrize("mode", ["data-path", "prompt"])
def test_eval_reward_uses_the_training_max_seq_len_in_every_mode(mode, trained, tmp_path,
                                                                 pairs_dir, invoke_dschat):
    import shutil

    import yaml

    rm = tmp_path / "rm16"
    shutil.copytree(trained, rm)
    run_cfg = yaml.safe_load((rm / "run_config.yaml").read_text())
    run_cfg["data"]["max_seq_len"] = 16  # as if trained with --max-seq-len 16: answers truncated
    (rm / "run_config.yaml").write_text(yaml.safe_dump(run_cfg))
    default = tmp_path / "default.jsonl"
    r = invoke_dschat("eval-reward", "--path", rm, "--max-pairs", "2", "--output-file", default)
    assert r.code == 0, r.explain()
    rows = read_jsonl(default)
    other = tmp_path / "other.jsonl"
    if mode == "data-path":
        args = ("--data-path", "local/jsonfile", "--data-dir", pairs_dir, "--max-pairs", "2")
    else:
        args = tuple(a for row in rows for a in ("--prompt", row["prompt"], "--chosen",
                                                  row["chosen"], "--rejected", row["rejected"]))
    r = invoke_dschat("eval-reward", "--path", rm, *args, "--output-file", other)
    assert r.code == 0, r.explain()
    got = read_jsonl(other)
    assert [g["prompt"] for g in got] == [row["prompt"] for row in rows]
    for g, row in zip(got, rows):
        assert g["chosen_score"] == pytest.approx(row["chosen_score"], abs=1e-5)
        assert g["rejected_score"] == pytest.approx(row["rejected_score"], abs=1e-5)


# --- errors ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untrained_reward(tiny_opt, tmp_path_factory) -> Path:
    """A reward folder as `dschat reward` saves it, without training (enough for error paths)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from dschat_cli.models.reward import RewardModel, save_reward_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("untrained_reward")
    save_reward_model(RewardModel(AutoModel.from_pretrained(tiny_opt)),
                      AutoTokenizer.from_pretrained(tiny_opt), out, zero_stage=0, is_main=True)
    return out


@pytest.mark.parametrize("case", ["causal-lm-folder", "missing-folder", "no-path",
                                  "prompt-chosen-count", "answer-count", "answer-with-chosen",
                                  "prompt-with-data-path"])
def test_eval_reward_bad_input(case, tmp_path, tiny_opt, untrained_reward, pairs_dir,
                               invoke_dschat):
    scores = tmp_path / "scores.jsonl"
    rm = ("--path", untrained_reward)
    args, where = {
        "causal-lm-folder": (("--path", tiny_opt), "--path"),
        "missing-folder": (("--path", tmp_path / "nope"), "--path"),
        "no-path": ((), "--path"),
        "prompt-chosen-count": ((*rm, "--prompt", "a", "--prompt", "b", "--chosen", "x",
                                 "--rejected", "y"), "--chosen"),
        "answer-count": ((*rm, "--prompt", "a", "--answer", "x", "--answer", "y"), "--answer"),
        "answer-with-chosen": ((*rm, "--prompt", "a", "--answer", "x", "--chosen", "x",
                                "--rejected", "y"), "--answer"),
        "prompt-with-data-path": ((*rm, "--prompt", "a", "--chosen", "x", "--rejected", "y",
                                   "--data-path", "local/jsonfile", "--data-dir", pairs_dir),
                                  "--data-path"),
    }[case]
    r = invoke_dschat("eval-reward", *args, "--output-file", scores)
    check_one_line_error(r, where)
    assert not scores.exists()
    if case == "causal-lm-folder":
        assert "dschat reward" in r.output  # says how to make one


def test_eval_reward_causal_lm_folder_through_the_real_command(tmp_path, tiny_opt, run_dschat):
    r = run_dschat("eval-reward", "--path", tiny_opt, timeout=120)
    check_one_line_error(r, "--path")
    assert str(tiny_opt) in r.output


def test_eval_rejects_a_reward_folder(tmp_path, tiny_opt, untrained_reward, invoke_dschat):
    answers = tmp_path / "answers.jsonl"
    r = invoke_dschat("eval", "--baseline", tiny_opt, "--finetuned", untrained_reward,
                      "--max-new-tokens", "4", "--output-file", answers)
    check_one_line_error(r, "--finetuned")
    assert "eval-reward" in r.output and not answers.exists()


@pytest.mark.parametrize("rejected", ["missing", "empty", "null"])
def test_reward_on_sft_only_data(rejected, tmp_path, tiny_opt, invoke_dschat):
    """Rows without a rejected answer: exit 2 before anything is written."""
    data = tmp_path / "sft-only"
    data.mkdir()
    rows = [{"prompt": f" Human: question {i}? Assistant:", "chosen": f" answer {i}."}
            for i in range(20)]
    for row in rows:
        if rejected != "missing":
            row["rejected"] = "" if rejected == "empty" else None
    for part in ("train", "eval"):
        (data / f"{part}.json").write_text(json.dumps(rows))
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    r = invoke_dschat(*reward_args(tiny_opt, out, cache, data, zero_stage=0,
                                   extra=("--launcher", "none")))
    check_one_line_error(r, "--data-path")
    assert "rejected" in r.output
    assert not out.exists() and not cache.exists()
