"""The one builder of DeepSpeed config dicts: `train_ds_config` for models with an optimizer
(actor, critic, SFT, reward training) and `eval_ds_config` for frozen models (PPO's ref and
reward, evaluation).

Each dict is spelled out completely from the typed options: batch sizes, ZeRO, precision,
optimizer, logging. Nothing patches it afterwards, so the JSON written next to a run's outputs
is exactly what DeepSpeed got. Golden files in tests/unit/config/golden pin every ZeRO stage x
offload x precision combination, and a test feeds each one to DeepSpeed's own config parser.

The shape follows DeepSpeed-Chat's `dschat/utils/ds_utils.py` (get_train_ds_config /
get_eval_ds_config); where this builder differs, the function's docstring says how and why.

No torch or deepspeed import here: the CLI builds these dicts for --dry-run and must stay fast.
"""

from __future__ import annotations

from typing import Any

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DeepSpeedOptions, OptimOptions

PRECISIONS = ("bf16", "fp16", "fp32")

# DeepSpeed prints its own "step=... lr=..." line every `steps_per_print` steps; we log
# ourselves (rank 0, rich), so push DeepSpeed's far out of reach (DeepSpeed-Chat used 10).
STEPS_PER_PRINT = 1_000_000_000

# DeepSpeed-Chat's ZeRO-3 tuning (ds_utils.py). DeepSpeed's own defaults are 1e5 / 1e9 / 5e7.
# The persistence threshold keeps small tensors (biases, norms: < 1e4 elements) whole on every
# rank; max_live_parameters bounds how many gathered parameters stay resident; the prefetch
# bucket bounds how much the next layers' all-gather fetches ahead.
ZERO3_TUNING: dict[str, int] = {
    "stage3_param_persistence_threshold": 10_000,
    "stage3_max_live_parameters": 30_000_000,
    "stage3_prefetch_bucket_size": 30_000_000,
}

# For tests on tiny models. With the defaults a 100k-parameter model stays gathered on every
# rank after the first forward, which hides missing collectives (e.g. generate() without
# synced_gpus hangs only when parameters really are re-gathered; see
# shared/reference/cpu-deepspeed-notes.md). Zero makes ZeRO-3 release and re-fetch everything.
ZERO3_EAGER_RELEASE: dict[str, int] = {
    "stage3_param_persistence_threshold": 0,
    "stage3_max_live_parameters": 0,
    "stage3_prefetch_bucket_size": 0,
    "stage3_max_reuse_distance": 0,
}

_ZERO3_TUNABLE = frozenset(ZERO3_EAGER_RELEASE)


def resolve_dtype(dtype: str, *, has_gpu: bool, bf16_supported: bool) -> str:
    """Turn --dtype (auto|bf16|fp16|fp32) into the precision DeepSpeed trains in.

    auto: bf16 on a GPU that supports it (Ampere and newer), fp16 on an older GPU, fp32 without
    a GPU. An explicit choice is kept unless the hardware cannot run it.
    """
    if dtype == "auto":
        if not has_gpu:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if dtype not in PRECISIONS:
        raise ConfigError("--dtype", f"{dtype!r} is not valid; choose one of auto, "
                          + ", ".join(PRECISIONS))
    if dtype == "fp16" and not has_gpu:
        raise ConfigError("--dtype", "fp16 needs a GPU; use bf16 or fp32 on CPU")
    if dtype == "bf16" and has_gpu and not bf16_supported:
        raise ConfigError("--dtype", "bf16 needs a GPU with bfloat16 support (Ampere or newer); "
                          "use fp16 on this GPU")
    return dtype


