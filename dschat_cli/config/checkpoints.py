"""Checkpoint folder layout and the `--resume` checks, without torch.

    dschat sft ... --save-interval 200            # writes OUTPUT_DIR/checkpoints/step_000200/ ...
    dschat sft ... --resume auto                  # continues from OUTPUT_DIR/checkpoints/latest

Layout of OUTPUT_DIR/checkpoints/:
    step_000200/            one checkpoint (steps/checkpoint.py writes it)
        model/ | actor/ critic/     DeepSpeed engine state (engine.save_checkpoint, tag = role)
        rng_rank00000.pt ...        each rank's RNG states (tensors, loaded with weights_only=True)
        trainer_state.json          step, data position, metric history, the run's config
        tensors.safetensors         extra tensors of the step (PPO: the actor's EMA), if any
        complete.json               written last, by rank 0, once every rank has finished:
                                    {"step", "world_size", "files": {relative path: size}}
    latest                  the name of the newest complete checkpoint (replaced atomically)

A folder without complete.json, or whose files do not have the sizes it lists, is not a
checkpoint: a crash mid-write leaves `latest` on the previous one. The user side checks `--resume`
here before any worker starts; the ranks check it again (launch.sh may start them directly).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dschat_cli.config.schema import ConfigError, flag_specs, to_dict

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "complete.json"
STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")

# Options that may differ between a run and the checkpoint it resumes: where things go, how they
# are launched and logged, and the checkpoint options themselves. Everything else changes the
# computation and must match (the world size is compared separately).
FREE_OPTIONS = ("output_dir", "overwrite", "checkpoint.", "launch.", "health.", "report.",
                "data.data_cache_dir", "deepspeed.enable_tensorboard", "generation.print_answers",
                "eval_interval",
                # how fast the decode step runs, not what the run computes: a resume may skip
                # the compile (--compile-decode off) or ask for it
                "generation.compile_decode")
# Options added after checkpoints were already being written, with the value an older checkpoint
# (whose config lacks the key) was trained as: the comparison reads that value in its place, so the
# error names a value the user can pass.
ADDED_OPTIONS = {"deepspeed.fp32_grad_accum": "off"}
RESTART = "drop --resume and pass --overwrite (or use a new --output-dir) to start over"
# Peak learning rates may differ too: lowering one and resuming from the last good checkpoint is
# the health monitor's advice after a divergence. steps/checkpoint.py then scales the restored
# schedule of each parameter group it controls by new/old. A LoRA rate only counts with LoRA on.
LR_OPTIONS = {"optim.learning_rate": None, "train.actor_learning_rate": None,
              "train.critic_learning_rate": None, "lora.lora_learning_rate": "lora.lora_dim",
              "actor_lora.lora_learning_rate": "actor_lora.lora_dim",
              "critic_lora.lora_learning_rate": "critic_lora.lora_dim"}


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(folder: Path) -> int | None:
    m = STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else None


def step_folders(root: Path) -> list[Path]:
    """The step_* folders under `root`, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_problem(folder: Path) -> str | None:
    """None for a complete checkpoint, else what is wrong with it (for an error message)."""
    if not folder.is_dir():
        return "is not a folder"
    marker = read_json(folder / MARKER)
    if marker is None or not isinstance(marker.get("files"), dict):
        return f"is incomplete (no valid {MARKER}: its write was interrupted)"
    for rel, size in marker["files"].items():
        f = folder / rel
        if not f.is_file():
            return f"is damaged ({rel} is missing)"
        if f.stat().st_size != size:
            return f"is damaged ({rel} has {f.stat().st_size} bytes, {size} were written)"
    state = read_json(folder / STATE)
    if state is None or not isinstance(state.get("config"), dict):
        return f"is damaged ({STATE} is unreadable)"
    return None


def complete_folders(root: Path) -> list[Path]:
    return [p for p in step_folders(root) if checkpoint_problem(p) is None]


def latest_name(root: Path) -> str | None:
    """What the `latest` pointer says (None without one)."""
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _fix(folder: Path, root: Path, restart: str) -> str:
    older = [p for p in complete_folders(root) if p != folder
             and (step_of(p) or 0) < (step_of(folder) or 1 << 62)]
    hint = f"point --resume at an older checkpoint ({older[-1]})" if older else \
        "point --resume at another complete step_* folder"
    return f"{hint}, or {restart}"


