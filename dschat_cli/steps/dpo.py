"""DPO:  dschat dpo --model M --data-path D --output-dir OUT

DeepSpeed-Chat's DPO step (step2_dpo_finetuning/main.py): chosen/rejected pairs (the step-2 part
of --data-split) train the policy straight from preferences against a frozen reference; no reward
model, no PPO. The loss, mask and metrics are pure functions in rlhf/dpo.py. Evaluates the whole
eval set (all ranks) before training, each epoch and every --eval-interval steps: loss, implicit-
reward accuracy, mean chosen and rejected rewards, their margin and the mean log-probability per
token of the chosen answers (it falls when DPO over-optimizes). With --true-reward, before and
after training the policy also answers the held-out prompts and is judged (steps/heldout.py: the
true reward of sampled answers, greedy answers; train_summary.json keys named as step 3's). Saves a
Hugging Face folder with LoRA merged, which `dschat chat` and step 3 load. Runs on every rank; rank
0 prints and writes.

The reference (config/dpo.py says which, and why): a frozen copy of the starting model (an engine
without optimizer, "ref" in the run record), its logprobs precomputed once with
--precompute-ref-logprobs (then freed), or the policy with its LoRA adapters off.
"""

from __future__ import annotations

import contextlib
import gc
import time
from functools import partial
from pathlib import Path

import torch
from rich.markup import escape

from dschat_cli.config.dpo import DPOConfig
from dschat_cli.config.ds_config import zero_label
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.data.reward import collate_pairs, pair_drop_counts, reward_datasets
from dschat_cli.dist import Dist
from dschat_cli.models.loading import (apply_lora, load_causal_lm, load_tokenizer, optimizer_groups,
                                       save_hf_model)
from dschat_cli.rlhf.dpo import (answer_masks, divergence_index, dpo_loss, pair_accuracy,
                              summed_logprobs)
from dschat_cli.rlhf.logprobs import logits_to_keep_kwarg
from dschat_cli.steps.checkpoint import CheckpointManager, own_generator, skip_batches
from dschat_cli.steps.common import (count_params, ds_initialize, flops_per_token, init_engine,
                                     make_loaders, move_batch, peak_memory_gib, print_summary,
                                     real_samples, seed_everything, total_optimizer_steps,
                                     write_summary_json)
from dschat_cli.steps.health import GradNorms, HealthMonitor
from dschat_cli.ui.console import console
from dschat_cli.ui.progress import fmt_metrics, train_progress

# the eval figures, in the order of the summary table; train_summary.json has eval_NAME_start/_end
EVAL_KEYS = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logprob",
             "rejected_logprob")


class IndexedPairs(torch.utils.data.Dataset):
    """Step-2 pairs with their row number, so precomputed reference logprobs can be looked up."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {**self.pairs[i], "index": i}


def collate_indexed_pairs(features, pad_token_id: int) -> dict:
    """collate_pairs' [chosen rows; rejected rows] (2B, T) plus "index" (B,) of the pairs."""
    batch = collate_pairs(features, pad_token_id=pad_token_id)
    batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
    return batch


def pair_logprobs(logits: torch.Tensor, batch: dict):
    """logits (2B, K, V) of the last K <= T positions of [chosen; rejected] (forward_logits) ->
    summed logprobs of the counted answer tokens (chosen (B,), rejected (B,)) and their token
    counts (chosen (B,), rejected (B,))."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, k = ids.shape[0] // 2, logits.shape[1]
    chosen_mask, rejected_mask = answer_masks(ids[:b], ids[b:], mask[:b], mask[b:])
    sums, counts = summed_logprobs(logits, ids[:, -k:],
                                   torch.cat([chosen_mask, rejected_mask])[:, -k:])
    return sums[:b], sums[b:], counts[:b], counts[b:]


def forward_logits(engine, batch: dict) -> torch.Tensor:
    """The logits (2B, K, V) from the position before the batch's first counted token on (K = T
    when a pair differs from its first token). The shared prompts before it never count, so
    their logits, fp32 copies and gradients are not made (half the logits work with a prompt as
    long as the answers). A model whose forward takes no logits_to_keep gives all T positions;
    pair_logprobs reads the same ones from either."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, T = ids.shape[0] // 2, ids.shape[1]
    start = int(divergence_index(ids[:b], ids[b:], mask[:b], mask[b:]).min())
    kw = logits_to_keep_kwarg(engine)  # None: a model that makes every position's logits
    keep = {kw: T - start + 1} if start > 1 and kw else {}
    return engine(input_ids=ids, attention_mask=mask, use_cache=False, **keep).logits


