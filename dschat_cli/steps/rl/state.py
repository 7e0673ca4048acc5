"""Step 3's run state: everything a checkpoint holds besides the engines, the RNG streams and the
EMA tensors, so that a resumed run continues exactly where the interrupted one was.

Checkpoints are written at update boundaries only (no rollout waiting in the experience buffer),
so the position is "`batch` prompt batches of `epoch` done".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class RunState:
    step: int = 0  # PPO steps (rollouts of the training loop) done
    epoch: int = 1  # the epoch over the prompts being read (1-based)
    batch: int = 0  # prompt batches of that epoch done
    finished: bool = False  # the loop ran to its end (a resume only re-runs the final eval)
    ema_reward: float | None = None  # EMA (0.9) of the batch reward after each update
    history: list[dict] = field(default_factory=list)  # the metrics row of every update
    gen_s: float = 0.0  # seconds spent generating (training rollouts)
    train_s: float = 0.0  # seconds spent in advantages + updates
    seconds: float = 0.0  # wall seconds of the loop so far, over resumes
    heldout_start: dict = field(default_factory=dict)  # held-out figures before PPO
                                                       # (steps/rl/experience.Heldout.summary)
    # copied from their owners when a checkpoint is written, read back on resume:
    rollouts: int = 0  # rollouts made (training and held-out): numbers the parity checks
    old_logprobs: dict | None = None  # where old logprobs come from (OldLogprobsSource.state_dict)
    last_parity: list[float] | None = None  # the last parity check's (mean, max) gap: logged
    kl_coef: float | None = None  # the KL coefficient (moves with --kl-target)
    unsup: list[int] | None = None  # position of the unsupervised data (Cycle.position)
    health: dict | None = None  # HealthMonitor.state_dict()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def update_ema_reward(self, reward: float) -> None:
        """nan (no answer kept: all <= 1 token) leaves the EMA as it was."""
        if math.isfinite(reward):
            self.ema_reward = reward if self.ema_reward is None \
                else 0.9 * self.ema_reward + 0.1 * reward
