"""Checkpoint folders: complete only with their marker, `latest` moved only to complete ones,
pruning beyond --keep-last, crash leftovers and a replaced run's folders removed, and the
--resume lookups (engines are stand-ins that write one file: DeepSpeed's part is tested end to end
in tests/integration/test_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dschat_cli.config.checkpoints import find_checkpoint, resolve_resume
from dschat_cli.config.schema import ConfigError, from_flags
from dschat_cli.config.sft import SFTConfig
from dschat_cli.dist import Dist
from dschat_cli.steps.checkpoint import CheckpointManager

DIST = Dist(rank=0, local_rank=0, world_size=1, device="cpu")


class Engine:
    """What CheckpointManager needs of a DeepSpeed engine."""

    def __init__(self, accumulation: int = 1):
        self.micro_steps, self.accumulation = 0, accumulation

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # DeepSpeed's own `latest` would bypass ours
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "states.pt").write_bytes(b"0123456789")


def cfg(out: Path, **flags) -> SFTConfig:
    return from_flags(SFTConfig, model="m", output_dir=str(out), **flags)


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text()


def test_save_marks_complete_then_points_latest_then_prunes(tmp_path):
    ckpt = CheckpointManager(cfg(tmp_path, save_interval=2, keep_last=2), DIST, tmp_path)
    engines = {"model": Engine()}
    for step in (2, 4, 6):
        folder = ckpt.save(step, engines, {"epoch": 1, "batch": step})
        assert latest(tmp_path) == folder.name == f"step_{step:06d}"
    assert names(tmp_path) == ["step_000004", "step_000006"]
    marker = json.loads((tmp_path / "checkpoints/step_000006/complete.json").read_text())
    assert marker["files"]["model/states.pt"] == 10 and "rng_rank00000.pt" in marker["files"]
    assert ckpt.latest() == tmp_path / "checkpoints" / "step_000006"
    state = json.loads((tmp_path / "checkpoints/step_000006/trainer_state.json").read_text())
    assert state["step"] == 6 and state["batch"] == 6 and state["config"]["model"]["model"] == "m"


def test_crash_leftovers_and_a_replaced_runs_folders_go_after_a_new_checkpoint(tmp_path):
    old = CheckpointManager(cfg(tmp_path, save_interval=2, keep_last=3), DIST, tmp_path)
    for step in (2, 4, 6):
        old.save(step, {"model": Engine()}, {})
    (tmp_path / "checkpoints" / "step_000007").mkdir()  # a write killed before its marker
    # resumed from 2: 4, 6 and 7 belong to the run it replaces
    new = CheckpointManager(cfg(tmp_path, save_interval=2, keep_last=3,
                                resume=str(tmp_path / "checkpoints" / "step_000002")),
                            DIST, tmp_path)
    assert latest(tmp_path) == "step_000002"  # not 6: `auto` must continue this run's history
    assert not new.due(3, {"model": Engine()}) and new.due(4, {"model": Engine()})
    new.save(4, {"model": Engine()}, {})
    assert names(tmp_path) == ["step_000002", "step_000004"] and latest(tmp_path) == "step_000004"


def test_a_fresh_run_drops_the_old_latest_pointer(tmp_path):
    CheckpointManager(cfg(tmp_path, save_interval=2), DIST, tmp_path).save(2, {"m": Engine()}, {})
    CheckpointManager(cfg(tmp_path, save_interval=2, overwrite=True), DIST, tmp_path)
    assert not (tmp_path / "checkpoints" / "latest").exists()
    assert resolve_resume(cfg(tmp_path, resume="auto"), 1) is None  # auto: starts fresh


def test_due_waits_for_the_end_of_an_accumulation_window(tmp_path):
    ckpt = CheckpointManager(cfg(tmp_path, save_interval=4), DIST, tmp_path)
    engine = Engine(accumulation=3)
    engine.micro_steps = 13  # mid-window: its gradients are in no checkpoint
    assert not ckpt.due(4, {"m": engine}) and not ckpt.due(3, {"m": Engine()})
    engine.micro_steps = 15
    assert ckpt.due(5, {"m": engine})  # the first chance at or after the multiple of 4


def test_resume_lookups(tmp_path):
    assert find_checkpoint("auto", tmp_path) is None  # nothing yet: start fresh
    ckpt = CheckpointManager(cfg(tmp_path, save_interval=2), DIST, tmp_path)
    ckpt.save(2, {"model": Engine()}, {})
    ckpt.save(4, {"model": Engine()}, {})
    root = tmp_path / "checkpoints"
    assert find_checkpoint("auto", tmp_path) == root / "step_000004"
    # a run folder or its checkpoints folder stand for their latest checkpoint
    assert find_checkpoint(str(tmp_path), tmp_path / "elsewhere") == root / "step_000004"
    assert find_checkpoint(str(root), tmp_path / "elsewhere") == root / "step_000004"
    # the newest damaged: the error names it and the complete one before it
    (root / "step_000004" / "model" / "states.pt").write_bytes(b"01")
    with pytest.raises(ConfigError) as e:
        find_checkpoint("auto", tmp_path)
    assert e.value.where == "--resume"
    assert "step_000004 is damaged (model/states.pt has 2 bytes, 10 were written)" in e.value.message
    assert str(root / "step_000002") in e.value.message
    with pytest.raises(ConfigError, match="was written by 1"):
        resolve_resume(cfg(tmp_path, resume=str(root / "step_000002")), world_size=2)


def test_pipeline_passes_checkpoint_options_and_resumes_interrupted_steps(tmp_path):
    from dschat_cli.config.pipeline import PipelineConfig
    from dschat_cli.pipeline import _resuming, plan_pipeline

    plans = plan_pipeline(from_flags(PipelineConfig, output_dir=str(tmp_path), save_interval=50,
                                     keep_last=1))
    assert [(p.cfg.checkpoint.save_interval, p.cfg.checkpoint.keep_last) for p in plans] == \
        [(50, 1)] * 3
    step = plans[0].cfg
    assert step.checkpoint.resume is None
    assert _resuming(step, rerun=False).checkpoint.resume == "auto"  # a step run again continues
    assert _resuming(step, rerun=True).checkpoint.resume is None  # --rerun: from its start


def test_a_changed_peak_learning_rate_continues_the_restored_schedule_scaled():
    """What load() does after DeepSpeed restored an optimizer and its transformers scheduler
    written with --learning-rate 1e-3 (two groups: decayed weights, biases) and
    --lora-learning-rate 4e-3 (one group), resumed with --learning-rate 5e-4 and the LoRA rate
    unchanged: from the restored step on, the first two groups follow exactly half the old
    schedule (the very next update included), the LoRA group exactly the old one."""
    import copy

    import torch
    from transformers import get_scheduler

    from dschat_cli.steps.checkpoint import continue_schedule

    def setup(lr: float):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"w": torch.nn.Linear(4, 4), "lora": torch.nn.Linear(4, 2)})
        groups = [{"params": [model["w"].weight], "weight_decay": 0.1},
                  {"params": [model["w"].bias], "weight_decay": 0.0},
                  {"params": list(model["lora"].parameters()), "weight_decay": 0.0, "lr": 4e-3}]
        opt = torch.optim.AdamW(groups, lr=lr)
        return model, opt, get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)

    def step(model, opt, sched, seed: int) -> None:
        torch.manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()

    model, opt, sched = setup(1e-3)
    for k in range(4):
        step(model, opt, sched, k)
    # a copy, as if read from disk (a state_dict shares the optimizer's moment tensors)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    lrs_old = [g["lr"] for g in opt.param_groups]

    model2, opt2, sched2 = setup(5e-4)
    peaks = list(sched2.base_lrs)  # this run's peaks, before the checkpoint replaces them
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    continue_schedule(sched2, peaks)
    assert [g["lr"] for g in opt2.param_groups] == [lrs_old[0] / 2, lrs_old[1] / 2, lrs_old[2]]
    assert sched2.get_last_lr() == [g["lr"] for g in opt2.param_groups]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, opt, sched, 4)
    step(model2, opt2, sched2, 4)
    for name, p in model.state_dict().items():  # AdamW's update is proportional to the lr
        moved, moved2 = p - before[name], model2.state_dict()[name] - before[name]
        torch.testing.assert_close(moved2, moved if name.startswith("lora") else moved / 2)
    assert [g["lr"] for g in opt2.param_groups] == \
        [opt.param_groups[0]["lr"] / 2, opt.param_groups[1]["lr"] / 2, opt.param_groups[2]["lr"]]
    # unchanged peaks leave the restored state alone
    model3, opt3, sched3 = setup(1e-3)
    opt3.load_state_dict(saved[1])
    sched3.load_state_dict(saved[2])
    continue_schedule(sched3, list(sched3.base_lrs))
    assert [g["lr"] for g in opt3.param_groups] == lrs_old


def test_resume_accepts_another_peak_learning_rate_but_no_other_change(tmp_path):
    """Only the peak learning rates may change; a LoRA rate counts as a change only where LoRA is
    on."""
    from dschat_cli.config.checkpoints import learning_rate_changes

    def run(**flags):
        return cfg(tmp_path, save_interval=2, lora_dim=4, **flags)

    CheckpointManager(run(), DIST, tmp_path).save(2, {"model": Engine()}, {})
    step2 = str(tmp_path / "checkpoints" / "step_000002")
    state = json.loads((tmp_path / "checkpoints/step_000002/trainer_state.json").read_text())
    ok = run(resume=step2, learning_rate=1e-4, lora_learning_rate=1e-3)
    assert resolve_resume(ok, 1) == Path(step2)
    assert learning_rate_changes(state, ok) == [
        {"flag": "--lora-learning-rate", "from": 5e-4, "to": 1e-3},
        {"flag": "--learning-rate", "from": 9.65e-6, "to": 1e-4}]
    with pytest.raises(ConfigError) as e:
        resolve_resume(run(resume=step2, weight_decay=0.1), 1)
    assert e.value.where == "--weight-decay"


def test_a_checkpoint_from_before_fp32_grad_accum_resumes_as_off(tmp_path):
    """A checkpoint written before --fp32-grad-accum existed has no such key: it trained with
    bf16 gradient accumulation, so it resumes with --fp32-grad-accum off, and the error for
    anything else names that value (one the user can pass)."""
    CheckpointManager(cfg(tmp_path, save_interval=2), DIST, tmp_path).save(
        2, {"model": Engine()}, {})
    step2 = tmp_path / "checkpoints" / "step_000002"
    state_file = step2 / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["deepspeed"]["fp32_grad_accum"]
    state_file.write_text(json.dumps(state))
    marker_file = step2 / "complete.json"  # the marker records each file's size: keep it whole
    marker = json.loads(marker_file.read_text())
    marker["files"]["trainer_state.json"] = state_file.stat().st_size
    marker_file.write_text(json.dumps(marker))
    assert resolve_resume(cfg(tmp_path, resume=str(step2), fp32_grad_accum="off"), 1) == step2
    with pytest.raises(ConfigError) as e:
        resolve_resume(cfg(tmp_path, resume=str(step2)), 1)
    assert e.value.where == "--fp32-grad-accum"
    assert "is auto but checkpoint" in e.value.message and "written with off" in e.value.message
