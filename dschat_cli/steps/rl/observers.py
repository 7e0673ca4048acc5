"""What watches the step-3 loop. After every update the loop builds one Update record and hands it
to each observer in turn; none of them changes what is trained.

    GreedyProbe      every --greedy-check-interval PPO steps: greedy answers to held-out prompts
    MetricsRecorder  the metrics row (metrics.jsonl, TensorBoard, the summary's history)
    HealthWatch      the health monitor (may stop the run: before any save of this update)
    ProgressView     the progress bar's live figures, and sample answers with --print-answers
    Checkpointer     a checkpoint when --save-interval says so
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from dschat_cli.dist import Dist
from dschat_cli.rlhf.ppo import PPOStats, Rollout
from dschat_cli.steps.rl.state import RunState
from dschat_cli.ui.progress import fmt_metrics


@dataclass
class Update:
    """One update of the loop: the experience of --generation-batches rollouts, trained on."""
    state: RunState  # already counts this update's rollouts
    stats: PPOStats
    experience: Rollout  # this rank's pooled experience
    rollouts: int  # rollouts pooled
    seconds: float  # wall seconds since the previous update: rollouts, scoring and training
    generation_s: float  # of which generating
    reward_spread: float  # std of the kept answers' scores over all ranks
    grad_norms: dict[str, list[float]] = field(default_factory=dict)  # each optimizer step's
    greedy: dict = field(default_factory=dict)  # the greedy check's figures (GreedyProbe fills)
    row: dict = field(default_factory=dict)  # the metrics row (MetricsRecorder fills it)


def reward_spread(experience: Rollout, dist: Dist) -> float:
    """Standard deviation of the kept answers' reward scores over all ranks (nan with < 2)."""
    scores = experience.scores[experience.action_mask.sum(1) > 0].double()
    n = dist.all_reduce_sum(float(len(scores)))
    total = dist.all_reduce_sum(float(scores.sum()))
    squares = dist.all_reduce_sum(float((scores ** 2).sum()))
    if n < 2:
        return float("nan")
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1))


class GreedyProbe:
    """Sampled answers can look healthy (varied, no repeats) while the greedy answer, what a user
    gets from `dschat chat`, repeats one token: every --greedy-check-interval PPO steps, answer
    the first --greedy-check-prompts held-out prompts greedily and measure those answers."""

    def __init__(self, maker, heldout_loader, *, interval: int, prompts: int, eos_token_id: int,
                 dist: Dist):
        self.maker = maker
        self.loader = heldout_loader
        self.interval = interval
        self.prompts = prompts
        self.eos_token_id = eos_token_id
        self.dist = dist

    def due(self, u: Update) -> bool:
        """When this update's PPO steps reach a multiple of the interval (so a resumed run checks
        at the same steps as an uninterrupted one)."""
        n = self.interval
        return bool(n) and self.loader is not None and \
            (u.state.step - u.rollouts) // n < u.state.step // n

    def after_update(self, u: Update) -> None:
        if not self.due(u):
            return
        u.greedy.update(self.measure())

    def measure(self) -> dict:
        """{greedy_repetition, greedy_distinct, greedy_eos_share (, greedy_true_reward)}."""
        from dschat_cli.steps.rl.experience import answer_quality

        r = self.maker.greedy_rollout(self.loader, self.prompts)
        q = answer_quality(r, r.action_mask.sum(1) > 0, self.eos_token_id, self.dist)
        return {f"greedy_{k}": v for k, v in q.items()
                if k != "true_reward" or r.true_scores is not None}


class MetricsRecorder:
    def __init__(self, metrics, *, dist: Dist, models, learner, maker):
        self.metrics = metrics  # ui/metrics.MetricsLog (None off rank 0 is fine: it no-ops)
        self.dist = dist
        self.models = models
        self.learner = learner
        self.maker = maker

    def after_update(self, u: Update) -> None:
        s = u.state
        samples = u.experience.seq.shape[0] * self.dist.world_size
        tokens = samples * u.experience.seq.shape[1]  # padded, as DeepSpeed-Chat counts
        row = dict(epoch=s.epoch, **u.stats._asdict(),
                   ema_reward=float("nan") if s.ema_reward is None else s.ema_reward,
                   reward_std=u.reward_spread, seconds=u.seconds,
                   generation_share=u.generation_s / u.seconds,
                   samples_per_s=samples / u.seconds, tokens_per_s=tokens / u.seconds,
                   lr_actor=self.models.actor.get_lr()[0],
                   **{f"{k}_grad_norm": g.reported for k, g in self.learner.grad_norms.items()
                      if g.reported is not None})
        if self.maker.judge is None:  # no --true-reward: no column
            row.pop("true_reward")
        for key in self._absent():  # figures this run's algorithm does not have: no column
            row.pop(key, None)
        if self.maker.last_parity is not None:  # fast engine vs forward, last check
            row["logprob_gap"] = self.maker.last_parity[0]
        if self.learner.skipped_minibatches:
            row["skipped_minibatches"] = self.learner.skipped_minibatches
        row.update(u.greedy)
        u.row.update(row)
        s.history.append({"step": s.step, **row})
        self.metrics.log(s.step, **row)


    def _absent(self) -> list[str]:
        """The PPOStats fields that do not exist in this run (rather than logging them as nan):
        the critic's without a critic, the KL loss with the KL in the reward, the group figures
        with one answer per prompt, the dual-clip share without dual-clip."""
        cfg = self.learner.cfg
        s = cfg.ppo.settings
        absent = []
        if self.models.critic is None:
            absent += ["critic_loss", "value_clipfrac", "return_mean"]
        if s.kl_placement != "loss" or s.kl_coef == 0:
            absent.append("kl_loss")
        if cfg.train.samples_per_prompt < 2:
            absent += ["group_reward_std", "zero_std_groups"]
        if s.dual_clip is None:
            absent.append("clipfrac_lower")
        return absent


