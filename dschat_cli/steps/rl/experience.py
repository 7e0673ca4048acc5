"""# 1. generate and # 2. score: one Rollout from a batch of left-padded prompts.

    maker = ExperienceMaker(models, cfg, dist)
    rollout = maker.make(batch)          # Rollout (rlhf/ppo.py documents its fields and shapes)
    heldout = maker.heldout(eval_loader) # Heldout: reward (and true reward) with n and stderr

Scoring runs the actor (old logprobs, unless the fast engine's own are used), the frozen
reference, the critic (when the estimator has one) and the frozen reward model over the generated
sequences, and with
--true-reward a known judge of the decoded answers (reported, never trained on).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dschat_cli.config.ppo import PPOConfig
from dschat_cli.dist import Dist
from dschat_cli.generation.fast import check_parity
from dschat_cli.generation.rollout import RolloutGenerator
from dschat_cli.models.reward import positions_from_mask
from dschat_cli.rlhf.logprobs import answer_logits_kwargs
from dschat_cli.rlhf.ppo import Rollout, answer_logprobs, answer_positions
from dschat_cli.rlhf.quality import distinct_ngrams, ended_with_eos, repeated_ngram_fraction
from dschat_cli.rlhf.reward import sequence_scores
from dschat_cli.steps.common import PhaseTimer, same_draws
from dschat_cli.ui.console import console


class OldLogprobsSource:
    """Where each rollout's old logprobs come from (--old-logprobs), and when the fast engine's
    own are checked against the actor's forward pass.

        source = OldLogprobsSource("auto", interval=10, switch_gap=0.03)
        use_generation, check = source.plan(rollout, engine_has_logprobs)
        news = source.observe(rollout, gap)   # after a check: what changed, in words, or None

    forward: always the forward pass; it is there anyway, so every rollout is checked.
    generation: the engine's, checked (a forward pass) on rollout 1 and every `interval`.
    auto: forward (checked) until a check's mean gap is <= switch_gap, then as generation, its
    checks counted from the switch; a later check above switch_gap goes back to the forward pass
    for the rest of the run (a gap above --parity-tolerance stops the run in every mode).
    Rollouts are numbered from 1 (the count goes on over a resume, with this state)."""

    def __init__(self, mode: str, *, interval: int, switch_gap: float):
        self.mode = mode
        self.interval = interval
        self.switch_gap = switch_gap
        self.from_generation = mode == "generation"
        self.anchor = 1  # the engine's logprobs are checked on rollouts anchor + k x interval
        self.first = 1 if mode == "generation" else None  # first rollout taking the engine's
        self.fell_back = False

    def plan(self, rollout: int, engine_has_logprobs: bool) -> tuple[bool, bool]:
        """-> (take the engine's logprobs, run the forward pass to check them)."""
        if not engine_has_logprobs:  # transformers' generate returns none
            return False, False
        if not self.from_generation:
            return False, True
        return True, (rollout - self.anchor) % self.interval == 0

    def observe(self, rollout: int, gap: float) -> str | None:
        """A check's mean gap (nats) on `rollout`: auto switches on it."""
        if self.mode != "auto" or self.fell_back:
            return None
        if not self.from_generation and gap <= self.switch_gap:
            # this rollout was just checked: the next check is `interval` rollouts on
            self.from_generation, self.anchor, self.first = True, rollout, rollout + 1
            return (f"from the fast engine's sampling pass from rollout {rollout + 1} on "
                    f"(--old-logprobs auto: rollout {rollout}'s mean gap to the forward pass "
                    f"{gap:.4f} nats <= --parity-switch-gap {self.switch_gap:g}; checked every "
                    f"{self.interval} rollouts); the actor's scoring forward is skipped")
        if self.from_generation and gap > self.switch_gap:
            self.from_generation, self.fell_back = False, True
            return (f"back to the actor's forward pass from rollout {rollout} on, for the rest "
                    f"of the run (--old-logprobs auto: mean gap {gap:.4f} nats > "
                    f"--parity-switch-gap {self.switch_gap:g})")
        return None

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run takes its old logprobs from where the
        interrupted one would have (the two runs stay equal to the last bit)."""
        return {"mode": self.mode, "from_generation": self.from_generation,
                "anchor": self.anchor, "first": self.first, "fell_back": self.fell_back}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's state (one of the same --old-logprobs mode; a checkpoint from before
        this record existed, or another mode, starts afresh: the forward pass, checked)."""
        if not state or state.get("mode") != self.mode:
            return
        self.from_generation = bool(state["from_generation"])
        self.anchor, self.first = int(state["anchor"]), state["first"]
        self.fell_back = bool(state["fell_back"])

    def describe(self, engine_has_logprobs: bool) -> str:
        """The choice so far, for the run log and the summary."""
        if not engine_has_logprobs:
            return "actor forward pass (transformers' generate returns no logprobs)"
        if self.from_generation:
            return f"fast engine's sampling pass (from rollout {self.first})"
        if self.fell_back:
            return "actor forward pass (auto fell back: a parity check was above the gap)"
        return ("actor forward pass (auto: until a parity check is within --parity-switch-gap)"
                if self.mode == "auto" else "actor forward pass")


class ExperienceMaker:
    def __init__(self, models, cfg: PPOConfig, dist: Dist, timer: PhaseTimer | None = None):
        self.m = models
        self.cfg = cfg
        self.dist = dist
        self.timer = timer or PhaseTimer(enabled=False)
        self.generator = RolloutGenerator(
            cfg.generation, models.tokenizer, max_prompt_seq_len=cfg.data.max_prompt_seq_len,
            zero3=cfg.deepspeed.actor_zero_stage == 3, world_size=dist.world_size,
            device=dist.device)
        self.rollouts = 0  # rollouts made so far (numbers the parity checks; restored on resume)
        self.last_generation_s = 0.0
        self.last_parity: tuple[float, float] | None = None  # (mean, max) logprob gap
        g = cfg.generation
        self.source = OldLogprobsSource(g.old_logprobs, interval=g.parity_check_interval,
                                        switch_gap=g.parity_switch_gap)
        self.judge = true_reward_judge(cfg.ppo.true_reward)  # (prompt, answer) -> float, or None
        self._greedy: RolloutGenerator | None = None  # for the summary's sample answers

    @torch.no_grad()
    def make(self, batch: dict, generator: RolloutGenerator | None = None,
             samples: int | None = None) -> Rollout:
        """One rollout: `samples` answers (default --samples-per-prompt) to each prompt of the
        batch, the answers to one prompt on consecutive rows (a group)."""
        # experience is scored as the policy acts: dropout off (the learner turns it back on)
        self.m.actor.eval()
        if self.m.critic is not None:
            self.m.critic.eval()
        dev = self.m.actor.device
        prompts = batch["input_ids"].to(dev)
        prompt_mask = batch["attention_mask"].to(dev)
        n = self.cfg.train.samples_per_prompt if samples is None else samples
        if n > 1:
            prompts = prompts.repeat_interleave(n, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(n, dim=0)
        self.rollouts += 1
        t0 = time.perf_counter()
        with self.timer("generation"):
            gen = (generator or self.generator).generate(self.m.actor.module, prompts,
                                                         prompt_mask)
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
                                                      position_ids=pos, use_cache=False,
                                                      **answer_logits_kwargs(self.m.ref, seq, P)
                                                      ).logits, seq, P)
        if self.m.critic is not None:
            with self.timer("critic_forward"):
                values = answer_positions(self.m.critic(seq, attention_mask, position_ids=pos), P)
        else:  # critic-free: no values (the estimator reads none)
            values = torch.zeros(action_mask.shape, dtype=torch.float32, device=seq.device)
        with self.timer("reward_forward"):
            scores = sequence_scores(self.m.reward(seq, attention_mask, position_ids=pos),
                                     attention_mask)
        true_scores = None
        if self.judge is not None:
            true_scores = torch.tensor([self.judge(p, a) for p, a in self.texts(seq, attention_mask,
                                                                                P)],
                                       dtype=torch.float32, device=scores.device)
        return Rollout(prompts=prompts, seq=seq, attention_mask=attention_mask,
                       action_mask=action_mask, logprobs=logprobs.float(),
                       ref_logprobs=ref_logprobs.float(), values=values.float().detach(),
                       scores=scores.float(), true_scores=true_scores)

    def texts(self, seq: torch.Tensor, attention_mask: torch.Tensor,
              P: int) -> list[tuple[str, str]]:
        """(prompt, answer) text of each row, special tokens (eos, pad) stripped."""
        tok = self.m.tokenizer
        out = []
        for ids, mask in zip(seq.tolist(), attention_mask.bool().tolist()):
            prompt = [t for t, m in zip(ids[:P], mask[:P]) if m]
            answer = [t for t, m in zip(ids[P:], mask[P:]) if m]
            out.append((tok.decode(prompt, skip_special_tokens=True),
                        tok.decode(answer, skip_special_tokens=True)))
        return out

    def _old_logprobs(self, gen, seq, attention_mask, pos, P: int, real) -> torch.Tensor:
        """The actor's logprobs of the answer tokens as sampled: from a forward pass (as
        DeepSpeed-Chat) or from the fast engine itself, as OldLogprobsSource decides; every
        forward pass that has the engine's logprobs beside it checks them (parity)."""
        use_generation, check = self.source.plan(self.rollouts, gen.logprobs is not None)
        if use_generation and not check:
            return gen.logprobs
        with self.timer("actor_forward"):
            logprobs = answer_logprobs(self.m.actor(input_ids=seq, attention_mask=attention_mask,
                                                    position_ids=pos, use_cache=False,
                                                    **answer_logits_kwargs(self.m.actor, seq, P)
                                                    ).logits, seq, P)
        if check:  # the engine's own logprobs must agree with the actor's forward pass
            self.last_parity = check_parity(gen.logprobs, logprobs, real.long(),
                                            tolerance=self.cfg.generation.parity_tolerance,
                                            step=self.rollouts,
                                            reduce_max=self.dist.all_reduce_max)
            news = self.source.observe(self.rollouts, self.last_parity[0])
            if news:
                console.print(f"old logprobs: {news}", markup=False)
            use_generation = use_generation and self.source.from_generation
        return gen.logprobs if use_generation else logprobs

    @torch.no_grad()
    def heldout(self, loader, greedy_prompts: int = 8) -> "Heldout":
        """The held-out figures over all ranks: the reward score (and --true-reward) of one sampled
        answer per prompt, with n and standard error; answers of <= 1 token (dropped in training)
        do not count. Plus the greedy answers to the first `greedy_prompts` prompts, what `dschat
        chat` would say: their quality figures (all ranks) and texts (rank 0's)."""
        sums = {"reward": [0.0, 0.0], "true": [0.0, 0.0]}  # [sum, sum of squares]
        count = 0
        for i, batch in enumerate(loader):
            with same_draws(self.cfg.seed, self.dist.rank, i):  # the same noise before and after
                r = self.make(batch, samples=1)
            kept = r.action_mask.sum(1) > 0
            count += int(kept.sum())
            for key, x in (("reward", r.scores), ("true", r.true_scores)):
                if x is not None:
                    x = x[kept].double()
                    sums[key][0] += float(x.sum())
                    sums[key][1] += float((x ** 2).sum())
        n = int(self.dist.all_reduce_sum(count))
        figures = {k: _mean_stderr(self.dist.all_reduce_sum(a), self.dist.all_reduce_sum(b), n)
                   for k, (a, b) in sums.items()}
        if self.judge is None:
            figures["true"] = (math.nan, math.nan)
        greedy = self.greedy_rollout(loader, greedy_prompts)
        quality = answer_quality(greedy, greedy.action_mask.sum(1) > 0,
                                 self.m.tokenizer.eos_token_id, self.dist)
        return Heldout(reward=figures["reward"][0], reward_stderr=figures["reward"][1], n=n,
                       true_reward=figures["true"][0], true_reward_stderr=figures["true"][1],
                       samples=self.samples(greedy),
                       greedy={f"greedy_{k}": v for k, v in quality.items()
                               if k != "true_reward" or greedy.true_scores is not None})

    @torch.no_grad()
    def greedy_rollout(self, loader, k: int) -> Rollout:
        """The greedy answers to the first k prompts of the loader's first batch, scored: what
        `dschat chat` would say (every rank generates; under ZeRO-3 all must)."""
        if self._greedy is None:
            g = self.cfg.generation
            self._greedy = RolloutGenerator(
                dataclasses.replace(g, do_sample=False, generation_tensor_parallel=1,
                                    generation_engine="hf" if g.generation_tensor_parallel > 1
                                    else g.generation_engine),
                self.m.tokenizer, max_prompt_seq_len=self.cfg.data.max_prompt_seq_len,
                zero3=self.cfg.deepspeed.actor_zero_stage == 3, world_size=self.dist.world_size,
                device=self.dist.device, occasional=True)
        batch = next(iter(loader))
        return self.make({key: v[:k] for key, v in batch.items()}, generator=self._greedy,
                         samples=1)

    def samples(self, r: Rollout) -> list[dict]:
        """A rollout as text: [{prompt, answer, reward (, true_reward)}]."""
        P = r.prompts.shape[1]
        return [{"prompt": p.strip(), "answer": a.strip(), "reward": float(r.scores[i]),
                 **({"true_reward": float(r.true_scores[i])} if r.true_scores is not None else {})}
                for i, (p, a) in enumerate(self.texts(r.seq, r.attention_mask, P))]


