"""One matmul for an attention layer's query, key and value projections while the fast engine
generates (generation/fast.py).

At batch 64 a decode step multiplies a (64, hidden) activation by three small weight matrices per
layer; one multiplication by their concatenation does the same work in about half the time
(26 us against 55 us per OPT-1.3B layer on an H100, ~0.7 ms of a ~4.3 ms step:
docs/benchmarks.md). For the rollout, each attention module's `q_proj`, `k_proj` and `v_proj`
(plain `nn.Linear`s reading the same input: OPT, Llama, Mistral, Qwen2, ...) are swapped for
three `_Part` modules that share one fused weight: the first of them called computes all three
outputs, each returns its own columns. After the rollout the original modules are back in place,
so training, checkpoints and DeepSpeed never see the parts.

    fusion = QKVFusion.build(model)        # None: nothing to fuse (GPT-2, NeoX: already fused)
    with fusion.active():                  # weights copied in, parts swapped in
        ...generate...

The fused weights are a copy (3 x hidden x hidden per layer for multi-head attention; counted by
`dschat plan`), refreshed in place at each rollout, so the trained weights' latest values are
used and a recorded CUDA graph keeps reading the same addresses. Modules that are not plain
Linears (LoRA-wrapped projections, tensor-parallel shards of another type) are left alone.
A model that calls the three projections on different inputs is caught on the first (eager)
call: `FusionMismatch`, and the engine generates unfused.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

NAMES = ("q_proj", "k_proj", "v_proj")


class FusionMismatch(RuntimeError):
    """A fused projection was called on another input than its siblings."""


class _Group:
    """The fused weight of one attention module's projections and the output of the current
    call, handed out column block by column block."""

    def __init__(self, owner: nn.Module, linears: list[nn.Linear]):
        self.owner = owner
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        w = linears[0].weight
        self.weight = torch.empty((sum(self.sizes), w.shape[1]), dtype=w.dtype, device=w.device)
        has_bias = [lin.bias is not None for lin in linears]
        self.bias = (torch.empty(sum(self.sizes), dtype=w.dtype, device=w.device)
                     if any(has_bias) else None)
        self.parts = [_Part(self, i) for i in range(len(linears))]
        self.input = None
        self.outputs = None
        self.taken = 0

    @torch.no_grad()
    def refresh(self) -> None:
        torch.cat([lin.weight for lin in self.linears], dim=0, out=self.weight)
        if self.bias is not None:
            at = 0
            for lin, n in zip(self.linears, self.sizes):
                if lin.bias is None:
                    self.bias[at:at + n].zero_()
                else:
                    self.bias[at:at + n].copy_(lin.bias)
                at += n

    def take(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.outputs is None:
            self.input = x
            self.outputs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        elif not torch.compiler.is_compiling() and x is not self.input:
            # another input than the sibling that computed the outputs: this family does not
            # project queries, keys and values from one tensor (caught on the eager prefill)
            self.reset()
            raise FusionMismatch(f"{type(self.owner).__name__} projects q/k/v from different "
                                 "inputs")
        out = self.outputs[i]
        self.taken += 1
        if self.taken == len(self.sizes):  # all three handed out: hold no tensor between calls
            self.reset()
        return out

    def reset(self) -> None:
        self.input = self.outputs = None
        self.taken = 0


class _Part(nn.Module):
    """Stands in for one projection during generation: its block of the group's fused output."""

    def __init__(self, group: _Group, index: int):
        super().__init__()
        # a plain attribute, not a submodule: the group is not part of the module tree
        object.__setattr__(self, "group", group)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.take(self.index, x)


def _fusable(module: nn.Module) -> list[nn.Linear] | None:
    linears = [getattr(module, n, None) for n in NAMES]
    if not all(type(lin) is nn.Linear for lin in linears):  # noqa: E721 - subclasses (LoRA) no
        return None
    w = [lin.weight for lin in linears]
    if len({(t.shape[1], t.dtype, t.device) for t in w}) != 1 or w[0].numel() == 0:
        return None  # different inputs, dtypes or devices; or a ZeRO-3 placeholder
    return linears


class QKVFusion:
    """The fused q/k/v groups of one model (see the module docstring)."""

    def __init__(self, groups: list[_Group]):
        self.groups = groups

    @classmethod
    def build(cls, model: nn.Module) -> "QKVFusion | None":
        """Groups for every module of `model` with three plain q/k/v Linears, or None if it has
        none. Under ZeRO-3, call it while the parameters are gathered."""
        groups = []
        for module in model.modules():
            linears = _fusable(module)
            if linears is not None:
                groups.append(_Group(module, linears))
        return cls(groups) if groups else None

    @contextlib.contextmanager
    def active(self):
        """Copy the current weights in, swap the parts in; put the Linears back on exit."""
        for g in self.groups:
            if any(getattr(g.owner, n) is not lin for n, lin in zip(NAMES, g.linears)):
                raise RuntimeError(f"{type(g.owner).__name__}'s q/k/v projections changed "
                                   "since the fusion was built")
            g.refresh()
            g.reset()
        try:
            for g in self.groups:
                for n, part in zip(NAMES, g.parts):
                    setattr(g.owner, n, part)
            yield
        finally:
            for g in self.groups:
                for n, lin in zip(NAMES, g.linears):
                    setattr(g.owner, n, lin)
                g.reset()