@contextlib.contextmanager
def adapters_off(engine):
    """The policy as the reference: LoRA adapters off (peft), eval mode (no dropout)."""
    was_training = engine.module.training
    engine.module.eval()
    try:
        with engine.module.disable_adapter():
            yield
    finally:
        engine.module.train(was_training)


class Reference:
    """The frozen reference's summed logprobs of a batch, -> (B, 2) float32 [chosen, rejected]:
    from a copy engine, from the policy with its adapters off, or looked up in tables precomputed
    over the train and eval pairs (then `engine` and `policy` are dropped)."""

    def __init__(self, engine=None, policy=None):
        self.engine = engine  # the copy (an engine without optimizer), or None
        self.policy = policy  # the LoRA policy engine whose base is the reference, or None
        self.tables: dict[str, torch.Tensor] | None = None  # split -> (N, 2) on the CPU

    @torch.no_grad()
    def compute(self, batch: dict) -> torch.Tensor:
        if self.engine is not None:
            logits = forward_logits(self.engine, batch)
        else:
            with adapters_off(self.policy):
                logits = forward_logits(self.policy, batch)
        chosen, rejected, _, _ = pair_logprobs(logits, batch)
        return torch.stack([chosen, rejected], dim=-1)

    def __call__(self, batch: dict, split: str) -> torch.Tensor:
        if self.tables is not None:
            return self.tables[split][batch["index"].cpu()].to(batch["input_ids"].device)
        return self.compute(batch)

    @torch.no_grad()
    def precompute(self, loaders: dict, dist: Dist) -> None:
        """Score every pair of each loader's dataset once (each rank its shard, then summed over
        ranks), and free the copy: from now on training reads the tables."""
        self.tables = {}
        for split, loader in loaders.items():
            n = len(loader.dataset)
            table = torch.zeros(n, 2, dtype=torch.float64)
            seen = torch.zeros(n, dtype=torch.float64)  # how many ranks scored each pair
            for batch in loader:
                batch = move_batch(batch, dist.device)
                idx = batch["index"].cpu()
                table[idx] = self.compute(batch).double().cpu()
                seen[idx] = 1.0  # a repeat that pads the ranks' shards is scored once per rank
            table, seen = _all_reduce_sum(table, dist), _all_reduce_sum(seen, dist)
            self.tables[split] = (table / seen.clamp(min=1).unsqueeze(-1)).float()
        self.engine = self.policy = None


def _all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    import torch.distributed as tdist

    if not (tdist.is_initialized() and dist.world_size > 1):
        return t
    t = t.to(dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.cpu()


def _release(engine) -> None:
    """Drop an engine's hooks and partitions (the caller drops its last reference)."""
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        destroy()


@torch.no_grad()
def evaluate_pairs(engine, loader, dist: Dist, reference: Reference, cfg: DPOConfig) -> dict:
    """The DPO figures over all ranks' eval pairs, each pair counted once (EVAL_KEYS, "pairs" and
    "accuracy_stderr"). Rewards are per pair means; logprobs are per counted answer token."""
    engine.eval()
    d = cfg.dpo
    # loss, accuracy, chosen reward, rejected reward, chosen logp, chosen tokens, rejected logp,
    # rejected tokens, pairs
    sums = torch.zeros(9, dtype=torch.float64)
    seen, n_total = 0, len(loader.dataset)
    for batch in loader:
        batch = move_batch(batch, engine.device)
        pc, pr, nc, nr = pair_logprobs(forward_logits(engine, batch), batch)
        ref = reference(batch, "eval")
        out = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta=d.beta,
                       label_smoothing=d.label_smoothing, loss_type=d.loss_type)
        keep = real_samples(dist, n_total, seen, pc.shape[0]).to(pc.device)
        seen += pc.shape[0]
        parts = [out.losses, pair_accuracy(out.chosen_rewards, out.rejected_rewards),
                 out.chosen_rewards, out.rejected_rewards, pc, nc, pr, nr]
        sums += torch.tensor([float(p[keep].double().sum()) for p in parts] + [int(keep.sum())],
                             dtype=torch.float64)
    engine.train()
    t = [dist.all_reduce_sum(float(x)) for x in sums]
    n = t[8]
    if not n:
        return {**{k: float("nan") for k in EVAL_KEYS}, "accuracy_stderr": float("nan"),
                "pairs": 0}
    accuracy = t[1] / n
    return {"loss": t[0] / n, "accuracy": accuracy, "chosen_reward": t[2] / n,
            "rejected_reward": t[3] / n, "margin": (t[2] - t[3]) / n,
            "chosen_logprob": t[4] / max(t[5], 1.0), "rejected_logprob": t[6] / max(t[7], 1.0),
            # a proportion over n pairs: its standard error
            "accuracy_stderr": (max(accuracy * (1 - accuracy), 0.0) / n) ** 0.5, "pairs": int(n)}


def _fixed_order_loader(data, collate, batch_size: int, dist: Dist):
    """Every pair once, in order, sharded over the ranks (for the precompute)."""
    from torch.utils.data import DataLoader, DistributedSampler

    return DataLoader(data, batch_size=batch_size, collate_fn=collate, generator=own_generator(),
                      sampler=DistributedSampler(data, num_replicas=dist.world_size,
                                                 rank=dist.rank, shuffle=False))


def run(cfg: DPOConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    # 1. setup ---------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    # resolved once before launch (config/resolved.py): where, precision, DeepSpeed configs,
    # TensorBoard; the launch wrote the DeepSpeed JSON and OUT exists
    out = Path(resolved.output_dir)
    dtype, ds_config = resolved.dtype, resolved.ds_config()
    tokenizer = load_tokenizer(cfg.model)
    with console.status("tokenising pairs"):
        train_pairs, eval_pairs = reward_datasets(cfg.data, tokenizer, seed=cfg.seed)
    drops = pair_drop_counts(train_pairs)
    if drops.get("no_rejected") or drops.get("identical"):
        console.print(f"[warn]dropped {drops.get('no_rejected', 0)} training row(s) without a "
                      f"rejected answer and {drops.get('identical', 0)} with identical answers")
    train_data, eval_data = IndexedPairs(train_pairs), IndexedPairs(eval_pairs)
    collate = partial(collate_indexed_pairs, pad_token_id=tokenizer.pad_token_id)
    loader, sampler, eval_loader = make_loaders(train_data, eval_data, collate, cfg.optim, dist,
                                                cfg.seed)
    has_eval = len(eval_data) > 0
    precompute = {"train": _fixed_order_loader(train_data, collate,
                                               cfg.optim.per_device_eval_batch_size, dist),
                  **({"eval": eval_loader} if has_eval else {})}

    # The reference copy first, with the same seed as the policy below (--random-init, new
    # embedding rows: both start from the same weights); the precompute frees it before the
    # policy is built.
    reference = Reference()
    if cfg.reference_copy:
        if cfg.lora.lora_dim > 0:
            console.print("[dim]LoRA trains the base weights too (no --only-optimize-lora): the "
                          "reference is a frozen copy of the starting model[/dim]")
        torch.manual_seed(cfg.seed)
        ref_model = load_causal_lm(_frozen(cfg.model), tokenizer, dtype=dtype,
                                   ds_config=resolved.ds_config("ref"), device=dist.device)
        ref_engine = _frozen_engine(ref_model, resolved.ds_config("ref"))
        reference.engine = ref_engine
        del ref_model
        if cfg.reference.precompute_ref_logprobs:
            with console.status("scoring the pairs with the reference (once)"):
                reference.precompute(precompute, dist)
            _release(ref_engine)
            del ref_engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(cfg.model, tokenizer, dtype=dtype, ds_config=ds_config,
                           device=dist.device)
    model = apply_lora(model, cfg.lora)
    n_params = count_params(model)
    groups = optimizer_groups(model, weight_decay=cfg.optim.weight_decay,
                              lora_lr=cfg.lora.lora_learning_rate)
    total_steps = total_optimizer_steps(len(loader), cfg.optim)
    engine = init_engine(model, groups, ds_config, cfg.optim, total_steps)
    if cfg.reference_is_base:
        reference.policy = engine
        if cfg.reference.precompute_ref_logprobs:  # before any update: the base as it starts
            with console.status("scoring the pairs with the reference (once)"):
                reference.precompute(precompute, dist)
    ckpt = CheckpointManager(cfg, dist, out)
    state, _ = ckpt.load({"model": engine})  # resuming: engine, RNG; the loop continues them
    metrics = ckpt.metrics_log(out / "metrics.jsonl" if dist.is_main else None, resolved,
                               state)
    health = HealthMonitor.for_run("dpo", cfg.health, dtype=dtype, out=out,
                                   is_main=dist.is_main, last_checkpoint=ckpt.latest, state=state)
    grad_norms = GradNorms(engine)
    # policy forward + backward, plus the reference's forward pass unless precomputed
    flops_tok = flops_per_token(engine.module, n_params, resolved.max_seq_len,
                                cfg.model.gradient_checkpointing)
    if reference.tables is None:
        flops_tok += flops_per_token(engine.module, n_params, resolved.max_seq_len, False) / 3
    ref_text = ("precomputed reference" if reference.tables is not None else
                "reference = policy with adapters off" if cfg.reference_is_base else
                "reference copy" + (" (offloaded)" if cfg.reference.offload_reference_model
                                    else ""))
    console.print(f"[bold]dpo[/bold] {escape(cfg.model.model)}: {n_params / 1e6:.1f}M parameters, "
                  f"{len(train_data)} train / {len(eval_data)} eval pairs, {dist.placement}, "
                  f"{dtype}, {zero_label(ds_config)}, global batch "
                  f"{ds_config['train_batch_size']} pairs, {total_steps} steps, "
                  f"{cfg.dpo.loss_type} loss, beta {cfg.dpo.beta:g}, {ref_text}")

    # with --true-reward: what the policy says to held-out prompts, before and after
    probe = _heldout_probe(cfg, tokenizer, dist)

    history: list[dict] = []
    if not has_eval:
        console.print("[warn]no eval pairs for DPO (the step-2 part of --data-split): evaluation "
                      "skipped")

    def record_eval(epoch: int, step: int, label: str, printer) -> dict:
        ev = evaluate_pairs(engine, eval_loader, dist, reference, cfg)
        history.append({"epoch": epoch, "step": step, **ev})
        metrics.log(step, **{f"eval_{k}": ev[k] for k in EVAL_KEYS})
        printer.print(f"{label}: {fmt_eval(ev)}", markup=False)
        return ev

    if state is None:
        first = record_eval(0, 0, "before training", console) if has_eval else None
        heldout_start = _measure(probe, engine, "before training")
        step, epoch, batch_pos, pairs_seen, tokens_seen, seconds = 0, 1, 0, 0, 0, 0.0
        losses: list[float] = []
    else:  # continue where the checkpoint was written (a finished run: after the loop)
        history += state["history"]
        first, step, epoch, batch_pos, pairs_seen, tokens_seen, seconds, losses = (
            state[k] for k in ("first", "step", "epoch", "batch", "pairs_seen", "tokens_seen",
                               "seconds", "losses"))
        heldout_start = state.get("heldout_start")
        console.print(f"resumed from {escape(str(ckpt.resume_from))}: step {step}, epoch {epoch}")
    start_epoch = cfg.optim.num_train_epochs + 1 if state and state["finished"] else epoch

    def snapshot(epoch: int, batch: int, finished: bool = False) -> dict:
        """What a checkpoint records besides engines and RNG: `batch` batches of `epoch` done."""
        return {"epoch": epoch, "batch": batch, "finished": finished, "first": first,
                "pairs_seen": pairs_seen, "tokens_seen": tokens_seen, "losses": losses,
                "history": history, "health": health.state_dict(),
                "heldout_start": heldout_start,
                "seconds": time.perf_counter() - t0}

    # 2. train ---------------------------------------------------------------------------------
    d = cfg.dpo
    t0 = time.perf_counter() - seconds
    # this rank's sums since the last optimizer step: loss (per micro-batch), then per pair:
    # correct, chosen reward, rejected reward, pairs; and real tokens
    win = dict(loss=0.0, n=0, correct=0.0, chosen=0.0, rejected=0.0, pairs=0, tokens=0)
    t_win = time.perf_counter()
    engine.train()
    with train_progress(dist.is_main) as progress:
        task = progress.add_task("dpo", total=total_steps, completed=step, metrics="")
        for epoch in range(start_epoch, cfg.optim.num_train_epochs + 1):
            sampler.set_epoch(epoch)
            skip = batch_pos if epoch == start_epoch else 0
            for batch_pos, batch in enumerate(skip_batches(loader, skip), start=skip + 1):
                if step >= total_steps:  # resumed from a checkpoint of the last step
                    break
                batch = move_batch(batch, engine.device)
                ref = reference(batch, "train")  # (B, 2), no grad
                pc, pr, _, _ = pair_logprobs(forward_logits(engine, batch), batch)
                out_ = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta=d.beta,
                                label_smoothing=d.label_smoothing, loss_type=d.loss_type)
                engine.backward(out_.loss)
                # asked before step(), which moves DeepSpeed's micro-step count on to the next one
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                grad_norms.poll()
                win["loss"] += out_.loss.item()
                win["n"] += 1
                win["correct"] += float(pair_accuracy(out_.chosen_rewards,
                                                      out_.rejected_rewards).sum())
                win["chosen"] += float(out_.chosen_rewards.sum())
                win["rejected"] += float(out_.rejected_rewards.sum())
                win["pairs"] += pc.shape[0]
                win["tokens"] += int(batch["attention_mask"].sum())
                if not boundary:
                    continue
                step += 1
                mean_loss = dist.all_reduce_mean(win["loss"] / win["n"])
                pairs = dist.all_reduce_sum(win["pairs"])
                acc = dist.all_reduce_sum(win["correct"]) / max(pairs, 1)
                chosen = dist.all_reduce_sum(win["chosen"]) / max(pairs, 1)
                rejected = dist.all_reduce_sum(win["rejected"]) / max(pairs, 1)
                tokens = dist.all_reduce_sum(win["tokens"])
                dt = time.perf_counter() - t_win
                pairs_seen += int(pairs)
                tokens_seen += int(tokens)
                tps = tokens / dt if dt > 0 else 0.0
                lr = engine.get_lr()[0]
                losses.append(mean_loss)
                norms = grad_norms.take()
                metrics.log(step, epoch=epoch, loss=mean_loss, train_accuracy=acc,
                            chosen_reward=chosen, rejected_reward=rejected,
                            margin=chosen - rejected, lr=lr, pairs_per_s=pairs / dt,
                            tokens_per_s=tps, tflops_per_gpu=tps * flops_tok / dist.world_size
                            / 1e12, **({"grad_norm": grad_norms.reported}
                                       if grad_norms.reported is not None else {}))
                progress.update(task, advance=1, metrics=fmt_metrics(
                    epoch=epoch, loss=mean_loss, acc=acc, margin=chosen - rejected, lr=lr,
                    **{"pairs/s": f"{pairs / dt:,.1f}"}))
                win = dict.fromkeys(win, 0)
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
    heldout_end = _measure(probe, engine, "after training")

    # 3. save ----------------------------------------------------------------------------------
    with console.status(f"saving to {out}"):
        save_hf_model(engine.module, tokenizer, out, zero_stage=cfg.deepspeed.zero_stage,
                      is_main=dist.is_main)
    last = history[-1] if history else None
    tps = tokens_seen / elapsed if elapsed > 0 else 0.0
    result = {
        "steps": step, "epochs_run": epoch, "seconds": elapsed, "world_size": dist.world_size,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        **{f"eval_{k}_start": first[k] if first else None for k in EVAL_KEYS},
        **{f"eval_{k}_end": last[k] if last else None for k in EVAL_KEYS},
        "eval_accuracy_stderr_start": first["accuracy_stderr"] if first else None,
        "eval_accuracy_stderr_end": last["accuracy_stderr"] if last else None,
        "eval_pairs": last["pairs"] if last else 0,
        "pairs_per_s": pairs_seen / elapsed if elapsed > 0 else 0.0, "tokens_per_s": tps,
        "tflops_per_gpu": tps * flops_tok / dist.world_size / 1e12,
        "reference": ("precomputed" if reference.tables is not None else
                      "adapters-off" if cfg.reference_is_base else "copy"),
        "evals": history, "params": n_params, "output_dir": str(out), "status": "completed",
        "anomalies": health.history, "health": health.state_dict(),
        "lr_changes": ckpt.lr_changes, "peak_memory_gib": peak_memory_gib(dist),
        **(heldout_start or {}), **(heldout_end or {}),
    }
    if dist.is_main:
        write_summary_json(out, result)
    metrics.close()

    def start_end(key: str, fmt: str) -> str:
        if first is None or last is None:
            return "-"
        return f"{first[key]:{fmt}} -> {last[key]:{fmt}}"

    n = f" (n={last['pairs']})" if last else ""
    print_summary("dpo summary", [
        ("optimizer steps", str(step)),
        ("train loss (first -> last step)",
         f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"),
        (f"eval loss{n}", start_end("loss", ".4f")),
        (f"eval accuracy{n}", start_end("accuracy", ".3f")
         + (f" ± {last['accuracy_stderr']:.3f}" if last else "")),
        ("eval chosen reward", start_end("chosen_reward", ".3f")),
        ("eval rejected reward", start_end("rejected_reward", ".3f")),
        ("eval margin", start_end("margin", ".3f")),
        ("eval chosen logprob / token", start_end("chosen_logprob", ".3f")),
        ("throughput", f"{result['pairs_per_s']:,.1f} pairs/s, {tps:,.0f} tokens/s, "
                       f"{result['tflops_per_gpu']:.1f} TFLOP/s per GPU"),
        ("reference", ref_text),
        *_heldout_rows(cfg, heldout_start, heldout_end),
        ("time", f"{elapsed:.1f} s"),
        ("saved", str(out)),
        *ckpt.summary_rows(),
        *health.summary_rows(),
    ])
    dist.barrier()
    return result


def _heldout_probe(cfg: DPOConfig, tokenizer, dist: Dist):
    """The held-out check of --true-reward (steps/heldout.py): the distinct prompts of the eval
    pairs (the step-2 part of the data, as the pairs); None without --true-reward or prompts."""
    if cfg.heldout.true_reward == "none":
        return None
    from dschat_cli.steps.heldout import HeldoutProbe, heldout_prompt_loader

    loader = heldout_prompt_loader(cfg.data, tokenizer, dist, phase=2, seed=cfg.seed,
                                   max_prompt_seq_len=cfg.data.max_seq_len,
                                   batch_size=cfg.optim.per_device_eval_batch_size)
    if loader is None:
        console.print("[warn]no held-out prompts (the eval pairs of the step-2 part of "
                      "--data-split): --true-reward has nothing to judge")
        return None
    return HeldoutProbe(cfg.heldout, tokenizer, loader, dist,
                        zero3=cfg.deepspeed.zero_stage == 3,
                        max_prompt_seq_len=cfg.data.max_seq_len, seed=cfg.seed)


def _measure(probe, engine, label: str) -> dict | None:
    """The held-out figures as train_summary.json keys (`_start` before training, `_end` after)."""
    if probe is None:
        return None
    with console.status(f"answering the held-out prompts ({label})"):
        answers = probe.measure(engine.module)
    console.print(f"held-out answers {label}: {answers.line()}", markup=False)
    return answers.summary("start" if label.startswith("before") else "end")


def _heldout_rows(cfg: DPOConfig, start: dict | None, end: dict | None) -> list[tuple[str, str]]:
    """The summary's rows of the held-out check, as step 3's: the true reward of sampled answers,
    the greedy answers' figures, and two greedy answers before and after."""
    if not start or not end:
        return []

    def pm(d: dict, key: str) -> str:
        return f"{d[key]:.4f} ± {d[key + '_stderr']:.4f}"

    rows = [(f"held-out true reward, {cfg.heldout.true_reward} (before -> after)",
             f"{pm(start, 'true_reward_heldout_start')} -> {pm(end, 'true_reward_heldout_end')} "
             f"(n={end['heldout_end_n']}, ± one standard error)"),
            ("greedy answers to held-out prompts (before -> after)",
             f"true reward {start['greedy_true_reward_start']:.3f} -> "
             f"{end['greedy_true_reward_end']:.3f}, repeated trigrams "
             f"{start['greedy_repetition_start']:.3f} -> {end['greedy_repetition_end']:.3f}, "
             f"distinct-2 {start['greedy_distinct_start']:.3f} -> "
             f"{end['greedy_distinct_end']:.3f}")]
    for before, after in list(zip(start["samples_start"], end["samples_end"]))[:2]:
        rows.append((f"greedy answer to: {after['prompt']}",
                     f"before: {before['answer']}\nafter:  {after['answer']}"))
    return rows


def fmt_eval(ev: dict) -> str:
    return (f"loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.3f}, chosen "
            f"{ev['chosen_reward']:.3f}, rejected {ev['rejected_reward']:.3f}, margin "
            f"{ev['margin']:.3f}, chosen logprob/token {ev['chosen_logprob']:.3f} "
            f"({ev['pairs']} pairs)")


def _frozen(opts):
    """The reference's model options: no gradient checkpointing (it only runs in eval mode)."""
    import dataclasses

    return dataclasses.replace(opts, gradient_checkpointing=False)


def _frozen_engine(model, config: dict):
    """An engine without optimizer (partitioned under ZeRO-3, offloaded with offload_param), in
    eval mode; it only runs under no_grad."""
    engine = ds_initialize(model=model, config=config)
    engine.eval()
    return engine
