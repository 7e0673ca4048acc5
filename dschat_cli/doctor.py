"""Is this machine ready for dschat? Package versions, GPUs, NCCL, /dev/shm, free disk, the hub.

    checks = run_checks(output_dir="out", procs_per_node=8)   # what `dschat doctor` prints
    preflight(procs_per_node=8, output_dir="out", cache_dir="~/.cache/dschat/data")

Each check returns a `Check` (name, status ok/warn/fail, what was found, the fix or a note). The
training commands call `preflight` before launching: the fast subset (versions, /dev/shm, disk;
no torch import, no network) turns a FAIL into a one-line `ConfigError`, so a too-old package or a
docker container without shared memory is caught in a second instead of as a worker crash.

Only the standard library is imported at module level: `dschat --help` must stay fast.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "fail"]

# The known-good minimums: the single table of requirements (the same list as pyproject.toml's
# [project] dependencies; tests/unit/test_doctor.py checks they agree). No upper bounds are known.
PYTHON_MIN = "3.10"
REQUIREMENTS: dict[str, str] = {
    "torch": "2.1",
    "deepspeed": "0.15",
    "transformers": "4.45",
    "datasets": "2.19",
    "peft": "0.11",
    "accelerate": "0.30",
    "safetensors": "0.4",
    "tokenizers": "0.19",
    "typer": "0.12",
    "rich": "13",
    "pyyaml": "6",
    "matplotlib": "3.7",
}

GIB = 1024 ** 3
MIB = 1024 ** 2
# /dev/shm. NCCL's intra-node transports keep per-peer, per-channel buffers in /dev/shm (tens to
# hundreds of MB on an 8-GPU node), and DataLoader workers hand every batch over through it; Docker
# gives a container 64 MB unless told otherwise, which kills workers with a bus error (exit code
# -7) mid-run. 512 MiB per process covers NCCL and the loaders with room to spare; below it a
# multi-process run is refused. Below 1 GiB per process (or 512 MiB for a single process, which
# needs no NCCL shm) it is a warning.
SHM_FAIL_PER_PROC = 512 * MIB
SHM_WARN_PER_PROC = 1 * GIB
SHM_WARN_SINGLE = 512 * MIB
SHM_FIX = ("restart the container with `docker run --shm-size=16g` (or `--ipc=host`); on "
           "Kubernetes mount an emptyDir with medium: Memory at /dev/shm")
# Free disk where checkpoints, the data cache and downloaded models go.
DISK_WARN = 10 * GIB
DISK_FAIL = 1 * GIB

DOCTOR_HINT = "run `dschat doctor` to see every check"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table. `fix` says what to do (warn/fail) or is a note (ok)."""
    name: str
    status: Status
    found: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- versions

