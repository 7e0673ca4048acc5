"""Golden and unit tests of the DeepSpeed config builder (dschat_cli/config/ds_config.py).

Regenerate the golden files after an intended change, then read the diff:
    DSCHAT_UPDATE_GOLDEN=1 python -m pytest tests/unit/config
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dschat_cli.config.ds_config import (PRECISIONS, STEPS_PER_PRINT, ZERO3_EAGER_RELEASE,
                                         ZERO3_TUNING, eval_ds_config, resolve_dtype,
                                         train_ds_config)
from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DeepSpeedOptions, OptimOptions

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("DSCHAT_UPDATE_GOLDEN") == "1"

# Golden inputs: the reference optimizer defaults (lr 9.65e-6, betas 0.9/0.95, eps 1e-8, wd 0,
# clip 1.0), micro-batch 4 x 2 ranks x 2 accumulation steps = 16 samples per optimizer step.
WORLD = 2
OPTIM = OptimOptions(per_device_train_batch_size=4, gradient_accumulation_steps=2)


def _train_cases() -> dict[str, dict]:
    cases = {}
    for stage in (0, 1, 2, 3):
        for offload in ((False,) if stage == 0 else (False, True)):
            for dtype in PRECISIONS:
                name = f"train_z{stage}{'_offload' if offload else ''}_{dtype}"
                cases[name] = train_ds_config(DeepSpeedOptions(zero_stage=stage, offload=offload),
                                              OPTIM, world_size=WORLD, dtype=dtype,
                                              torch_adam=False)
    # bf16 at ZeRO-1 accumulates in fp32 unless told not to (the case above has data_types)
    cases["train_z1_bf16_fp32acc_off"] = train_ds_config(
        DeepSpeedOptions(zero_stage=1, fp32_grad_accum="off"), OPTIM, world_size=WORLD,
        dtype="bf16", torch_adam=False)
    # What the CPU integration tests run: torch AdamW (no JIT build), ZeRO-3 releasing every
    # gathered parameter (so missing collectives hang instead of hiding), TensorBoard on.
    cases["train_z3_fp32_cputest"] = train_ds_config(
        DeepSpeedOptions(zero_stage=3), OPTIM, world_size=WORLD, dtype="fp32", torch_adam=True,
        tensorboard_dir="out/tensorboard", job_name="sft", zero3_tuning=ZERO3_EAGER_RELEASE)
    return cases


def _eval_cases() -> dict[str, dict]:
    cases = {}
    # Stages 1 and 2 give stage 0's config (test_eval_stages_below_3_are_stage_0); z0 + offload
    # shows the promotion to ZeRO-3 parameter offload.
    for stage in (0, 3):
        for offload in (False, True):
            for dtype in PRECISIONS:
                name = f"eval_z{stage}{'_offload' if offload else ''}_{dtype}"
                cases[name] = eval_ds_config(zero_stage=stage, offload=offload, dtype=dtype,
                                             micro_batch_size=4, world_size=WORLD)
    return cases


CASES = {**_train_cases(), **_eval_cases()}


def _dump(cfg: dict) -> str:
    return json.dumps(cfg, indent=2) + "\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    path = GOLDEN / f"{name}.json"
    text = _dump(CASES[name])
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing {path}; run DSCHAT_UPDATE_GOLDEN=1 pytest tests/unit/config"
    # Text, not dict equality: pins key order and int-vs-float (10000 vs 10000.0) too.
    assert text == path.read_text(), f"{name} differs from {path.name}"


def test_no_stray_golden_files():
    assert {p.stem for p in GOLDEN.glob("*.json")} == set(CASES)


# --- DeepSpeed accepts every config ------------------------------------------------------------

@pytest.fixture(scope="module")
def ds_parse():
    """DeepSpeed's own parser (pydantic models for zero/precision/monitor sections, batch-size
    arithmetic checks). It asks torch.distributed for the world size and falls back to 1
    without a process group, so pretend there is one of WORLD ranks."""
    rc = pytest.importorskip("deepspeed.runtime.config")

    def parse(cfg: dict):
        mp = pytest.MonkeyPatch()
        try:
            mp.setattr(rc.dist, "get_rank", lambda *a, **k: 0)
            mp.setattr(rc.dist, "get_world_size", lambda *a, **k: WORLD)
            return rc.DeepSpeedConfig(json.loads(json.dumps(cfg)))
        finally:
            mp.undo()

    return parse


@pytest.fixture(scope="module")
def ds_top_level_keys():
    """Keys DeepSpeed reads at the top level: it ignores unknown ones silently, so check."""
    import deepspeed.runtime.constants as c
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    keys = {v for k, v in vars(c).items() if k.isupper() and isinstance(v, str)}
    return keys | {ZERO_OPTIMIZATION, "tensorboard", "wandb", "csv_monitor", "comet"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_deepspeed_accepts(name, ds_parse, ds_top_level_keys):
    cfg = CASES[name]
    assert set(cfg) <= ds_top_level_keys
    parsed = ds_parse(cfg)  # raises on unknown zero/fp16/bf16 keys or inconsistent batch sizes
    assert parsed.world_size == WORLD
    assert parsed.train_batch_size == cfg["train_batch_size"]
    assert parsed.train_micro_batch_size_per_gpu == cfg["train_micro_batch_size_per_gpu"]
    assert parsed.gradient_accumulation_steps == cfg["gradient_accumulation_steps"]
    zero = cfg["zero_optimization"]
    assert parsed.zero_optimization_stage == zero["stage"]
    assert (parsed.zero_config.offload_optimizer is not None) == ("offload_optimizer" in zero)
    assert (parsed.zero_config.offload_param is not None) == ("offload_param" in zero)
    if zero["stage"] == 3:
        assert parsed.zero_config.param_persistence_threshold == \
            zero["stage3_param_persistence_threshold"]
        assert parsed.zero_config.memory_efficient_linear is False
    assert parsed.float16_config.enabled == cfg["fp16"]["enabled"]
    assert parsed.bfloat16_config.enabled == cfg["bf16"]["enabled"]
    if name.startswith("train"):
        assert parsed.optimizer_name == "adamw"
        assert parsed.optimizer_params == cfg["optimizer"]["params"]
        assert parsed.gradient_clipping == cfg["gradient_clipping"]
        assert parsed.scheduler_name is None
    else:
        assert parsed.optimizer_name is None
    if cfg["fp16"]["enabled"] and "loss_scale" in cfg["fp16"]:
        fp16 = parsed.float16_config
        assert (fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window,
                fp16.hysteresis, fp16.min_loss_scale) == (0, 16, 100, 2, 1)
    tensorboard = cfg.get("tensorboard", {"enabled": False})
    assert parsed.monitor_config.tensorboard.enabled == tensorboard["enabled"]
    if tensorboard["enabled"]:
        assert parsed.monitor_config.tensorboard.output_path == tensorboard["output_path"]
        assert parsed.monitor_config.tensorboard.job_name == tensorboard["job_name"]


# --- batch sizes, optimizer, sections ----------------------------------------------------------

@pytest.mark.parametrize("micro,world,accum", [(1, 1, 1), (16, 1, 1), (4, 8, 1), (2, 8, 4),
                                               (3, 5, 7), (16, 64, 2)])
def test_train_batch_size_is_micro_x_world_x_accum(micro, world, accum):
    optim = OptimOptions(per_device_train_batch_size=micro, gradient_accumulation_steps=accum)
    cfg = train_ds_config(DeepSpeedOptions(), optim, world_size=world, dtype="bf16",
                          torch_adam=False)
    assert cfg["train_batch_size"] == micro * world * accum
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    assert cfg["gradient_accumulation_steps"] == accum


@pytest.mark.parametrize("micro,world", [(1, 1), (8, 4), (3, 7)])
def test_eval_batch_size_is_micro_x_world(micro, world):
    cfg = eval_ds_config(zero_stage=3, offload=False, dtype="fp32", micro_batch_size=micro,
                         world_size=world)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
            cfg["gradient_accumulation_steps"]) == (micro * world, micro, 1)


def test_optimizer_comes_from_optim_options():
    optim = OptimOptions(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6,
                         weight_decay=0.05, gradient_clipping=0.5)
    cfg = train_ds_config(DeepSpeedOptions(), optim, world_size=1, dtype="fp32", torch_adam=False)
    assert cfg["optimizer"] == {"type": "AdamW", "params": {
        "lr": 3e-4, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05}}
    assert cfg["gradient_clipping"] == 0.5
    assert "scheduler" not in cfg


def test_torch_adam_flag():
    on = train_ds_config(DeepSpeedOptions(zero_stage=2, offload=True), OptimOptions(),
                         world_size=1, dtype="fp32", torch_adam=True)
    off = train_ds_config(DeepSpeedOptions(zero_stage=2, offload=True), OptimOptions(),
                          world_size=1, dtype="fp32", torch_adam=False)
    assert on["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in off["optimizer"]["params"]


def test_tensorboard_section():
    base = dict(world_size=1, dtype="fp32", torch_adam=True)
    assert train_ds_config(DeepSpeedOptions(), OptimOptions(), **base)["tensorboard"] == \
        {"enabled": False}
    cfg = train_ds_config(DeepSpeedOptions(), OptimOptions(), **base,
                          tensorboard_dir="/runs/x/tensorboard", job_name="ppo_actor")
    assert cfg["tensorboard"] == {"enabled": True, "output_path": "/runs/x/tensorboard",
                                  "job_name": "ppo_actor"}


def test_fixed_sections():
    cfg = train_ds_config(DeepSpeedOptions(), OptimOptions(), world_size=1, dtype="fp32",
                          torch_adam=True)
    assert cfg["steps_per_print"] == STEPS_PER_PRINT
    assert cfg["wall_clock_breakdown"] is False
    assert cfg["prescale_gradients"] is False


@pytest.mark.parametrize("dtype,bf16,fp16", [("bf16", True, False), ("fp16", False, True),
                                             ("fp32", False, False)])
def test_precision_sections(dtype, bf16, fp16):
    for cfg in (train_ds_config(DeepSpeedOptions(), OptimOptions(), world_size=1, dtype=dtype,
                                torch_adam=True),
                eval_ds_config(zero_stage=0, offload=False, dtype=dtype, micro_batch_size=1,
                               world_size=1)):
        assert cfg["bf16"]["enabled"] is bf16
        assert cfg["fp16"]["enabled"] is fp16


def test_offload_sections_per_stage():
    def zero(stage, offload):
        return train_ds_config(DeepSpeedOptions(zero_stage=stage, offload=offload),
                               OptimOptions(), world_size=1, dtype="bf16",
                               torch_adam=False)["zero_optimization"]

    assert zero(0, False) == {"stage": 0}
    for stage in (1, 2):
        assert "offload_optimizer" not in zero(stage, False)
        assert zero(stage, True)["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert "offload_param" not in zero(stage, True)
        assert not any(k.startswith("stage3_") for k in zero(stage, True))
    assert zero(3, True)["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero(3, True)["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero(3, False)
    assert {k: zero(3, False)[k] for k in ZERO3_TUNING} == ZERO3_TUNING
    assert ZERO3_TUNING == {"stage3_param_persistence_threshold": 10_000,
                            "stage3_max_live_parameters": 30_000_000,
                            "stage3_prefetch_bucket_size": 30_000_000}


def test_zero3_tuning_override():
    tuned = train_ds_config(DeepSpeedOptions(zero_stage=3), OptimOptions(), world_size=1,
                            dtype="fp32", torch_adam=True, zero3_tuning=ZERO3_EAGER_RELEASE)
    assert {k: tuned["zero_optimization"][k] for k in ZERO3_EAGER_RELEASE} == ZERO3_EAGER_RELEASE
    ev = eval_ds_config(zero_stage=3, offload=False, dtype="fp32", micro_batch_size=1,
                        world_size=1, zero3_tuning={"stage3_param_persistence_threshold": 0})
    assert ev["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    # Below stage 3 there is nothing to tune: the override changes nothing.
    z2 = dict(world_size=1, dtype="fp32", torch_adam=True)
    assert train_ds_config(DeepSpeedOptions(zero_stage=2), OptimOptions(), **z2,
                           zero3_tuning=ZERO3_EAGER_RELEASE) == \
        train_ds_config(DeepSpeedOptions(zero_stage=2), OptimOptions(), **z2)
    for stage in (2, 3):  # a misspelt key fails at every stage, not only where it is used
        with pytest.raises(ConfigError, match="stage3_max_live_params"):
            train_ds_config(DeepSpeedOptions(zero_stage=stage), OptimOptions(), **z2,
                            zero3_tuning={"stage3_max_live_params": 0})
    with pytest.raises(ConfigError, match="zero3_tuning"):
        eval_ds_config(zero_stage=0, offload=False, dtype="fp32", micro_batch_size=1,
                       world_size=1, zero3_tuning={"max_live_parameters": 0})


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("dtype", PRECISIONS)
def test_eval_stages_below_3_are_stage_0(offload, dtype):
    def ev(stage):
        return eval_ds_config(zero_stage=stage, offload=offload, dtype=dtype, micro_batch_size=2,
                              world_size=2)

    assert ev(1) == ev(0) == ev(2)
    assert ev(0)["zero_optimization"]["stage"] == (3 if offload else 0)
    assert "optimizer" not in ev(0) and "optimizer" not in ev(3)


def test_eval_fp16_has_no_loss_scaling():
    cfg = eval_ds_config(zero_stage=0, offload=False, dtype="fp16", micro_batch_size=1,
                         world_size=1)
    assert cfg["fp16"] == {"enabled": True}


# --- errors -----------------------------------------------------------------------------------

def test_fp32_grad_accum_where_deepspeed_runs_it():
    def cfg(stage=1, dtype="bf16", offload=False, setting="auto"):
        return train_ds_config(DeepSpeedOptions(zero_stage=stage, offload=offload,
                                                fp32_grad_accum=setting), OPTIM, world_size=WORLD,
                               dtype=dtype, torch_adam=False)

    # auto: only bf16 at ZeRO-1 without offload (DeepSpeed's BF16_Optimizer)
    assert cfg()["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg(setting="on")["data_types"] == {"grad_accum_dtype": "fp32"}
    for kw in ({"stage": 0}, {"stage": 2}, {"stage": 3}, {"dtype": "fp16"}, {"dtype": "fp32"},
               {"offload": True}, {"setting": "off"}):
        assert "data_types" not in cfg(**kw), kw
    # on where DeepSpeed cannot: the flag, what is wrong, and the fix
    for kw, why in (({"stage": 0}, "not ZeRO-0"), ({"stage": 2}, "not ZeRO-2"),
                    ({"dtype": "fp32"}, "not fp32 training"), ({"offload": True}, "not --offload")):
        with pytest.raises(ConfigError, match=f"on needs bf16 training at ZeRO-1 .*{why}") as e:
            cfg(setting="on", **kw)
        assert e.value.where == "--fp32-grad-accum"


def test_offload_needs_zero_stage():
    with pytest.raises(ConfigError) as e:
        train_ds_config(DeepSpeedOptions(zero_stage=0, offload=True), OptimOptions(),
                        world_size=1, dtype="bf16", torch_adam=False)
    assert e.value.where == "--offload"
    assert "needs --zero-stage 1, 2 or 3" in str(e.value)


@pytest.mark.parametrize("world", [0, -1, 1.5, True, None])
def test_world_size_validated(world):
    with pytest.raises(ConfigError, match="world_size"):
        train_ds_config(DeepSpeedOptions(), OptimOptions(), world_size=world, dtype="bf16",
                        torch_adam=False)
    with pytest.raises(ConfigError, match="world_size"):
        eval_ds_config(zero_stage=0, offload=False, dtype="bf16", micro_batch_size=1,
                       world_size=world)


def test_unresolved_or_bad_dtype_rejected():
    with pytest.raises(ConfigError, match="resolve_dtype"):
        train_ds_config(DeepSpeedOptions(), OptimOptions(), world_size=1, dtype="auto",
                        torch_adam=False)
    with pytest.raises(ConfigError, match="--dtype"):
        eval_ds_config(zero_stage=0, offload=False, dtype="float16", micro_batch_size=1,
                       world_size=1)


def test_bad_stage_and_batch_rejected():
    with pytest.raises(ConfigError, match="--zero-stage"):
        train_ds_config(replace(DeepSpeedOptions(), zero_stage=4), OptimOptions(), world_size=1,
                        dtype="bf16", torch_adam=False)
    with pytest.raises(ConfigError, match="--zero-stage"):
        eval_ds_config(zero_stage=5, offload=False, dtype="bf16", micro_batch_size=1,
                       world_size=1)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        eval_ds_config(zero_stage=0, offload=False, dtype="bf16", micro_batch_size=0,
                       world_size=1)


# --- resolve_dtype ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,has_gpu,bf16_ok,expected", [
    ("auto", True, True, "bf16"),
    ("auto", True, False, "fp16"),
    ("auto", False, False, "fp32"),
    ("auto", False, True, "fp32"),   # a CPU with avx512_bf16 still defaults to fp32
    ("bf16", True, True, "bf16"),
    ("bf16", False, False, "bf16"),  # bf16 on CPU works (slowly)
    ("fp16", True, True, "fp16"),
    ("fp16", True, False, "fp16"),
    ("fp32", True, True, "fp32"),
    ("fp32", False, False, "fp32"),
])
def test_resolve_dtype(dtype, has_gpu, bf16_ok, expected):
    assert resolve_dtype(dtype, has_gpu=has_gpu, bf16_supported=bf16_ok) == expected


def test_resolve_dtype_errors():
    with pytest.raises(ConfigError) as e:
        resolve_dtype("fp16", has_gpu=False, bf16_supported=False)
    assert e.value.where == "--dtype"
    assert e.value.message == "fp16 needs a GPU; use bf16 or fp32 on CPU"
    with pytest.raises(ConfigError, match="bfloat16 support"):
        resolve_dtype("bf16", has_gpu=True, bf16_supported=False)
    with pytest.raises(ConfigError, match="not valid"):
        resolve_dtype("float32", has_gpu=True, bf16_supported=True)


def test_module_imports_no_torch():
    code = ("import sys, dschat_cli.config.ds_config; "
            "bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[3])
