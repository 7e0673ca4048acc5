"""Plan a training step before it runs: memory per GPU against the GPUs at hand, the batch sizes and
step counts in words, and what to change when it does not fit.

    target = detect_target(gpu_memory_gib=None, gpus=query_gpus())   # GPUs here, or --gpu-memory
    sp = plan_step(cfg, record, target)           # -> StepPlan (estimate, schedule, verdict)

`record` is the run record (config/resolved.py) of the run as it would launch on a GPU machine:
its world size, precision and DeepSpeed configs come from the same resolver the launch uses
(launch/step.py builds it), the step counts from config/schedule.py. Nothing here asks the machine
or the launcher. No torch import; data rows are counted only for local sources (nothing is
downloaded or tokenised).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from dschat_cli.config.resolved import ResolvedRun, with_config
from dschat_cli.config.schema import ConfigError
from dschat_cli.config.steps import step as step_spec
from dschat_cli.plan.arch import Arch, PlanUnavailable, load_arch
from dschat_cli.plan.memory import GiB, Estimate, estimate_dpo, estimate_ppo, estimate_single

# The estimate's stated accuracy: within this fraction of the measured peak. A run whose peak plus
# overheads fits, but not with this margin, is "tight".
MARGIN = 0.15
VERDICTS = ("fits", "tight", "does not fit", "unknown")


@dataclass(frozen=True)
class Target:
    """The GPUs the plan is checked against."""
    gpus_here: int  # GPUs visible on this machine (0: none)
    gpu_bytes: float | None  # memory of one GPU (the smallest visible); None: unknown
    source: str  # where gpu_bytes came from, in words
    bf16: bool  # bf16-capable (what --dtype auto picks)


def detect_target(gpu_memory_gib: float | None = None,
                  gpus: list[tuple[int, float]] | tuple = ()) -> Target:
    """The GPUs here (`gpus`: [(MiB, compute capability)] as launch/runner.py's query_gpus lists
    them; their count and the smallest one's memory), or the --gpu-memory given."""
    gpus = list(gpus)
    bf16 = all(cap >= 8.0 for _, cap in gpus) if gpus else True
    if gpu_memory_gib is not None:
        return Target(len(gpus), gpu_memory_gib * GiB, f"--gpu-memory {gpu_memory_gib:g}", bf16)
    if gpus:
        mib = min(m for m, _ in gpus)
        return Target(len(gpus), mib * 1024.0 ** 2, f"{len(gpus)} GPU(s) here, {mib / 1024:.1f} "
                      "GiB each", bf16)
    return Target(0, None, "no GPU here", True)


def verdict(peak: float, overhead: float, gpu_bytes: float | None) -> str:
    """fits: with the estimate's margin; tight: only without it; does not fit."""
    if gpu_bytes is None:
        return "unknown"
    if peak * (1 + MARGIN) + overhead <= gpu_bytes:
        return "fits"
    if peak + overhead <= gpu_bytes:
        return "tight"
    return "does not fit"


@dataclass(frozen=True)
class Line:
    """One line of the batch and step explanation."""
    what: str
    value: str
    how: str


@dataclass(frozen=True)
class Suggestion:
    change: str
    flags: tuple[str, ...]
    peak: float
    verdict: str


@dataclass
class StepPlan:
    step: str  # sft, reward, ppo
    world_size: int
    dtype: str
    estimate: Estimate | None
    unavailable: str | None  # why there is no estimate
    target: Target
    schedule: list[Line] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    title: str = ""
    unavailable_flag: str = ""  # the option that named the model without an estimate

    @property
    def verdict(self) -> str:
        if self.estimate is None:
            return "unknown"
        return verdict(self.estimate.peak, self.estimate.overhead, self.target.gpu_bytes)


# ------------------------------------------------------------------------------------- estimates

def _kind(step: str) -> str:
    """How the table (config/steps.py) says the step's memory is estimated: single, dpo, ppo."""
    kind = step_spec(step).memory
    if kind is None:
        raise ConfigError(f"dschat plan {step}", "has no memory model; plan sft, reward, dpo or "
                          "ppo")
    return kind


def _single(step: str) -> bool:
    """A step that trains one model from --model with the options of `dschat sft` (model, lora,
    data, optim, deepspeed): sft and reward (estimate_single), dpo (estimate_dpo: plus its
    reference)."""
    return _kind(step) in ("single", "dpo")


def dpo_reference(cfg) -> str:
    """Which reference a DPO run holds (plan/memory.py's estimate_dpo): adapters-off, precomputed
    or copy."""
    if cfg.reference_is_base:
        return "adapters-off"
    return "precomputed" if cfg.reference.precompute_ref_logprobs else "copy"


def step_archs(step: str, cfg) -> dict[str, Arch]:
    """The architectures a step's models have (PlanUnavailable when one cannot be read)."""
    if _single(step):
        return {"model": load_arch(cfg.model.model, cfg.model.dropout)}
    actor = load_arch(cfg.actor.model, cfg.actor.dropout, flag="--actor-model")
    if not cfg.has_critic:  # a critic-free estimator: the reward model only
        reward = load_arch(cfg.reward_path,
                           flag="--reward-model" if cfg.reward_model else "--critic-model")
        return {"actor": actor, "ref": load_arch(cfg.actor.model), "reward": reward}
    critic = load_arch(cfg.critic.model, cfg.critic.dropout, flag="--critic-model")
    reward = load_arch(cfg.reward_model, flag="--reward-model") if cfg.reward_model else critic
    return {"actor": actor, "critic": critic, "ref": load_arch(cfg.actor.model), "reward": reward}


def pipeline_ppo_archs(cfg, actor_source: str, reward_source: str) -> dict[str, Arch]:
    """Step 3's architectures inside `dschat pipeline`: the models steps 1 and 2 write, or, until
    those exist (a dry run, a plan), the pipeline's --actor and --reward they are trained from."""
    from pathlib import Path

    def arch(path, fallback: str, flag: str, dropout=None) -> Arch:
        where = str(path) if (Path(str(path)) / "config.json").is_file() else fallback
        return load_arch(where, dropout, flag=flag)

    archs = {"actor": arch(cfg.actor.model, actor_source, "--actor", cfg.actor.dropout),
             "ref": arch(cfg.actor.model, actor_source, "--actor"),
             "reward": arch(cfg.reward_path, reward_source, "--reward")}
    if cfg.has_critic:  # a critic-free estimator builds none
        archs["critic"] = arch(cfg.critic.model, reward_source, "--reward", cfg.critic.dropout)
    return archs


def estimate_step(cfg, record: ResolvedRun, *, archs: dict[str, Arch] | None = None) -> Estimate:
    """Memory of running `cfg` as `record` resolves it (its world size and DeepSpeed configs by
    role, as the launch writes them)."""
    step, world_size = record.step, record.world_size
    archs = archs or step_archs(step, cfg)
    ds = record.ds_configs
    if _kind(step) == "dpo":
        o, lora = cfg.optim, cfg.lora
        return estimate_dpo(archs["model"], ds, source=str(cfg.model.model),
                            world_size=world_size, micro_batch=o.per_device_train_batch_size,
                            eval_batch=o.per_device_eval_batch_size, seq_len=cfg.data.max_seq_len,
                            checkpointing=cfg.model.gradient_checkpointing,
                            lora_dim=lora.lora_dim, lora_filter=lora.lora_module_name,
                            only_lora=lora.only_optimize_lora, dropout=cfg.model.dropout,
                            reference=dpo_reference(cfg))
    if _single(step):
        o, lora = cfg.optim, cfg.lora
        return estimate_single(step, archs["model"], ds["model"], source=str(cfg.model.model),
                               world_size=world_size, micro_batch=o.per_device_train_batch_size,
                               eval_batch=o.per_device_eval_batch_size,
                               seq_len=cfg.data.max_seq_len,
                               checkpointing=cfg.model.gradient_checkpointing,
                               lora_dim=lora.lora_dim, lora_filter=lora.lora_module_name,
                               only_lora=lora.only_optimize_lora, dropout=cfg.model.dropout)
    t = cfg.train
    if not cfg.has_critic:  # nothing of a critic in the estimate, even if archs has one
        archs = {k: v for k, v in archs.items() if k != "critic"}
    sources = {"actor": str(cfg.actor.model), "critic": str(cfg.critic.model),
               "ref": f"{cfg.actor.model} (frozen copy)", "reward": str(cfg.reward_path)}
    return estimate_ppo(
        archs, ds, sources, world_size=world_size,
        generation_batch=t.per_device_generation_batch_size,
        training_batch=t.per_device_training_batch_size, generation_batches=t.generation_batches,
        ppo_epochs=t.ppo_epochs, max_prompt_seq_len=cfg.data.max_prompt_seq_len,
        max_answer_seq_len=cfg.generation.max_answer_seq_len,
        actor_checkpointing=cfg.actor.gradient_checkpointing,
        critic_checkpointing=cfg.critic.gradient_checkpointing,
        actor_lora=(cfg.actor_lora.lora_dim, cfg.actor_lora.lora_module_name,
                    cfg.actor_lora.only_optimize_lora),
        critic_lora=(cfg.critic_lora.lora_dim, cfg.critic_lora.lora_module_name,
                     cfg.critic_lora.only_optimize_lora),
        actor_dropout=cfg.actor.dropout, critic_dropout=cfg.critic.dropout,
        unsupervised=bool(cfg.data.unsupervised_dataset_name), ema=cfg.ppo.enable_ema,
        generation_engine=getattr(cfg.generation, "generation_engine", "hf"),
        generation_tp=getattr(cfg.generation, "generation_tensor_parallel", 1),
        samples_per_prompt=t.samples_per_prompt)


def plan_step(cfg, record: ResolvedRun, target: Target, *,
              archs: dict[str, Arch] | None = None, count_data: bool = True, suggest: bool = True,
              title: str = "") -> StepPlan:
    """Everything `dschat plan STEP` prints, for `cfg` run as `record` resolves it, on `target`."""
    step, world, dtype = record.step, record.world_size, record.dtype
    try:
        archs = archs or step_archs(step, cfg)
        est = estimate_step(cfg, record, archs=archs)
        unavailable = None
    except PlanUnavailable as e:
        est, unavailable, flag = None, str(e), e.flag
    sp = StepPlan(step=step, world_size=world, dtype=dtype, estimate=est, unavailable=unavailable,
                  target=target, title=title or f"dschat {step}")
    if unavailable:
        sp.unavailable_flag = flag
    sp.schedule = explain_schedule(cfg, record, count_data=count_data)
    if suggest and est is not None and sp.verdict in ("does not fit", "tight"):
        sp.suggestions = suggestions(cfg, record, target, archs)
    return sp


# ------------------------------------------------------------------------------------- schedule

def _local(data) -> bool:
    """Every source is on this machine (counting rows reads files, never the network)."""
    names = list(data.data_path) + list(getattr(data, "sft_only_data_path", ()))
    return bool(names) and all(n == "local/jsonfile" or Path(n).expanduser().exists()
                               for n in names)


def count_rows(step: str, cfg) -> tuple[int | None, str]:
    """(training rows of this step's part of the data, where the number comes from); None when
    the data is not local (hub data is counted once it is tokenised, at the run's start)."""
    data = cfg.data if _single(step) else cfg.data.as_data_options()
    if not _local(data):
        return None, "hub data: counted when the run tokenises it"
    from dschat_cli.data.prepare import load_phase_rows

    try:
        train, _ = load_phase_rows(data, phase=step_spec(step).data_phase, seed=cfg.seed)
    except ConfigError as e:
        return None, f"cannot read the data ({e.where}: {e.message})"
    return len(train), "rows of this step's part of the local data"


def _n(x: int) -> str:
    return f"{x:,}"


def explain_schedule(cfg, record: ResolvedRun, *, count_data: bool = True) -> list[Line]:
    """The batch sizes and step counts of the run, each with the formula that gives it."""
    from dschat_cli.config.schedule import loader_batches, optimizer_steps, ppo_schedule

    step, world, ds = record.step, record.world_size, record.ds_configs
    n, origin = count_rows(step, cfg) if count_data else (None, "not counted")
    if _single(step):
        o = cfg.optim
        pairs = step == "reward" or _kind(step) == "dpo"
        unit = "pairs" if pairs else "sequences"
        gb = ds["model"]["train_batch_size"]
        seqs = " (chosen + rejected: twice as many sequences)" if pairs else ""
        lines = [
            Line("micro-batch per GPU", f"{o.per_device_train_batch_size} {unit}",
                 f"--per-device-train-batch-size, each up to --max-seq-len "
                 f"{cfg.data.max_seq_len} tokens{seqs}"),
            Line("global batch", f"{gb} {unit}",
                 f"per optimizer step: {o.per_device_train_batch_size} per GPU x {world} GPU(s) x "
                 f"{o.gradient_accumulation_steps} accumulation step(s)"),
        ]
        if n is None:
            lines.append(Line("training samples", "unknown", origin))
            lines.append(Line("optimizer steps per epoch", "ceil(ceil(samples / "
                              f"{world}) / {o.per_device_train_batch_size} / "
                              f"{o.gradient_accumulation_steps})",
                              "each GPU reads ceil(samples / GPUs) samples per epoch"))
            total = (f"that x {o.num_train_epochs} epoch(s)"
                     + (f", at most {o.max_steps} (--max-steps)" if o.max_steps else ""))
            lines.append(Line("total optimizer steps", total, "--num-train-epochs, --max-steps"))
            return lines
        batches = loader_batches(n, o.per_device_train_batch_size, world, drop_last=False)
        per_epoch = optimizer_steps(batches, dataclasses.replace(o, num_train_epochs=1, max_steps=0))
        total = optimizer_steps(batches, o)
        lines += [
            Line("training samples", f"{_n(n)} {unit}", origin + (
                " (pairs without a rejected answer are dropped when tokenised)"
                if pairs else "")),
            Line("batches per epoch", f"{_n(batches)} per GPU",
                 f"ceil(ceil({_n(n)} / {world}) / {o.per_device_train_batch_size})"),
            Line("optimizer steps per epoch", _n(per_epoch),
                 f"ceil({_n(batches)} / {o.gradient_accumulation_steps} accumulation step(s))"),
            Line("total optimizer steps", _n(total),
                 f"{_n(per_epoch)} x {o.num_train_epochs} epoch(s)"
                 + (f", capped by --max-steps {o.max_steps}" if o.max_steps else "")),
        ]
        return lines

    t = cfg.train
    k = t.samples_per_prompt
    gen_global = t.per_device_generation_batch_size * world
    answers = gen_global * k  # a rollout holds every prompt's --samples-per-prompt answers
    experience = answers * t.generation_batches
    # the experience of --generation-batches rollouts is pooled, then cut into mini-batches
    mini = -(-t.per_device_generation_batch_size * k * t.generation_batches
             // t.per_device_training_batch_size)
    gb = ds["actor"]["train_batch_size"]
    seq = cfg.data.max_prompt_seq_len + cfg.generation.max_answer_seq_len
    critic = cfg.has_critic
    estimator = cfg.ppo.advantage_estimator
    unit = "samples" if k == 1 else "answers"
    lengths = (f"each answer up to {cfg.generation.max_answer_seq_len} tokens after a prompt of up "
               f"to {cfg.data.max_prompt_seq_len} (up to {_n(answers * seq)} tokens)")
    lines = [
        Line("prompts per PPO step", f"{gen_global}",
             f"generation batch: {t.per_device_generation_batch_size} per GPU x {world} GPU(s)"
             + ("; " + lengths if k == 1 else "")),
    ]
    if k > 1:
        lines.append(Line("answers per PPO step", f"{answers}",
                          f"{gen_global} prompts x --samples-per-prompt {k} "
                          f"({t.per_device_generation_batch_size * k} sequences per GPU are "
                          f"generated and scored together); {lengths}"))
    lines += [
        Line("experience per update", f"{experience} {unit}",
             f"{answers} x --generation-batches {t.generation_batches}: "
             + ("the actor and critic train" if critic else "the actor trains")
             + f" on it --ppo-epochs {t.ppo_epochs} time(s)"
             + ("" if critic else f" (no critic: {estimator})")),
        Line("PPO mini-batch", f"{t.per_device_training_batch_size} per GPU",
             f"--per-device-training-batch-size{' (answers)' if k > 1 else ''}: {mini} "
             f"mini-batch(es) per update (pooled experience of {t.generation_batches} generation "
             "batch(es)) on each GPU"),
        Line("global batch (actor, critic)" if critic else "global batch (actor)",
             f"{gb} {unit}",
             f"per optimizer step: {t.per_device_training_batch_size} x {world} GPU(s) x "
             f"{t.gradient_accumulation_steps} accumulation step(s)"),
    ]
    unsup = bool(cfg.data.unsupervised_dataset_name)
    no_critic = f"no critic ({estimator})"
    if n is None:
        lines.append(Line("training prompts", "unknown", origin))
        lines.append(Line("PPO steps per epoch",
                          f"floor(floor(prompts / {world}) / {t.per_device_generation_batch_size})",
                          "incomplete batches are dropped (every rank runs the same steps)"))
        lines.append(Line("optimizer steps", f"PPO steps / {t.generation_batches} x "
                          f"{t.ppo_epochs * mini} / {t.gradient_accumulation_steps}"
                          + (" (actor: x 2 with the unsupervised loss)" if unsup else "")
                          + ("" if critic else f" for the actor, {no_critic}"),
                          "one per mini-batch and accumulation group, over every PPO epoch"))
        return lines
    batches = loader_batches(n, t.per_device_generation_batch_size, world, drop_last=True)
    s = ppo_schedule(batches, t, unsupervised=unsup)
    lines += [
        Line("training prompts", f"{_n(n)} (at most)",
             origin + "; prompts longer than --max-prompt-seq-len are dropped when tokenised"),
        Line("PPO steps per epoch", _n(batches),
             f"floor(floor({_n(n)} / {world}) / {t.per_device_generation_batch_size})"),
        Line("total PPO steps", _n(s.ppo_steps),
             f"{_n(batches)} x {t.num_train_epochs} epoch(s)"
             + (f", capped by --test-stop-step {t.test_stop_step}" if t.test_stop_step else "")),
        Line("optimizer steps", f"actor {_n(s.actor_steps)}, "
             + (f"critic {_n(s.optimizer_steps)}" if critic else no_critic),
             f"{_n(s.updates)} mini-batch updates / {t.gradient_accumulation_steps} accumulation"
             + (" (the actor steps again on the unsupervised loss)" if unsup else "")),
    ]
    return lines


# ---------------------------------------------------------------------------------- suggestions

def _replace(cfg, path: tuple[str, ...], value):
    if len(path) == 1:
        return dataclasses.replace(cfg, **{path[0]: value})
    return dataclasses.replace(cfg, **{path[0]: _replace(getattr(cfg, path[0]), path[1:], value)})


def _candidates(step: str, cfg, world: int) -> list[tuple[str, str, dict]]:
    """(kind, what changes, {field path: value}) for changes that lower memory, cheapest first;
    smaller and smaller batches are of one kind."""
    out: list[tuple[str, str, dict]] = []
    if _single(step):
        z, o = cfg.deepspeed.zero_stage, cfg.optim
        if _kind(step) == "dpo" and dpo_reference(cfg) == "copy":
            out.append(("precompute", "precompute the reference's logprobs once: no second model "
                        "while the policy trains", {("reference", "precompute_ref_logprobs"): True}))
            if not cfg.reference.offload_reference_model:
                out.append(("offload-ref", "keep the reference copy in CPU memory",
                            {("reference", "offload_reference_model"): True}))
        if world > 1 and z < 3:
            out.append(("zero", f"ZeRO-{z + 1}: partition more over the {world} GPUs",
                        {("deepspeed", "zero_stage"): z + 1}))
            if z + 1 < 3:
                out.append(("zero", "ZeRO-3: partition the weights too", {("deepspeed", "zero_stage"): 3}))
        if not cfg.model.gradient_checkpointing:
            out.append(("checkpointing", "gradient checkpointing (about 30% more compute)",
                        {("model", "gradient_checkpointing"): True}))
        if not cfg.deepspeed.offload:
            stage = 3 if z == 3 else max(z, 2)
            out.append(("offload", "offload the optimizer states to CPU memory"
                        + (" (and the weights, ZeRO-3)" if stage == 3 else ""),
                        {("deepspeed", "zero_stage"): stage, ("deepspeed", "offload"): True}))
        if z < 3:
            out.append(("offload-3", "ZeRO-3 with offload: optimizer states and weights in CPU "
                        "memory (slow)", {("deepspeed", "zero_stage"): 3,
                                          ("deepspeed", "offload"): True}))
        if not (cfg.lora.lora_dim and cfg.lora.only_optimize_lora):
            out.append(("lora", "LoRA: train rank-128 adapters only (no full-model optimizer states)",
                        {("lora", "lora_dim"): cfg.lora.lora_dim or 128,
                         ("lora", "only_optimize_lora"): True}))
        b, k = o.per_device_train_batch_size, o.gradient_accumulation_steps
        while b > 1:
            b, k = b // 2, k * 2
            out.append(("batch", f"micro-batch {b} with {k} accumulation steps (same global batch)",
                        {("optim", "per_device_train_batch_size"): b,
                         ("optim", "gradient_accumulation_steps"): k}))
        return out
    d, t = cfg.deepspeed, cfg.train
    if not cfg.has_critic:
        return out + _critic_free_candidates(cfg, world)
    if world > 1 and (d.actor_zero_stage < 3 or d.critic_zero_stage < 3):
        out.append(("zero", f"ZeRO-3 for actor and critic: partition them over the {world} GPUs",
                    {("deepspeed", "actor_zero_stage"): 3, ("deepspeed", "critic_zero_stage"): 3}))
    if not (cfg.actor.gradient_checkpointing and cfg.critic.gradient_checkpointing):
        out.append(("checkpointing", "gradient checkpointing of actor and critic",
                    {("actor", "gradient_checkpointing"): True,
                     ("critic", "gradient_checkpointing"): True}))
    if not (d.offload and d.offload_reference_model and d.offload_reward_model):
        out.append(("offload", "offload optimizer states, reference and reward model to CPU memory",
                    {("deepspeed", "offload"): True, ("deepspeed", "offload_reference_model"): True,
                     ("deepspeed", "offload_reward_model"): True,
                     ("deepspeed", "actor_zero_stage"): max(d.actor_zero_stage, 2),
                     ("deepspeed", "critic_zero_stage"): max(d.critic_zero_stage, 2)}))
    if d.actor_zero_stage < 3 or d.critic_zero_stage < 3:
        out.append(("offload-3", "ZeRO-3 with offload: every model's weights and optimizer states "
                    "in CPU memory (slow)",
                    {("deepspeed", "offload"): True, ("deepspeed", "offload_reference_model"): True,
                     ("deepspeed", "offload_reward_model"): True,
                     ("deepspeed", "actor_zero_stage"): 3, ("deepspeed", "critic_zero_stage"): 3}))
    return out + _ppo_common_candidates(cfg)


def _critic_free_candidates(cfg, world: int) -> list[tuple[str, str, dict]]:
    """Step 3 without a critic (--advantage-estimator grpo, ...): the same changes, none of them
    touching an option of the critic (the run would refuse those, and they would save nothing).
    The frozen reward model is moved to CPU memory by --offload-reward-model alone."""
    d, out = cfg.deepspeed, []
    if world > 1 and d.actor_zero_stage < 3:
        out.append(("zero", f"ZeRO-3 for the actor: partition it over the {world} GPUs",
                    {("deepspeed", "actor_zero_stage"): 3}))
    if not cfg.actor.gradient_checkpointing:
        out.append(("checkpointing", "gradient checkpointing of the actor",
                    {("actor", "gradient_checkpointing"): True}))
    if not (d.offload and d.offload_reference_model and d.offload_reward_model):
        out.append(("offload", "offload optimizer states, reference and reward model to CPU memory",
                    {("deepspeed", "offload"): True, ("deepspeed", "offload_reference_model"): True,
                     ("deepspeed", "offload_reward_model"): True,
                     ("deepspeed", "actor_zero_stage"): max(d.actor_zero_stage, 2)}))
    if d.actor_zero_stage < 3:
        out.append(("offload-3", "ZeRO-3 with offload: the actor's weights and optimizer states, "
                    "the reference and reward models in CPU memory (slow)",
                    {("deepspeed", "offload"): True, ("deepspeed", "offload_reference_model"): True,
                     ("deepspeed", "offload_reward_model"): True,
                     ("deepspeed", "actor_zero_stage"): 3}))
    return out + _ppo_common_candidates(cfg)


def _ppo_common_candidates(cfg) -> list[tuple[str, str, dict]]:
    """Step 3's actor LoRA and smaller batches (with or without a critic). A mini-batch counts
    answers: a generation batch of g prompts holds g x --samples-per-prompt of them."""
    t, out = cfg.train, []
    if not (cfg.actor_lora.lora_dim and cfg.actor_lora.only_optimize_lora):
        out.append(("lora", "LoRA for the actor: train rank-128 adapters only",
                    {("actor_lora", "lora_dim"): cfg.actor_lora.lora_dim or 128,
                     ("actor_lora", "only_optimize_lora"): True}))
    bt, bg = t.per_device_training_batch_size, t.per_device_generation_batch_size
    while bt > 1:
        bt //= 2
        out.append(("mini-batch", f"PPO mini-batches of {bt} (same experience per step)",
                    {("train", "per_device_training_batch_size"): bt}))
    while bg > 1:
        bg //= 2
        out.append(("generation batch", f"generation batch {bg} (fewer prompts per step)",
                    {("train", "per_device_generation_batch_size"): bg,
                     ("train", "per_device_training_batch_size"):
                         min(t.per_device_training_batch_size, bg * t.samples_per_prompt)}))
    return out


def _flags(cfg, changes: dict) -> tuple[str, ...]:
    """The command-line flags that make `changes` (only those that differ from `cfg`)."""
    from dschat_cli.config.schema import flag_for

    out = []
    for path, value in changes.items():
        cur = cfg
        for part in path:
            cur = getattr(cur, part)
        if cur == value:
            continue
        flag = flag_for(type(cfg), ".".join(path))
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out.append(f"{flag} {value}")
    return tuple(out)


def _merge(into: dict, changes: dict) -> None:
    """Combine changes; a ZeRO stage never goes down."""
    for path, value in changes.items():
        if path[-1].endswith("zero_stage") and path in into:
            value = max(into[path], value)
        into[path] = value


def suggestions(cfg, record: ResolvedRun, target: Target, archs: dict[str, Arch],
                limit: int = 5) -> list[Suggestion]:
    """Changes that make the step fit, each estimated the same way (the same machine and
    precision, the DeepSpeed configs rebuilt for the changed config): the single changes that fit
    on their own (of the batch sizes, only the largest that fits); if none does, the changes
    combined in order until the combination fits."""
    from dschat_cli.plan.memory import overhead_bytes

    step, world = record.step, record.world_size

    def estimate(changes: dict) -> tuple[float, str] | None:
        c = cfg
        for path, value in changes.items():
            c = _replace(c, path, value)
        try:
            dataclasses.replace(c, output_dir=c.output_dir or "plan").check()
            peak = estimate_step(c, with_config(record, c), archs=archs).peak
        except ConfigError:  # a combination the run would refuse
            return None
        return peak, verdict(peak, overhead_bytes(peak, world), target.gpu_bytes)

    found: list[Suggestion] = []
    kinds_found: set[str] = set()
    cands = _candidates(step, cfg, world)
    for kind, change, values in cands:
        if kind in kinds_found:
            continue  # e.g. a larger batch already fits
        got = estimate(values)
        if got and got[1] in ("fits", "tight"):
            found.append(Suggestion(change, _flags(cfg, values), *got))
            kinds_found.add(kind)
    if found:
        return sorted(found, key=lambda s: s.verdict != "fits")[:limit]  # else cheapest first
    combined: dict = {}
    names: dict[str, str] = {}  # kind -> its latest description, in the order of first use
    got = None
    for kind, change, values in cands:
        trial = dict(combined)
        _merge(trial, values)
        result = estimate(trial)
        if result is None:
            continue
        combined, got = trial, result
        names[kind] = change.split(":")[0].split(" (")[0]
        if got[1] in ("fits", "tight"):
            return [Suggestion(" + ".join(names.values()), _flags(cfg, combined), *got)]
    if got is None:
        return []
    return [Suggestion("all of: " + " + ".join(names.values()) + " (still too large: use more "
                       "GPUs or a smaller model)", _flags(cfg, combined), *got)]
