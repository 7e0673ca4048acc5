"""`dschat doctor` and the pre-launch check: versions, /dev/shm, disk, hub, CLI exit codes."""

import json
import re
from collections import namedtuple
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dschat_cli import doctor
from dschat_cli.cli.app import app
from dschat_cli.config.schema import ConfigError
from dschat_cli.doctor import GIB, MIB, Check

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _old(monkeypatch, dist: str, version: str):
    real = metadata.version

    def fake(name):
        return version if name.lower() == dist else real(name)

    monkeypatch.setattr(metadata, "version", fake)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------- versions

@pytest.mark.parametrize("found,minimum,ok", [
    ("0.19.0", "0.30", False), ("0.30.0", "0.30", True), ("0.30", "0.30.0", True),
    ("1.15.0", "0.30", True), ("2.13.0+cpu", "2.1", True), ("2.0.1+cu118", "2.1", False),
    ("4.45.0.dev0", "4.45", False), ("4.45.0rc1", "4.45", False), ("4.46.0.dev0", "4.45", True),
    ("0.30.0.post1", "0.30", True), ("13", "13", True), ("12.9.9", "13", False),
])
def test_version_comparison(found, minimum, ok):
    assert doctor.version_at_least(found, minimum) is ok


def test_unreadable_version_is_a_warning(monkeypatch):
    _old(monkeypatch, "peft", "unknown")
    c = doctor.check_package("peft", "0.11")
    assert c.status == "warn" and doctor.version_at_least("unknown", "1") is None


def test_old_accelerate_fails_with_the_pip_fix(monkeypatch):
    _old(monkeypatch, "accelerate", "0.19.0")
    c = doctor.check_package("accelerate", doctor.REQUIREMENTS["accelerate"])
    assert c.status == "fail"
    assert "0.19.0" in c.found
    assert "pip install -U 'accelerate>=0.30'" in c.fix


def test_missing_package_fails(monkeypatch):
    def fake(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", fake)
    c = doctor.check_package("peft", "0.11")
    assert c.status == "fail" and c.found == "not installed" and "peft>=0.11" in c.fix


def test_installed_packages_pass_here():
    assert all(c.status == "ok" for c in doctor.check_versions())


def test_requirements_table_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        project = tomllib.loads(text)["project"]
        deps, python = project["dependencies"], project["requires-python"]
    except ImportError:  # Python 3.10
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
        deps = re.findall(r'"([^"]+)"', block)
        python = re.search(r'^requires-python = "([^"]+)"', text, re.M).group(1)
    pinned = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9.]*)", dep.strip())
        assert m, f"dependency without a plain minimum: {dep}"
        pinned[m.group(1).lower()] = m.group(2)
    assert pinned == doctor.REQUIREMENTS
    assert python == f">={doctor.PYTHON_MIN}"


# ------------------------------------------------------------------------------------- /dev/shm

@pytest.mark.parametrize("free,procs,status", [
    (64 * MIB, 8, "fail"),       # docker's default: bus errors (exit code -7)
    (64 * MIB, 2, "fail"),
    (64 * MIB, 1, "warn"),       # one process: never a failure
    (3 * GIB, 8, "fail"),        # under 512 MiB per process
    (5 * GIB, 8, "warn"),        # under 1 GiB per process
    (16 * GIB, 8, "ok"),
    (1536 * MIB, 2, "warn"),
    (2 * GIB, 2, "ok"),
    (600 * MIB, 1, "ok"),
])
def test_shm_thresholds(monkeypatch, free, procs, status):
    monkeypatch.setattr(doctor, "shm_bytes", lambda path="/dev/shm": (free, free))
    c = doctor.check_shm(procs)
    assert c.status == status, c
    if status != "ok":
        assert "--shm-size=16g" in c.fix and "--ipc=host" in c.fix


def test_missing_shm_is_a_warning(monkeypatch):
    monkeypatch.setattr(doctor, "shm_bytes", lambda path="/dev/shm": None)
    assert doctor.check_shm(8).status == "warn"


def test_shm_bytes_reads_statvfs(monkeypatch):
    st = namedtuple("st", "f_bavail f_frsize f_blocks")(10, 4096, 20)
    monkeypatch.setattr(doctor.os, "statvfs", lambda p: st)
    assert doctor.shm_bytes() == (40960, 81920)

    def missing(p):
        raise FileNotFoundError(p)

    monkeypatch.setattr(doctor.os, "statvfs", missing)
    assert doctor.shm_bytes() is None


# ------------------------------------------------------------------------------------------ disk

@pytest.mark.parametrize("free,status", [(500 * MIB, "fail"), (5 * GIB, "warn"), (50 * GIB, "ok")])
def test_disk_thresholds(monkeypatch, tmp_path, free, status):
    monkeypatch.setattr(doctor, "disk_free", lambda path: free)
    checks = doctor.check_disk({"output": str(tmp_path / "out"), "data cache": str(tmp_path)})
    assert len(checks) == 1  # same filesystem: one line
    assert checks[0].status == status and "output" in checks[0].found


def test_disk_uses_the_nearest_existing_parent(tmp_path):
    assert doctor.nearest_existing(str(tmp_path / "a" / "b" / "c")) == tmp_path
    assert doctor.disk_free(str(tmp_path / "a" / "b")) > 0


# ------------------------------------------------------------------------------------------- hub

@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_offline_mode_is_ok_without_network(monkeypatch, var):
    from dschat_cli import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: pytest.fail("no network"))
    c = doctor.check_hub()
    assert c.status == "ok" and "offline mode" in c.found


