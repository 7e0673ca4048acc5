"""What `dschat bench` decides for a user who leaves a setting unset, from the memory plan.

    choice = choose_bench(cfg, world_size=1, target=detect_target(gpus=query_gpus()))
    choice.cfg          # cfg with every unset ZeRO stage and --batch-size filled in
    choice.lines        # what was chosen and why, one line each (printed, and kept in bench.json)
    choice.larger       # larger batches to measure next, largest first ([] when none fits)
    choice.attempts     # the launches after the first: (batch, its ZeRO stages), in order

Users do not tune, so the defaults should be the fastest correct setting that fits:
- ZeRO: on one GPU there is nothing to partition. In bf16, 1: it is where DeepSpeed accumulates
  the gradients in fp32 (its BF16_Optimizer, --fp32-grad-accum auto), whose optimizer step is the
  fastest measured (OPT-1.3B on an H100, backward + step: 77 ms against 112 at ZeRO-0, where every
  tensor is scanned for inf/nan one by one; docs/benchmarks.md). In another precision, or with
  --fp32-grad-accum off, 0, which skips ZeRO's bookkeeping. On several GPUs 2, the reference's
  benchmark setting (ZeRO-0 across GPUs has not been measured against it).
- Batch: --batch-size 64 (the reference's largest, the figure compared with it), then the largest
  batch the plan says fits one GPU (with or without its margin: the bench's own out-of-memory
  fallback is the final word). Step 3 generates that batch at once and trains it in mini-batches
  of half the first batch, one optimizer step per batch (gradient accumulation), walking up in
  steps of the mini-batch: generation is what gains from a larger batch, and training keeps the
  first batch's memory. Steps 1 and DPO train one mini-batch, in steps of half the base batch.
An explicit flag always wins: nothing here changes a value the user gave.

No torch import: the plan reads model configs only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from dschat_cli.config.bench import BASE_BATCH, BenchConfig, bench_step_config
from dschat_cli.config.resolved import resolve_run
from dschat_cli.plan.arch import PlanUnavailable
from dschat_cli.plan.memory import CONTEXT_BYTES, GiB, overhead_bytes
from dschat_cli.plan.planner import MARGIN, Target, estimate_step, verdict

MAX_BATCH_FACTOR = 16  # the search stops at 16 x the base batch
LARGER_TRIES = 3  # batches tried (largest first) before the bench gives up on a larger one


@dataclass
class BenchChoice:
    cfg: BenchConfig
    lines: list[str] = field(default_factory=list)
    larger: list[int] = field(default_factory=list)
    # the ZeRO stages (BenchConfig field -> stage) a larger batch runs at where they are not
    # cfg's: one GPU's ZeRO-1 keeps an fp32 gradient buffer, so a batch that fits only without it
    # runs at 0 (and step 3's larger batch, trained in smaller mini-batches, can fit at 1 when
    # the first did not)
    zero_at: dict[int, dict[str, int]] = field(default_factory=dict)
    # the launches after the first, in order: (batch, the ZeRO stages it runs at; {}: cfg's).
    # A batch the plan puts at ZeRO-0 whose ZeRO-1 estimate is still below the GPU's memory (the
    # plan's allowance for fragmentation is what tips it) is tried at ZeRO-1 first: an out of
    # memory error there is caught, and the same batch runs again at ZeRO-0.
    attempts: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    # step 3: the larger batches' training mini-batch (--micro-batch-size), None: one mini-batch
    micro: int | None = None

    def config_for(self, batch: int, stages: dict[str, int] | None = None) -> BenchConfig:
        """cfg at --batch-size `batch` (one of `larger`), with `stages` (default: that batch's
        ZeRO stages by the plan)."""
        stages = self.zero_at.get(batch, {}) if stages is None else stages
        micro = {"micro_batch_size": self.micro} if self.micro else {}
        return dataclasses.replace(self.cfg, batch_size=batch, **stages, **micro)


def choose_bench(cfg: BenchConfig, *, world_size: int, target: Target, on_gpu: bool = True
                 ) -> BenchChoice:
    """`cfg` with its unset ZeRO stages and batch size chosen for `world_size` ranks of `target`'s
    GPUs (or the --gpu-memory it names; a target without GPU memory: no search). `on_gpu`
    False: the ranks are CPU processes (the lines say so)."""
    choice = BenchChoice(cfg)
    fallback = _choose_zero(choice, world_size, "GPU" if on_gpu else "CPU rank",
                            bf16=cfg.dtype == "bf16" or (cfg.dtype == "auto" and on_gpu
                                                         and target.bf16))
    if cfg.batch_size is not None:  # given: measured as it is, nothing to search
        return choice
    choice.cfg = dataclasses.replace(choice.cfg, batch_size=BASE_BATCH)
    staged = choice.cfg  # the chosen ZeRO stages, before a batch falls back from them
    base = BASE_BATCH
    what = "the reference's largest" if cfg.step == "ppo" else "the default"
    sizes = _Sizes(staged, fallback, world_size, target)
    if target.gpu_bytes is None or not sizes.planned:
        why = ("no GPU here and no --gpu-memory" if target.gpu_bytes is None else
               "the memory plan has no estimate for these models")
        choice.lines.append(f"--batch-size {base} ({what}); the largest batch that fits was not "
                            f"searched: {why}")
        return choice
    where = f"one GPU ({target.source})"
    k = choice.cfg.samples  # a batch counts answers: a whole number of prompts x k
    first = base
    if not sizes.fits(base):  # a smaller GPU (or a bigger step): the largest that fits below
        down = _round_up(max(base // 8, 1), k)
        if cfg.micro_batch_size:  # whole mini-batches only (--micro-batch-size divides 64)
            down = _round_up(down, cfg.micro_batch_size)
        smaller = next((b for b in range(base - down, 0, -down) if sizes.fits(b)), None)
        if smaller is None:
            choice.lines.append(f"--batch-size {base} ({what}), though it does not fit {where} by "
                                f"the memory plan (estimated peak {sizes.peak(base) / GiB:.1f} "
                                "GiB) and no smaller batch does either; measuring it anyway")
            return choice
        first = smaller
        choice.cfg = dataclasses.replace(choice.cfg, batch_size=smaller, **sizes.at(smaller))
        choice.lines.append(f"--batch-size {smaller}: the largest that fits {where} by the memory "
                            f"plan ({sizes.est(smaller)}; {base}, {what}: "
                            f"{sizes.peak(base) / GiB:.1f} GiB, does not fit)")
        if cfg.step != "ppo":  # a larger batch only helps step 3's generation
            return choice
    elif sizes.at(base):
        choice.cfg = dataclasses.replace(choice.cfg, **sizes.at(base))
        choice.lines.append(f"--batch-size {base} fits {where} only at ZeRO-0 ({sizes.est(base)}; "
                            f"ZeRO-1's fp32 gradients: {sizes.chosen(base) / GiB:.1f} GiB)")
    chosen_stages = {name: getattr(staged, name) for name in fallback}  # ZeRO-1's, by name
    first_stages = {name: getattr(choice.cfg, name) for name in fallback}
    if cfg.step == "ppo":
        choice.micro = cfg.micro_batch_size or _round_up(max(first // 2, 1), k)
        step, start = choice.micro, first - first % choice.micro
        sizes, z1_peak, stages = _mini_batch_sizes(staged, choice.micro, chosen_stages, fallback,
                                                   world_size, target, start=start, step=step)
        stages_of = lambda b: stages  # noqa: E731 - every larger batch at the same stages
    else:
        # one mini-batch; a first batch that fell back to ZeRO-0 takes the larger ones along
        # (they need more memory)
        step, start = _round_up(base // 2, k), base
        stages_of = lambda b: first_stages if first_stages != chosen_stages \
            else sizes.at(b) or chosen_stages  # noqa: E731
        z1_peak = sizes.chosen
    fitting = fitting_batches(sizes.peak, target.gpu_bytes, world_size, start=start, step=step,
                              limit=MAX_BATCH_FACTOR * base)
    lead = f"--batch-size {base} ({what}), then" if first == base else "then"
    minis = (f" (trained in mini-batches of {choice.micro}, one optimizer step per batch"
             + (", at ZeRO-0: with ZeRO-1's fp32 gradient buffer none fits" if fallback and
                stages_of(start) == fallback else "") + ")" if choice.micro else "")
    if not fitting:
        nxt = start + step
        choice.lines.append(f"{lead} no larger batch{minis} fits {where} by the memory plan "
                            f"({nxt}: {sizes.peak(nxt) / GiB:.1f} GiB, does not fit)")
        return choice
    choice.larger = fitting[:LARGER_TRIES]
    choice.zero_at = {b: stages_of(b) for b in choice.larger if stages_of(b) != first_stages}
    for b in choice.larger:
        # a batch the plan puts at ZeRO-0 whose ZeRO-1 estimate is still below the GPU's memory
        # (the plan's allowance for fragmentation is what tips it) is tried at ZeRO-1 first
        if stages_of(b) != chosen_stages and z1_peak(b) + CONTEXT_BYTES <= target.gpu_bytes:
            choice.attempts.append((b, chosen_stages))
        choice.attempts.append((b, stages_of(b)))
    best = fitting[0]
    tries = [f"{b} at ZeRO-0" if i and choice.attempts[i - 1][0] == b else str(b)
             for i, (b, _) in enumerate(choice.attempts)][1:]
    zero1_first = (f"; it runs at ZeRO-1 first (its estimate there, "
                   f"{z1_peak(best) / GiB:.1f} GiB, is below the GPU's memory with the CUDA "
                   "context, before the plan's allowance for fragmentation)"
                   if len(choice.attempts) > 1 and choice.attempts[1][0] == best else "")
    choice.lines.append(f"{lead} {best}{minis}: the largest batch that fits {where} by the memory "
                        f"plan ({sizes.est(best)}; {best + step}: "
                        f"{sizes.peak(best + step) / GiB:.1f} GiB, does not fit){zero1_first}; "
                        "on out of memory the bench tries " + (", ".join(tries) or "no other"))
    return choice


def _mini_batch_sizes(staged: BenchConfig, micro: int, chosen_stages: dict[str, int],
                      fallback: dict[str, int], world_size: int, target: Target, *, start: int,
                      step: int):
    """Step 3's larger batches, trained in mini-batches of `micro`: their plan (`_Sizes`), the
    peak at the chosen stages (for a ZeRO-1-first attempt) and the stages they run at. Training
    runs as fast in mini-batches of half the first batch (thousands of tokens per matmul) in
    less memory, which leaves the room to the generation batch and its KV cache. The chosen
    stages (ZeRO-1: the mini-batches' gradients summed in fp32) whenever a larger batch fits
    there, the fallback's (ZeRO-0) only when none does."""
    z1_peak = None
    for stages in ([chosen_stages, fallback] if fallback else [chosen_stages]):
        sizes = _Sizes(dataclasses.replace(staged, batch_size=micro, micro_batch_size=micro,
                                           **stages), {}, world_size, target)
        z1_peak = z1_peak or sizes.chosen
        if not sizes.planned or fitting_batches(sizes.peak, target.gpu_bytes, world_size,
                                                start=start, step=step, limit=start + step):
            break
    return sizes, z1_peak, stages


class _Sizes:
    """The memory plan of a bench config by batch: the peak at the chosen ZeRO stages, at the
    fallback's (one GPU's ZeRO-0 for a batch that fits only without ZeRO-1's fp32 gradient
    buffer), and which of the two a batch runs at."""

    def __init__(self, cfg: BenchConfig, fallback: dict[str, int], world_size: int,
                 target: Target):
        self.world_size, self.target, self.fallback = world_size, target, fallback
        self.allowed = ("fits", "tight") if world_size == 1 else ("fits",)
        self.chosen = _peak_fn(cfg, world_size, target)
        self.planned = self.chosen is not None
        self.lean = _peak_fn(dataclasses.replace(cfg, **fallback), world_size, target) \
            if fallback and self.planned else None

    def at(self, b: int) -> dict[str, int]:
        """The ZeRO stages batch b runs at: {} for the chosen ones where they fit, else the
        fallback's where those do."""
        if self.lean is None or self._verdict(self.chosen(b)) in self.allowed or \
                self._verdict(self.lean(b)) not in self.allowed:
            return {}
        return self.fallback

    def peak(self, b: int) -> float:
        return (self.lean if self.at(b) else self.chosen)(b)

    def fits(self, b: int) -> bool:
        return self._verdict(self.peak(b)) != "does not fit"

    def est(self, b: int) -> str:  # "estimated peak 118.0 GiB, fits, but not with the plan's ..."
        return (f"estimated peak {self.peak(b) / GiB:.1f} GiB{_at_zero0(self.at(b))}, "
                f"{_words(self._verdict(self.peak(b)))}")

    def _verdict(self, peak: float) -> str:
        return _verdict(peak, self.world_size, self.target)


def _at_zero0(stages: dict[str, int]) -> str:
    return (" at ZeRO-0 (with ZeRO-1's fp32 gradient buffer it does not fit)" if stages else "")


def _round_up(n: int, k: int) -> int:
    return max(-(-n // k) * k, k)


def fitting_batches(peak: Callable[[int], float], gpu_bytes: float, world_size: int, *,
                    start: int, step: int, limit: int) -> list[int]:
    """The batches above `start` (start + step, start + 2 x step, ... up to `limit`) whose
    estimated peak fits `gpu_bytes`, largest first: with or without the plan's margin on one GPU,
    where the bench catches an out-of-memory error and tries the next; with it on several, where
    one rank's out-of-memory error ends the run. The peak grows with the batch, so the walk stops
    at the first that does not fit."""
    allowed = ("fits", "tight") if world_size == 1 else ("fits",)
    out = []
    b = start + step
    while b <= limit:
        if verdict(peak(b), overhead_bytes(peak(b), world_size), gpu_bytes) not in allowed:
            break
        out.append(b)
        b += step
    return out[::-1]


def _choose_zero(choice: BenchChoice, world_size: int, unit: str, *, bf16: bool
                 ) -> dict[str, int]:
    """Fill in the unset ZeRO stages; `bf16`: the run trains in bf16 (given or auto's pick).
    Returns the fallback for a batch that does not fit at the stages chosen (those stages at 0:
    one GPU's ZeRO-1 for fp32 gradients), or {} when there is none."""
    cfg = choice.cfg
    roles = [("actor_zero_stage", "--actor-zero-stage")]
    if cfg.step == "ppo":
        roles.append(("critic_zero_stage", "--critic-zero-stage"))
    unset = [(name, flag) for name, flag in roles if getattr(cfg, name) is None]
    fp32_accum = bf16 and cfg.fp32_grad_accum != "off"
    stage = 2 if world_size > 1 else 1 if fp32_accum else 0
    # a stage that does not apply to this step (sft's critic) is filled in too: nothing reads it
    filled = [name for name in ("actor_zero_stage", "critic_zero_stage")
              if getattr(cfg, name) is None]
    choice.cfg = dataclasses.replace(cfg, **{name: stage for name in filled})
    fallback = {name: 0 for name in filled} if stage == 1 else {}
    if not unset:
        return fallback
    flags = " and ".join(flag for _, flag in unset)
    if world_size > 1:
        why = (f"{world_size} {unit}s: ZeRO-2, the reference's benchmark setting, partitions the "
               "optimizer states and gradients")
    elif fp32_accum:
        why = (f"one {unit} in bf16: nothing to partition, but ZeRO-1 is where DeepSpeed "
               "accumulates the gradients in fp32 (--fp32-grad-accum auto), the fastest optimizer "
               "step measured (one inf/nan test of the global norm instead of one per tensor); 0 "
               "at a batch that fits only without its fp32 gradient buffer")
    else:
        why = (f"one {unit}: ZeRO has nothing to partition, and stage 0 skips its bookkeeping"
               + (" (fp32 gradient accumulation, ZeRO-1's gain, is off)" if bf16 else
                  " (fp32 gradient accumulation, ZeRO-1's gain, needs bf16)"))
    choice.lines.append(f"{flags} {stage}: {why}")
    return fallback


def _peak_fn(cfg: BenchConfig, world_size: int, target: Target
             ) -> Callable[[int], float] | None:
    """batch -> the memory plan's peak bytes per GPU of `cfg` at that --batch-size (None: no
    estimate for these models)."""
    cache: dict[int, float] = {}

    def peak(batch: int) -> float:
        if batch not in cache:
            # the output folder only names where files would go: a plan writes none
            step, run_cfg = bench_step_config(dataclasses.replace(
                cfg, batch_size=batch, output_dir=cfg.output_dir or "dschat-bench"))
            record = resolve_run(step, run_cfg, world_size=world_size, device="cuda",
                                 bf16_supported=target.bf16, hub_reachable=False)
            cache[batch] = estimate_step(run_cfg, record).peak
        return cache[batch]

    try:
        peak(cfg.batch_size)
    except PlanUnavailable:
        return None
    return peak


def _verdict(peak: float, world_size: int, target: Target) -> str:
    """The plan's verdict (planner.VERDICTS) on `peak` bytes per GPU, overheads included."""
    return verdict(peak, overhead_bytes(peak, world_size), target.gpu_bytes)


def _words(v: str) -> str:
    """A verdict as the chosen lines say it."""
    return {"fits": f"fits with the plan's {MARGIN:.0%} margin",
            "tight": f"fits, but not with the plan's {MARGIN:.0%} margin"}.get(v, v)


MAX_GENERATION_FACTOR = 8  # the hint looks at up to 8 x the generation batch


def larger_generation_batch(cfg, record, target: Target, *, archs=None
                            ) -> tuple[int, float] | None:
    """`dschat ppo`'s hint (printed before a GPU launch, never applied): the largest multiple of
    --per-device-generation-batch-size, up to 8x, that the memory plan says fits `target` with
    its margin, and that estimate's peak bytes; None when no larger one fits.

    It is a hint, not a default: the prompts per PPO step are part of the algorithm (the number
    of PPO steps per epoch, where the health checks and checkpoints fall), so the same command
    must train the same way on any GPU. It pays because a decode step reads the weights once for
    the whole batch: G prompts cost about what 16 do while decoding is memory-bound."""
    t = cfg.train
    g0 = t.per_device_generation_batch_size
    best = None
    for factor in range(2, MAX_GENERATION_FACTOR + 1):
        g = g0 * factor
        train = dataclasses.replace(t, per_device_generation_batch_size=g)
        candidate = dataclasses.replace(cfg, train=train)
        try:
            candidate.check()
        except ValueError:  # e.g. the training batch must divide the experience
            continue
        peak = estimate_step(candidate, record, archs=archs).peak
        if _verdict(peak, record.world_size, target) == "fits":
            best = (g, peak)
        else:
            break
    return best


def zero1_hint(cfg, record, target: Target, *, archs=None) -> tuple[list[str], float] | None:
    """The training commands' hint on one GPU in bf16 (printed before the launch, never
    applied): the flags that move each trained model from ZeRO-0 to ZeRO-1, where its gradients
    accumulate in fp32 (--fp32-grad-accum auto) and the optimizer step is faster (the bench's
    choice; docs/benchmarks.md), with that estimate's peak bytes; None when no model is at
    ZeRO-0, the run is not one GPU in bf16, --fp32-grad-accum is off, or ZeRO-1's fp32 gradient
    buffer does not fit `target` with the plan's margin.

    A hint, not a default: `--zero-stage 0` is the reference's default, and the 4 B per parameter
    the buffer keeps could push a run that fits today over the edge of another GPU."""
    d = cfg.deepspeed
    if record.world_size != 1 or record.dtype != "bf16" or d.fp32_grad_accum == "off":
        return None
    if hasattr(d, "actor_zero_stage"):  # step 3: the actor, and the critic when there is one
        stages = [("actor_zero_stage", "--actor-zero-stage")] + (
            [("critic_zero_stage", "--critic-zero-stage")] if cfg.has_critic else [])
    else:
        stages = [("zero_stage", "--zero-stage")]
    move = [(name, flag) for name, flag in stages if getattr(d, name) == 0]
    if not move:
        return None
    candidate = dataclasses.replace(cfg, deepspeed=dataclasses.replace(
        d, **{name: 1 for name, _ in move}))
    rec = resolve_run(record.step, candidate, world_size=1, device="cuda", bf16_supported=True,
                      hub_reachable=False)
    peak = estimate_step(candidate, rec, archs=archs).peak
    if _verdict(peak, 1, target) != "fits":
        return None
    return [f"{flag} 1" for _, flag in move], peak
