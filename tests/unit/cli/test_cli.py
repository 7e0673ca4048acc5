"""The command line: fast help, version, dry-run output, and one-line errors with exit code 2."""

import subprocess
import sys
import time

from typer.testing import CliRunner

from dschat_cli.cli.app import app

runner = CliRunner()


def test_help_is_fast_and_lists_commands():
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dschat_cli", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0
    for cmd in ("sft", "eval"):
        assert cmd in r.stdout
    assert elapsed < 3.0  # < 1 s on a dev machine; margin for loaded CI
    # no heavy import at CLI import time
    r = subprocess.run([sys.executable, "-c", "import sys, dschat_cli.cli.app; "
                        "print(any(m in sys.modules for m in ('torch', 'deepspeed', 'transformers')))"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False"


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("dschat ")


def test_dry_run_prints_config_ds_json_and_command(tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["sft", "--model", "opt-1.3b", "--random-init", "--zero-stage", "2",
                            "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
                            "--output-dir", str(out), "--dry-run"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "zero_stage: 2" in r.output
    assert '"train_batch_size": 8' in r.output  # 4 x 1 GPU x 2
    assert "deepspeed.launcher.runner" in r.output and "dschat_cli.worker sft" in r.output
    # the run record the ranks would read: resolved for this CPU machine
    assert "run record: resolved.json" in r.output
    for field in ('"device": "cpu"', '"dtype": "fp32"', '"torch_adam": true', '"world_size": 1'):
        assert field in r.output, field
    assert not out.exists()  # a dry run writes nothing


def test_bad_flag_values_exit_2_with_one_line(tmp_path):
    r = runner.invoke(app, ["sft", "--model", "m", "--output-dir", str(tmp_path / "o"),
                            "--zero-stage", "4", "--dry-run"])
    assert r.exit_code == 2
    assert "--zero-stage" in r.output and "Traceback" not in r.output