@pytest.mark.parametrize("reachable,status", [(True, "ok"), (False, "warn")])
def test_hub_reachability(monkeypatch, reachable, status):
    from dschat_cli import hub

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: reachable)
    c = doctor.check_hub()
    assert c.status == status
    if not reachable:
        assert "HF_HUB_OFFLINE=1" in c.fix


# -------------------------------------------------------------------------------------- GPU info

def test_gpu_lines_cpu_only_and_gpus():
    cpu = doctor.check_gpus(doctor.GpuInfo(None, False))
    assert [c.status for c in cpu] == ["ok", "ok", "ok"]
    assert "CPU only" in cpu[1].found
    gpu = doctor.check_gpus(doctor.GpuInfo("12.4", True, ("H200", "H200"), (140 * GIB,) * 2,
                                           "2.21.5"))
    assert "2 x H200 (140.0 GiB)" in gpu[1].found and gpu[2].found == "2.21.5"
    no_nccl = doctor.check_gpus(doctor.GpuInfo("12.4", True, ("A", "A"), (GIB, GIB), None))
    assert no_nccl[2].status == "warn"
    broken = doctor.check_gpus(doctor.GpuInfo("12.4", False))
    assert broken[0].status == "warn"


# ------------------------------------------------------------------------------------------- CLI

def _fake_checks(statuses):
    return lambda **kw: [Check(f"c{i}", s, "x", "do y") for i, s in enumerate(statuses)]


@pytest.mark.parametrize("statuses,code", [(["ok", "ok"], 0), (["ok", "warn"], 0),
                                           (["ok", "fail", "warn"], 1)])
def test_cli_exit_codes(monkeypatch, statuses, code):
    monkeypatch.setattr(doctor, "run_checks", _fake_checks(statuses))
    r = runner.invoke(app, ["doctor"], terminal_width=120)
    assert r.exit_code == code, r.output
    assert "c0" in r.output and ("failed" in r.output) == (code == 1)


def test_cli_json(monkeypatch):
    monkeypatch.setattr(doctor, "run_checks", _fake_checks(["ok", "fail"]))
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["ok"] is False and [c["status"] for c in data["checks"]] == ["ok", "fail"]
    assert set(data["checks"][0]) == {"name", "status", "found", "fix"}


def test_cli_real_checks_here(offline, tmp_path):
    r = runner.invoke(app, ["doctor", "--json", "--output-dir", str(tmp_path / "out"),
                            "--data-cache-dir", str(tmp_path / "cache"), "--procs-per-node", "1"])
    data = json.loads(r.stdout)
    names = [c["name"] for c in data["checks"]]
    for name in ("python", "torch", "deepspeed", "transformers", "datasets", "peft", "accelerate",
                 "cuda", "gpus", "nccl", "/dev/shm", "disk", "hub"):
        assert name in names
    assert r.exit_code == (0 if data["ok"] else 1)
    assert data["checks"][names.index("hub")]["found"].startswith("offline mode")


def test_cli_passes_the_old_package_failure_through(monkeypatch, offline):
    _old(monkeypatch, "accelerate", "0.19.0")
    r = runner.invoke(app, ["doctor"], terminal_width=200)
    assert r.exit_code == 1
    assert "pip install -U 'accelerate>=0.30'" in r.output


# ------------------------------------------------------------------------------------- preflight

def test_preflight_passes_here(tmp_path):
    doctor.preflight(1, str(tmp_path / "out"), str(tmp_path / "cache"))
    doctor.preflight(1, str(tmp_path / "out"), None)


def test_preflight_refuses_an_old_package(monkeypatch, tmp_path):
    _old(monkeypatch, "accelerate", "0.19.0")
    with pytest.raises(ConfigError) as e:
        doctor.preflight(1, str(tmp_path / "out"), None)
    assert e.value.where == "accelerate"
    assert "pip install -U 'accelerate>=0.30'" in e.value.message
    assert "dschat doctor" in e.value.message


def test_preflight_shm_fails_only_for_several_processes(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "shm_bytes", lambda path="/dev/shm": (64 * MIB, 64 * MIB))
    doctor.preflight(1, str(tmp_path), None)  # one process: a warning, not a refusal
    with pytest.raises(ConfigError) as e:
        doctor.preflight(8, str(tmp_path), None)
    assert e.value.where == "/dev/shm" and "--shm-size=16g" in e.value.message
    assert "exit code -7" in e.value.message


def test_preflight_refuses_a_full_disk_and_lists_several_failures(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "disk_free", lambda path: 100 * MIB)
    _old(monkeypatch, "peft", "0.5.0")
    with pytest.raises(ConfigError) as e:
        doctor.preflight(1, str(tmp_path), None)
    assert e.value.where == "environment"
    assert "peft>=0.11" in e.value.message and "disk" in e.value.message


def test_preflight_is_fast_and_imports_no_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from dschat_cli.doctor import preflight; "
            f"preflight(2, {str(tmp_path)!r}, None); "
            "print(any(m in sys.modules for m in ('torch', 'deepspeed', 'transformers')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_launch_training_runs_preflight_before_writing(monkeypatch, tmp_path):
    """A failed preflight refuses the launch with the doctor's message; nothing is written."""
    from dschat_cli.cli import sft as sft_cmd

    _old(monkeypatch, "accelerate", "0.19.0")
    monkeypatch.setattr("dschat_cli.launch.step.detect_hardware",
                        lambda: __import__("dschat_cli.launch.runner", fromlist=["Hardware"])
                        .Hardware(gpus=0, bf16=False, cpu_cores=2))
    out = tmp_path / "out"
    r = runner.invoke(app, ["sft", "--model", "opt-1.3b", "--random-init",
                            "--output-dir", str(out)], terminal_width=200)
    assert sft_cmd is not None
    assert r.exit_code == 2, r.output
    assert "accelerate>=0.30" in r.output
    assert not out.exists()
