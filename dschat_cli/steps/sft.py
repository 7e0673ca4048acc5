"""Step 1, supervised fine-tuning:  dschat sft --model M --data-path D --output-dir OUT

Trains the actor on prompt + chosen answer + eos (loss on the answer only with --mask-prompt,
the default), evaluates loss and perplexity each epoch (and every --eval-interval steps), and saves
a Hugging Face folder with LoRA merged. Runs on every rank; rank 0 prints and writes.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from dschat_cli.config.ds_config import zero_label
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.config.sft import SFTConfig
from dschat_cli.data.sft import collate_sft, sft_datasets
from dschat_cli.dist import Dist
from dschat_cli.models.loading import (apply_lora, load_causal_lm, load_tokenizer, optimizer_groups,
                                       save_hf_model)
from dschat_cli.steps.common import (count_params, eval_loss, flops_per_token, init_engine,
                                     make_loaders, move_batch, print_summary, seed_everything,
                                     peak_memory_gib, total_optimizer_steps,
                                     write_summary_json)
from dschat_cli.steps.checkpoint import CheckpointManager, skip_batches
from dschat_cli.steps.health import GradNorms, HealthMonitor
from rich.markup import escape

from dschat_cli.ui.console import console
from dschat_cli.ui.progress import fmt_metrics, train_progress


def run(cfg: SFTConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    # 1. setup ---------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    # resolved once before launch (config/resolved.py): where, precision, DeepSpeed config,
    # TensorBoard; the launch wrote the DeepSpeed JSON and OUT exists
    out = Path(resolved.output_dir)
    dtype, ds_config = resolved.dtype, resolved.ds_config()

    tokenizer = load_tokenizer(cfg.model)
    with console.status("tokenising data"):
        train_data, eval_data = sft_datasets(cfg.data, tokenizer, mask_prompt=cfg.mask_prompt,
                                             seed=cfg.seed)
    model = load_causal_lm(cfg.model, tokenizer, dtype=dtype, ds_config=ds_config,
                           device=dist.device)
    model = apply_lora(model, cfg.lora)
    n_params = count_params(model)
    groups = optimizer_groups(model, weight_decay=cfg.optim.weight_decay,
                              lora_lr=cfg.lora.lora_learning_rate)

    collate = partial(collate_sft, pad_token_id=tokenizer.pad_token_id)
    loader, sampler, eval_loader = make_loaders(train_data, eval_data, collate, cfg.optim, dist,
                                                cfg.seed)
    total_steps = total_optimizer_steps(len(loader), cfg.optim)
    engine = init_engine(model, groups, ds_config, cfg.optim, total_steps)
    ckpt = CheckpointManager(cfg, dist, out)
    state, _ = ckpt.load({"model": engine})  # resuming: engine, RNG; the loop continues them
    metrics = ckpt.metrics_log(out / "metrics.jsonl" if dist.is_main else None, resolved,
                               state)
    health = HealthMonitor.for_run("sft", cfg.health, dtype=dtype, out=out,
                                   is_main=dist.is_main, last_checkpoint=ckpt.latest, state=state)
    grad_norms = GradNorms(engine)
    flops_tok = flops_per_token(engine.module, n_params, resolved.max_seq_len,
                                cfg.model.gradient_checkpointing)
    console.print(f"[bold]sft[/bold] {escape(cfg.model.model)}: {n_params / 1e6:.1f}M parameters, "
                  f"{len(train_data)} train / {len(eval_data)} eval samples, "
                  f"{dist.placement}, {dtype}, {zero_label(ds_config)}, global batch "
                  f"{ds_config['train_batch_size']}, {total_steps} steps")

    # 2. train ---------------------------------------------------------------------------------
    history: list[dict] = []
    has_eval = len(eval_data) > 0
    if not has_eval:
        console.print("[warn]no eval samples for step 1 (see --data-split): evaluation skipped")

    def evaluate() -> dict:
        return eval_loss(engine, eval_loader, dist) if has_eval else {"loss": float("nan"),
                                                                      "ppl": float("nan")}

    def record_eval(epoch: int, step: int, label: str, progress) -> None:
        ev = evaluate()
        history.append({"epoch": epoch, "step": step, **ev})
        metrics.log(step, eval_loss=ev["loss"], eval_ppl=ev["ppl"])
        progress.console.print(f"{label}: eval loss {ev['loss']:.4f}, perplexity {ev['ppl']:.2f}")

    if state is None:
        first = evaluate()
        history.append({"epoch": 0, "step": 0, **first})
        metrics.log(0, eval_loss=first["loss"], eval_ppl=first["ppl"])
        if has_eval:
            console.print(f"before training: eval loss {first['loss']:.4f}, perplexity "
                          f"{first['ppl']:.2f}")
        step, epoch, batch_pos, tokens_seen, losses, seconds = 0, 1, 0, 0, [], 0.0
    else:  # continue where the checkpoint was written (a finished run: after the loop)
        history += state["history"]
        first = history[0]
        step, epoch, batch_pos, tokens_seen, losses, seconds = (
            state[k] for k in ("step", "epoch", "batch", "tokens_seen", "losses", "seconds"))
        console.print(f"resumed from {escape(str(ckpt.resume_from))}: step {step}, epoch {epoch}")
    start_epoch = cfg.optim.num_train_epochs + 1 if state and state["finished"] else epoch

    def snapshot(epoch: int, batch: int, finished: bool = False) -> dict:
        """What a checkpoint records besides engines and RNG: `batch` batches of `epoch` done."""
        return {"epoch": epoch, "batch": batch, "finished": finished, "step": step,
                "tokens_seen": tokens_seen, "losses": losses, "history": history,
                "health": health.state_dict(), "seconds": time.perf_counter() - t0}

    t0 = time.perf_counter() - seconds
    window_loss, window_n = 0.0, 0
    t_window, tok_window = time.perf_counter(), 0
    engine.train()
    with train_progress(dist.is_main) as progress:
        task = progress.add_task("sft", total=total_steps, completed=step, metrics="")
        for epoch in range(start_epoch, cfg.optim.num_train_epochs + 1):
            sampler.set_epoch(epoch)
            skip = batch_pos if epoch == start_epoch else 0
            for batch_pos, batch in enumerate(skip_batches(loader, skip), start=skip + 1):
                if step >= total_steps:  # resumed from a checkpoint of the last step
                    break
                batch = move_batch(batch, engine.device)
                loss = engine(**batch, use_cache=False).loss
                engine.backward(loss)
                # asked before step(), which moves DeepSpeed's micro-step count on to the next one
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                grad_norms.poll()
                window_loss += loss.item()
                window_n += 1
                tok_window += int(batch["attention_mask"].sum())
                if not boundary:
                    continue
                step += 1
                mean_loss = dist.all_reduce_mean(window_loss / window_n)
                tokens = int(dist.all_reduce_sum(tok_window))
                dt = time.perf_counter() - t_window
                tokens_seen += tokens
                tps = tokens / dt if dt > 0 else 0.0
                tflops = tps * flops_tok / dist.world_size / 1e12
                lr = engine.get_lr()[0]
                losses.append(mean_loss)
                norms = grad_norms.take()
                metrics.log(step, epoch=epoch, loss=mean_loss, lr=lr, tokens_per_s=tps,
                            tflops_per_gpu=tflops, **({"grad_norm": grad_norms.reported}
                                                      if grad_norms.reported is not None else {}))
                progress.update(task, advance=1, metrics=fmt_metrics(
                    epoch=epoch, loss=mean_loss, lr=lr, **{"tok/s": f"{tps:,.0f}"}))
                window_loss, window_n, tok_window, t_window = 0.0, 0, 0, time.perf_counter()
                # before any eval or save of this step: a stop leaves earlier saves as they were
                health.act(health.check(step, losses={"loss": mean_loss},
                                        grad_norms={"gradient norm": norms}),
                           metrics=metrics, printer=progress.console)
                if has_eval and cfg.eval_interval and step % cfg.eval_interval == 0:
                    record_eval(epoch, step, f"step {step}", progress)
                if ckpt.due(step, {"model": engine}):
                    ckpt.save(step, {"model": engine}, snapshot(epoch, batch_pos))
                if step >= total_steps:
                    break
            if has_eval and not (cfg.eval_interval and step % cfg.eval_interval == 0):
                record_eval(epoch, step, f"epoch {epoch}", progress)
            if step >= total_steps:
                break
    ckpt.save_final(step, {"model": engine}, snapshot(epoch, batch_pos, finished=True))
    elapsed = time.perf_counter() - t0

    # 3. save ----------------------------------------------------------------------------------
    with console.status(f"saving to {out}"):
        save_hf_model(engine.module, tokenizer, out, zero_stage=cfg.deepspeed.zero_stage,
                      is_main=dist.is_main)
    tps = tokens_seen / elapsed if elapsed > 0 else 0.0
    result = {
        "steps": step, "epochs_run": epoch, "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None, "eval_loss_start": first["loss"],
        "eval_ppl_start": first["ppl"], "eval_loss_end": history[-1]["loss"],
        "eval_ppl_end": history[-1]["ppl"], "tokens_per_s": tps,
        "tflops_per_gpu": tps * flops_tok / dist.world_size / 1e12, "seconds": elapsed,
        "world_size": dist.world_size, "params": n_params, "output_dir": str(out),
        "evals": history, "status": "completed", "anomalies": health.history,
        "health": health.state_dict(), "lr_changes": ckpt.lr_changes,
        "peak_memory_gib": peak_memory_gib(dist),
    }
    if dist.is_main:
        write_summary_json(out, result)
    metrics.close()
    print_summary("sft summary", [
        ("optimizer steps", f"{step}"),
        ("train loss (first -> last step)", f"{result['train_loss_first']:.4f} -> "
                                            f"{result['train_loss_last']:.4f}" if losses else "-"),
        ("eval loss (start -> end)", f"{first['loss']:.4f} -> {history[-1]['loss']:.4f}"),
        ("eval perplexity (start -> end)", f"{first['ppl']:.2f} -> {history[-1]['ppl']:.2f}"),
        ("throughput", f"{tps:,.0f} tokens/s, {result['tflops_per_gpu']:.1f} TFLOP/s per GPU"),
        ("time", f"{elapsed:.1f} s"),
        ("saved", str(out)),
        *ckpt.summary_rows(),
        *health.summary_rows(),
    ])
    dist.barrier()
    return result