def parse_version(text: str) -> tuple[tuple[int, ...], bool] | None:
    """'2.13.0+cpu' -> ((2, 13, 0), False); '0.30.0rc1' -> ((0, 30, 0), True) (a pre-release);
    None when the text does not start with a number."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)(.*)", text)
    if not m:
        return None
    release = tuple(int(x) for x in m.group(1).split("."))
    rest = m.group(2).split("+", 1)[0].lower()
    pre = bool(re.match(r"[.\-_]?(a|b|c|rc|alpha|beta|pre|preview|dev)\d*", rest))
    return release, pre


def version_at_least(found: str, minimum: str) -> bool | None:
    """True when `found` >= `minimum` (pre-releases of the minimum itself count as older, as pip
    sees them); None when `found` cannot be read."""
    f, m = parse_version(found), parse_version(minimum)
    if f is None or m is None:
        return None
    width = max(len(f[0]), len(m[0]))
    fr = f[0] + (0,) * (width - len(f[0]))
    mr = m[0] + (0,) * (width - len(m[0]))
    if fr != mr:
        return fr > mr
    return not f[1] or m[1]


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pip_fix(dist: str, minimum: str) -> str:
    fix = f"pip install -U '{dist}>={minimum}'"
    if dist == "torch":
        fix += " (pick the build for your CUDA: https://pytorch.org/get-started/locally/)"
    return fix


def check_package(dist: str, minimum: str) -> Check:
    found = _installed_version(dist)
    if found is None:
        return Check(dist, "fail", "not installed", pip_fix(dist, minimum))
    ok = version_at_least(found, minimum)
    if ok is None:
        return Check(dist, "warn", found, f"cannot read this version; dschat needs >={minimum}")
    if not ok:
        return Check(dist, "fail", f"{found} (needs >={minimum})", pip_fix(dist, minimum))
    note = ""
    if dist == "transformers" and (parse_version(found) or ((0,), False))[0][0] >= 5:
        note = "DeepSpeed's Hybrid Engine fails on transformers 5 (dschat does not use it)"
    return Check(dist, "ok", f"{found} (>={minimum})", note)


def check_python() -> Check:
    found = ".".join(str(x) for x in sys.version_info[:3])
    if version_at_least(found, PYTHON_MIN):
        return Check("python", "ok", f"{found} (>={PYTHON_MIN})")
    return Check("python", "fail", f"{found} (needs >={PYTHON_MIN})",
                 f"use Python {PYTHON_MIN} or newer")


def check_versions() -> list[Check]:
    return [check_python()] + [check_package(d, m) for d, m in REQUIREMENTS.items()]


# ------------------------------------------------------------------------------------ GPUs, NCCL

@dataclass(frozen=True)
class GpuInfo:
    torch_cuda: str | None  # the CUDA version torch was built with; None for a CPU build
    available: bool
    names: tuple[str, ...] = ()
    total_mem: tuple[int, ...] = ()  # bytes, one per GPU
    nccl: str | None = None  # NCCL version; None when not available
    error: str | None = None  # why CUDA could not be queried


def gpu_info() -> GpuInfo:
    """Ask torch (imported here, lazily) what it sees."""
    import torch

    cuda = torch.version.cuda
    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        props = [torch.cuda.get_device_properties(i) for i in range(count)]
    except Exception as e:  # a broken driver: report, do not crash the doctor
        return GpuInfo(cuda, False, error=f"{type(e).__name__}: {e}")
    nccl = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_nccl_available():
            v = torch.cuda.nccl.version()
            nccl = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception:
        nccl = None
    return GpuInfo(cuda, available, tuple(p.name for p in props),
                   tuple(int(p.total_memory) for p in props), nccl)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_gpus(info: GpuInfo) -> list[Check]:
    if info.torch_cuda is None:
        cuda = Check("cuda", "ok", "none (CPU build of torch)")
    elif info.error:
        cuda = Check("cuda", "warn", f"torch built for CUDA {info.torch_cuda}; cannot query: "
                     f"{info.error}", "check the NVIDIA driver (`nvidia-smi`)")
    elif not info.available:
        cuda = Check("cuda", "warn", f"torch built for CUDA {info.torch_cuda}, no usable GPU",
                     "check the NVIDIA driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES; in docker "
                     "pass `--gpus all`")
    else:
        cuda = Check("cuda", "ok", f"torch built for CUDA {info.torch_cuda}")

    if not info.names:
        gpus = Check("gpus", "ok", "none (CPU only: fine for tests and the demo)")
    else:
        groups: dict[tuple[str, int], int] = {}
        for name, mem in zip(info.names, info.total_mem):
            groups[(name, mem)] = groups.get((name, mem), 0) + 1
        found = ", ".join(f"{n} x {name} ({_gib(mem)})" for (name, mem), n in groups.items())
        gpus = Check("gpus", "ok", found)

    if not info.names:
        nccl = Check("nccl", "ok", "not used (no GPU)", "CPU runs use gloo")
    elif info.nccl:
        nccl = Check("nccl", "ok", info.nccl)
    elif len(info.names) > 1:
        nccl = Check("nccl", "warn", "not available",
                     "multi-GPU training needs NCCL: install a torch build with NCCL")
    else:
        nccl = Check("nccl", "ok", "not available", "needed only for more than one GPU")
    return [cuda, gpus, nccl]


# ---------------------------------------------------------------------------------------- /dev/shm

def shm_bytes(path: str = "/dev/shm") -> tuple[int, int] | None:
    """(free, total) bytes of the shared-memory filesystem; None when there is none."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _size(n: float) -> str:
    return _gib(n) if n >= GIB else f"{n / MIB:.0f} MiB"


def check_shm(procs_per_node: int) -> Check:
    procs = max(int(procs_per_node), 1)
    sizes = shm_bytes()
    who = f"for {procs} processes per node" if procs > 1 else "for 1 process"
    if sizes is None:
        return Check("/dev/shm", "warn", "missing",
                     "DataLoader workers and NCCL use shared memory; " + SHM_FIX)
    free, total = sizes
    found = f"{_size(free)} free of {_size(total)}"
    if procs > 1:
        if free < SHM_FAIL_PER_PROC * procs:
            return Check("/dev/shm", "fail", f"{found} (needs {_size(SHM_FAIL_PER_PROC * procs)} "
                         f"{who})", "workers would die with a bus error (exit code -7): " + SHM_FIX)
        if free < SHM_WARN_PER_PROC * procs:
            return Check("/dev/shm", "warn", f"{found} ({_size(SHM_WARN_PER_PROC * procs)} "
                         f"advised {who})", SHM_FIX)
    elif free < SHM_WARN_SINGLE:
        return Check("/dev/shm", "warn", f"{found} ({_size(SHM_WARN_SINGLE)} advised)",
                     "enough for one process; more than one per node needs more: " + SHM_FIX)
    return Check("/dev/shm", "ok", found, who)


# ------------------------------------------------------------------------------------------- disk

