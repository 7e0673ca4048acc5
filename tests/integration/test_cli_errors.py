"""User mistakes end in one line, exit code 2, and nothing written.

    dschat sft ... --data-path missing.json   ->  error: --data-path: no such file or folder: ...

Each case is a command line built from a few fixtures; it must exit with code 2, print exactly one
`error: WHERE: ...` line naming the flag (or the file) at fault, show no traceback, and leave no
output folder, no data cache folder and no eval output file behind. Most cases run the CLI in this
process (fast); a few run it as a subprocess, the user's real path.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest


@dataclass
class Ctx:
    tmp: Path
    out: Path  # --output-dir (sft): must not be created
    cache: Path  # --data-cache-dir (sft): must not be created
    answers: Path  # --output-file (eval): must not be created
    model: Path
    pairs: Path

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def rows_dir(self, name: str, rows) -> Path:
        """A local/jsonfile folder whose train.json and eval.json hold `rows`."""
        d = self.tmp / name
        d.mkdir()
        for part in ("train", "eval"):
            (d / f"{part}.json").write_text(json.dumps(rows))
        return d

    def sft(self, *args, data: tuple = (), model: Path | None = None) -> list[str]:
        data = data or ("--data-path", "local/jsonfile", "--data-dir", self.pairs)
        return ["sft", "--model", model or self.model, *data, "--data-split", "10,0,0",
                "--output-dir", self.out, "--data-cache-dir", self.cache, "--num-train-epochs", "1",
                *args]

    def eval(self, *args, finetuned: Path | str | None = None) -> list[str]:
        return ["eval", "--baseline", self.model, "--finetuned", finetuned or self.model,
                "--output-file", self.answers, "--max-new-tokens", "4", *args]


ROWS = [{"prompt": f" Human: question {i}? Assistant:", "chosen": f" answer {i}.",
         "rejected": f" no {i}."} for i in range(20)]


def _drop(key: str):
    return [{k: v for k, v in r.items() if k != key} for r in ROWS]


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# (id, command line built from the context, WHERE of the expected "error: WHERE: ..." line; a
# regex, so file names can be matched).
Case = tuple[str, Callable[[Ctx], list], str]
CASES: list[Case] = [
    # --- data
    ("missing-data-file", lambda c: c.sft(data=("--data-path", c.tmp / "missing.json")),
     "--data-path"),
    ("missing-data-folder", lambda c: c.sft(data=("--data-path", "./no/such/folder")),
     "--data-path"),
    ("offline-hub-dataset", lambda c: c.sft(data=("--data-path", "Dahoas/rm-static")),
     "--data-path"),
    ("unknown-data-name", lambda c: c.sft(data=("--data-path", "nobody/no-such-dataset")),
     "--data-path"),
    ("jsonfile-without-data-dir", lambda c: c.sft(data=("--data-path", "local/jsonfile")),
     "--data-dir"),
    ("data-dir-missing", lambda c: c.sft(data=("--data-path", "local/jsonfile",
                                               "--data-dir", c.tmp / "nope")), "--data-dir"),
    ("data-dir-without-train-json", lambda c: c.sft(data=("--data-path", "local/jsonfile",
                                                          "--data-dir", c.tmp)), "--data-dir"),
    ("rows-without-prompt", lambda c: c.sft(data=("--data-path", "local/jsonfile", "--data-dir",
                                                  c.rows_dir("noprompt", _drop("prompt")))),
     r".*(train\.json|--data-path|--data-dir)"),
    ("rows-without-chosen", lambda c: c.sft(data=("--data-path", "local/jsonfile", "--data-dir",
                                                  c.rows_dir("nochosen", _drop("chosen")))),
     r".*(train\.json|--data-path|--data-dir)"),
    ("jsonl-without-chosen", lambda c: c.sft(data=("--data-path", c.write(
        "nochosen.jsonl", _jsonl(_drop("chosen")))),), r".*(nochosen\.jsonl|--data-path)"),
    ("empty-train-json", lambda c: c.sft(data=("--data-path", "local/jsonfile", "--data-dir",
                                               c.rows_dir("empty", []))),
     r".*(train\.json|--data-path|--data-dir)"),
    ("non-utf8-data-file", lambda c: c.sft(data=("--data-path", c.write(
        "latin1.json", json.dumps(ROWS, ensure_ascii=False).replace("question", "questi\u00f3n")
        .encode("latin-1")))), r".*(latin1\.json|--data-path)"),
    ("invalid-json", lambda c: c.sft(data=("--data-path", c.write("bad.json", '[{"prompt": "a",'))),
     r".*(bad\.json|--data-path)"),
    ("invalid-jsonl-line", lambda c: c.sft(data=("--data-path", c.write(
        "bad.jsonl", _jsonl(ROWS) + "{not json}\n"))), r".*(bad\.jsonl|--data-path)"),
    ("json-not-rows", lambda c: c.sft(data=("--data-path", c.write("scalar.json", "42"))),
     r".*(scalar\.json|--data-path)"),
    ("unsupported-file-type", lambda c: c.sft(data=("--data-path", c.write("rows.csv", "a,b\n"))),
     "--data-path"),
    # --- data split
    ("split-leaves-sft-empty", lambda c: c.sft("--data-split", "0,5,5"), "--data-split"),
    ("split-two-parts", lambda c: c.sft("--data-split", "2,4"), "--data-split"),
    ("split-negative", lambda c: c.sft("--data-split", "-2,6,6"), "--data-split"),
    ("split-all-zero", lambda c: c.sft("--data-split", "0,0,0"), "--data-split"),
    ("split-not-numbers", lambda c: c.sft("--data-split", "a,b,c"), "--data-split"),
    # --- model
    ("model-path-missing", lambda c: c.sft(model=c.tmp / "no-model"), "--model"),
    ("model-folder-without-config", lambda c: c.sft(model=c.tmp), "--model"),
    ("model-is-a-file", lambda c: c.sft(model=c.write("model.bin", "x")), "--model"),
    ("offline-hub-model", lambda c: c.sft(model="facebook/opt-1.3b"), "--model"),
    # Found only inside the worker, after the output folder and run records were written (and,
    # through the launcher, reported twice): see test_lora_module_name_matching_nothing.
    # --- flags and their combinations
    ("zero-stage-4", lambda c: c.sft("--zero-stage", "4"), "--zero-stage"),
    ("only-optimize-lora-without-lora", lambda c: c.sft("--only-optimize-lora"),
     "--only-optimize-lora"),
    ("offload-with-zero-0", lambda c: c.sft("--offload", "--zero-stage", "0"), "--offload"),
    ("negative-lora-dim", lambda c: c.sft("--lora-dim", "-1"), "--lora-dim"),
    ("bad-dtype", lambda c: c.sft("--dtype", "fp8"), "--dtype"),
    # fp32 gradients where DeepSpeed has none: ZeRO-0 here, and fp32 training on this CPU
    ("fp32-grad-accum-at-zero-0", lambda c: c.sft("--fp32-grad-accum", "on"), "--fp32-grad-accum"),
    ("fp32-grad-accum-in-fp32", lambda c: c.sft("--fp32-grad-accum", "on", "--zero-stage", "1"),
     "--fp32-grad-accum"),
    ("config-file-missing", lambda c: c.sft("--config", c.tmp / "run.yaml"), "--config"),
    ("config-unknown-key", lambda c: c.sft("--config", c.write("run.yaml", "optim:\n  lr: 1\n")),
     "--config"),
    # --- launch
    ("multi-node-without-hostfile", lambda c: c.sft("--deployment-type", "multi_node"),
     "--hostfile"),
    ("hostfile-missing", lambda c: c.sft("--deployment-type", "multi_node", "--hostfile",
                                         c.tmp / "hostfile"), "--hostfile"),
    ("hostfile-malformed", lambda c: c.sft("--deployment-type", "multi_node", "--hostfile",
                                           c.write("hostfile", "worker-1 gpus=8\n")), "--hostfile"),
    ("hostfile-zero-slots", lambda c: c.sft("--deployment-type", "multi_node", "--hostfile",
                                            c.write("hostfile", "worker-1 slots=0\n")),
     "--hostfile"),
    ("hostfile-empty", lambda c: c.sft("--deployment-type", "multi_node", "--hostfile",
                                       c.write("hostfile", "# no hosts\n")), "--hostfile"),
    ("hostfile-without-multi-node",
     lambda c: c.sft("--hostfile", c.write("hostfile", "a slots=1\n")), "--hostfile"),
    ("bad-deployment-type", lambda c: c.sft("--deployment-type", "cluster"), "--deployment-type"),
    ("num-gpus-with-single-gpu", lambda c: c.sft("--num-gpus", "2"), "--num-gpus"),
    ("launcher-none-with-two-workers", lambda c: c.sft("--launcher", "none", "--deployment-type",
                                                       "single_node", "--num-gpus", "2"),
     "--launcher"),
    ("bad-launcher", lambda c: c.sft("--launcher", "slurm"), "--launcher"),
    # --- eval
    ("eval-prompts-missing", lambda c: c.eval("--prompts", c.tmp / "prompts.txt"), "--prompts"),
    ("eval-prompts-invalid-json", lambda c: c.eval("--prompts", c.write("p.json", "[1,")),
     "--prompts"),
    ("eval-prompts-without-prompt-key", lambda c: c.eval("--prompts", c.write(
        "p.jsonl", '{"question": "hi"}\n')), "--prompts"),
    ("eval-prompts-empty", lambda c: c.eval("--prompts", c.write("p.txt", "\n\n")), "--prompts"),
    ("eval-prompts-non-utf8", lambda c: c.eval("--prompts", c.write("p.txt", b"caf\xe9?\n")),
     "--prompts"),
    ("eval-finetuned-not-a-model", lambda c: c.eval(finetuned=c.pairs), "--finetuned"),
    ("eval-finetuned-missing", lambda c: c.eval(finetuned=c.tmp / "no-model"), "--finetuned"),
    ("eval-baseline-missing", lambda c: ["eval", "--baseline", c.tmp / "nope", "--finetuned",
                                         c.model, "--output-file", c.answers], "--baseline"),
    ("eval-no-model", lambda c: ["eval", "--output-file", c.answers], "--finetuned"),
    ("eval-fp16-on-cpu", lambda c: c.eval("--device", "cpu", "--dtype", "fp16"), "--dtype"),
    ("eval-cuda-without-gpu", lambda c: c.eval("--device", "cuda"), "--device"),
]

ERROR_LINE = re.compile(r"^error: (?P<where>.+?): \S")


def _make_ctx(tmp_path: Path, model: Path, pairs: Path) -> Ctx:
    work = tmp_path / "work"
    work.mkdir()
    return Ctx(tmp=work, out=tmp_path / "out", cache=tmp_path / "data-cache",
               answers=tmp_path / "answers.jsonl", model=model, pairs=pairs)


def _check_one_line_error(result, where: str, ctx: Ctx) -> None:
    assert result.code == 2, result.explain()
    assert "Traceback" not in result.output, result.explain()
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1, result.explain()
    m = ERROR_LINE.match(errors[0].strip())
    assert m, f"not an 'error: WHERE: message' line: {errors[0]!r}"
    assert re.fullmatch(where, m.group("where")), \
        f"error names {m.group('where')!r}, expected {where!r}\n{result.explain()}"
    assert not ctx.out.exists(), "output folder was created"
    assert not ctx.cache.exists(), "data cache folder was created"
    assert not ctx.answers.exists(), "eval output file was written"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_error_exit_2_nothing_written(case, tmp_path, tiny_opt, pairs_dir,
                                                          invoke_dschat):
    _, build, where = case
    ctx = _make_ctx(tmp_path, tiny_opt, pairs_dir)
    t = time.monotonic()
    result = invoke_dschat(*build(ctx))
    elapsed = time.monotonic() - t
    _check_one_line_error(result, where, ctx)
    assert elapsed < 30, f"a user mistake took {elapsed:.1f} s to report"  # never hangs


def test_offline_hub_dataset_fails_within_seconds(tmp_path, tiny_opt, pairs_dir, invoke_dschat,
                                                  monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import importlib

    for module in ("datasets", "transformers", "dschat_cli.data.prepare",
                   "dschat_cli.launch.runner"):
        importlib.import_module(module)  # import time is not what is measured

    ctx = _make_ctx(tmp_path, tiny_opt, pairs_dir)
    t = time.monotonic()
    result = invoke_dschat(*ctx.sft(data=("--data-path", "Dahoas/rm-static")))
    elapsed = time.monotonic() - t
    _check_one_line_error(result, "--data-path", ctx)
    assert "Dahoas/rm-static" in result.output
    assert elapsed < 5, f"offline hub dataset took {elapsed:.1f} s to fail"


def test_non_empty_output_dir_without_overwrite(tmp_path, tiny_opt, pairs_dir, invoke_dschat):
    ctx = _make_ctx(tmp_path, tiny_opt, pairs_dir)
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("mine")
    result = invoke_dschat(*ctx.sft())
    assert result.code == 2, result.explain()
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].strip().startswith("error: --output-dir: "), \
        result.explain()
    assert "--overwrite" in errors[0]
    assert [p.name for p in ctx.out.iterdir()] == ["keep.txt"]
    assert (ctx.out / "keep.txt").read_text() == "mine"
    assert not ctx.cache.exists()


def test_output_dir_is_a_file(tmp_path, tiny_opt, pairs_dir, invoke_dschat):
    ctx = _make_ctx(tmp_path, tiny_opt, pairs_dir)
    ctx.out.write_text("a file")
    result = invoke_dschat(*ctx.sft())
    assert result.code == 2 and "error: --output-dir: " in result.output, result.explain()
    assert ctx.out.read_text() == "a file" and not ctx.cache.exists()


@pytest.mark.parametrize("args, flag", [
    (("--zero-stage", "two"), "--zero-stage"),
    (("--num-train-epochs", "1.5"), "--num-train-epochs"),
    (("--no-such-flag",), "--no-such-flag"),
])
def test_unparsable_flag_values_exit_2(args, flag, tmp_path, tiny_opt, pairs_dir, invoke_dschat):
    """Values click itself rejects (not an int, unknown flag) come in click's usage box rather than
    as an `error:` line, but still: exit code 2, the flag named, no traceback, nothing written."""
    ctx = _make_ctx(tmp_path, tiny_opt, pairs_dir)
    result = invoke_dschat(*ctx.sft(*args))
    assert result.code == 2, result.explain()
    assert flag in result.output and "Traceback" not in result.output, result.explain()
    assert not ctx.out.exists() and not ctx.cache.exists()


def test_lora_module_name_matching_nothing(tmp_path, tiny_opt, pairs_dir, invoke_dschat):
    ctx = _make_ctx(tmp_path, tiny_opt, pairs_dir)
    result = invoke_dschat(*ctx.sft("--lora-dim", "8", "--lora-module-name", "no_such_layer",
                                    "--launcher", "none"))
    _check_one_line_error(result, "--lora-module-name", ctx)


@pytest.mark.parametrize("case", ["missing-data-file", "split-two-parts", "hostfile-malformed",
                                  "eval-finetuned-not-a-model"])
def test_bad_input_through_the_real_command(case, tmp_path, tiny_opt, pairs_dir, run_dschat):
    """The same contract from `python -m dschat_cli` (what a user runs): stderr, exit status."""
    _, build, where = next(c for c in CASES if c[0] == case)
    ctx = _make_ctx(tmp_path, tiny_opt, pairs_dir)
    result = run_dschat(*build(ctx), timeout=120)
    _check_one_line_error(result, where, ctx)


@pytest.mark.parametrize("name", ["rows[draft].json", "rows[/old].json"])
def test_error_line_shows_paths_verbatim(name, tmp_path, tiny_opt, pairs_dir, invoke_dschat):
    ctx = _make_ctx(tmp_path, tiny_opt, pairs_dir)
    missing = ctx.tmp / name
    result = invoke_dschat(*ctx.sft(data=("--data-path", missing)))
    _check_one_line_error(result, "--data-path", ctx)
    assert str(missing) in result.output, result.explain()
