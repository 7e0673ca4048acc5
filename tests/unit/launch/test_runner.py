"""Launch plans (argv for deepspeed.launcher) and output streaming, with an injected process."""

import io
import subprocess
import sys

import pytest

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import LaunchOptions
from dschat_cli.launch.runner import Hardware, parse_hostfile, plan_launch, run_launch

GPU8 = Hardware(gpus=8, bf16=True, cpu_cores=64)
CPU = Hardware(gpus=0, bf16=False, cpu_cores=2)


def tail(argv):
    return argv[argv.index("deepspeed.launcher.runner") + 1:]


def test_single_gpu():
    plan = plan_launch(LaunchOptions(master_port=29500), "sft", "/o/run_config.yaml", hw=GPU8)
    assert tail(plan.argv) == ["--num_gpus", "1", "--master_port", "29500", "--no_local_rank",
                               "--module", "dschat_cli.worker", "sft", "/o/run_config.yaml"]
    assert plan.world_size == 1 and plan.device == "cuda" and plan.warning is None


def test_single_node_uses_all_gpus_or_num_gpus():
    plan = plan_launch(LaunchOptions(deployment_type="single_node", master_port=1), "sft", "c", hw=GPU8)
    assert plan.world_size == 8 and tail(plan.argv)[:2] == ["--num_gpus", "8"]
    plan = plan_launch(LaunchOptions(deployment_type="single_node", num_gpus=2, master_port=1),
                       "sft", "c", hw=GPU8)
    assert plan.world_size == 2
    with pytest.raises(ConfigError) as e:
        plan_launch(LaunchOptions(deployment_type="single_node", num_gpus=9), "sft", "c", hw=GPU8)
    assert e.value.where == "--num-gpus"


def test_include_sets_world_size():
    plan = plan_launch(LaunchOptions(deployment_type="single_node", include="localhost:0,2",
                                     master_port=1), "sft", "c", hw=GPU8)
    assert plan.world_size == 2 and "--include" in plan.argv and "--num_gpus" not in plan.argv


def test_multi_node_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nworker-0 slots=8\nworker-1 slots=8\n")
    plan = plan_launch(LaunchOptions(deployment_type="multi_node", hostfile=str(hf),
                                     master_addr="worker-0", master_port=1), "sft", "c", hw=GPU8)
    assert plan.world_size == 16 and plan.nodes == 2
    t = tail(plan.argv)
    assert t[:4] == ["--hostfile", str(hf), "--master_addr", "worker-0"]


@pytest.mark.parametrize("text,msg", [("worker-0 slots=x\n", "expected"), ("", "no hosts"),
                                      ("a slots=1\na slots=2\n", "twice")])
def test_bad_hostfile(tmp_path, text, msg):
    hf = tmp_path / "hostfile"
    hf.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_hostfile(str(hf))
    assert e.value.where == "--hostfile" and msg in e.value.message


def test_multi_node_needs_hostfile():
    with pytest.raises(ConfigError) as e:
        plan_launch(LaunchOptions(deployment_type="multi_node"), "sft", "c", hw=GPU8)
    assert e.value.where == "--hostfile"
    with pytest.raises(ConfigError) as e:
        plan_launch(LaunchOptions(deployment_type="multi_node", hostfile="/nonexistent"), "sft", "c",
                    hw=GPU8)
    assert "not found" in e.value.message


def test_cpu_plan_warns_and_sets_threads():
    plan = plan_launch(LaunchOptions(deployment_type="single_node", num_gpus=2, master_port=1),
                       "sft", "c", hw=CPU)
    assert plan.device == "cpu" and "CPU" in plan.warning
    assert plan.env["DS_ACCELERATOR"] == "cpu" and plan.env["OMP_NUM_THREADS"] == "1"


def test_in_process_launcher_is_single_rank_only():
    assert plan_launch(LaunchOptions(launcher="none"), "sft", "c", hw=CPU).argv == []
    with pytest.raises(ConfigError):
        plan_launch(LaunchOptions(launcher="none", deployment_type="single_node", num_gpus=2),
                    "sft", "c", hw=CPU)


def test_run_launch_streams_logs_and_returns_exit_code(tmp_path):
    script = ("import sys; print('[INFO] launcher noise'); print('\\x1b[1mrank0 line\\x1b[0m');"
              "sys.stderr.write('boom\\n'); sys.exit(3)")

    def popen(argv, **kw):
        return subprocess.Popen([sys.executable, "-c", script], **kw)

    from dschat_cli.launch.runner import LaunchPlan

    out = io.BytesIO()
    rc = run_launch(LaunchPlan(argv=["x"]), log_path=tmp_path / "log", popen=popen, out=out)
    assert rc == 3
    shown = out.getvalue().decode()
    assert "rank0 line" in shown and "boom" in shown and "launcher noise" not in shown
    log = (tmp_path / "log").read_text()
    assert "launcher noise" in log and "rank0 line" in log and "\x1b" not in log


def test_detect_hardware_asks_nvidia_smi_not_torch(tmp_path, monkeypatch):
    """GPUs come from the driver's nvidia-smi (no CUDA context in the launching process), and
    CUDA_VISIBLE_DEVICES narrows them."""
    import os

    from dschat_cli.launch.runner import detect_hardware

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '143771, 9.0'\necho '81559, 7.5'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hw = detect_hardware()
    assert (hw.gpus, hw.bf16) == (2, False)  # a compute-7.5 GPU has no bf16
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    hw = detect_hardware()
    assert (hw.gpus, hw.bf16) == (1, True)
