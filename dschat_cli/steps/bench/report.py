"""`dschat bench`'s tables: a run record (the dict run() returns) printed."""

from __future__ import annotations

from dschat_cli.steps.bench.floors import DPO_PHASES
from dschat_cli.steps.bench.ppo import PPO_PHASES
from dschat_cli.ui.console import console


# the report --------------------------------------------------------------------------------------
def print_result(r: dict) -> None:
    from rich.table import Table

    c = r["ceilings"]
    console.print(f"[bold]dschat bench[/bold] {r['step']}: {r['device']}, {r['dtype']}; measured "
                  f"ceilings: matmul {_fmt(c['matmul_tflops'], '.0f')} TFLOP/s, copy "
                  f"{c['copy_gbps']:.0f} GB/s")
    if r["step"] == "dpo":
        print_dpo(r)
        return
    if r["step"] == "sft":
        t = Table(title=f"step 1: {r['actor']} ({r['actor_params'] / 1e6:.0f}M), batch "
                        f"{r['batch_size']} x {r['seq_len']} tokens per GPU, "
                        f"{r['zero']}",
                  title_justify="left")
        ph = r.get("phases") or {}
        cols = ("s/step", "forward s", "backward s", "optimizer step s", "tokens/s",
                "TFLOP/s per GPU", "x floor", "peak GiB")
        for col in cols:
            t.add_column(col, justify="right")
        t.add_row(f"{r['step_seconds']:.3f}",
                  *(_fmt(ph.get(k), ".3f") for k in ("forward", "backward", "optimizer_step")),
                  f"{r['tokens_per_s']:,.0f}", _fmt(r['tflops_per_gpu'], ".0f"),
                  f"{r['step_x_floor']:.2f}", _fmt(r["peak_memory_gib"], ".1f"))
        console.print(t)
        return
    engines = r["engines"]
    est, k = r.get("advantage_estimator", "gae"), r.get("samples_per_prompt", 1)
    zero = {role: f" ({r[role + '_zero']})" if r.get(role + "_zero") else ""
            for role in ("actor", "critic")}
    models = (f"critic {r['critic']}{zero['critic']}" if r.get("critic") else
              f"reward {r.get('reward')}, no critic ({est})")
    batch = f"{r['batch_size']} answers per GPU ({r['prompts_per_gpu']} prompts x {k})" \
        if k > 1 else f"batch {r['batch_size']} per GPU"
    micro = r.get("micro_batch_size") or r["batch_size"]
    if micro != r["batch_size"]:
        batch += (f" trained in {r['batch_size'] // micro} mini-batches of {micro} (one "
                  "optimizer step)")
    t = Table(title=f"step 3 per phase (seconds per PPO step): actor {r['actor']}"
                    f"{zero['actor']}, {models}, "
                    f"{batch}, {r['max_prompt_seq_len']} + {r['max_answer_seq_len']} tokens",
              title_justify="left")
    t.add_column("phase")
    for e in engines:
        t.add_column(f"{e} s", justify="right")
        t.add_column(f"{e} TFLOP/s", justify="right")
    t.add_column("floor s", justify="right")
    names = [p for p in PPO_PHASES if any(p in v["phases"] for v in engines.values())]
    first = next(iter(engines.values()))
    for p in names:
        row = [p.replace("_", " ")]
        for v in engines.values():
            ph = v["phases"].get(p)
            row += [_fmt(ph and ph["seconds"], ".3f"), _fmt(ph and ph["tflops"], ".0f")]
        fl = next((v["phases"][p]["floor_seconds"] for v in engines.values() if p in v["phases"]),
                  None)
        t.add_row(*row, _fmt(fl, ".3f"))
    t.add_row("other", *sum(([f"{v['other_seconds']:.3f}", ""] for v in engines.values()), []), "")
    t.add_row("[bold]step", *sum(([f"{v['step_seconds']:.3f}", _fmt(v['tflops'], ".0f")]
                                  for v in engines.values()), []),
              f"{first['floor_seconds']:.3f}")
    console.print(t)
    s = Table(title=f"step 3 summary ({est})", title_justify="left")
    for col in ("engine", "tokens/s", "answers/s", "gen", "decode ms", "floor ms", "x floor",
                "step x floor", "lp gap", "peak GiB"):
        s.add_column(col, justify="right")
    for e, v in engines.items():
        s.add_row(e, f"{v['tokens_per_s']:,.0f}", f"{v['samples_per_s']:.1f}",
                  f"{v['generation_share']:.0%}", f"{v['decode_ms']:.2f}",
                  f"{v['decode_floor_ms']:.2f}", f"{v['decode_x_floor']:.2f}",
                  f"{v['step_x_floor']:.2f}", _fmt(v["logprob_gap"], ".4f"),
                  _fmt(v["peak_memory_gib"], ".1f"))
    console.print(s)
    for e, v in engines.items():
        if v.get("decode_step"):
            console.print(f"{e} engine's decode step: {v['decode_step']}", markup=False)
    console.print("[dim]gen: generation's share of the step; decode ms: per decode step (fast) or "
                  "per generated token including the prefill (hf); floor ms: weights + KV cache at "
                  "the mean context over the measured copy bandwidth; lp gap: mean |logprob| "
                  "difference, fast engine vs forward; tokens/s: prompt + answer tokens of every "
                  "answer (sequence) of all GPUs per second[/dim]")


