"""The user's side of the process boundary: plan and run a `deepspeed.launcher` launch.

    plan = plan_launch(cfg.launch, "sft", config_path, hw=detect_hardware())
    rc = run_launch(plan, log_path=out / "train.log")

Workers run `python -m dschat_cli.worker STEP CONFIG`. Their output is streamed through (rank 0
prints; others only their errors) and also written, without terminal escapes, to the log. When one
rank fails, DeepSpeed's launcher stops the others and we return its exit code.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import LaunchOptions
from dschat_cli.dist import free_port


@dataclass(frozen=True)
class Hardware:
    gpus: int  # visible CUDA devices on this node (0: CPU only)
    bf16: bool  # GPUs support bf16
    cpu_cores: int


def query_gpus() -> list[tuple[int, float]]:
    """[(MiB, compute capability)] of the GPUs CUDA_VISIBLE_DEVICES leaves visible; [] without
    nvidia-smi. Asking the driver directly keeps torch (and a CUDA context, ~0.5 GiB on GPU 0 for
    the whole run) out of the launching process."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        try:
            mib, cap = (x.strip() for x in line.split(","))
            gpus.append((int(float(mib)), float(cap)))
        except ValueError:
            continue
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and gpus:
        try:
            gpus = [gpus[int(i)] for i in visible.split(",") if i.strip()]
        except (ValueError, IndexError):  # UUIDs or MIG slices: keep what the driver listed
            pass
    return gpus


def detect_hardware() -> Hardware:
    """GPUs from nvidia-smi; without it, torch (imported lazily, not at CLI import time)."""
    gpus = query_gpus()
    if gpus:
        return Hardware(gpus=len(gpus), bf16=all(cap >= 8.0 for _, cap in gpus),
                        cpu_cores=os.cpu_count() or 1)
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bf16 = bool(n and torch.cuda.is_bf16_supported())
    return Hardware(gpus=n, bf16=bf16, cpu_cores=os.cpu_count() or 1)


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]  # empty for the in-process launcher
    env: dict[str, str] = field(default_factory=dict)  # added to the workers' environment
    world_size: int = 1
    nodes: int = 1
    device: str = "cuda"  # or "cpu"
    warning: str | None = None

    def command(self) -> str:
        if not self.argv:
            return "(in process: --launcher none)"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


