"""`dschat chat` as users run it, on the tiny models (CPU):

    dschat chat --path DIR --prompt "Hello" --prompt "And?"     answers only, on stdout
    dschat chat --path DIR                                        interactive (a pty, and piped stdin)
    dschat chat --path REWARD_DIR | MISSING                       one-line error, exit 2

Two subprocess runs (the real entry point, ~10 s each, mostly importing torch); the rest runs the
typer app in this process.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

SPECIAL_TEXTS = ("</s>", "<s>", "<pad>", "<unk>", "<|endoftext|>")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(COLUMNS="200", PYTHONIOENCODING="utf-8", **extra)
    return env


def _expected_answers(model_dir, turns: list[str | None], max_new_tokens: int) -> list[str]:
    """The answers of one conversation computed in this process (None: `clear`), as printed."""
    import torch

    from dschat_cli.chat.session import ChatSession
    from dschat_cli.config.eval import GenerationOptions
    from dschat_cli.models.inference import load_for_inference
    from dschat_cli.ui.console import plain_text

    model, tok = load_for_inference(str(model_dir), device="cpu", dtype=torch.float32,
                                    flag="--path")
    s = ChatSession(model, tok, GenerationOptions(max_new_tokens=max_new_tokens))
    out = []
    for t in turns:
        if t is None:
            s.clear()
        else:
            out.append(plain_text(s.respond(t)).plain)
    return out


def _invoke(args: list[str], input: str | None = None):
    from dschat_cli.cli.app import app

    return CliRunner().invoke(app, ["chat", *map(str, args)], input=input, terminal_width=200)


def test_prompt_prints_only_the_answers(tiny_opt):
    questions = ["Hello", "How do I bake bread?"]
    proc = subprocess.run(
        [sys.executable, "-m", "dschat_cli", "chat", "--path", str(tiny_opt), "--prompt",
         questions[0], "--prompt", questions[1], "--max-new-tokens", "8", "--device", "cpu"],
        capture_output=True, text=True, encoding="utf-8", timeout=120, env=_env(),
        stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    # one answer per --prompt, the same as the session gives for that conversation, and nothing else
    expected = _expected_answers(tiny_opt, questions, 8)
    assert proc.stdout == "".join(a + "\n" for a in expected)
    assert any(expected)
    assert not any(t in proc.stdout for t in SPECIAL_TEXTS + ("Human:",))


def _read_until(fd: int, buf: list[str], done, timeout: float = 60) -> str:
    """Read the pty into buf until done(text) or EOF; returns the text so far."""
    end = time.monotonic() + timeout
    while not done("".join(buf)):
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out; output so far:\n" + "".join(buf))
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        buf.append(data.decode("utf-8", "replace"))
    return "".join(buf)


def test_interactive_session_in_a_terminal(tiny_llama):
    """Two turns, `clear`, one more turn, `quit`, typed into a pseudo-terminal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dschat_cli", "chat", "--path", str(tiny_llama),
         "--max-new-tokens", "10", "--device", "cpu"],
        stdin=slave, stdout=slave, stderr=slave, env=_env(TERM="dumb", NO_COLOR="1"),
        close_fds=True)
    os.close(slave)
    buf: list[str] = []
    turns = ["Hello there", "How are you?", None, "Hello there"]
    try:
        prompts = 1
        _read_until(master, buf, lambda t: t.count("You:") >= prompts)
        for t in turns + ["quit"]:
            os.write(master, ((t or "clear") + "\n").encode())
            prompts += 1
            if t != "quit":
                _read_until(master, buf, lambda text: text.count("You:") >= prompts)
        _read_until(master, buf, lambda t: False, timeout=30)  # to EOF
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    out = ANSI.sub("", "".join(buf)).replace("\r\n", "\n")
    assert "Traceback" not in out
    assert out.startswith("dschat chat") and "llama" in out
    assert "Hello there" in out and "How are you?" in out  # the terminal echoes the input
    assert "(conversation cleared)" in out
    answers = re.findall(r"Assistant: (.*)\n", out)
    assert answers == [a or "(empty answer)" for a in _expected_answers(tiny_llama, turns, 10)]
    # after `clear` the same question gets the first answer again: the history was emptied
    assert answers[2] == answers[0]
    assert not any(s in out for s in SPECIAL_TEXTS)


def test_piped_stdin_ends_at_eof(tiny_opt):
    r = _invoke(["--path", tiny_opt, "--max-new-tokens", "6"], input="Hello\n\nclear\nHi again\n")
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.count("You:") == 5 and out.count("Assistant:") == 2  # the empty line is skipped
    assert "You: Hello\n" in out and "You: Hi again\n" in out  # piped input is echoed
    assert "(conversation cleared)" in out


def test_ctrl_c_at_the_prompt_ends_cleanly(tiny_opt, monkeypatch):
    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", ctrl_c)
    r = _invoke(["--path", tiny_opt, "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "Aborted" not in r.output


def test_old_turns_dropped_with_one_notice(tiny_model_dir):
    model = tiny_model_dir("opt", max_positions=48)
    prompts = [f"Tell me about bread and water, part {i}" for i in range(5)]
    args = ["--path", model, "--max-new-tokens", "16", "--device", "cpu"]
    for p in prompts:
        args += ["--prompt", p]
    r = _invoke(args)
    assert r.exit_code == 0, r.output
    # the notice once, on stderr; stdout holds the answers of the trimmed conversation alone
    assert r.stderr.count("older turns are dropped") == 1, r.stderr
    assert r.stdout == "".join(a + "\n" for a in _expected_answers(model, prompts, 16))


def test_message_longer_than_the_context(tiny_model_dir):
    model = tiny_model_dir("opt", max_positions=48)
    r = _invoke(["--path", model, "--max-new-tokens", "16", "--prompt", "bread " * 60])
    assert r.exit_code == 2
    assert r.output.strip().startswith("error: --prompt: the message takes")


def _reward_dir(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(dschat_role="reward", architectures=["OPTModel"])
    (dst / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file
    import torch

    save_file({"v_head.weight": torch.zeros(1, 64)}, str(dst / "value_head.safetensors"))
    return dst


def _classifier_dir(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["OPTForSequenceClassification"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case,message", [
    ("reward", "is a dschat reward model, not a causal LM"),
    ("classifier", "holds a OPTForSequenceClassification, not a causal language model"),
    ("missing", "not found"),
    ("no_config", "has no config.json"),
    ("hub_offline", "is not a local folder, and hub model"),
])
def test_not_a_chat_model_exits_2_with_one_line(case, message, tiny_opt, tmp_path):
    path = {"reward": lambda: _reward_dir(tiny_opt, tmp_path / "reward"),
            "classifier": lambda: _classifier_dir(tiny_opt, tmp_path / "cls"),
            "missing": lambda: tmp_path / "no" / "such" / "actor",
            "no_config": lambda: tmp_path,
            "hub_offline": lambda: "out/actor-that-is-not-here"}[case]()
    r = _invoke(["--path", path, "--prompt", "Hello"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --path:"), r.output
    assert message in lines[0]
