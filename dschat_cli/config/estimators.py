"""Step 3's advantage estimators as a table: what each needs (a critic, a group of answers per
prompt) and its defaults, each from the paper or code that defines it. No torch import: the CLI,
the checks and `dschat plan` read it; rlhf/advantages.py holds the arithmetic.

    spec = ESTIMATORS["grpo"]            # needs_critic False, needs_group True, KL in the loss (k3)
    s = rl_settings(cfg.ppo)             # the run's settings, every "auto" resolved

| estimator            | baseline                               | KL (default)                 | loss aggregation        |
|----------------------|----------------------------------------|------------------------------|-------------------------|
| gae                  | a learned critic (GAE, lambda)         | reward, k1 per token, 0.1    | token-mean              |
| grpo                 | group mean, / group std (unbiased)     | loss, k3, 0.04               | seq-mean-token-mean     |
| dr-grpo              | group mean                             | none (0; loss, k3 if set)    | seq-mean-token-sum-norm |
| rloo                 | mean of the group's other answers      | reward, k1 summed per answer, 0.05 | token-mean        |
| reinforce++          | none; batch-whitened return-to-go      | reward, k1 per token, 0.01   | token-mean              |
| reinforce++-baseline | group mean, then batch-whitened        | reward, k1 per token, 0.01   | token-mean              |
"""

from __future__ import annotations

from dataclasses import dataclass

KL_PLACEMENTS = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class EstimatorSpec:
    name: str  # the --advantage-estimator value
    needs_critic: bool  # builds, trains, checkpoints and saves a critic
    needs_group: bool  # a baseline from the other answers to the same prompt: --samples-per-prompt >= 2
    returns_to_go: bool  # per-token rewards summed backwards with --gamma (else one scalar per answer)
    whitens: bool  # normalises the advantages over the whole experience itself
    kl_placement: str  # reward: -coef * kl in the reward; loss: + coef * kl in the actor loss
    kl_estimator: str  # k1, k2 or k3 (Schulman's "Approximating KL divergence")
    kl_coef: float  # the default --kl-ctl
    loss_aggregation: str
    source: str  # whose defaults these are


ESTIMATORS: dict[str, EstimatorSpec] = {s.name: s for s in (
    EstimatorSpec("gae", needs_critic=True, needs_group=False, returns_to_go=True, whitens=False,
                  kl_placement="reward", kl_estimator="k1", kl_coef=0.1,
                  loss_aggregation="token-mean",
                  source="DeepSpeed-Chat's PPO (Ouyang et al. 2022)"),
    EstimatorSpec("grpo", needs_critic=False, needs_group=True, returns_to_go=False, whitens=False,
                  kl_placement="loss", kl_estimator="k3", kl_coef=0.04,
                  loss_aggregation="seq-mean-token-mean",
                  source="GRPO, DeepSeekMath (Shao et al. 2024)"),
    EstimatorSpec("dr-grpo", needs_critic=False, needs_group=True, returns_to_go=False,
                  whitens=False, kl_placement="loss", kl_estimator="k3", kl_coef=0.0,
                  loss_aggregation="seq-mean-token-sum-norm",
                  source="Dr. GRPO (Liu et al. 2025)"),
    EstimatorSpec("rloo", needs_critic=False, needs_group=True, returns_to_go=False, whitens=False,
                  kl_placement="reward", kl_estimator="k1", kl_coef=0.05,
                  loss_aggregation="token-mean",
                  source="RLOO (Ahmadian et al. 2024; TRL's beta)"),
    EstimatorSpec("reinforce++", needs_critic=False, needs_group=False, returns_to_go=True,
                  whitens=True, kl_placement="reward", kl_estimator="k1", kl_coef=0.01,
                  loss_aggregation="token-mean",
                  source="REINFORCE++ (Hu 2025; OpenRLHF's defaults)"),
    EstimatorSpec("reinforce++-baseline", needs_critic=False, needs_group=True, returns_to_go=True,
                  whitens=True, kl_placement="reward", kl_estimator="k1", kl_coef=0.01,
                  loss_aggregation="token-mean",
                  source="REINFORCE++-baseline (Hu 2025; OpenRLHF's defaults)"),
)}


def estimator_spec(name: str) -> EstimatorSpec:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; one of "
                         f"{', '.join(ESTIMATORS)}") from None


@dataclass(frozen=True)
class RLSettings:
    """A run's step-3 algorithm with every default resolved for its estimator."""
    estimator: EstimatorSpec
    kl_placement: str
    kl_estimator: str
    kl_coef: float  # the starting coefficient (adaptive KL moves it from here)
    loss_aggregation: str
    cliprange_low: float
    cliprange_high: float
    dual_clip: float | None  # None: off

    @property
    def needs_critic(self) -> bool:
        return self.estimator.needs_critic


def rl_settings(ppo) -> RLSettings:
    """The settings of a PPO section (config/ppo.PPOAlgoOptions): its explicit flags, the
    estimator's defaults for the rest."""
    spec = estimator_spec(ppo.advantage_estimator)
    placement = spec.kl_placement if ppo.kl_placement == "auto" else ppo.kl_placement
    # auto: the estimator's own when its placement is kept, else the usual one for the placement
    # (k3 in a loss: non-negative, low variance; k1 in a reward: unbiased)
    auto_kl = spec.kl_estimator if placement == spec.kl_placement else \
        ("k3" if placement == "loss" else "k1")
    return RLSettings(
        estimator=spec,
        kl_placement=placement,
        kl_estimator=auto_kl if ppo.kl_estimator == "auto" else ppo.kl_estimator,
        kl_coef=spec.kl_coef if ppo.kl_ctl is None else ppo.kl_ctl,
        loss_aggregation=spec.loss_aggregation if ppo.loss_aggregation == "auto"
        else ppo.loss_aggregation,
        cliprange_low=ppo.cliprange,
        cliprange_high=ppo.cliprange if ppo.cliprange_high is None else ppo.cliprange_high,
        dual_clip=ppo.dual_clip)
