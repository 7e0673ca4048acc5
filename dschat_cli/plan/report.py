"""How a plan is shown: the full tables of `dschat plan`, its --json form, and the short estimate every
training command prints before it launches (`launch_estimate`)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dschat_cli.plan.memory import GiB, Estimate
from dschat_cli.plan.planner import MARGIN, StepPlan, Target, verdict

STYLE = {"fits": "green", "tight": "yellow", "does not fit": "bold red", "unknown": "dim"}


def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def count(n: int) -> str:
    """1315758080 -> '1.32B', 331196416 -> '331.2M'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _zero(m) -> str:
    return f"ZeRO-{m.stage}" + (" + offload" if m.offload else "") + \
        (", fp32 grads" if m.hp_grads else "") if m.trainable else \
        ("ZeRO-3" + (" offload" if m.offload else "") if m.stage == 3 else "full copy")


def fit_line(est: Estimate, target: Target) -> Text:
    """'peak 36.3 GiB (training forward + backward) + 3.1 GiB overhead of 140.4 GiB: fits'."""
    v = verdict(est.peak, est.overhead, target.gpu_bytes)
    what = "CUDA context, NCCL and allocator" if est.world_size > 1 else "CUDA context and allocator"
    text = Text(f"peak {gib(est.peak)} GiB per GPU ({est.peak_phase}) + ~{gib(est.overhead)} GiB "
                f"{what} overhead")
    if target.gpu_bytes is None:
        text.append(": no GPU here to compare with; pass --gpu-memory GiB (e.g. 80)", "dim")
        return text
    text.append(f" vs {gib(target.gpu_bytes)} GiB ({target.source}): ")
    text.append(v, STYLE[v])
    if v == "tight":
        text.append(f" (fits, but not with the estimate's {MARGIN:.0%} margin)", "yellow")
    return text


def render(sp: StepPlan, console) -> None:
    """The full plan of one step."""
    console.rule(f"[bold]{escape(sp.title)}[/bold]: {sp.world_size} GPU(s), {sp.dtype}")
    est = sp.estimate
    if est is None:
        console.print(Text(f"memory: cannot estimate: {sp.unavailable}", style="yellow"))
    else:
        table = Table(title="memory per GPU (GiB)", title_justify="left")
        table.add_column("")
        for m in est.models:
            table.add_column(m.role, justify="right")
        rows = [
            ("model", [Text(m.source, overflow="fold") for m in est.models]),
            ("parameters", [count(m.params) for m in est.models]),
            ("trained", [count(m.trainable) if m.trainable else "frozen" for m in est.models]),
            ("sharding", [_zero(m) for m in est.models]),
            ("weights", [gib(m.weights) for m in est.models]),
            ("gradients", [gib(m.grads) for m in est.models]),
            ("optimizer states", [gib(m.optimizer) for m in est.models]),
            ("DeepSpeed buffers", [gib(m.buffers) for m in est.models]),
            ("activations + logits", [gib(m.activations) for m in est.models]),
        ]
        if any(m.hp_grads for m in est.models):  # kept for the run, unlike the gradients above
            rows.insert(6, ("fp32 gradient buffer", [gib(m.hp_grads) if m.hp_grads else "-"
                                                     for m in est.models]))
        if any(m.kv_cache for m in est.models):
            rows.append(("KV cache (generation)", [gib(m.kv_cache) if m.kv_cache else "-"
                                                   for m in est.models]))
        for label, cells in rows:
            table.add_row(label, *cells)
        console.print(table)
        phases = Table(title="peak per GPU by phase (GiB)", title_justify="left", min_width=40)
        phases.add_column("phase")
        phases.add_column("GiB", justify="right")
        for name, value in est.phases.items():
            style = "bold" if name == est.peak_phase else ""
            phases.add_row(Text(name, style=style), Text(gib(value), style=style))
        console.print(phases)
        for note in est.notes:
            console.print(Text(note, style="dim"))
        console.print(fit_line(est, sp.target))
    if sp.schedule:
        sched = Table(title="batches and steps", title_justify="left")
        sched.add_column("what")
        sched.add_column("value", justify="right")
        sched.add_column("how")
        for line in sp.schedule:
            sched.add_row(line.what, Text(line.value), Text(line.how))
        console.print(sched)
    if sp.suggestions:
        sug = Table(title="to make it fit", title_justify="left")
        for col in ("change", "flags", "peak GiB", "verdict"):
            sug.add_column(col, justify="right" if col == "peak GiB" else "left")
        for s in sp.suggestions:
            sug.add_row(Text(s.change), Text(" ".join(s.flags)), gib(s.peak),
                        Text(s.verdict, style=STYLE[s.verdict]))
        console.print(sug)


