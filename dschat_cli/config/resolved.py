"""The run record: every value a run derives from its config and the machine, resolved once on the
user's side before launch, written next to run_config.yaml, and read by every rank.

    record = resolve_run("sft", cfg, world_size=2, device="cuda", bf16_supported=True,
                         hub_reachable=False)
    record.write(out)                        # OUT/resolved.json and OUT/ds_config*.json
    record = ResolvedRun.read(out)           # in the worker
    record.check_rank(world_size=dist.world_size, device="cuda", bf16_supported=True)

run_config.yaml stays the user's config (what `--config` repeats and `--resume` compares);
resolved.json is what the launch decided from it: the precision, the experiment trackers and
where they write, the exact DeepSpeed configs by role (also written as the ds_config*.json files DeepSpeed-Chat users
look for). A rank never decides these again: when its hardware disagrees with the record (launch.sh
started on another machine, a GPU without bf16) it stops with a one-line error.

No torch import here: `--dry-run` and `dschat plan` build records too.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dschat_cli.config.ds_config import resolve_dtype
from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import TRACKERS
from dschat_cli.config.steps import load, step as step_spec

RECORD = "resolved.json"
DEVICES = ("cuda", "cpu")


def ds_config_file(role: str) -> str:
    """The file a role's DeepSpeed config is written to: ds_config.json for the one model of a
    step that trains one, ds_config_ROLE.json otherwise (step 3: actor, critic, ref, reward)."""
    return "ds_config.json" if role == "model" else f"ds_config_{role}.json"


@dataclass(frozen=True)
class ResolvedRun:
    step: str  # the step's name in the table (config/steps.py)
    output_dir: str  # absolute
    device: str  # "cuda" or "cpu": what every rank runs on
    world_size: int  # ranks the launch starts (data-parallel degree)
    dtype: str  # the training precision: bf16, fp16 or fp32 (--dtype auto resolved)
    torch_adam: bool  # torch's AdamW instead of DeepSpeed's fused/CPU Adam (always on CPU)
    report_to: tuple[str, ...]  # the experiment trackers fed (TRACKERS order; () for none)
    tensorboard_dir: str | None  # where TensorBoard event files go; None: no TensorBoard
    wandb: dict | None  # wandb.init's project, name, job_type and dir (the output folder: its
    # files go to OUT/wandb); None: no wandb
    max_seq_len: int  # the longest sequence a model sees (step 3: prompt + answer)
    hub_reachable: bool  # may models and data come from the hub (hub.py); the ranks do not probe
    ds_configs: dict[str, dict]  # role ("model"; step 3: actor, critic, ref, reward) -> the
    # exact DeepSpeed config that role's engine gets; read with ds_config(role)

    def ds_config(self, role: str = "model") -> dict:
        """A copy of `role`'s DeepSpeed config (an engine may add keys to the dict it gets)."""
        try:
            return copy.deepcopy(self.ds_configs[role])
        except KeyError:
            raise KeyError(f"no DeepSpeed config for role {role!r} in the {self.step} record; "
                           f"roles: {', '.join(self.ds_configs)}") from None

    def ds_files(self) -> dict[str, dict]:
        """{file name: DeepSpeed config} as written next to the run's outputs."""
        return {ds_config_file(role): c for role, c in self.ds_configs.items()}

    # ------------------------------------------------------------------------- file form
    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, out: str | Path) -> None:
        """OUT/resolved.json and each role's ds_config*.json (the launch does this once, before any
        worker starts)."""
        out = Path(out)
        (out / RECORD).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        for name, ds in self.ds_files().items():
            (out / name).write_text(json.dumps(ds, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict, where: str = RECORD) -> "ResolvedRun":
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            missing = sorted(names - set(data)) if isinstance(data, dict) else sorted(names)
            raise ConfigError(where, f"is not a run record of this dschat version (missing "
                              f"{', '.join(missing) or 'nothing'}, or unknown keys); run the "
                              "dschat command again to write it")
        return cls(**{**data, "report_to": tuple(data["report_to"])})  # JSON has no tuples

    @classmethod
    def read(cls, folder: str | Path) -> "ResolvedRun":
        """The record of the run in `folder` (ConfigError when it is missing or unreadable)."""
        path = Path(folder) / RECORD
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError:
            raise ConfigError(str(path), "not found: the workers read the run record that the "
                              "dschat command writes before launch; run the dschat command "
                              "again") from None
        except ValueError as e:
            raise ConfigError(str(path), f"is not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))

    # ------------------------------------------------------------------- the rank's check
    def check_rank(self, *, world_size: int, device: str, bf16_supported: bool) -> None:
        """The rank's own hardware against the record: ConfigError (one line) when they disagree,
        never a silent re-decision (the DeepSpeed configs and the checkpoints depend on them)."""
        where = f"{self.output_dir}/{RECORD}"
        again = "run the dschat command again on this machine (it resolves the run anew)"
        if world_size != self.world_size:
            raise ConfigError(where, f"the run was resolved for {self.world_size} rank(s) but "
                              f"{world_size} started; {again}")
        if device != self.device:
            raise ConfigError(where, f"the run was resolved for {self.device} but this rank runs "
                              f"on {device}; {again}")
        if self.dtype == "bf16" and device == "cuda" and not bf16_supported:
            raise ConfigError(where, "the run was resolved for bf16 but this rank's GPU has no "
                              f"bfloat16 support (Ampere or newer); pass --dtype fp16, or {again}")


def resolve_run(step: str, cfg: Any, *, world_size: int, device: str, bf16_supported: bool,
                hub_reachable: bool) -> ResolvedRun:
    """The record of running step `step` with `cfg` on `world_size` ranks of `device` ("cuda" or
    "cpu"; `bf16_supported`: its GPUs run bf16). Pure: the caller says what the machine is
    (launch/ asks the machine, `dschat plan` assumes a GPU machine)."""
    spec = step_spec(step)
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: one of {', '.join(DEVICES)}")
    on_gpu = device == "cuda"
    dtype = resolve_dtype(spec.get(cfg, spec.precision), has_gpu=on_gpu,
                          bf16_supported=on_gpu and bf16_supported)
    torch_adam = bool(spec.get(cfg, spec.torch_adam)) or not on_gpu
    out = Path(cfg.output_dir).expanduser().resolve()
    report_to = trackers(step, cfg)
    tensorboard = str(out / "tensorboard") if "tensorboard" in report_to else None
    wandb = None
    if "wandb" in report_to:
        opts = spec.get(cfg, spec.report)
        wandb = {"project": opts.wandb_project, "name": opts.wandb_run_name or out.name,
                 "job_type": spec.name, "dir": str(out)}
    ds_configs = load(spec.ds_configs)(cfg, world_size=world_size, dtype=dtype,
                                       torch_adam=torch_adam, tensorboard_dir=tensorboard,
                                       job_name=spec.name)
    return ResolvedRun(step=spec.name, output_dir=str(out), device=device, world_size=world_size,
                       dtype=dtype, torch_adam=torch_adam, report_to=report_to,
                       tensorboard_dir=tensorboard, wandb=wandb,
                       max_seq_len=sum(spec.get(cfg, p) for p in spec.seq_len),
                       hub_reachable=bool(hub_reachable), ds_configs=ds_configs)


def trackers(step: str, cfg: Any) -> tuple[str, ...]:
    """The experiment trackers a run of `step` with `cfg` feeds: its --report-to, plus tensorboard
    for --enable-tensorboard (DeepSpeed-Chat's flag for it), in TRACKERS order."""
    spec = step_spec(step)
    chosen = set(spec.get(cfg, spec.report).trackers) if spec.report else set()
    if spec.tensorboard and spec.get(cfg, spec.tensorboard):
        chosen.add("tensorboard")
    return tuple(t for t in TRACKERS if t in chosen)


def with_config(record: ResolvedRun, cfg: Any) -> ResolvedRun:
    """The record of the same machine and precision with another config of the same step (the
    DeepSpeed configs rebuilt): `dschat plan`'s suggestions estimate each changed config so."""
    spec = step_spec(record.step)
    torch_adam = bool(spec.get(cfg, spec.torch_adam)) or record.device != "cuda"
    ds_configs = load(spec.ds_configs)(cfg, world_size=record.world_size, dtype=record.dtype,
                                       torch_adam=torch_adam,
                                       tensorboard_dir=record.tensorboard_dir, job_name=spec.name)
    return ResolvedRun(**{**record.to_dict(), "torch_adam": torch_adam, "ds_configs": ds_configs,
                          "max_seq_len": sum(spec.get(cfg, p) for p in spec.seq_len)})