def answer_quality(exp: Rollout, kept: torch.Tensor, eos_token_id: int, dist: Dist) -> dict:
    """Repetition, diversity, eos share and the true reward of the kept answers, over all
    ranks (distinct-2 is each rank's, averaged over the ranks that kept an answer)."""
    P = exp.prompts.shape[1]
    answers, mask = exp.seq[:, P:][kept], exp.action_mask[kept]
    total = dist.all_reduce_sum
    n = total(float(len(answers)))
    distinct = distinct_ngrams(answers, mask, n=2)
    ranks = total(1.0 if distinct == distinct else 0.0)  # ranks with a finite figure
    figures = {
        "repetition": total(float(repeated_ngram_fraction(answers, mask, n=3).sum())),
        "distinct": total(distinct if distinct == distinct else 0.0),
        "eos_share": total(float(ended_with_eos(answers, mask,
                                                eos_token_id).sum())),
        "true_reward": total(float(exp.true_scores[kept].sum()))
        if exp.true_scores is not None else float("nan"),
    }
    nan = float("nan")
    return {"repetition": figures["repetition"] / n if n else nan,
            "distinct": figures["distinct"] / ranks if ranks else nan,
            "eos_share": figures["eos_share"] / n if n else nan,
            "true_reward": figures["true_reward"] / n if n else nan}


