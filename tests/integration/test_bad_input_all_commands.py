"""Bad input to every command: one line naming the input and the fix, exit code 2, no traceback,
and every file that was there before is byte-identical afterwards, with nothing added.

    dschat ppo --actor-model OUT/reward ...   ->  error: --actor-model: OUT/reward is a dschat
                                                  reward model, not a causal LM; ...

Unlike test_cli_errors.py (which checks that nothing is *created*), every case here starts from a
previous run's files: the training commands get a non-empty --output-dir (run_config.yaml,
model.safetensors, a checkpoint) and --overwrite, eval and eval-reward an existing --output-file.
A mistake must be reported before any of them is touched. The whole temp folder is snapshotted
(path -> bytes) before the command and compared after it.

All cases run the CLI in this process (typer's CliRunner); none gets as far as loading a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROWS = [{"prompt": f" Human: question {i}? Assistant:", "chosen": f" answer {i}.",
         "rejected": f" no {i}."} for i in range(20)]
SFT_ONLY_ROWS = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in ROWS]
ERROR_LINE = re.compile(r"^error: (?P<where>.+?): \S")
# A short run that leaves two checkpoints (step_000001, step_000002) in its output folder.
CHECKPOINT_FLAGS = ("--max-steps", "2", "--save-interval", "1", "--per-device-train-batch-size",
                    "8", "--max-seq-len", "64", "--max-train-samples", "16",
                    "--max-eval-samples", "8")
PREVIOUS_RUN = {"run_config.yaml": b"previous: run\n", "model.safetensors": b"\x00weights\x01",
                "checkpoints/step_10/state.pt": b"\x80\x04previous checkpoint"}


@dataclass
class Ctx:
    tmp: Path  # inputs the case writes
    out: Path  # a previous run's --output-dir (training commands)
    cache: Path  # --data-cache-dir
    answers: Path  # a previous --output-file (eval, eval-reward)
    model: Path  # tiny OPT causal LM folder
    reward: Path  # a dschat reward folder with the tiny OPT's tokenizer
    other_reward: Path  # a dschat reward folder with another vocabulary
    pairs: Path  # local/jsonfile folder
    checkpointed: Path  # a finished `dschat sft ... CHECKPOINT_FLAGS` output folder

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def folder(self, name: str, files: dict[str, str] | None = None) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True)
        for f, text in (files or {}).items():
            (d / f).write_text(text)
        return d

    def jsonfile_dir(self, name: str, rows) -> Path:
        return self.folder(name, {"train.json": json.dumps(rows), "eval.json": json.dumps(rows)})

    def _data(self, data) -> list:
        return list(data or ("--data-path", "local/jsonfile", "--data-dir", self.pairs))

    def _train(self, launcher: bool) -> list:
        return ["--output-dir", self.out, "--overwrite", "--data-cache-dir", self.cache,
                *(() if launcher else ("--launcher", "none"))]

    def sft(self, *args, data=(), model=None, launcher: bool = False) -> list:
        return ["sft", "--model", model or self.model, *self._data(data), "--data-split", "10,0,0",
                "--num-train-epochs", "1", *self._train(launcher), *args]

    def reward_cmd(self, *args, data=(), model=None, launcher: bool = False) -> list:
        return ["reward", "--model", model or self.model, *self._data(data), "--data-split",
                "0,10,0", *self._train(launcher), *args]

    def dpo(self, *args, data=(), model=None) -> list:
        return ["dpo", "--model", model or self.model, *self._data(data), "--data-split",
                "0,10,0", *self._train(False), *args]

    def ppo(self, *args, actor=None, critic=None, data=(), launcher: bool = False) -> list:
        return ["ppo", "--actor-model", actor or self.model,
                "--critic-model", critic or self.reward,
                *self._data(data), "--data-split", "0,0,10", "--test-stop-step", "1",
                "--max-answer-seq-len", "4", *self._train(launcher), *args]

    def pipeline(self, *args, data=(), actor=None) -> list:
        return ["pipeline", "--actor", actor or self.model, "--reward", self.model,
                *self._data(data), "--data-split", "4,3,3", "--data-cache-dir", self.cache,
                "--output-dir", self.out, "--launcher", "none", *args]

    def eval(self, *args, baseline=None, finetuned=None) -> list:
        return ["eval", "--baseline", baseline or self.model,
                "--finetuned", finetuned or self.model,
                "--output-file", self.answers, "--max-new-tokens", "4", *args]

    def eval_reward(self, *args, path=None) -> list:
        return ["eval-reward", "--path", path or self.reward, "--output-file", self.answers, *args]

    def chat(self, *args, path=None) -> list:
        return ["chat", "--path", path or self.model, "--prompt", "Hello", *args]


def resume_from(c: Ctx, damage: Callable[[Path], None] | None = None, *flags) -> list:
    """--output-dir holds a previous checkpointed run (its step_* folders, latest 2), damaged by
    `damage(checkpoints folder)`; the same command again with --resume auto."""
    shutil.copytree(c.checkpointed, c.out, dirs_exist_ok=True)
    if damage is not None:
        damage(c.out / "checkpoints")
    return c.sft(*CHECKPOINT_FLAGS, *flags, "--resume", "auto")


def _truncate(checkpoints: Path) -> None:
    states = checkpoints / "step_000002" / "model" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _custom_code_model(c: Ctx) -> Path:
    """A copy of the tiny model whose config names custom code (auto_map) for an architecture
    transformers does not know: loading it means running the folder's Python."""
    d = c.tmp / "custom-code-model"
    shutil.copytree(c.model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="dschat_custom", architectures=["CustomForCausalLM"],
               auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    # Would leave evidence if it ever ran.
    (d / "modeling_custom.py").write_text(f"open({str(c.tmp / 'CODE_RAN')!r}, 'w').close()\n")
    return d


# (id, command line built from the context, WHERE of the "error: WHERE: ..." line (a regex),
#  text the line must also contain (the fix or the input), or None)
Case = tuple[str, Callable[[Ctx], list], str, str | None]
CASES: list[Case] = [
    # --- sft: files and folders of the wrong kind, empty and undecodable data
    ("sft-empty-jsonl", lambda c: c.sft(data=("--data-path", c.write("empty.jsonl", ""))),
     r".*(empty\.jsonl|--data-path)", "empty.jsonl"),
    ("sft-non-utf8-jsonl", lambda c: c.sft(data=("--data-path", c.write(
        "latin1.jsonl", _jsonl(ROWS[:3]).replace("question", "questi\u00f3n")
        .encode("latin-1")))), r".*(latin1\.jsonl|--data-path)", "UTF-8"),
    ("sft-data-path-is-a-model-folder", lambda c: c.sft(data=("--data-path", c.model)),
     "--data-path", None),
    ("sft-data-dir-is-a-file", lambda c: c.sft(data=("--data-path", "local/jsonfile", "--data-dir",
                                                     c.write("train.json", json.dumps(ROWS)))),
     "--data-dir", None),
    ("sft-model-is-a-data-folder", lambda c: c.sft(model=c.pairs), "--model", "config.json"),
    ("sft-tokenizer-missing", lambda c: c.sft("--tokenizer", c.tmp / "no-tokenizer"),
     "--tokenizer", "no-tokenizer"),
    ("sft-data-cache-dir-is-a-file", lambda c: c.sft("--data-cache-dir", c.write("cache", "x")),
     "--data-cache-dir", None),
    # --- sft: numbers out of range, YAML configs
    ("sft-negative-learning-rate", lambda c: c.sft("--learning-rate", "-1e-3"), "--learning-rate",
     None),
    ("sft-zero-batch-size", lambda c: c.sft("--per-device-train-batch-size", "0"),
     "--per-device-train-batch-size", None),
    ("sft-tiny-max-seq-len", lambda c: c.sft("--max-seq-len", "4"), "--max-seq-len", None),
    ("sft-config-invalid-yaml", lambda c: c.sft("--config", c.write("run.yaml", "optim: [1,\n")),
     "--config", "run.yaml"),
    ("sft-config-not-a-mapping", lambda c: c.sft("--config", c.write("run.yaml", "- 1\n- 2\n")),
     "--config", "run.yaml"),
    ("sft-config-wrong-type", lambda c: c.sft("--config", c.write(
        "run.yaml", "optim:\n  learning_rate: fast\n")), "--learning-rate", "fast"),
    ("sft-config-non-utf8", lambda c: c.sft("--config", c.write("run.yaml", b"seed: \xe9\n")),
     "--config", "run.yaml"),
    # --- sft: launch flags
    ("sft-include-with-num-gpus", lambda c: c.sft("--deployment-type", "single_node", "--include",
                                                  "localhost:0", "--num-gpus", "2", launcher=True),
     "--include|--num-gpus", None),
    ("sft-include-without-devices", lambda c: c.sft("--deployment-type", "single_node",
                                                    "--include", "localhost:", launcher=True),
     "--include", None),
    ("sft-hostfile-is-a-folder", lambda c: c.sft("--deployment-type", "multi_node", "--hostfile",
                                                 c.folder("hosts"), launcher=True),
     "--hostfile", "folder"),
    ("sft-hostfile-non-utf8", lambda c: c.sft("--deployment-type", "multi_node", "--hostfile",
                                              c.write("hostfile", b"w\xe9rker slots=\xff\n"),
                                              launcher=True), "--hostfile", None),
    ("sft-hostfile-with-single-gpu", lambda c: c.sft(
        "--hostfile", c.write("hostfile", "a slots=1\n"), launcher=True), "--hostfile",
     "multi_node"),
    ("sft-master-port-zero", lambda c: c.sft("--master-port", "0", launcher=True), "--master-port",
     None),
    # --- remote code
    ("sft-custom-code-model", lambda c: c.sft(model=_custom_code_model(c)), "--model",
     "--trust-remote-code"),
    # --- reward
    ("reward-sft-only-jsonl", lambda c: c.reward_cmd(data=("--data-path", c.write(
        "sft.jsonl", _jsonl(SFT_ONLY_ROWS)))), "--data-path", "rejected"),
    ("reward-split-leaves-step2-empty", lambda c: c.reward_cmd("--data-split", "10,0,0"),
     "--data-split", None),
    ("reward-model-missing", lambda c: c.reward_cmd(model=c.tmp / "no-model"), "--model",
     "not found"),
    ("reward-offline-hub-model", lambda c: c.reward_cmd(model="facebook/opt-350m"), "--model",
     "facebook/opt-350m"),
    ("reward-bad-loss", lambda c: c.reward_cmd("--loss", "hinge"), "--loss", "divergence"),
    # --- dpo
    ("dpo-sft-only-jsonl", lambda c: c.dpo(data=("--data-path", c.write(
        "sft.jsonl", _jsonl(SFT_ONLY_ROWS)))), "--data-path", "rejected"),
    ("dpo-model-is-a-reward-folder", lambda c: c.dpo(model=c.reward), "--model", "reward model"),
    ("dpo-offload-reference-without-a-copy", lambda c: c.dpo(
        "--lora-dim", "8", "--only-optimize-lora", "--offload-reference-model"),
     "--offload-reference-model", "drop the flag"),
    ("dpo-ipo-with-label-smoothing", lambda c: c.dpo("--loss-type", "ipo", "--label-smoothing",
                                                     "0.1"), "--label-smoothing", "sigmoid"),
    # --- ppo
    ("ppo-critic-is-a-data-folder", lambda c: c.ppo(critic=c.pairs), "--critic-model",
     "dschat reward"),
    ("ppo-actor-is-a-reward-folder", lambda c: c.ppo(actor=c.reward), "--actor-model",
     "reward model"),
    ("ppo-reward-model-other-vocab", lambda c: c.ppo("--reward-model", c.other_reward),
     "--reward-model", "different tokenizer"),
    ("ppo-critic-missing", lambda c: c.ppo(critic=c.tmp / "no-critic"), "--critic-model",
     "not found"),
    ("ppo-offline-hub-actor", lambda c: c.ppo(actor="facebook/opt-1.3b"), "--actor-model",
     "facebook/opt-1.3b"),
    ("ppo-unsupervised-data-missing", lambda c: c.ppo("--unsupervised-dataset-name",
                                                      c.tmp / "no-such.txt"),
     "--unsupervised-dataset-name", "no-such.txt"),
    ("ppo-max-answer-seq-len-1", lambda c: c.ppo("--max-answer-seq-len", "1"),
     "--max-answer-seq-len", None),
    ("ppo-hostfile-zero-slots", lambda c: c.ppo("--deployment-type", "multi_node", "--hostfile",
                                                c.write("hostfile", "a slots=0\n"), launcher=True),
     "--hostfile", "slots"),
    # --- pipeline
    ("pipeline-bad-steps", lambda c: c.pipeline("--steps", "4"), "--steps", None),
    ("pipeline-dpo-steps-3", lambda c: c.pipeline("--method", "dpo", "--steps", "3"), "--steps",
     "not of --method dpo"),
    ("pipeline-dpo-estimator", lambda c: c.pipeline("--method", "dpo", "--advantage-estimator",
                                                    "grpo"), "--advantage-estimator", "dpo"),
    ("pipeline-dpo-sft-only-data", lambda c: c.pipeline("--method", "dpo", data=(
        "--data-path", c.write("sft.jsonl", _jsonl(SFT_ONLY_ROWS)))), "--data-path", "rejected"),
    ("pipeline-sft-only-data", lambda c: c.pipeline(data=(
        "--data-path", c.write("sft.jsonl", _jsonl(SFT_ONLY_ROWS)))), "--data-path", "rejected"),
    ("pipeline-offline-hub-actor", lambda c: c.pipeline(actor="facebook/opt-1.3b"), "--actor",
     "facebook/opt-1.3b"),
    ("pipeline-step-config-unknown-key", lambda c: c.pipeline(
        "--sft-config", c.write("sft.yaml", "optim:\n  lr: 1\n")), "--sft-config", "optim.lr"),
    ("pipeline-output-dir-is-a-file", lambda c: c.pipeline("--output-dir", c.write("out.txt", "x")),
     "--output-dir", None),
    ("pipeline-multi-node-without-hostfile", lambda c: c.pipeline("--deployment-type",
                                                                  "multi_node"),
     "--launcher|--hostfile", None),
    # --- eval
    ("eval-finetuned-empty-folder", lambda c: c.eval(finetuned=c.folder("empty")), "--finetuned",
     "config.json"),
    ("eval-baseline-is-a-file", lambda c: c.eval(baseline=c.write("model.bin", "x")), "--baseline",
     None),
    ("eval-output-file-is-a-folder", lambda c: c.eval("--output-file", c.folder("answers")),
     "--output-file", None),
    ("eval-zero-max-new-tokens", lambda c: c.eval("--max-new-tokens", "0"), "--max-new-tokens",
     None),
    ("eval-offline-hub-model", lambda c: c.eval(finetuned="facebook/opt-1.3b"), "--finetuned",
     "facebook/opt-1.3b"),
    ("eval-custom-code-model", lambda c: c.eval(finetuned=_custom_code_model(c)), "--finetuned",
     "--trust-remote-code"),
    # --- eval-reward
    ("eval-reward-empty-folder", lambda c: c.eval_reward(path=c.folder("empty")), "--path", None),
    ("eval-reward-data-missing", lambda c: c.eval_reward("--data-path", c.tmp / "pairs.jsonl"),
     "--data-path", "pairs.jsonl"),
    ("eval-reward-non-utf8-data", lambda c: c.eval_reward("--data-path", c.write(
        "pairs.json", json.dumps(ROWS, ensure_ascii=False).replace("question", "questi\u00f3n")
        .encode("latin-1"))), r".*(pairs\.json|--data-path)", "UTF-8"),
    ("eval-reward-sft-only-data", lambda c: c.eval_reward("--data-path", c.write(
        "sft.jsonl", _jsonl(SFT_ONLY_ROWS))), "--data-path", "rejected"),
    ("eval-reward-offline-hub-data", lambda c: c.eval_reward("--data-path", "Dahoas/rm-static"),
     "--data-path", "Dahoas/rm-static"),
    ("eval-reward-output-file-is-a-folder", lambda c: c.eval_reward(
        "--output-file", c.folder("scores")), "--output-file", None),
    # --- chat
    ("chat-empty-folder", lambda c: c.chat(path=c.folder("empty")), "--path", "config.json"),
    ("chat-path-is-a-file", lambda c: c.chat(path=c.write("model.safetensors", "x")), "--path",
     None),
    ("chat-zero-max-new-tokens", lambda c: c.chat("--max-new-tokens", "0"), "--max-new-tokens",
     None),
    ("chat-bad-format", lambda c: c.chat("--format", "markdown"), "--format", "template"),
    ("chat-config-unknown-key", lambda c: c.chat("--config", c.write("chat.yaml", "temp: 1\n")),
     "--config", "temp"),
    ("chat-custom-code-model", lambda c: c.chat(path=_custom_code_model(c)), "--path",
     "--trust-remote-code"),
    # --- plan (writes nothing; takes the training commands' flags)
    ("plan-sft-model-missing", lambda c: ["plan", *c.sft(model=c.tmp / "no-model")], "--model",
     "no-model"),
    ("plan-ppo-critic-empty-folder", lambda c: ["plan", *c.ppo(critic=c.folder("empty"))],
     "--critic-model", "config.json"),
    ("plan-sft-config-invalid-yaml", lambda c: ["plan", *c.sft("--config", c.write(
        "run.yaml", "optim: [1,\n"))], "--config", "run.yaml"),
    ("plan-pipeline-demo", lambda c: ["plan", "pipeline", "--demo"], "--demo", None),
    # --- resuming from a checkpoint (another run's checkpoints must survive a refused resume)
    ("resume-truncated-checkpoint", lambda c: resume_from(c, _truncate), "--resume", "damaged"),
    ("resume-other-options", lambda c: resume_from(c, None, "--weight-decay", "0.5"),
     "--weight-decay", "--resume"),
    ("resume-path-not-a-checkpoint", lambda c: c.sft(*CHECKPOINT_FLAGS, "--resume", c.pairs),
     "--resume", None),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (-> bytes) and folder (-> None) under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _make_ctx(tmp_path: Path, tiny_opt: Path, reward: Path, other: Path, pairs: Path,
              checkpointed: Path | None = None) -> Ctx:
    ctx = Ctx(tmp=tmp_path / "work", out=tmp_path / "out", cache=tmp_path / "data-cache",
              answers=tmp_path / "answers.jsonl", model=tiny_opt, reward=reward, other_reward=other,
              pairs=pairs, checkpointed=checkpointed)
    ctx.tmp.mkdir()
    for name, content in PREVIOUS_RUN.items():
        (ctx.out / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx.out / name).write_bytes(content)
    ctx.answers.write_text('{"prompt": "previous", "answer": "answers"}\n')
    return ctx


def check_one_line_error(result, where: str, contains: str | None) -> str:
    assert result.code == 2, result.explain()
    assert "Traceback" not in result.output, result.explain()
    errors = [ln for ln in result.output.splitlines() if "error:" in ln]
    assert len(errors) == 1, result.explain()
    m = ERROR_LINE.match(errors[0].strip())
    assert m, f"not an 'error: WHERE: message' line: {errors[0]!r}"
    assert re.fullmatch(where, m.group("where")), \
        f"error names {m.group('where')!r}, expected {where!r}\n{result.explain()}"
    if contains is not None:
        assert contains in errors[0], f"{contains!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture(scope="module")
def reward_folder(tiny_opt, tmp_path_factory) -> Path:
    """A reward folder as `dschat reward` saves it, untrained (enough for error paths)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from dschat_cli.models.reward import RewardModel, save_reward_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bad_input_reward")
    save_reward_model(RewardModel(AutoModel.from_pretrained(tiny_opt)),
                      AutoTokenizer.from_pretrained(tiny_opt), out, zero_stage=0, is_main=True)
    return out


@pytest.fixture(scope="module")
def other_vocab_reward(tmp_path_factory) -> Path:
    """A reward folder whose tokenizer has another vocabulary than the tiny models'."""
    from transformers import AutoModel

    from dschat_cli.models.local_tokenizer import build_local_tokenizer
    from dschat_cli.models.reward import RewardModel, save_reward_model
    from dschat_cli.models.tiny import save_tiny_model

    tok = build_local_tokenizer(vocab_size=300)
    base = save_tiny_model("opt", tmp_path_factory.mktemp("bad_input_othertok"), tokenizer=tok)
    out = tmp_path_factory.mktemp("bad_input_othertok_reward")
    save_reward_model(RewardModel(AutoModel.from_pretrained(base)), tok, out, zero_stage=0,
                      is_main=True)
    return out


@pytest.fixture(scope="module")
def checkpointed_run(tiny_opt, pairs_dir, tmp_path_factory, invoke_dschat) -> Path:
    """The output folder of a finished in-process `dschat sft ... CHECKPOINT_FLAGS` run."""
    root = tmp_path_factory.mktemp("bad_input_checkpointed")
    ctx = Ctx(tmp=root, out=root / "out", cache=root / "cache", answers=root / "a.jsonl",
              model=tiny_opt, reward=root, other_reward=root, pairs=pairs_dir, checkpointed=root)
    r = invoke_dschat(*ctx.sft(*CHECKPOINT_FLAGS))
    assert r.code == 0, r.explain()
    assert (root / "out" / "checkpoints" / "step_000002" / "model").is_dir()
    return root / "out"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_leaves_everything_untouched(case, tmp_path, tiny_opt, reward_folder,
                                               other_vocab_reward, pairs_dir, invoke_dschat,
                                               request):
    _, build, where, contains = case
    checkpointed = request.getfixturevalue("checkpointed_run") if case[0].startswith("resume") \
        else None
    ctx = _make_ctx(tmp_path, tiny_opt, reward_folder, other_vocab_reward, pairs_dir,
                    checkpointed)
    args = build(ctx)
    before = _snapshot(tmp_path)
    t = time.monotonic()
    result = invoke_dschat(*args)
    elapsed = time.monotonic() - t
    check_one_line_error(result, where, contains)
    after = _snapshot(tmp_path)
    added = sorted(set(after) - set(before))
    assert not added, f"new files or folders: {added}"
    changed = [k for k in before if after.get(k, b"<deleted>") != before[k]]
    assert changed == [], f"changed or deleted: {changed}"
    assert elapsed < 30, f"a user mistake took {elapsed:.1f} s to report"


def test_doctor_bad_flag_value_exit_2(invoke_dschat):
    """doctor has no file inputs; its one numeric flag out of range is click's usage error."""
    r = invoke_dschat("doctor", "--procs-per-node", "0")
    assert r.code == 2 and "--procs-per-node" in r.output and "Traceback" not in r.output, \
        r.explain()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["sft", "pipeline", "eval"])
def test_unwritable_output_folder(command, tmp_path, tiny_opt, reward_folder, other_vocab_reward,
                                  pairs_dir, invoke_dschat):
    ctx = _make_ctx(tmp_path, tiny_opt, reward_folder, other_vocab_reward, pairs_dir)
    locked = ctx.folder("locked")
    if command == "eval":
        args, where = ctx.eval("--output-file", locked / "answers.jsonl"), "--output-file"
    else:
        args = getattr(ctx, command)("--output-dir", locked / "out")
        where = "--output-dir"
    locked.chmod(0o500)
    try:
        before = _snapshot(tmp_path)
        r = invoke_dschat(*args)
        check_one_line_error(r, where, str(locked))
        assert _snapshot(tmp_path) == before
    finally:
        locked.chmod(0o700)


def test_full_disk_refused_before_writing(tmp_path, tiny_opt, reward_folder, other_vocab_reward,
                                          pairs_dir, invoke_dschat, monkeypatch):
    """Under 1 GiB free where the run writes: refused by the pre-launch check, naming the
    folder."""
    real = shutil.disk_usage
    ctx = _make_ctx(tmp_path, tiny_opt, reward_folder, other_vocab_reward, pairs_dir)

    def usage(path):
        u = real(path)
        full = str(Path(path).resolve()).startswith(str(tmp_path.resolve()))
        return type(u)(u.total, u.total - 1024, 1024) if full else u

    monkeypatch.setattr(shutil, "disk_usage", usage)
    before = _snapshot(tmp_path)
    r = invoke_dschat(*ctx.sft())
    line = check_one_line_error(r, "disk", "free some space")
    assert str(ctx.out) in line or "output" in line
    assert _snapshot(tmp_path) == before


def test_resume_from_a_checkpoint_damaged_inside(tmp_path, tiny_opt, reward_folder,
                                                 other_vocab_reward, pairs_dir, checkpointed_run,
                                                 invoke_dschat):
    """A damaged file of the right size passes the pre-launch check (sizes) and fails DeepSpeed's
    load in the worker: still one line naming --resume and exit 2, and no checkpoint, weight or
    metrics file changes. (run_config.yaml, resolved.json and launch.sh are written before any
    worker starts, since workers read their config and run record from there, so they record this
    attempt; the worker has tokenised the data into --data-cache-dir by then, which a later run
    reuses.)"""
    def damage(checkpoints: Path) -> None:
        states = checkpoints / "step_000002" / "model" / "mp_rank_00_model_states.pt"
        data = bytearray(states.read_bytes())
        data[200:400] = bytes(200)
        states.write_bytes(bytes(data))

    ctx = _make_ctx(tmp_path, tiny_opt, reward_folder, other_vocab_reward, pairs_dir,
                    checkpointed_run)
    args = resume_from(ctx, damage)
    before = _snapshot(ctx.out)
    r = invoke_dschat(*args)
    check_one_line_error(r, "--resume", "step_000002")
    after = _snapshot(ctx.out)
    records = {"run_config.yaml", "resolved.json", "launch.sh"}
    assert {k: v for k, v in after.items() if k not in records} == \
        {k: v for k, v in before.items() if k not in records}