def parse_hostfile(path: str) -> dict[str, int]:
    """'host slots=N' per line (comments with #) -> {host: slots}."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError("--hostfile", f"{path} is a folder; give the hostfile itself (lines like "
                          "'worker-1 slots=8')")
    if not p.is_file():
        raise ConfigError("--hostfile", f"file not found: {path}")
    hosts: dict[str, int] = {}
    for i, raw in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise ConfigError("--hostfile", f"{path}:{i}: expected 'HOSTNAME slots=N' (N >= 1), got "
                              f"'{raw.strip()}'")
        if m.group(1) in hosts:
            raise ConfigError("--hostfile", f"{path}:{i}: host {m.group(1)} listed twice")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ConfigError("--hostfile", f"{path} lists no hosts")
    return hosts


def _count_include(include: str) -> int:
    """Ranks selected by a DeepSpeed --include string ('localhost:0,2@other:1')."""
    total = 0
    for part in include.split("@"):
        if ":" in part:
            total += len([x for x in part.split(":", 1)[1].split(",") if x.strip()])
        else:
            raise ConfigError("--include", f"'{part}' must name devices, like localhost:0,1")
    if total == 0:
        raise ConfigError("--include", f"'{include}' selects no device; name them, like "
                          "localhost:0,1")
    return total


def plan_launch(opts: LaunchOptions, step: str, config_path: str | Path, *, hw: Hardware,
                python: str = sys.executable) -> LaunchPlan:
    """Everything about how the workers start, decided before anything runs (and shown by
    --dry-run)."""
    on_cpu = hw.gpus == 0
    device = "cpu" if on_cpu else "cuda"
    warning = None
    if on_cpu:
        warning = ("no GPU found: running DeepSpeed on CPU (gloo) - fine for tests and smoke runs, "
                   "not for real training")
    if opts.launcher == "none":
        if opts.deployment_type != "single_gpu" or (opts.num_gpus or 1) > 1 or opts.hostfile:
            raise ConfigError("--launcher", "none runs one worker in this process; use --launcher "
                              "deepspeed for several GPUs or nodes")
        return LaunchPlan(argv=[], env={"DS_ACCELERATOR": "cpu"} if on_cpu else {}, world_size=1,
                          device=device, warning=warning)

    if opts.include and opts.num_gpus is not None:
        # deepspeed.launcher refuses the pair too, but only after the run folder is written
        raise ConfigError("--include", "selects the devices itself; drop --num-gpus (or --include)")
    if opts.hostfile and opts.deployment_type != "multi_node":
        raise ConfigError("--hostfile", "is for --deployment-type multi_node")
    nodes = 1
    if opts.deployment_type == "single_gpu":
        if opts.num_gpus not in (None, 1):
            raise ConfigError("--num-gpus", f"{opts.num_gpus} with --deployment-type single_gpu; use "
                              "--deployment-type single_node for several GPUs")
        per_node = 1
    elif opts.deployment_type == "single_node":
        per_node = opts.num_gpus or (hw.gpus if hw.gpus else 1)
        if hw.gpus and per_node > hw.gpus:
            raise ConfigError("--num-gpus", f"{per_node} requested but this machine has {hw.gpus} "
                              "GPUs")
    else:  # multi_node
        if not opts.hostfile:
            raise ConfigError("--hostfile", "is required with --deployment-type multi_node (lines "
                              "like 'worker-1 slots=8')")
        hosts = parse_hostfile(opts.hostfile)
        nodes = len(hosts)
        per_node = opts.num_gpus or min(hosts.values())
    world = per_node * nodes
    if opts.include:
        world = _count_include(opts.include)

    port = opts.master_port or free_port()
    argv = [python, "-m", "deepspeed.launcher.runner"]
    if opts.deployment_type == "multi_node":
        argv += ["--hostfile", str(Path(opts.hostfile).expanduser())]  # type: ignore[arg-type]
        if opts.master_addr:
            argv += ["--master_addr", opts.master_addr]
        if opts.num_gpus:
            argv += ["--num_gpus", str(opts.num_gpus)]
    if opts.include:
        argv += ["--include", opts.include]
    elif opts.deployment_type != "multi_node":
        argv += ["--num_gpus", str(per_node)]
    argv += ["--master_port", str(port), "--no_local_rank", "--module", "dschat_cli.worker", step,
             str(config_path)]
    env = {"PYTHONUNBUFFERED": "1"}
    if on_cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, hw.cpu_cores // max(1, per_node)))
    return LaunchPlan(argv=argv, env=env, world_size=world, nodes=nodes, device=device,
                      warning=warning)


# Words that mark an environment variable as a credential: HF_TOKEN, WANDB_API_KEY,
# AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, ... (whole parts between underscores, so that
# TOKENIZERS_PARALLELISM is not one).
_SECRET_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "APIKEY", "CREDENTIAL",
                 "CREDENTIALS"}
_ASSIGNMENT = re.compile(rb"\b([A-Za-z_][A-Za-z0-9_]*)=([^\s;'\"]+)")


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_PARTS & set(name.upper().split("_")))


def secret_redactor(env: dict[str, str]) -> Callable[[bytes], bytes]:
    """line -> line with credentials replaced by ***: the value of every secret-named variable of
    `env`, and any `NAME=value` of a secret-looking NAME. DeepSpeed's multi-node runner logs its
    whole pdsh/mpirun command, including `export NAME=value` for MLFLOW*/NCCL* variables and every
    line of .deepspeed_env (where users put HF_TOKEN for the other nodes); that log is train.log."""
    values = sorted({v.encode() for k, v in env.items() if is_secret_name(k) and len(v) >= 6},
                    key=len, reverse=True)

    def assignment(m: re.Match) -> bytes:
        return m.group(1) + b"=***" if is_secret_name(m.group(1).decode()) else m.group(0)

    def redact(line: bytes) -> bytes:
        if b"=" in line:
            line = _ASSIGNMENT.sub(assignment, line)
        for v in values:
            line = line.replace(v, b"***")
        return line

    return redact


_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\r")
_LAUNCHER_NOISE = re.compile(rb"^\[(?:\d{4}-\d\d-\d\d [\d:,]+\] \[)?(?:INFO|WARNING)\]")
# What redraws a line: a carriage return, or a cursor move / erase (CSI ... A-H, J, K, f). Colours
# and styles (CSI ... m) and cursor show/hide (CSI ? 25 h/l) draw nothing over earlier text.
_REDRAW = re.compile(rb"\r|\x1b\[[0-9;]*[A-HJKf]")


def run_launch(plan: LaunchPlan, *, log_path: str | Path | None = None,
               popen: Callable[..., subprocess.Popen] = subprocess.Popen,
               out=None, verbose: bool = False) -> int:
    """Start the launcher, stream its output, return its exit code. `popen` is injectable for
    tests; `out` is a binary stream (default: this process's stdout)."""
    out = out if out is not None else sys.stdout.buffer
    env = dict(os.environ)
    env.update(plan.env)
    if sys.stdout.isatty():  # let rank 0 draw live progress through the pipe
        env.setdefault("DSCHAT_FORCE_TERMINAL", "1")
        try:
            env.setdefault("COLUMNS", str(os.get_terminal_size().columns))
        except OSError:
            pass
    proc = popen(plan.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 start_new_session=False)
    log = open(log_path, "ab") if log_path else None
    stream = _LineStream(out, log, secret_redactor(env), verbose)
    try:
        assert proc.stdout is not None
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            stream.feed(chunk)
        stream.close()
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return 130
    finally:
        if log:
            log.close()


class _LineStream:
    r"""The launcher's output, read in chunks that end anywhere, to the terminal and the log.

    Rich's live bar through the pipe (DSCHAT_FORCE_TERMINAL=1) is a line that does not end while
    it runs: each refresh is "\r\x1b[2K" + the bar, no "\n"; a line printed meanwhile comes as
    "\r\x1b[2K" + text + "\n" + the bar again; the last frame ends in "\n". Plain lines, coloured
    or not, come split anywhere (unbuffered, a print writes its text and its "\n" apart). So an
    unfinished line is drawn at once only if it redraws (_REDRAW), follows a line that did (the bar
    under a printed line), or is already partly drawn; others wait for their "\n", to be filtered
    and redacted whole. The terminal gets each byte once, in order; the log every finished line,
    as a terminal leaves it (the text after its last "\r"), without escapes, redacted.
    """

    def __init__(self, out, log, redact: Callable[[bytes], bytes], verbose: bool):
        self.out, self.log, self.redact, self.verbose = out, log, redact, verbose
        self.line = b""  # the unfinished line, from its last carriage return on
        self.shown = 0  # how many bytes of self.line the terminal already has
        self.trimmed = False  # frames were cut off the front of self.line (so it redrew)
        self.after_redraw = False  # the last finished line redrew

    def feed(self, chunk: bytes) -> None:
        buf, start = self.line + chunk, 0
        while (end := buf.find(b"\n", start)) >= 0:
            self._finish(buf[start:end + 1])
            start = end + 1
        self.line = buf[start:]
        if self.line and (self.shown or self.after_redraw or _REDRAW.search(self.line)):
            self._show(self.line[self.shown:])
            self.shown = len(self.line)
            # frames before the last carriage return are overwritten: keep only the current one
            # (a bar refreshed for hours is one line). A final "\r" may be half of "\r\n": kept.
            cut = self.line.rstrip(b"\r").rfind(b"\r") + 1
            self.line, self.shown = self.line[cut:], self.shown - cut
            self.trimmed = self.trimmed or cut > 0

    def close(self) -> None:
        """End of output: the unfinished line, if any, is a line too."""
        if self.line:
            self._finish(self.line)
            self.line = b""

    def _finish(self, line: bytes) -> None:
        text = line.rstrip(b"\r\n")
        self.after_redraw = self.trimmed or bool(_REDRAW.search(text))
        self.trimmed = False
        if self.log:
            text = text.rsplit(b"\r", 1)[-1]
            clean = self.redact(_ANSI.sub(b"", text))
            if clean.strip():
                self.log.write(clean + b"\n")
                self.log.flush()
        if self.shown:  # already partly on the terminal: the rest of it
            self._show(line[self.shown:])
        elif self.verbose or not _LAUNCHER_NOISE.match(line):
            self._show(line)
        self.shown = 0

    def _show(self, data: bytes) -> None:
        self.out.write(self.redact(data))
        self.out.flush()