def train_ds_config(ds: DeepSpeedOptions, optim: OptimOptions, *, world_size: int, dtype: str,
                    torch_adam: bool, tensorboard_dir: str | None = None, job_name: str = "dschat",
                    zero3_tuning: dict | None = None) -> dict:
    """DeepSpeed config for a model that trains (SFT actor, reward model, PPO actor and critic).

    `dtype` is a resolved precision (see resolve_dtype); `world_size` the number of ranks
    (data-parallel degree); `torch_adam` the resolved --torch-adam (the caller turns it on
    without a GPU); `zero3_tuning` overrides the stage-3 keys (ZERO3_EAGER_RELEASE in tests)
    and is ignored below stage 3. DeepSpeed builds the optimizer from the "optimizer" section:
    torch.optim.AdamW with `torch_adam`, otherwise FusedAdam on GPU or DeepSpeedCPUAdam with
    offload (both compile at first use). The learning-rate schedule is an HF scheduler passed to
    deepspeed.initialize, so there is no "scheduler" section.

    Differences from DeepSpeed-Chat's get_train_ds_config:
    - batch sizes are real (micro x world x accumulation), not placeholders overwritten later;
    - offload sections appear only where DeepSpeed uses them (offload_optimizer at ZeRO >= 1,
      offload_param at ZeRO-3) instead of {"device": "none"} everywhere, and stage-3 keys
      only at stage 3;
    - fp16 spells out its dynamic loss scaling (same values: loss_scale_window 100 as there,
      DeepSpeed's defaults for the rest), precision uses the current "bf16" key (DeepSpeed-Chat
      wrote the old alias "bfloat16"), and fp32 is possible (CPU runs, debugging);
    - the optimizer (AdamW, betas, eps, weight decay) is in the config rather than built in
      main.py, so the written JSON records it;
    - no hybrid_engine section: fast generation is the generation/ package's job;
    - bf16 at ZeRO-1 accumulates gradients in fp32 unless --fp32-grad-accum off
      (`fp32_grad_accum`).
    """
    _check_common(world_size=world_size, zero_stage=ds.zero_stage, dtype=dtype)
    _check_tuning(zero3_tuning)
    if ds.offload and ds.zero_stage == 0:
        raise ConfigError("--offload", "needs --zero-stage 1, 2 or 3")
    micro = optim.per_device_train_batch_size
    accum = optim.gradient_accumulation_steps
    if micro < 1:
        raise ConfigError("--per-device-train-batch-size", f"{micro} must be >= 1")
    if accum < 1:
        raise ConfigError("--gradient-accumulation-steps", f"{accum} must be >= 1")

    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # As DeepSpeed-Chat: overlap the gradient reduce-scatter with the backward pass.
        zero["overlap_comm"] = True
    if ds.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        if ds.offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero.update(_zero3_tuning(dict(ZERO3_TUNING), zero3_tuning))
        # Read by zero.Init (stage 3 only): False keeps torch's F.linear instead of DeepSpeed's
        # memory-efficient replacement. As DeepSpeed-Chat.
        zero["memory_efficient_linear"] = False

    params: dict[str, Any] = {
        "lr": optim.learning_rate,
        "betas": [optim.adam_beta1, optim.adam_beta2],
        "eps": optim.adam_epsilon,
        "weight_decay": optim.weight_decay,
    }
    if torch_adam:
        params["torch_adam"] = True

    cfg: dict[str, Any] = {
        "train_batch_size": micro * world_size * accum,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "steps_per_print": STEPS_PER_PRINT,
        "zero_optimization": zero,
        **_precision(dtype, train=True),
        "gradient_clipping": optim.gradient_clipping,
        "optimizer": {"type": "AdamW", "params": params},
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "tensorboard": _tensorboard(tensorboard_dir, job_name),
    }
    if fp32_grad_accum(ds, dtype):
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        # add each bf16 gradient into the fp32 buffer from a hook as backward makes it, and free
        # it there, instead of after backward over every parameter: the same sums in the same
        # order (bit-identical weights), without a second resident copy of the gradients
        cfg["bf16"]["immediate_grad_update"] = True
    return cfg


def zero_label(ds_config: dict) -> str:
    """How a run log names a DeepSpeed config's ZeRO setting: "ZeRO-2", or "ZeRO-1, fp32
    gradients" where its gradients accumulate in fp32 (`fp32_grad_accum`)."""
    fp32 = ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    return f"ZeRO-{ds_config['zero_optimization']['stage']}" + (", fp32 gradients" if fp32 else "")


def fp32_grad_accum(ds: DeepSpeedOptions, dtype: str) -> bool:
    """Whether a model trained with `ds` in the resolved precision `dtype` accumulates its
    gradients in fp32: DeepSpeed's data_types.grad_accum_dtype "fp32", which it runs only for bf16
    at ZeRO-1 without offload (its BF16_Optimizer; at ZeRO-0 it raises NotImplementedError, and
    other stages ignore the key). Against bf16 accumulation there: gradients summed and clipped in
    fp32, and an optimizer step of one inf/nan test of the global norm instead of one per tensor
    (OPT-1.3B, 4 x 512 tokens on an H100, backward + step: 76.8 ms against 112.1 at ZeRO-0;
    docs/benchmarks.md), for a resident fp32 gradient buffer (4 B per trained parameter).
    --fp32-grad-accum auto turns it on wherever DeepSpeed allows it; on where it does not is an
    error."""
    allowed = dtype == "bf16" and ds.zero_stage == 1 and not ds.offload
    if ds.fp32_grad_accum == "on" and not allowed:
        why = ("--offload" if ds.offload else f"ZeRO-{ds.zero_stage}" if ds.zero_stage != 1
               else f"{dtype} training")
        raise ConfigError("--fp32-grad-accum", f"on needs bf16 training at ZeRO-1 without "
                          f"--offload (DeepSpeed accumulates in fp32 only there), not {why}; use "
                          "a ZeRO stage of 1 and --dtype bf16 (or auto on a GPU), or "
                          "--fp32-grad-accum auto")
    return allowed and ds.fp32_grad_accum != "off"


