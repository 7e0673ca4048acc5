"""The KL to the reference model in step 3: its per-token estimate (Schulman's k1, k2, k3) and its
coefficient, fixed (DeepSpeed-Chat's --kl-ctl) or adaptive (Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences", section 2.2), which steers the KL to the reference towards
a target instead of fixing its price.

    kl_t = kl_estimate(logprobs, ref_logprobs, "k3")           # (B, A) -> (B, A) float32
    kl = kl_controller(kl_ctl=0.1, target=None)              # FixedKL(0.1)
    kl = kl_controller(kl_ctl=0.1, target=6.0, horizon=10000)  # AdaptiveKL
    rewards = kl_penalised_rewards(..., kl_ctl=kl.value, ...)
    kl.update(measured_kl, n_samples)                          # after each update

Estimators ("Approximating KL divergence", Schulman 2020), with d = logprob - ref_logprob of the
sampled token, so that the expectation under the actor's samples is KL(actor || reference):

    k1 = d                       unbiased, one sample can be negative (the reward penalty of PPO)
    k2 = d^2 / 2                 biased, >= 0, low variance
    k3 = exp(-d) - 1 + d         unbiased, >= 0, low variance (GRPO's loss term; verl's low_var_kl)

k3 is computed on d clamped to [-20, 20] and capped at 10, as verl does, so that one token the actor
has made far more likely than the reference cannot dominate a loss.

Adaptive rule, per update with measured KL `kl` (nats per answer, summed over its tokens, the log's
"kl" figure) over `n` answers:

    error = clip(kl / target - 1, -0.2, 0.2)
    value = value * (1 + error * n / horizon)

so the coefficient grows while the KL is above target and shrinks below it, by at most 20% of
n / horizon per update: with the horizon in answers, it moves by e^(+-0.2) at most over one horizon.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dschat_cli.config.estimators import KL_ESTIMATORS


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str,
                action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(actor || reference), in float32 (see the module docstring).

    logprobs, ref_logprobs: (B, A) -> (B, A) float32; differentiable in both. With action_mask
    (B, A), masked positions give 0 (d is zeroed before the arithmetic, so garbage there, even inf,
    gives neither nan values nor nan gradients); without it every position is computed.
    """
    d = logprobs.float() - ref_logprobs.float()
    if action_mask is not None:
        d = torch.where(action_mask.bool(), d, torch.zeros((), dtype=d.dtype, device=d.device))
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        d = d.clamp(-20.0, 20.0)
        # expm1(-d) = exp(-d) - 1 without the float32 cancellation near d = 0
        return (torch.expm1(-d) + d).clamp(max=10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; one of {', '.join(KL_ESTIMATORS)}")


@dataclass
class FixedKL:
    value: float

    def update(self, kl: float, n: int) -> None:
        """The fixed coefficient ignores the measured KL."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKL:
    value: float
    target: float
    horizon: float

    def update(self, kl: float, n: int) -> None:
        if kl != kl:  # nan: no answer kept, nothing measured
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def kl_controller(kl_ctl: float, target: float | None = None,
                  horizon: float = 10000.0) -> FixedKL | AdaptiveKL:
    if target is None or target <= 0:
        return FixedKL(kl_ctl)
    if horizon <= 0:
        raise ValueError(f"the adaptive KL horizon must be > 0, got {horizon}")
    return AdaptiveKL(kl_ctl, target, horizon)