def print_dpo(r: dict) -> None:
    from rich.table import Table

    P, A, B = r["max_prompt_seq_len"], r["max_answer_seq_len"], r["batch_size"]
    ref = ("reference precomputed (no reference forward)" if r["reference"] == "precomputed"
           else "reference: a frozen copy")
    t = Table(title=f"DPO step per phase: policy {r['actor']} ({r['actor_params'] / 1e6:.0f}M), "
                    f"{B} pairs per GPU = {2 * B} sequences of {P} + {A} tokens (chosen and "
                    f"rejected share the prompt: pairs of 2 x {P + A} tokens), "
                    f"{r['zero']}, {ref}", title_justify="left")
    for col, just in (("phase", "left"), ("s", "right"), ("share", "right"),
                      ("TFLOP/s", "right"), ("floor s", "right"), ("x floor", "right")):
        t.add_column(col, justify=just)
    for name in DPO_PHASES:
        ph = r["phases"].get(name)
        if ph is None:
            continue
        t.add_row(name.replace("_", " "), f"{ph['seconds']:.4f}", f"{ph['share']:.0%}",
                  _fmt(ph["tflops"], ".0f"), f"{ph['floor_seconds']:.4f}",
                  f"{ph['seconds'] / ph['floor_seconds']:.2f}" if ph["floor_seconds"] else "-")
    step = r["step_seconds"]
    t.add_row("other", f"{r['other_seconds']:.4f}", f"{r['other_seconds'] / step:.0%}", "", "", "")
    t.add_row("[bold]step", f"{step:.4f}", "100%", _fmt(r["tflops_per_gpu"], ".0f"),
              f"{r['floor_seconds']:.4f}", f"{r['step_x_floor']:.2f}")
    console.print(t)
    s = Table(title="DPO summary", title_justify="left")
    for col in ("tokens/s", "pairs/s", "TFLOP/s per GPU", "step x floor", "loss", "peak GiB"):
        s.add_column(col, justify="right")
    s.add_row(f"{r['tokens_per_s']:,.0f}", f"{r['pairs_per_s']:.1f}",
              _fmt(r["tflops_per_gpu"], ".0f"), f"{r['step_x_floor']:.2f}",
              f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}", _fmt(r["peak_memory_gib"], ".1f"))
    console.print(s)
    console.print("[dim]tokens/s: the tokens of both sequences of every pair (chosen and rejected, "
                  "the shared prompt counted in each) of all GPUs per second; TFLOP/s: the "
                  "policy's forward + backward and the reference's forward, 2 x matmul "
                  "parameters + 4 x layers x hidden x sequence length per token and forward "
                  "(backward 2x), over the whole step; floor: the FLOPs at the measured matmul "
                  "speed, the optimizer step's bytes (28 per parameter) at the measured copy "
                  "bandwidth; other: the batch's copy to the GPU and the loss read back[/dim]")


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if spec == ".0f" and abs(v) < 10:  # small figures (CPU runs) keep their digits
        spec = ".3g"
    return format(v, spec)
