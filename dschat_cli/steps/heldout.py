"""What a policy trained without generating (DPO) says to held-out prompts, before and after.

    probe = HeldoutProbe(cfg.heldout, tokenizer, heldout_prompt_loader(...), dist, zero3=False,
                         max_prompt_seq_len=cfg.data.max_seq_len, seed=cfg.seed)
    start = probe.measure(engine.module)   # HeldoutAnswers
    start.summary("start")                 # true_reward_heldout_start(_stderr), heldout_start_n,
                                           # greedy_*_start, samples_start (train_summary.json)

One sampled answer per held-out prompt is judged by the known --true-reward (mean, standard error
and n over all ranks; answers of <= 1 token do not count, as in step 3; the sampling noise is the
same before and after, steps/common.same_draws), and the greedy answers to
the first --greedy-check-prompts prompts (what `dschat chat` would say) give the quality figures
(repeated trigrams, distinct-2, eos share, true reward) and the texts the summary shows. Step 3's
pieces without its models: the rollout generator (generation/rollout.py), the judges and
answer_quality (steps/rl/experience.py), so the figures mean what step 3's do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch

from dschat_cli.dist import Dist


class Answers(NamedTuple):
    """Generated answers, in the fields answer_quality reads (a Rollout without the scores)."""
    prompts: torch.Tensor  # (B, P) left-padded prompts
    seq: torch.Tensor  # (B, P + A) prompts and answers
    attention_mask: torch.Tensor  # (B, P + A): 1 = real token (an answer ends at its first eos)
    action_mask: torch.Tensor  # (B, A): the answer tokens that count (0 for answers of <= 1 token)
    true_scores: torch.Tensor | None  # (B,) the judge's score of each answer


@dataclass
class HeldoutAnswers:
    true_reward: float  # mean --true-reward of one sampled answer per held-out prompt
    true_reward_stderr: float
    n: int  # answers that counted
    samples: list[dict] = field(default_factory=list)  # greedy answers to the first prompts
    greedy: dict = field(default_factory=dict)  # greedy_repetition, greedy_distinct, ...

    def summary(self, when: str) -> dict:
        """The train_summary.json keys, named as step 3's; `when` = start or end."""
        return {f"true_reward_heldout_{when}": self.true_reward,
                f"true_reward_heldout_{when}_stderr": self.true_reward_stderr,
                f"heldout_{when}_n": self.n, f"samples_{when}": self.samples,
                **{f"{k}_{when}": v for k, v in self.greedy.items()}}

    def line(self) -> str:
        return (f"true reward {self.true_reward:.4f} ± {self.true_reward_stderr:.4f} "
                f"(n={self.n}), greedy answers "
                f"{self.greedy.get('greedy_true_reward', math.nan):.3f}")


def heldout_prompt_loader(data, tokenizer, dist: Dist, *, phase: int, seed: int,
                          max_prompt_seq_len: int, batch_size: int):
    """The distinct prompts of the step's eval rows (the eval part of --data-split's `phase`), left-
    padded in batches, sharded over the ranks in order; prompts longer than max_prompt_seq_len
    tokens are dropped (as step 3 drops them). None when there are none."""
    from torch.utils.data import DataLoader, DistributedSampler

    from dschat_cli.data.prepare import load_phase_rows
    from dschat_cli.data.prompts import collate_prompts, tokenize_prompts
    from dschat_cli.steps.checkpoint import own_generator

    _, eval_rows = load_phase_rows(data, phase=phase, seed=seed)
    prompts = list(dict.fromkeys(eval_rows["prompt"]))
    ids = tokenize_prompts({"prompt": prompts}, tokenizer, max_prompt_seq_len)["prompt_input_ids"]
    if not ids:
        return None
    rows = [{"prompt_input_ids": x} for x in ids]
    return DataLoader(rows, batch_size=batch_size, generator=own_generator(),
                      collate_fn=partial(collate_prompts, pad_token_id=tokenizer.pad_token_id),
                      sampler=DistributedSampler(rows, num_replicas=dist.world_size,
                                                 rank=dist.rank, shuffle=False))


