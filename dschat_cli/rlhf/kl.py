"""The KL coefficient of step 3: fixed (DeepSpeed-Chat's --kl-ctl) or adaptive (Ziegler et al.
2019, "Fine-Tuning Language Models from Human Preferences", section 2.2), which steers the KL to
the reference towards a target instead of fixing its price.

    kl = kl_controller(kl_ctl=0.1, target=None)              # FixedKL(0.1)
    kl = kl_controller(kl_ctl=0.1, target=6.0, horizon=10000)  # AdaptiveKL
    rewards = kl_penalised_rewards(..., kl_ctl=kl.value, ...)
    kl.update(measured_kl, n_samples)                          # after each update

Adaptive rule, per update with measured KL `kl` (nats per answer, summed over its tokens, the log's
"kl" figure) over `n` answers:

    error = clip(kl / target - 1, -0.2, 0.2)
    value = value * (1 + error * n / horizon)

so the coefficient grows while the KL is above target and shrinks below it, by at most 20% of
n / horizon per update: with the horizon in answers, it moves by e^(+-0.2) at most over one horizon.
"""

from __future__ import annotations

from dataclasses import dataclass


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
