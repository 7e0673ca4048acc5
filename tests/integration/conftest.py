"""Helpers of the integration tests: run `dschat` as users do, and check what a run leaves behind.

Two ways to run the CLI:
  run_dschat(args)    a subprocess `python -m dschat_cli ARGS` (the real user path: with the default
                      `--launcher deepspeed` it goes through deepspeed.launcher). ~15-25 s a run on
                      CPU, mostly process start and imports: keep these few and mark them slow.
  invoke_dschat(args) the same typer app in this process (CliRunner). With `--launcher none` a
                      run is the same code as a worker minus the spawn, ~3-5 s once torch and
                      deepspeed are imported. Used for the family x ZeRO x LoRA matrix and the
                      table of bad inputs.

`sft_run(family, zero_stage, lora_dim, ...)` (session-scoped) trains once in process per distinct
arguments and returns the output folder, so a later test (eval) can reuse a trained model.
Every run gets its own output folder and its own --data-cache-dir under a temp folder, so no test
writes into ~/.cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Set by Dist.init() in an in-process run (and by the launcher in workers): never hand them to a
# subprocess, where they would describe a world that does not exist.
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")

# The files every finished `dschat sft` leaves in its output folder (launcher runs add train.log).
SFT_OUTPUT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "run_config.yaml", "resolved.json", "ds_config.json",
                    "metrics.jsonl", "train_summary.json", "launch.sh")


@dataclass
class CliResult:
    code: int
    output: str  # stdout and stderr together

    def explain(self) -> str:
        return f"exit code {self.code}; output:\n{self.output}"


def subprocess_env(columns: int = 200, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["COLUMNS"] = str(columns)  # rich tables and progress lines wide enough not to wrap
    env.update(extra)
    return env


def run_dschat(*args: str, timeout: float = 300, columns: int = 200) -> CliResult:
    """`python -m dschat_cli ARGS` in a subprocess; stdout and stderr merged."""
    proc = subprocess.run([sys.executable, "-m", "dschat_cli", *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout,
                          env=subprocess_env(columns), stdin=subprocess.DEVNULL)
    return CliResult(proc.returncode, proc.stdout)


def invoke_dschat(*args: str, columns: int = 200) -> CliResult:
    """The dschat typer app in this process. An in-process run sets RANK etc. (Dist.init()) and the
    launch plan's env; the environment is restored afterwards so later tests and subprocesses do not
    inherit them. The gloo group of one rank stays initialised for the next in-process run."""
    from typer.testing import CliRunner

    from dschat_cli.cli.app import app
    from dschat_cli.ui import console as ui

    saved_env = dict(os.environ)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in _DIST_ENV:
                mp.delenv(k, raising=False)
            mp.setenv("COLUMNS", str(columns))
            for c in (ui.console, ui.err_console):  # made at import: COLUMNS is read only then
                mp.setattr(c, "_width", columns)
            r = CliRunner().invoke(app, list(map(str, args)), terminal_width=columns)
    finally:  # the run may also set the launch plan's env (OMP_NUM_THREADS, ...): undo it all
        os.environ.clear()
        os.environ.update(saved_env)
        _forget_zero3_config()
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(r.exception))
        return CliResult(r.exit_code if r.exit_code else 1, r.output + "\n" + tb)
    return CliResult(r.exit_code, r.output)


def _forget_zero3_config() -> None:
    """An in-process ZeRO-3 run leaves its HfDeepSpeedConfig registered (a worker process would
    just exit): drop it, or this process's next from_pretrained would build a partitioned model."""
    mod = sys.modules.get("transformers.integrations.deepspeed")
    if mod is not None:
        mod.unset_hf_deepspeed_config()