def to_json(sp: StepPlan) -> dict:
    est = sp.estimate
    out: dict = {"step": sp.step, "title": sp.title, "world_size": sp.world_size,
                 "dtype": sp.dtype, "verdict": sp.verdict,
                 "gpu_memory_gib": None if sp.target.gpu_bytes is None
                 else round(sp.target.gpu_bytes / GiB, 2),
                 "gpu_memory_source": sp.target.source, "unavailable": sp.unavailable}
    if est is not None:
        r = lambda x: round(x / GiB, 3)  # noqa: E731
        out.update({
            "peak_gib": r(est.peak), "peak_phase": est.peak_phase, "overhead_gib": r(est.overhead),
            "phases_gib": {k: r(v) for k, v in est.phases.items()},
            "models": [{"role": m.role, "model": m.source, "params": m.params,
                        "trainable": m.trainable, "zero_stage": m.stage, "offload": m.offload,
                        "weights_gib": r(m.weights), "grads_gib": r(m.grads),
                        "optimizer_gib": r(m.optimizer), "buffers_gib": r(m.buffers),
                        "activations_gib": r(m.activations), "kv_cache_gib": r(m.kv_cache)}
                       for m in est.models],
            "notes": est.notes})
    out["schedule"] = [{"what": x.what, "value": x.value, "how": x.how} for x in sp.schedule]
    out["suggestions"] = [{"change": s.change, "flags": list(s.flags),
                           "peak_gib": round(s.peak / GiB, 3), "verdict": s.verdict}
                          for s in sp.suggestions]
    return out


def launch_estimate(cfg, record, target: Target, *, console, archs=None) -> None:
    """The few lines a training command prints before it launches on GPUs: each model's memory,
    the peak against `target` (this machine's GPUs), and, when it clearly does not fit, a warning
    with the first change that would make it fit. It never stops the launch: an estimate can be
    wrong, and the run's own out-of-memory error is the final word. `record` is the run record
    the launch resolved; `archs()` gives the models' architectures when `cfg`'s model paths do not
    exist yet."""
    from dschat_cli.plan.arch import PlanUnavailable
    from dschat_cli.plan.planner import estimate_step, plan_step

    step, world_size = record.step, record.world_size
    try:
        model_archs = archs() if archs is not None else None  # else read from cfg's models
        est = estimate_step(cfg, record, archs=model_archs)
    except PlanUnavailable as e:
        hint = ("; `dschat plan pipeline` plans step 3 before steps 1 and 2 have written its "
                "models" if step == "ppo" else "")
        console.print(Text(f"memory estimate: not available ({e}){hint}", style="dim"))
        return
    console.print(Text(f"memory estimate per GPU ({est.dtype}, {world_size} GPU(s); "
                       f"`dschat plan {step}` explains it):", style="bold"))
    for m in est.models:
        parts = [("weights", m.weights), ("grads", m.grads), ("fp32 grads", m.hp_grads),
                 ("optimizer", m.optimizer),
                 ("buffers", m.buffers), ("activations", m.activations), ("KV cache", m.kv_cache)]
        body = " + ".join(f"{name} {gib(v)}" for name, v in parts if v >= 0.05 * GiB) or "0.0"
        console.print(Text(f"  {m.role} {m.source} ({count(m.params)}, {_zero(m)}): {body} GiB"))
    console.print(Text("  ").append_text(fit_line(est, target)))
    fits = verdict(est.peak, est.overhead, target.gpu_bytes)
    if step == "ppo" and fits == "fits":
        _generation_hint(cfg, record, target, console=console, archs=model_archs)
    if fits != "does not fit":
        _zero1_hint(cfg, record, target, console=console, archs=model_archs)
    else:
        sp = plan_step(cfg, record, target, archs=model_archs, count_data=False)
        fix = (f"; to fit, try {' '.join(sp.suggestions[0].flags)} (estimated peak "
               f"{gib(sp.suggestions[0].peak)} GiB)" if sp.suggestions else "")
        from dschat_cli.ui.console import warn_line

        warn_line(f"the estimated peak ({gib(est.peak)} GiB) does not fit this GPU "
                  f"({gib(target.gpu_bytes)} GiB){fix}; launching anyway: the estimate can be "
                  f"wrong. `dschat plan {step}` with the same flags shows the details")


def _zero1_hint(cfg, record, target: Target, *, console, archs=None) -> None:
    """One dim line when ZeRO-1 with fp32 gradients fits one GPU (plan/choose.py's zero1_hint)."""
    from dschat_cli.plan.choose import zero1_hint

    found = zero1_hint(cfg, record, target, archs=archs)
    if found is None:
        return
    flags, peak = found
    console.print(Text(f"  hint: {' '.join(flags)} also fits (estimated peak {gib(peak)} GiB): "
                       "ZeRO-1 accumulates the gradients in fp32 and its optimizer step tests "
                       "the global norm for inf/nan once instead of every tensor (about 6% more "
                       "tokens/s in step 3 and SFT on an H100, docs/benchmarks.md)", style="dim"))


def _generation_hint(cfg, record, target: Target, *, console, archs=None) -> None:
    """One dim line when a larger generation batch fits (plan/choose.py says why it is only a
    hint)."""
    from dschat_cli.plan.choose import larger_generation_batch

    found = larger_generation_batch(cfg, record, target, archs=archs)
    if found is None:
        return
    g, peak = found
    g0 = cfg.train.per_device_generation_batch_size
    console.print(Text(f"  hint: --per-device-generation-batch-size {g} also fits (estimated peak "
                       f"{gib(peak)} GiB): a decode step reads the weights once for the whole "
                       f"batch, so {g} prompts take about as long to generate as {g0}; it means "
                       f"{g // g0}x fewer PPO steps per epoch with the same optimizer steps",
                       style="dim"))