def find_checkpoint(spec: str, output_dir: str | Path, restart: str = RESTART) -> Path | None:
    """The checkpoint folder `--resume SPEC` names; None for `auto` when OUTPUT_DIR has none.
    A path may be a step_* folder, a checkpoints folder, or a run's output folder."""
    out = Path(output_dir).expanduser().resolve()
    if spec == "auto":
        folder = _from_root(out / CHECKPOINTS, False, restart)
    else:
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise ConfigError("--resume", f"{path} does not exist; give a checkpoint folder "
                              f"(OUTPUT_DIR/{CHECKPOINTS}/step_NNNNNN) or auto")
        if step_of(path) is None and (path / CHECKPOINTS).is_dir():
            folder = _from_root(path / CHECKPOINTS, True, restart)
        elif step_of(path) is None and ((path / LATEST).is_file() or step_folders(path)):
            folder = _from_root(path, True, restart)
        else:
            folder = path
    if folder is None:
        return None
    problem = checkpoint_problem(folder)
    if problem:
        raise ConfigError("--resume", f"checkpoint {folder} {problem}; "
                          f"{_fix(folder, folder.parent, restart)}")
    return folder


def _from_root(root: Path, required: bool, restart: str) -> Path | None:
    """The checkpoint `root/latest` names. Without a pointer: None (`auto` starts fresh; a run
    that starts fresh drops a stale pointer, so older folders there belong to a replaced run), or
    an error when `required`."""
    name = latest_name(root)
    if name is None:
        if required:
            raise ConfigError("--resume", f"{root} has no {LATEST} checkpoint; point --resume at "
                              f"one of its step_* folders, or {restart}")
        return None
    if step_of(Path(name)) is None or "/" in name:
        raise ConfigError("--resume", f"{root / LATEST} does not name a step_* folder "
                          f"({name[:40]!r}); {_fix(root / name, root, restart)}")
    return root / name


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(folder: Path, cfg, world_size: int, restart: str = RESTART) -> dict:
    """The checkpoint's trainer state, after checking that `cfg` and `world_size` continue the
    run that wrote it (ConfigError naming the first flag that differs)."""
    state = read_json(folder / STATE) or {}
    then, now = _flat(state.get("config", {})), _flat(to_dict(cfg))
    if then:
        then = {**{k: v for k, v in ADDED_OPTIONS.items() if k in now}, **then}
    flags = {s.dotted: s.flag for s in flag_specs(type(cfg))}
    order = {k: i for i, k in enumerate(flags)}
    for key in sorted(set(then) | set(now), key=lambda k: order.get(k, len(order))):
        if key.startswith(FREE_OPTIONS) or key in LR_OPTIONS \
                or then.get(key) == now.get(key):
            continue
        raise ConfigError(flags.get(key, key),
                          f"is {_show(now.get(key))} but checkpoint {folder} was written with "
                          f"{_show(then.get(key))}; resume with the same value, or {restart}")
    if state.get("world_size") != world_size:
        raise ConfigError("--num-gpus",
                          f"this run has {world_size} rank(s) but checkpoint {folder} was written "
                          f"by {state.get('world_size')}; launch as many workers to resume it, or "
                          f"{restart}")
    return state


def learning_rate_changes(state: dict, cfg) -> list[dict]:
    """The peak learning rates `cfg` changes against the checkpoint's trainer state `state`:
    [{"flag", "from", "to"}], in flag order (LoRA rates only where LoRA is on)."""
    then, now = _flat(state.get("config", {})), _flat(to_dict(cfg))
    changes = []
    for s in flag_specs(type(cfg)):
        if s.dotted not in LR_OPTIONS or then.get(s.dotted) == now.get(s.dotted):
            continue
        needs = LR_OPTIONS[s.dotted]
        if needs is None or now.get(needs):
            changes.append({"flag": s.flag, "from": then.get(s.dotted), "to": now.get(s.dotted)})
    return changes


def _show(v) -> str:
    if v is None:
        return "unset"
    if isinstance(v, list):
        return " ".join(map(str, v)) or "empty"
    return str(v)


def resolve_resume(cfg, world_size: int, restart: str = RESTART) -> Path | None:
    """The checkpoint a run with `cfg` resumes from, validated (complete, same options, same world
    size); None when it starts fresh. Raises ConfigError (exit 2, one line) otherwise."""
    spec = cfg.checkpoint.resume
    if not spec:
        return None
    folder = find_checkpoint(spec, cfg.output_dir, restart)
    if folder is not None:
        check_compatible(folder, cfg, world_size, restart)
    return folder
