"""--enable-ema: an exponential moving average of the actor's parameters (DeepSpeed-Chat's 0.992),
kept in fp32 on rank 0: on the GPU beside the model, or on the CPU under ZeRO-3 where the model
itself is partitioned. Saved as actor_ema/ and carried in checkpoints."""

from __future__ import annotations

import contextlib

import torch

from dschat_cli.rlhf.ppo import ema_update


class ActorEMA:
    def __init__(self, actor_engine, *, zero3: bool, is_main: bool, beta: float = 0.992):
        self.engine = actor_engine
        self.zero3 = zero3
        self.is_main = is_main
        self.beta = beta
        self.tensors: dict[str, torch.Tensor] | None = self._copy(to_cpu=zero3)

    def _params(self):
        """(name, full parameter) pairs; every rank iterates (ZeRO-3 gathers each in turn)."""
        import deepspeed

        for name, p in self.engine.module.named_parameters():
            ctx = (deepspeed.zero.GatheredParameters([p], modifier_rank=None)
                   if self.zero3 else contextlib.nullcontext())
            with ctx:
                yield name, p

    @torch.no_grad()
    def _copy(self, to_cpu: bool) -> dict[str, torch.Tensor] | None:
        out = {}
        for name, p in self._params():
            if self.is_main:
                out[name] = p.detach().float().to("cpu" if to_cpu else p.device, copy=True)
        return out if self.is_main else None

    @torch.no_grad()
    def update(self) -> None:
        """ema = beta * ema + (1 - beta) * actor, after an actor update (every rank calls it)."""
        for name, p in self._params():
            if self.tensors is not None:
                ema_update([self.tensors[name]], [p.detach().float().to(self.tensors[name].device)],
                           beta=self.beta)

    def load(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Restore from a checkpoint's tensors (rank 0 holds them)."""
        if tensors is not None and self.tensors is not None:
            self.tensors = {k: tensors[k].to(v.device) for k, v in self.tensors.items()}

    def state_dict(self, zero_stage: int) -> dict | None:
        """The actor's full state with the EMA parameters, on rank 0 (every rank calls it)."""
        from dschat_cli.models.loading import gathered_state_dict

        sd = gathered_state_dict(self.engine.module, zero_stage=zero_stage, is_main=self.is_main)
        if sd is None or self.tensors is None:
            return None
        for name, value in self.tensors.items():
            sd[name] = value.to(device="cpu", dtype=sd[name].dtype)
        return sd
