"""Step 2, reward model:  dschat reward --model M --data-path D --output-dir OUT

Trains backbone + value head on chosen/rejected pairs (phase 2 of the data split) with the pairwise
loss, evaluates mean chosen score, mean rejected score and accuracy (chosen > rejected) before
training, each epoch and every --eval-interval steps, and saves a reward folder that
`dschat eval-reward` and step 3 load. Runs on every rank; rank 0 prints and writes.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

from dschat_cli.config.ds_config import zero_label
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.config.reward import RewardConfig
from dschat_cli.data.reward import collate_pairs, pair_drop_counts, reward_datasets
from dschat_cli.dist import Dist
from dschat_cli.models.loading import apply_lora, load_causal_lm, load_tokenizer, optimizer_groups
from dschat_cli.models.reward import RewardModel, save_reward_model
from dschat_cli.rlhf.reward import (pairwise_divergence_loss, pairwise_last_token_loss,
                                    sequence_scores)
from dschat_cli.steps.common import (count_params, init_engine, make_loaders, move_batch,
                                     print_summary, real_samples, seed_everything, total_optimizer_steps,
                                     peak_memory_gib, write_summary_json)
from dschat_cli.steps.checkpoint import CheckpointManager, skip_batches
from dschat_cli.steps.health import GradNorms, HealthMonitor
from rich.markup import escape

from dschat_cli.ui.console import console
from dschat_cli.ui.progress import fmt_metrics, train_progress


def pair_loss(values: torch.Tensor, batch: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """values (2B, T) for [chosen; rejected] -> (loss, per-pair correct (B,) bool)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0] // 2
    scores = sequence_scores(values, mask)
    if kind == "divergence":
        loss = pairwise_divergence_loss(values[:b], values[b:], ids[:b], ids[b:], mask[:b], mask[b:])
    else:
        loss = pairwise_last_token_loss(scores[:b], scores[b:])
    return loss, scores[:b] > scores[b:]


@torch.no_grad()
def evaluate_pairs(engine, loader, dist: Dist) -> dict:
    """Mean chosen score, mean rejected score, accuracy over all ranks' eval pairs."""
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # chosen, rejected, correct, pairs
    seen, n_total = 0, len(loader.dataset)
    for batch in loader:
        batch = move_batch(batch, engine.device)
        scores = sequence_scores(engine(**batch), batch["attention_mask"]).double().cpu()
        b = scores.shape[0] // 2
        keep = real_samples(dist, n_total, seen, b)  # repeats padding the ranks count 0
        seen += b
        chosen, rejected = scores[:b][keep], scores[b:][keep]
        sums += torch.tensor([chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                              len(chosen)], dtype=torch.float64)
    engine.train()
    totals = [dist.all_reduce_sum(float(x)) for x in sums]
    n = totals[3]
    if not n:
        return {"chosen": float("nan"), "rejected": float("nan"), "accuracy": float("nan"),
                "accuracy_stderr": float("nan"), "pairs": 0}
    accuracy = totals[2] / n
    return {"chosen": totals[0] / n, "rejected": totals[1] / n, "accuracy": accuracy,
            # a binomial proportion over n pairs: its standard error
            "accuracy_stderr": (accuracy * (1 - accuracy) / n) ** 0.5, "pairs": int(n)}


