"""# 1. generate and # 2. score: one Rollout from a batch of left-padded prompts.

    maker = ExperienceMaker(models, cfg, dist)
    rollout = maker.make(batch)          # Rollout (rlhf/ppo.py documents its fields and shapes)
    mean, n, stderr = maker.heldout_reward(eval_loader)

Scoring runs the actor (old logprobs, unless the fast engine's own are used), the frozen
reference, the critic and the frozen reward model over the generated sequences.
"""

from __future__ import annotations

import time

import torch

from dschat_cli.config.ppo import PPOConfig
from dschat_cli.dist import Dist
from dschat_cli.generation.fast import check_parity
from dschat_cli.generation.rollout import RolloutGenerator
from dschat_cli.models.reward import positions_from_mask
from dschat_cli.rlhf.ppo import Rollout, answer_logprobs, answer_positions
from dschat_cli.rlhf.reward import sequence_scores
from dschat_cli.steps.common import PhaseTimer


class ExperienceMaker:
    def __init__(self, models, cfg: PPOConfig, dist: Dist, timer: PhaseTimer | None = None):
        self.m = models
        self.cfg = cfg
        self.dist = dist
        self.timer = timer or PhaseTimer(enabled=False)
        self.generator = RolloutGenerator(
            cfg.generation, models.tokenizer, max_prompt_len=cfg.data.max_prompt_seq_len,
            zero3=cfg.deepspeed.actor_zero_stage == 3, world_size=dist.world_size)
        self.rollouts = 0  # rollouts made so far (numbers the parity checks; restored on resume)
        self.last_generation_s = 0.0
        self.last_parity: tuple[float, float] | None = None  # (mean, max) logprob gap

    @torch.no_grad()
    def make(self, batch: dict) -> Rollout:
        # experience is scored as the policy acts: dropout off (the learner turns it back on)
        self.m.actor.eval()
        self.m.critic.eval()
        dev = self.m.actor.device
        prompts = batch["input_ids"].to(dev)
        prompt_mask = batch["attention_mask"].to(dev)
        self.rollouts += 1
        t0 = time.perf_counter()
        with self.timer("generation"):
            gen = self.generator.generate(self.m.actor.module, prompts, prompt_mask)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.last_generation_s = time.perf_counter() - t0
        seq, P = gen.seq, prompts.shape[1]
        # an answer ends at its first eos (kept); what follows is padding
        is_eos = (seq[:, P:] == self.m.tokenizer.eos_token_id).long()
        real = (is_eos.cumsum(1) - is_eos) == 0
        # answers of <= 1 token are dropped: they stay in the batch (so every rank keeps the same
        # number of rows and mini-batches) but their action mask is zero: no loss, no statistics
        action_mask = real.long() * (real.sum(1, keepdim=True) > 1).long()
        attention_mask = torch.cat([prompt_mask, real.long()], dim=1)
        pos = positions_from_mask(attention_mask)

        logprobs = self._old_logprobs(gen, seq, attention_mask, pos, P, real)
        with self.timer("ref_forward"):
            ref_logprobs = answer_logprobs(self.m.ref(input_ids=seq, attention_mask=attention_mask,
                                                      position_ids=pos, use_cache=False).logits,
                                           seq, P)
        with self.timer("critic_forward"):
            values = answer_positions(self.m.critic(seq, attention_mask, position_ids=pos), P)
        with self.timer("reward_forward"):
            scores = sequence_scores(self.m.reward(seq, attention_mask, position_ids=pos),
                                     attention_mask)
        return Rollout(prompts=prompts, seq=seq, attention_mask=attention_mask,
                       action_mask=action_mask, logprobs=logprobs.float(),
                       ref_logprobs=ref_logprobs.float(), values=values.float().detach(),
                       scores=scores.float())

    def _old_logprobs(self, gen, seq, attention_mask, pos, P: int, real) -> torch.Tensor:
        """The actor's logprobs of the answer tokens as sampled: from a forward pass (as
        DeepSpeed-Chat), or with --old-logprobs generation from the fast engine itself, checked
        against a forward pass on the first rollout and every --parity-check-interval."""
        g = self.cfg.generation
        from_generation = g.old_logprobs == "generation" and gen.logprobs is not None
        check = gen.logprobs is not None and (
            not from_generation or (self.rollouts - 1) % g.parity_check_interval == 0)
        if from_generation and not check:
            return gen.logprobs
        with self.timer("actor_forward"):
            logprobs = answer_logprobs(self.m.actor(input_ids=seq, attention_mask=attention_mask,
                                                    position_ids=pos, use_cache=False).logits,
                                       seq, P)
        if check:  # the engine's own logprobs must agree with the actor's forward pass
            self.last_parity = check_parity(gen.logprobs, logprobs, real.long(),
                                            tolerance=g.parity_tolerance, step=self.rollouts)
        return gen.logprobs if from_generation else logprobs

    @torch.no_grad()
    def heldout_reward(self, loader) -> tuple[float, int, float]:
        """(mean, n, standard error) of the reward scores of sampled answers to the held-out
        prompts, over all ranks; answers of <= 1 token (dropped in training) do not count."""
        total, squares, count = 0.0, 0.0, 0
        for batch in loader:
            r = self.make(batch)
            kept = r.scores[r.action_mask.sum(1) > 0].double()
            total += float(kept.sum())
            squares += float((kept ** 2).sum())
            count += int(kept.numel())
        total = self.dist.all_reduce_sum(total)
        squares = self.dist.all_reduce_sum(squares)
        count = int(self.dist.all_reduce_sum(count))
        if not count:
            return float("nan"), 0, float("nan")
        mean = total / count
        if count < 2:
            return mean, count, float("nan")
        var = max(squares - count * mean * mean, 0.0) / (count - 1)
        return mean, count, (var / count) ** 0.5