def hub_cache_dir() -> str:
    """Where huggingface_hub downloads models (its own rules, without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def nearest_existing(path: str) -> Path:
    p = Path(path).expanduser().absolute()
    return next((q for q in (p, *p.parents) if q.exists()), Path(p.anchor or "/"))


def disk_free(path: str) -> int:
    """Free bytes on the filesystem that `path` (or its nearest existing parent) lives on."""
    return shutil.disk_usage(nearest_existing(path)).free


def _show_path(folder: str) -> str:
    """A folder as the user would type it: ~ for the home folder."""
    p = str(Path(folder).expanduser())
    home = str(Path.home())
    if home not in ("", "/") and (p == home or p.startswith(home + os.sep)):
        return "~" + p[len(home):]
    return p


def check_disk(dirs: dict[str, str]) -> list[Check]:
    """One line per filesystem: {label: folder}; folders on the same filesystem share a line."""
    by_fs: dict[object, list[tuple[str, str]]] = {}
    for label, folder in dirs.items():
        base = nearest_existing(folder)
        try:
            key: object = base.stat().st_dev
        except OSError:
            key = str(base)
        by_fs.setdefault(key, []).append((label, folder))
    checks = []
    for entries in by_fs.values():
        where = ", ".join(f"{label} {_show_path(folder)}" for label, folder in entries)
        try:
            free = disk_free(entries[0][1])
        except OSError as e:
            checks.append(Check("disk", "warn", f"cannot read ({e.strerror}): {where}", ""))
            continue
        found = f"{_gib(free)} free: {where}"
        if free < DISK_FAIL:
            checks.append(Check("disk", "fail", found, f"free some space (at least "
                                f"{_gib(DISK_FAIL)}) or point the folder elsewhere"))
        elif free < DISK_WARN:
            checks.append(Check("disk", "warn", found, f"under {_gib(DISK_WARN)}: checkpoints of "
                                "real models may not fit; free space or use another folder"))
        else:
            checks.append(Check("disk", "ok", found))
    return checks


# -------------------------------------------------------------------------------------------- hub

def check_hub(timeout: float = 3.0) -> Check:
    from dschat_cli import hub

    var = hub.offline_variable()
    if var:
        return Check("hub", "ok", f"offline mode ({var}=1)",
                     "models and data must be local folders or already cached")
    endpoint = os.environ.get("HF_ENDPOINT")
    if hub.probe(timeout):  # afresh: doctor checks the machine as it is now
        return Check("hub", "ok", "huggingface.co reachable",
                     f"HF_ENDPOINT={endpoint} is set (not checked)" if endpoint else "")
    return Check("hub", "warn", "huggingface.co unreachable"
                 + (f" (HF_ENDPOINT={endpoint} is set, not checked)" if endpoint else ""),
                 "pass local folders, or set HF_HUB_OFFLINE=1")


# -------------------------------------------------------------------------------------------- all

DEFAULT_CACHE_DIR = "~/.cache/dschat/data"


def run_checks(output_dir: str | None = None, cache_dir: str | None = None,
               procs_per_node: int | None = 1, fast: bool = False) -> list[Check]:
    """Every check, in table order. `fast`: only those that need neither torch nor the network
    (versions, /dev/shm, disk), for the pre-launch check. procs_per_node None: one per GPU seen."""
    checks = check_versions()
    if not fast:
        try:
            info = gpu_info()
        except Exception as e:  # torch missing or broken: its version line already says so
            info = GpuInfo(None, False, error=f"{type(e).__name__}: {e}")
            checks.append(Check("cuda", "fail", f"torch does not import: {info.error}",
                                pip_fix("torch", REQUIREMENTS["torch"])))
        else:
            checks.extend(check_gpus(info))
        if procs_per_node is None:
            procs_per_node = max(len(info.names), 1)
    checks.append(check_shm(procs_per_node or 1))
    dirs = {"output": output_dir or ".", "data cache": cache_dir or DEFAULT_CACHE_DIR}
    if not fast:
        dirs["hub cache"] = hub_cache_dir()
    checks.extend(check_disk(dirs))
    if not fast:
        checks.append(check_hub())
    return checks


def verdict(checks: list[Check]) -> str:
    fails = [c for c in checks if c.status == "fail"]
    warns = [c for c in checks if c.status == "warn"]
    if fails:
        return (f"{len(fails)} check(s) failed ({', '.join(c.name for c in fails)}): fix them "
                "before training")
    if warns:
        return (f"ready, with {len(warns)} warning(s) ({', '.join(c.name for c in warns)}); "
                f"{len(checks) - len(warns)} check(s) ok")
    return f"ready: all {len(checks)} checks ok"


def failure_message(fails: list[Check]) -> tuple[str, str]:
    """(where, message) of the one-line error for failed checks."""
    parts = [f"{c.found}: {c.fix}" if len(fails) == 1 else f"{c.name} {c.found}: {c.fix}"
             for c in fails]
    where = fails[0].name if len(fails) == 1 else "environment"
    return where, "; ".join(parts) + f" ({DOCTOR_HINT})"


def preflight(procs_per_node: int, output_dir: str, cache_dir: str | None) -> None:
    """The fast checks, before a training launch: raise ConfigError on a FAIL (a package below its
    minimum, /dev/shm too small for several processes, under 1 GiB of free disk). Warnings are
    left to `dschat doctor`."""
    from dschat_cli.config.schema import ConfigError

    checks = run_checks(output_dir=output_dir, cache_dir=cache_dir,
                        procs_per_node=procs_per_node, fast=True)
    fails = [c for c in checks if c.status == "fail"]
    if fails:
        raise ConfigError(*failure_message(fails))