def sft_args(model: Path, out: Path, cache: Path, data_dir: Path, *, zero_stage: int,
             lora_dim: int = 0, epochs: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    """A small step-1 run on the synthetic pairs: 256 train rows, batch 8 -> 32 steps an epoch."""
    return ["sft", "--model", str(model), "--data-path", "local/jsonfile",
            "--data-dir", str(data_dir),
            "--zero-stage", str(zero_stage), "--lora-dim", str(lora_dim), "--output-dir", str(out),
            "--data-cache-dir", str(cache), "--num-train-epochs", str(epochs),
            "--per-device-train-batch-size", "8", "--learning-rate", "1e-3", "--max-seq-len", "128",
            "--data-split", "10,0,0", *extra]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def eval_texts(data_dir: Path, n: int = 16) -> list[str]:
    rows = json.loads((data_dir / "eval.json").read_text())[:n]
    return [r["prompt"] + r["chosen"] for r in rows]


def lm_loss(model_dir: Path, texts: list[str]) -> float:
    """Mean next-token loss of a saved model on `texts` (full sequence, no masking)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def check_sft_output(out: Path, *, zero_stage: int, lora_dim: int, world_size: int = 1,
                     launcher: bool = False, base_model: Path | None = None,
                     data_dir: Path | None = None) -> dict:
    """What a finished `dschat sft` must leave: every record file, a loss that fell, and a model
    folder that loads with AutoModelForCausalLM, has no LoRA leftovers, and generates. With
    `base_model` and `data_dir` also: the saved model fits held-out pairs better than the base
    model (so the trained weights were saved, not the initial ones)."""
    import torch
    import yaml
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in out.iterdir()}
    expected = set(SFT_OUTPUT_FILES) | ({"train.log"} if launcher else set())
    assert expected <= files, f"missing {sorted(expected - files)} in {sorted(files)}"

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == world_size
    assert summary["steps"] > 0
    assert summary["eval_loss_end"] < summary["eval_loss_start"], summary
    assert summary["train_loss_last"] < summary["train_loss_first"], summary

    metrics = read_metrics(out)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert len(train) == summary["steps"]
    assert all(math.isfinite(m["loss"]) for m in train)
    assert len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[0]["eval_loss"] == pytest.approx(summary["eval_loss_start"])
    assert evals[-1]["eval_loss"] == pytest.approx(summary["eval_loss_end"])

    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == zero_stage
    assert ds["train_batch_size"] == 8 * world_size
    run_cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_cfg["deepspeed"]["zero_stage"] == zero_stage
    assert run_cfg["lora"]["lora_dim"] == lora_dim
    launch_sh = (out / "launch.sh").read_text()
    if launcher:
        assert "deepspeed.launcher.runner" in launch_sh and "dschat_cli.worker sft" in launch_sh
    else:
        assert "--launcher none" in launch_sh

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora_" in k or "base_layer" in k or "base_model" in k]

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    enc = tok([" Human: How do I bake bread? Assistant:"], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert gen.shape[0] == 1 and gen.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(tok.decode(gen[0, enc["input_ids"].shape[1]:]), str)

    if base_model is not None and data_dir is not None:
        texts = eval_texts(data_dir)
        before, after = lm_loss(base_model, texts), lm_loss(out, texts)
        assert after < before, f"saved model loss {after:.4f} not below base model {before:.4f}"
    return summary


@pytest.fixture(scope="session")
def sft_run(tiny_model_dir, pairs_dir, tmp_path_factory):
    """Factory: sft_run("opt", zero_stage=0, lora_dim=8) -> (CliResult, output folder) of an
    in-process `dschat sft --launcher none` run, trained once per distinct arguments."""
    cache: dict[tuple, tuple[CliResult, Path]] = {}

    def run(family: str, zero_stage: int, lora_dim: int = 0,
            extra: tuple[str, ...] = ()) -> tuple[CliResult, Path]:
        key = (family, zero_stage, lora_dim, extra)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"sft_{family}_z{zero_stage}_lora{lora_dim}")
            args = sft_args(tiny_model_dir(family), root / "out", root / "data-cache", pairs_dir,
                            zero_stage=zero_stage, lora_dim=lora_dim,
                            extra=("--launcher", "none", *extra))
            cache[key] = (invoke_dschat(*args), root / "out")
        return cache[key]

    return run


# The helpers above as fixtures (test modules are imported with --import-mode=importlib, so they
# cannot import this conftest).
@pytest.fixture(name="run_dschat", scope="session")
def _run_dschat_fixture():
    return run_dschat


@pytest.fixture(name="invoke_dschat", scope="session")
def _invoke_dschat_fixture():
    return invoke_dschat


@pytest.fixture(name="sft_args", scope="session")
def _sft_args_fixture():
    return sft_args


@pytest.fixture(name="check_sft_output", scope="session")
def _check_sft_output_fixture():
    return check_sft_output
