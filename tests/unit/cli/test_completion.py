"""Shell completion (typer's): `dschat --show-completion` prints a script for the `dschat`
command, `--install-completion` installs it, and the script's protocol completes commands and
flags. _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION makes the shell an explicit argument (typer
would otherwise detect the shell running the tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def dschat(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1", **env}
    return subprocess.run([sys.executable, "-m", "dschat_cli", *args], capture_output=True,
                          text=True, env=full, timeout=60)


@pytest.mark.parametrize("shell, expected", [
    ("bash", "complete -o default -F _dschat_completion dschat"),
    ("zsh", "#compdef dschat"),
    ("fish", "complete --command dschat"),
])
def test_show_completion_prints_a_script_for_dschat(shell, expected):
    r = dschat("--show-completion", shell)
    assert r.returncode == 0, r.stderr
    assert expected in r.stdout and "_DSCHAT_COMPLETE" in r.stdout


def test_install_completion_writes_the_script_under_home(tmp_path):
    r = dschat("--install-completion", "bash", HOME=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "bash completion installed" in r.stdout
    script = tmp_path / ".bash_completions" / "dschat.sh"
    assert "_dschat_completion" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


def test_the_scripts_protocol_completes_commands_and_flags():
    r = dschat(_DSCHAT_COMPLETE="complete_bash", COMP_WORDS="dschat rep", COMP_CWORD="1")
    assert r.stdout.split() == ["report"], r.stderr
    r = dschat(_DSCHAT_COMPLETE="complete_bash", COMP_WORDS="dschat ppo --actor-learning",
               COMP_CWORD="2")
    assert r.stdout.split() == ["--actor-learning-rate"], r.stderr
