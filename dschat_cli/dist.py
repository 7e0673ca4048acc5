"""The rank's view of the job: the only module that reads RANK or initialises distributed.

    dist = Dist.init()          # in the worker, once
    if dist.is_main: ...        # rank-0-only printing and writing
    loss = dist.all_reduce_mean(loss)

Steps receive a Dist; they never read the environment or call init_process_group themselves.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: str  # "cuda:N" or "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def placement(self) -> str:
        """Where the ranks run, for the run's header line (printed by rank 0, whose own device
        alone would read as if every rank shared it): '4 rank(s), one GPU each'."""
        if self.device == "cpu":
            return f"{self.world_size} rank(s) on cpu"
        if self.world_size == 1:
            return f"1 rank on {self.device}"
        return f"{self.world_size} rank(s), one GPU each"

    @classmethod
    def init(cls) -> "Dist":
        """Initialise torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU).

        Launched by deepspeed.launcher the env vars are set; run in-process (--launcher none) we set
        a world of one so the same code path runs."""
        import deepspeed
        import torch

        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
            _fix_cuda_arch_list(torch.cuda.get_device_capability(local_rank))
        else:
            device = "cpu"
            _skip_cpu_shm_build()
        import torch.distributed as tdist

        if not tdist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device != "cpu" else "gloo",
                                       verbose=False)
        return cls(rank=rank, local_rank=local_rank, world_size=world, device=device)

    def barrier(self) -> None:
        import torch.distributed as tdist

        if tdist.is_initialized() and self.world_size > 1:
            tdist.barrier()

    def all_reduce_mean(self, value):
        """Mean of a float or tensor over ranks (returns the same kind)."""
        import torch
        import torch.distributed as tdist

        is_tensor = isinstance(value, torch.Tensor)
        t = value.detach().clone().float() if is_tensor else torch.tensor(float(value))
        t = t.to(self.device)
        if tdist.is_initialized() and self.world_size > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t = t / self.world_size
        return t if is_tensor else t.item()

    def all_reduce_sum(self, value: float) -> float:
        import torch
        import torch.distributed as tdist

        t = torch.tensor(float(value), device=self.device)
        if tdist.is_initialized() and self.world_size > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.item()

    def all_reduce_max(self, value: float) -> float:
        import torch
        import torch.distributed as tdist

        t = torch.tensor(float(value), device=self.device)
        if tdist.is_initialized() and self.world_size > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t.item()

    def broadcast_object(self, obj):
        import torch.distributed as tdist

        if not (tdist.is_initialized() and self.world_size > 1):
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


def _fix_cuda_arch_list(capability: tuple[int, int]) -> None:
    """DeepSpeed JIT-builds FusedAdam/CPUAdam for TORCH_CUDA_ARCH_LIST, but its parser only takes
    numbers (and +PTX): an image exporting e.g. "9.0a" makes every build fail with
    "invalid literal for int()". Replace such a list by this GPU's own capability."""
    import re

    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value is None:
        return
    entries = [e for e in re.split(r"[;\s,]+", value) if e]
    if all(re.fullmatch(r"\d+\.\d+(\+PTX)?", e) for e in entries):
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{capability[0]}.{capability[1]}"


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op at first init (~33 s
    cold). gloo does the work without it, so we skip the build on CPU (set DSCHAT_CPU_SHM=1 to keep
    it). This touches a private DeepSpeed hook, guarded so a DeepSpeed change only costs time."""
    if os.environ.get("DSCHAT_CPU_SHM") == "1":
        return
    try:
        import importlib

        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_torch_comm, "build_shm_op"):
            ds_torch_comm.build_shm_op = lambda: None
    except Exception:  # pragma: no cover - only a speed optimisation
        pass