def model_ds_configs(cfg, *, world_size: int, dtype: str, torch_adam: bool,
                     tensorboard_dir: str | None, job_name: str) -> dict[str, dict]:
    """{"model": config} of a step that trains one model (sft, reward): its .deepspeed and .optim
    sections through train_ds_config. The table of steps (config/steps.py) names this builder."""
    return {"model": train_ds_config(cfg.deepspeed, cfg.optim, world_size=world_size, dtype=dtype,
                                     torch_adam=torch_adam, tensorboard_dir=tensorboard_dir,
                                     job_name=job_name)}


def eval_ds_config(*, zero_stage: int, offload: bool, dtype: str, micro_batch_size: int,
                   world_size: int, zero3_tuning: dict | None = None) -> dict:
    """DeepSpeed config for a frozen model: PPO's reference and reward models, evaluation.

    `zero_stage` is the stage of the model it sits next to (the actor's for ref, the critic's
    for reward), as in DeepSpeed-Chat's rlhf_engine. With no optimizer there are no optimizer
    states or gradients to shard, so stages 0-2 all become stage 0 (a full copy per rank);
    stage 3 keeps the parameters partitioned.

    `offload` keeps the weights in CPU memory and streams them in layer by layer. DeepSpeed
    only offloads parameters at ZeRO-3, so offload always yields stage 3 with offload_param,
    whatever `zero_stage` is. DeepSpeed-Chat instead wrote offload_param into a stage-0 config,
    where DeepSpeed ignores it: its --offload_reference_model did nothing unless the actor ran
    ZeRO-3. All ranks must then run the frozen model's forward passes together (PPO does).

    `zero3_tuning` overrides the stage-3 keys as in train_ds_config.

    Other differences from get_eval_ds_config: real batch sizes, no gradient_clipping or
    prescale_gradients (nothing is trained), the "bf16" key, and fp32 is possible.
    """
    _check_common(world_size=world_size, zero_stage=zero_stage, dtype=dtype)
    _check_tuning(zero3_tuning)
    if micro_batch_size < 1:
        raise ConfigError("micro_batch_size", f"{micro_batch_size} must be >= 1")
    stage = 3 if (zero_stage == 3 or offload) else 0
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update(_zero3_tuning({"stage3_param_persistence_threshold":
                                   ZERO3_TUNING["stage3_param_persistence_threshold"]},
                                  zero3_tuning))
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero["memory_efficient_linear"] = False
    return {
        "train_batch_size": micro_batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "steps_per_print": STEPS_PER_PRINT,
        "zero_optimization": zero,
        **_precision(dtype, train=False),
        "wall_clock_breakdown": False,
    }


def _check_common(*, world_size: int, zero_stage: int, dtype: str) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError("world_size", f"{world_size!r} must be an integer >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError("--zero-stage", f"{zero_stage!r} is not valid; choose one of 0, 1, 2, 3")
    if dtype not in PRECISIONS:
        hint = " (resolve 'auto' with resolve_dtype first)" if dtype == "auto" else ""
        raise ConfigError("--dtype", f"{dtype!r} is not a precision{hint}; expected one of "
                          + ", ".join(PRECISIONS))


def _check_tuning(overrides: dict | None) -> None:
    unknown = sorted(set(overrides or ()) - _ZERO3_TUNABLE)
    if unknown:
        raise ConfigError("zero3_tuning", f"unknown keys {unknown}; allowed: "
                          + ", ".join(sorted(_ZERO3_TUNABLE)))


def _zero3_tuning(base: dict[str, Any], overrides: dict | None) -> dict[str, Any]:
    base.update(overrides or {})
    return base


def _precision(dtype: str, *, train: bool) -> dict[str, dict[str, Any]]:
    """Both sections, always, so the JSON says at a glance which precision ran."""
    if dtype == "fp16":
        fp16: dict[str, Any] = {"enabled": True}
        if train:
            # Dynamic loss scaling. Start at 2**16, halve after `hysteresis` overflowing steps,
            # double after loss_scale_window clean steps (DeepSpeed-Chat: 100; DeepSpeed's
            # default 1000 recovers too slowly after an overflow), never below 1.
            fp16.update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 100,
                         "hysteresis": 2, "min_loss_scale": 1})
        return {"bf16": {"enabled": False}, "fp16": fp16}
    return {"bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": False}}


def _tensorboard(output_dir: str | None, job_name: str) -> dict[str, Any]:
    if output_dir is None:
        return {"enabled": False}
    return {"enabled": True, "output_path": str(output_dir), "job_name": job_name}