@dataclass
class Heldout:
    reward: float  # mean reward-model score of the kept answers
    reward_stderr: float
    n: int  # answers kept
    true_reward: float = math.nan  # mean --true-reward (nan without one)
    true_reward_stderr: float = math.nan
    samples: list[dict] = field(default_factory=list)  # greedy answers to the first prompts
    greedy: dict = field(default_factory=dict)  # their greedy_repetition, greedy_distinct, ...

    def summary(self, when: str) -> dict:
        """The train_summary.json keys of this evaluation, `when` = start or end."""
        return {f"reward_heldout_{when}": self.reward,
                f"reward_heldout_{when}_stderr": self.reward_stderr,
                f"heldout_{when}_n": self.n,
                f"true_reward_heldout_{when}": self.true_reward,
                f"true_reward_heldout_{when}_stderr": self.true_reward_stderr,
                f"samples_{when}": self.samples,
                **{f"{k}_{when}": v for k, v in self.greedy.items()}}

    def line(self) -> str:
        text = f"{self.reward:.4f} ± {self.reward_stderr:.4f}"
        if self.true_reward == self.true_reward:
            text += f", true reward {self.true_reward:.4f} ± {self.true_reward_stderr:.4f}"
        return text + f" (n={self.n})"


def _mean_stderr(total: float, squares: float, n: int) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    mean = total / n
    if n < 2:
        return mean, math.nan
    var = max(squares - n * mean * mean, 0.0) / (n - 1)
    return mean, math.sqrt(var / n)


def true_reward_judge(name: str) -> Callable[[str, str], float] | None:
    """--true-reward NAME -> a function (prompt text, answer text) -> float; None for none."""
    if name == "none":
        return None
    if name == "demo":
        from dschat_cli.demo.judge import true_reward

        return true_reward
    raise ValueError(f"unknown --true-reward {name!r}")