def run(cfg: RewardConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    # 1. setup ---------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    # resolved once before launch (config/resolved.py): where, precision, DeepSpeed config,
    # TensorBoard; the launch wrote the DeepSpeed JSON and OUT exists
    out = Path(resolved.output_dir)
    dtype, ds_config = resolved.dtype, resolved.ds_config()
    tokenizer = load_tokenizer(cfg.model)
    with console.status("tokenising pairs"):
        train_data, eval_data = reward_datasets(cfg.data, tokenizer, seed=cfg.seed)
    drops = pair_drop_counts(train_data)
    if drops.get("no_rejected") or drops.get("identical"):
        console.print(f"[warn]dropped {drops.get('no_rejected', 0)} training row(s) without a "
                      f"rejected answer and {drops.get('identical', 0)} with identical answers")
    backbone = load_causal_lm(cfg.model, tokenizer, dtype=dtype, ds_config=ds_config,
                              device=dist.device, backbone_only=True)
    backbone = apply_lora(backbone, cfg.lora)
    torch.manual_seed(cfg.seed)  # the value head starts identical on every rank
    model = RewardModel(backbone)
    model.v_head.to(backbone.dtype)  # only the head: the backbone may be ZeRO-3 partitioned
    n_params = count_params(model)
    groups = optimizer_groups(model, weight_decay=cfg.optim.weight_decay,
                              lora_lr=cfg.lora.lora_learning_rate)
    collate = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id)
    loader, sampler, eval_loader = make_loaders(train_data, eval_data, collate, cfg.optim, dist,
                                                cfg.seed)
    total_steps = total_optimizer_steps(len(loader), cfg.optim)
    engine = init_engine(model, groups, ds_config, cfg.optim, total_steps)
    ckpt = CheckpointManager(cfg, dist, out)
    state, _ = ckpt.load({"model": engine})  # resuming: engine, RNG; the loop continues them
    metrics = ckpt.metrics_log(out / "metrics.jsonl" if dist.is_main else None, resolved,
                               state)
    health = HealthMonitor.for_run("reward", cfg.health, dtype=dtype, out=out,
                                   is_main=dist.is_main, last_checkpoint=ckpt.latest, state=state)
    grad_norms = GradNorms(engine)
    console.print(f"[bold]reward[/bold] {escape(cfg.model.model)}: {n_params / 1e6:.1f}M parameters, "
                  f"{len(train_data)} train / {len(eval_data)} eval pairs, "
                  f"{dist.placement}, {dtype}, {zero_label(ds_config)}, global batch "
                  f"{ds_config['train_batch_size']} pairs, {total_steps} steps, {cfg.loss} loss")

    history: list[dict] = []
    has_eval = len(eval_data) > 0
    if not has_eval:
        console.print("[warn]no eval pairs for step 2 (see --data-split): evaluation skipped")

    def record_eval(epoch: int, step: int, label: str, printer) -> dict:
        ev = evaluate_pairs(engine, eval_loader, dist)
        history.append({"epoch": epoch, "step": step, **ev})
        metrics.log(step, eval_chosen=ev["chosen"], eval_rejected=ev["rejected"],
                    eval_accuracy=ev["accuracy"])
        printer.print(f"{label}: chosen {ev['chosen']:.3f}, rejected {ev['rejected']:.3f}, "
                      f"accuracy {ev['accuracy']:.3f} ({ev['pairs']} pairs)")
        return ev

    if state is None:
        first = record_eval(0, 0, "before training", console) if has_eval else None
        step, epoch, batch_pos, pairs_seen, tokens_seen, seconds = 0, 1, 0, 0, 0, 0.0
        losses: list[float] = []
    else:  # continue where the checkpoint was written (a finished run: after the loop)
        history += state["history"]
        first, step, epoch, batch_pos, pairs_seen, tokens_seen, seconds, losses = (
            state[k] for k in ("first", "step", "epoch", "batch", "pairs_seen", "tokens_seen",
                               "seconds", "losses"))
        console.print(f"resumed from {escape(str(ckpt.resume_from))}: step {step}, epoch {epoch}")
    start_epoch = cfg.optim.num_train_epochs + 1 if state and state["finished"] else epoch

    def snapshot(epoch: int, batch: int, finished: bool = False) -> dict:
        """What a checkpoint records besides engines and RNG: `batch` batches of `epoch` done."""
        return {"epoch": epoch, "batch": batch, "finished": finished, "first": first,
                "pairs_seen": pairs_seen, "tokens_seen": tokens_seen, "losses": losses,
                "history": history, "health": health.state_dict(),
                "seconds": time.perf_counter() - t0}

    # 2. train ---------------------------------------------------------------------------------
    t0 = time.perf_counter() - seconds
    win_loss, win_correct, win_pairs, win_n, win_tokens = 0.0, 0, 0, 0, 0
    t_win = time.perf_counter()
    engine.train()
    with train_progress(dist.is_main) as progress:
        task = progress.add_task("reward", total=total_steps, completed=step, metrics="")
        for epoch in range(start_epoch, cfg.optim.num_train_epochs + 1):
            sampler.set_epoch(epoch)
            skip = batch_pos if epoch == start_epoch else 0
            for batch_pos, batch in enumerate(skip_batches(loader, skip), start=skip + 1):
                if step >= total_steps:  # resumed from a checkpoint of the last step
                    break
                batch = move_batch(batch, engine.device)
                loss, correct = pair_loss(engine(**batch), batch, cfg.loss)
                engine.backward(loss)
                # asked before step(), which moves DeepSpeed's micro-step count on to the next one
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                grad_norms.poll()
                win_loss += loss.item()
                win_n += 1
                win_correct += int(correct.sum())
                win_pairs += correct.numel()
                win_tokens += int(batch["attention_mask"].sum())
                if not boundary:
                    continue
                step += 1
                mean_loss = dist.all_reduce_mean(win_loss / win_n)
                pairs = dist.all_reduce_sum(win_pairs)
                acc = dist.all_reduce_sum(win_correct) / max(pairs, 1)
                tokens = dist.all_reduce_sum(win_tokens)
                dt = time.perf_counter() - t_win
                pairs_seen += int(pairs)
                tokens_seen += int(tokens)
                lr = engine.get_lr()[0]
                losses.append(mean_loss)
                norms = grad_norms.take()
                metrics.log(step, epoch=epoch, loss=mean_loss, train_accuracy=acc, lr=lr,
                            pairs_per_s=pairs / dt, tokens_per_s=tokens / dt,
                            **({"grad_norm": grad_norms.reported}
                               if grad_norms.reported is not None else {}))
                progress.update(task, advance=1, metrics=fmt_metrics(
                    epoch=epoch, loss=mean_loss, acc=acc, lr=lr, **{"pairs/s": f"{pairs / dt:,.1f}"}))
                win_loss, win_correct, win_pairs, win_n, win_tokens = 0.0, 0, 0, 0, 0
                t_win = time.perf_counter()
                # before any eval or save of this step: a stop leaves earlier saves as they were
                health.act(health.check(step, losses={"loss": mean_loss},
                                        grad_norms={"gradient norm": norms}),
                           metrics=metrics, printer=progress.console)
                if has_eval and cfg.eval_interval and step % cfg.eval_interval == 0:
                    record_eval(epoch, step, f"step {step}", progress.console)
                if ckpt.due(step, {"model": engine}):
                    ckpt.save(step, {"model": engine}, snapshot(epoch, batch_pos))
                if step >= total_steps:
                    break
            if has_eval and not (cfg.eval_interval and step % cfg.eval_interval == 0):
                record_eval(epoch, step, f"epoch {epoch}", progress.console)
            if step >= total_steps:
                break
    ckpt.save_final(step, {"model": engine}, snapshot(epoch, batch_pos, finished=True))
    elapsed = time.perf_counter() - t0

    # 3. save ----------------------------------------------------------------------------------
    with console.status(f"saving to {out}"):
        save_reward_model(engine.module, tokenizer, out, zero_stage=cfg.deepspeed.zero_stage,
                          is_main=dist.is_main)
    last = history[-1] if history else None
    result = {
        "steps": step, "epochs_run": epoch, "seconds": elapsed, "world_size": dist.world_size,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "pairs_per_s": pairs_seen / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0,
        "eval_start": first, "eval_end": last, "evals": history, "params": n_params,
        "output_dir": str(out), "status": "completed", "anomalies": health.history,
        "health": health.state_dict(), "lr_changes": ckpt.lr_changes,
        "peak_memory_gib": peak_memory_gib(dist),
    }
    if dist.is_main:
        write_summary_json(out, result)
    metrics.close()

    def fmt_eval(ev):
        return "-" if ev is None else (f"acc {ev['accuracy']:.3f} ± {ev['accuracy_stderr']:.3f} "
                                       f"(n={ev['pairs']}), chosen {ev['chosen']:.3f}, "
                                       f"rejected {ev['rejected']:.3f}")
    print_summary("reward summary", [
        ("optimizer steps", str(step)),
        ("train loss (first -> last step)",
         f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"),
        ("eval before training", fmt_eval(first)),
        ("eval after training", fmt_eval(last)),
        ("throughput", f"{result['pairs_per_s']:,.1f} pairs/s, {result['tokens_per_s']:,.0f} "
                       "tokens/s"),
        ("time", f"{elapsed:.1f} s"),
        ("saved", str(out)),
        *ckpt.summary_rows(),
        *health.summary_rows(),
    ])
    dist.barrier()
    return result
