"""Launch plans (argv for deepspeed.launcher) and output streaming, with an injected process."""

import io
import os
import subprocess
import sys

import pytest

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import LaunchOptions
from dschat_cli.launch.runner import (Hardware, LaunchPlan, parse_hostfile, plan_launch,
                                      run_launch)

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
    """A real child through a real pipe. With PYTHONUNBUFFERED (set for the workers) a print writes
    its text and its newline apart, so whether one read ends inside the coloured line depends on
    timing (it used to lose that line from the log now and then); the output must not
    (test_run_launch_any_chunking covers every split)."""
    script = ("import sys; print('[INFO] launcher noise'); print('\\x1b[1mrank0 line\\x1b[0m');"
              "sys.stderr.write('boom\\n'); sys.exit(3)")

    def popen(argv, **kw):
        kw["env"]["PYTHONUNBUFFERED"] = "1"
        return subprocess.Popen([sys.executable, "-c", script], **kw)

    out = io.BytesIO()
    rc = run_launch(LaunchPlan(argv=["x"]), log_path=tmp_path / "log", popen=popen, out=out)
    assert rc == 3
    assert out.getvalue() == b"\x1b[1mrank0 line\x1b[0m\nboom\n"
    assert (tmp_path / "log").read_text() == "[INFO] launcher noise\nrank0 line\nboom\n"


class _ChunkedProc:
    """A launcher whose output comes in the given chunks, one per read. run_launch asks
    stdout.fileno() before each os.read: that call puts the next chunk (or, after the last, the
    end of output) in a real pipe, and records in `seen` what the terminal showed by then. The
    pipe does not block: a read with nothing put in it fails rather than hangs."""

    def __init__(self, chunks, out):
        self.chunks, self.out, self.seen = list(chunks), out, []
        self.stdout = self
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def fileno(self):
        self.seen.append(self.out.getvalue())
        if self.chunks:
            os.write(self.w, self.chunks.pop(0))
        elif self.w is not None:
            os.close(self.w)
            self.w = None
        return self.r

    def wait(self, timeout=None):
        os.close(self.r)
        return 7


# Through the launcher's pipe: its noise, a coloured line split by an unbuffered print, rich's live
# bar (hide cursor, frames "\r\x1b[2K" + bar, a line printed above it and the bar again, the last
# frame ending in "\n", show cursor), a credential, a tqdm-style bar ("\r" + frame), a CRLF line
# and a last line without "\n".
BAR = b"\x1b[1msft\x1b[0m \x1b[32m%d/3\x1b[0m"
RICH = (b"\r\x1b[2K" + BAR % 1 + b"\r\x1b[2K" + BAR % 2
        + b"\r\x1b[2K\x1b[1mppo\x1b[0m: eval loss 1.5\n" + BAR % 2 + b"\r\x1b[2K" + BAR % 3 + b"\n")
TQDM = b"\r 50%|##   | 1/2\r100%|#####| 2/2\n"
STREAM = (b"[INFO] launcher noise\n"
          b"\x1b[1mppo\x1b[0m: step 1 reward 0.5\n"
          b"\x1b[?25l" + RICH + b"\x1b[?25hsaved\n"
          b"download token hf_abcdefgh1234\n" + TQDM + b"crlf line\r\n"
          b"\x1b[32mdone\x1b[0m")
LOG = ["[INFO] launcher noise", "ppo: step 1 reward 0.5", "ppo: eval loss 1.5", "sft 3/3",
       "saved", "download token ***", "100%|#####| 2/2", "crlf line", "done"]


def shown(stream: bytes) -> bytes:
    return stream.replace(b"[INFO] launcher noise\n", b"").replace(b"hf_abcdefgh1234", b"***")


LIVE = [(STREAM.index(bar), STREAM.index(bar) + len(bar) - 1) for bar in (RICH, TQDM)]


def _splits():
    yield [STREAM[i:i + 1] for i in range(len(STREAM))]
    for k in range(1, len(STREAM)):
        yield [STREAM[:k], STREAM[k:]]


@pytest.mark.parametrize("chunks", list(_splits()), ids=lambda c: f"{len(c[0])}:{len(c)}")
def test_run_launch_any_chunking(tmp_path, monkeypatch, chunks):
    """However the reads cut the output: every finished line is in the log whole (the text a
    terminal is left with, no escapes, redacted), the terminal gets every byte once and in order
    (less the launcher noise, credentials redacted), and what a live bar has drawn so far is on
    the terminal before the next read."""
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh1234")
    out = io.BytesIO()
    proc = _ChunkedProc(chunks, out)
    rc = run_launch(LaunchPlan(argv=["x"]), log_path=tmp_path / "log", popen=lambda *a, **k: proc,
                    out=out)
    assert rc == 7
    assert (tmp_path / "log").read_text().splitlines() == LOG
    assert out.getvalue() == shown(STREAM)
    read = 0
    for i, chunk in enumerate(chunks[:-1]):
        read += len(chunk)
        if any(start < read <= end for start, end in LIVE):
            assert proc.seen[i + 1] == shown(STREAM[:read])


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