class HealthWatch:
    def __init__(self, health, *, unsupervised: bool, printer, metrics, critic: bool = True):
        self.health = health  # steps/health.HealthMonitor
        self.unsupervised = unsupervised
        self.critic = critic  # whether the run trains a critic (its loss is watched)
        self.printer = printer
        self.metrics = metrics

    def after_update(self, u: Update) -> None:
        st = u.stats
        losses = {}
        if st.minibatches:  # none computed when every mini-batch was skipped
            losses = {"actor loss": st.actor_loss}
            if self.critic:
                losses["critic loss"] = st.critic_loss
            if self.unsupervised:
                losses["unsupervised loss"] = st.unsup_loss
        self.health.act(self.health.check(
            u.state.step, losses=losses,
            grad_norms={f"{k} gradient norm": v for k, v in u.grad_norms.items()},
            kl=st.kl, answer_length=st.answer_length, ema_reward=u.state.ema_reward,
            reward_spread=u.reward_spread, repetition=st.repetition, distinct=st.distinct,
            greedy_repetition=u.greedy.get("greedy_repetition")),
            metrics=self.metrics, printer=self.printer)


class ProgressView:
    def __init__(self, progress, task, *, tokenizer, print_answers: bool, interval: int):
        self.progress = progress
        self.task = task
        self.tokenizer = tokenizer
        self.print_answers = print_answers
        self.interval = interval

    def after_rollout(self, state: RunState, rollout: Rollout) -> None:
        if self.print_answers and state.step % self.interval == 0:
            print_answer(self.progress.console, self.tokenizer, rollout)

    def after_update(self, u: Update) -> None:
        st, row = u.stats, u.row
        critic = {} if st.critic_loss != st.critic_loss else {"critic": st.critic_loss}
        self.progress.update(self.task, completed=u.state.step, metrics=fmt_metrics(
            reward=st.reward, ema=row["ema_reward"], kl=st.kl, actor=st.actor_loss,
            **critic, clip=st.clipfrac, answer_length=st.answer_length,
            **{"gen": f"{row['generation_share']:.0%}",
               "samples/s": f"{row['samples_per_s']:.1f}", "s/step": f"{u.seconds:.2f}"}))


class Checkpointer:
    def __init__(self, ckpt, engines: dict, *, ema=None, extras=None):
        self.ckpt = ckpt  # steps/checkpoint.CheckpointManager
        self.engines = engines
        self.ema = ema
        self.extras = extras or (lambda: {})  # what else the state record needs at save time

    def record(self, state: RunState) -> dict:
        return {**state.to_dict(), **self.extras()}

    def after_update(self, u: Update) -> None:
        if self.ckpt.due(u.state.step, self.engines):  # the buffer is empty: an update boundary
            self.save(u.state)

    def save(self, state: RunState) -> None:
        self.ckpt.save(state.step, self.engines, self.record(state),
                       tensors=self.ema.tensors if self.ema is not None else None)

    def save_final(self, state: RunState) -> None:
        self.ckpt.save_final(state.step, self.engines, self.record(state),
                             tensors=self.ema.tensors if self.ema is not None else None)


def print_answer(printer, tokenizer, rollout: Rollout) -> None:
    from rich.text import Text

    P = rollout.prompts.shape[1]
    prompt = tokenizer.decode(rollout.seq[0, :P][rollout.attention_mask[0, :P].bool()],
                              skip_special_tokens=True)
    answer = tokenizer.decode(rollout.seq[0, P:][rollout.attention_mask[0, P:].bool()],
                              skip_special_tokens=True)
    printer.print(Text(f"prompt: {prompt.strip()}\nanswer: {answer.strip()}  "
                       f"(reward {float(rollout.scores[0]):.3f})"))


class Clock:
    """Wall time between updates (the e2e figure of DeepSpeed-Chat's throughput line)."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds
