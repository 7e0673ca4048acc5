"""How many batches and optimizer steps a run takes: one set of formulas for the training steps and
for `dschat plan` (which explains them before anything runs). No torch import.

    optimizer_steps(len(loader), cfg.optim)               # steps 1 and 2
    ppo_schedule(len(loader), cfg.train, unsupervised)    # step 3
    loader_batches(n_samples, batch, world, drop_last)    # len(loader) without building it
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def loader_batches(n_samples: int, batch_size: int, world_size: int, *, drop_last: bool) -> int:
    """Batches one rank's DataLoader yields per epoch over a DistributedSampler of `n_samples`:
    the sampler pads to a multiple of the ranks (drop_last=False: ceil(n / ranks) each) or drops
    the remainder (drop_last=True: floor(n / ranks)), and the loader does the same with batches."""
    per_rank = n_samples // world_size if drop_last else math.ceil(n_samples / world_size)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def optimizer_steps(n_batches: int, optim) -> int:
    """Steps 1 and 2: one optimizer step per --gradient-accumulation-steps batches (a partial
    group at an epoch's end still steps), --num-train-epochs times, capped by --max-steps."""
    steps = max(1, math.ceil(n_batches / optim.gradient_accumulation_steps)) * optim.num_train_epochs
    return min(steps, optim.max_steps) if optim.max_steps else steps


@dataclass(frozen=True)
class PPOSchedule:
    ppo_steps: int  # generation batches (rollouts) in the run: one "PPO step" each
    rows_per_rollout: int  # answers per rollout per GPU: prompts x --samples-per-prompt
    mini_batches: int  # mini-batches per pooled experience (--generation-batches rollouts)
    updates: int  # actor (and critic) forward/backward passes in the run
    optimizer_steps: int  # the critic's (and the actor's PPO loss) optimizer steps
    actor_steps: int  # the actor's steps: twice as many with an unsupervised loss


def ppo_schedule(n_batches: int, train, unsupervised: bool) -> PPOSchedule:
    """Step 3 over `n_batches` prompt batches per epoch (`train`: PPOConfig.train), as the loop in
    steps/ppo.py runs it: every generation batch is one PPO step, a rollout of
    --per-device-generation-batch-size prompts x --samples-per-prompt answers (rows); the
    experience of --generation-batches of them is pooled (the run's last pool may hold fewer) and
    trained on --ppo-epochs times, cut in order into mini-batches of
    --per-device-training-batch-size rows (the last one shorter if the rows do not divide). DeepSpeed steps the optimizer (and the LR
    scheduler) once per --gradient-accumulation-steps mini-batches, counted over the whole run."""
    t = train
    ppo_steps = n_batches * t.num_train_epochs
    if t.test_stop_step:
        ppo_steps = min(ppo_steps, t.test_stop_step)
    full_pools, rest = divmod(ppo_steps, t.generation_batches)
    rows = t.per_device_generation_batch_size * t.samples_per_prompt
    per_pool = math.ceil(rows * t.generation_batches / t.per_device_training_batch_size)
    last_pool = math.ceil(rows * rest / t.per_device_training_batch_size)
    updates = (full_pools * per_pool + last_pool) * t.ppo_epochs
    steps = max(1, updates // t.gradient_accumulation_steps)
    return PPOSchedule(ppo_steps=ppo_steps, rows_per_rollout=rows, mini_batches=per_pool,
                       updates=updates, optimizer_steps=steps,
                       actor_steps=steps * (2 if unsupervised else 1))