class HeldoutProbe:
    def __init__(self, opts, tokenizer, loader, dist: Dist, *, zero3: bool,
                 max_prompt_seq_len: int, seed: int):
        from dschat_cli.config.ppo import PPOGenerationOptions
        from dschat_cli.steps.rl.experience import true_reward_judge

        self.opts = opts  # config/dpo.HeldoutOptions
        self.tokenizer = tokenizer
        self.loader = loader
        self.dist = dist
        self.judge = true_reward_judge(opts.true_reward)
        if self.judge is None:
            raise ValueError("HeldoutProbe needs a --true-reward")
        # step 3's sampling (temperature 1, no top-k/p) and its greedy check
        self.sampling = PPOGenerationOptions(max_answer_seq_len=opts.max_answer_seq_len,
                                             generation_engine=opts.generation_engine)
        self.zero3 = zero3
        self.max_prompt_seq_len = max_prompt_seq_len
        self.seed = seed  # of the sampling noise (steps/common.same_draws)

    def _generator(self, do_sample: bool):
        from dschat_cli.generation.rollout import RolloutGenerator

        return RolloutGenerator(dataclasses.replace(self.sampling, do_sample=do_sample),
                                self.tokenizer, max_prompt_seq_len=self.max_prompt_seq_len,
                                zero3=self.zero3, world_size=self.dist.world_size,
                                device=self.dist.device, occasional=True)

    @torch.no_grad()
    def measure(self, module) -> HeldoutAnswers:
        """Answer every held-out prompt once (sampled) and the first ones greedily; every rank
        takes part (under ZeRO-3 all must). The generators are built here and dropped after, so
        no KV cache stays allocated while the policy trains."""
        from dschat_cli.steps.common import same_draws
        from dschat_cli.steps.rl.experience import _mean_stderr, answer_quality

        was_training = module.training
        total = squares = 0.0
        count = 0
        sampled = self._generator(do_sample=True)
        for i, batch in enumerate(self.loader):
            with same_draws(self.seed, self.dist.rank, i):  # the same noise before and after
                a = self._answer(sampled, module, batch)
            kept = a.action_mask.sum(1) > 0
            x = a.true_scores[kept].double()
            count += int(kept.sum())
            total, squares = total + float(x.sum()), squares + float((x ** 2).sum())
        n = int(self.dist.all_reduce_sum(count))
        mean, stderr = _mean_stderr(self.dist.all_reduce_sum(total),
                                    self.dist.all_reduce_sum(squares), n)
        first = next(iter(self.loader))
        greedy = self._answer(self._generator(do_sample=False), module,
                              {k: v[:self.opts.greedy_check_prompts] for k, v in first.items()})
        quality = answer_quality(greedy, greedy.action_mask.sum(1) > 0,
                                 self.tokenizer.eos_token_id, self.dist)
        module.train(was_training)  # the hf engine leaves the model in eval mode
        return HeldoutAnswers(true_reward=mean, true_reward_stderr=stderr, n=n,
                              samples=self._texts(greedy),
                              greedy={f"greedy_{k}": v for k, v in quality.items()})

    def _answer(self, generator, module, batch: dict) -> Answers:
        """One answer to each prompt of the batch, cut at its first eos, judged."""
        device = next(module.parameters()).device
        prompts = batch["input_ids"].to(device)
        prompt_mask = batch["attention_mask"].to(device)
        seq = generator.generate(module, prompts, prompt_mask).seq
        P = prompts.shape[1]
        is_eos = (seq[:, P:] == self.tokenizer.eos_token_id).long()
        real = (is_eos.cumsum(1) - is_eos) == 0  # up to and with the first eos
        action_mask = real.long() * (real.sum(1, keepdim=True) > 1).long()
        attention_mask = torch.cat([prompt_mask, real.long()], dim=1)
        a = Answers(prompts, seq, attention_mask, action_mask, None)
        scores = torch.tensor([self.judge(p, r) for p, r in self._decode(a)], dtype=torch.float32)
        return a._replace(true_scores=scores.to(device))

    def _decode(self, a: Answers) -> list[tuple[str, str]]:
        """(prompt, answer) text of each row, special tokens (eos, pad) stripped."""
        P, out = a.prompts.shape[1], []
        for ids, mask in zip(a.seq.tolist(), a.attention_mask.bool().tolist()):
            prompt = [t for t, m in zip(ids[:P], mask[:P]) if m]
            answer = [t for t, m in zip(ids[P:], mask[P:]) if m]
            out.append((self.tokenizer.decode(prompt, skip_special_tokens=True),
                        self.tokenizer.decode(answer, skip_special_tokens=True)))
        return out

    def _texts(self, a: Answers) -> list[dict]:
        """[{prompt, answer, true_reward}] as step 3's samples."""
        return [{"prompt": p.strip(), "answer": r.strip(), "true_reward": float(a.true_scores[i])}
                for i, (p, r) in enumerate(self._decode(a))]
