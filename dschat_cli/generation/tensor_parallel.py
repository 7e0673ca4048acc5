"""Tensor-parallel rollouts: `dschat ppo --generation-tensor-parallel N`.

A decode step of the fast engine reads every weight of the actor once per generated token, so
with a large actor (OPT-13B: 24 GiB of bf16 weights) generation is bound by memory bandwidth and
each GPU re-reads the whole model for its own small batch. With N-way tensor parallelism the N
ranks of a group decode their prompts together, each holding 1/N of every attention and MLP
weight (Megatron's layout: query/key/value and the first MLP projection split by output rows,
attention output and second MLP projection split by input columns and summed with an all-reduce),
so a decode step reads 1/N of the weights per GPU.

    tp = TensorParallelRollout(actor_module, size=4, device=device, dtype=torch.bfloat16)
    tp.refresh(actor_module, zero3=True)          # copy the current trained weights in
    out = tp.generate(fast_kwargs, input_ids, attention_mask)   # this rank's rows only

The sharded copy (the "replica") is a second instance of the Hugging Face model class built on
the meta device, its split Linear layers replaced by smaller ones, then allocated once; before
every rollout `refresh` copies the trained weights into it (under ZeRO-3 a chunk of parameters
is gathered at a time, so the whole actor is never materialised on one GPU). The replica's
weights stay at the same addresses, so its CUDA graphs are recorded once, not per rollout.
Generation never changes the trained weights.

Ranks of a group sample with the same random numbers (a seed the group's first rank draws before
each rollout) and see bit-identical all-reduced activations, so they pick the same tokens; a
checksum after every rollout stops the run (GenerationMismatch) if they ever do not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dschat_cli.generation.fast import FastGenerator, Generated, GenerationMismatch
from dschat_cli.generation.tp_layouts import FLAG, LAYOUTS, Layout, check_supported  # noqa: F401

class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W_shard^T) + b: the input arrives split by columns (the heads or
    MLP units this rank holds); the partial products of the ranks sum to the full layer's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group, device=None,
                 dtype=None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                  requires_grad=False) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TensorParallelRollout:
    """The sharded replica of the actor for one tensor-parallel group, and the fast engine that
    decodes on it. Every rank of the process group builds one (group creation is collective)."""

    def __init__(self, model, *, size: int, device, dtype, fast_kwargs: dict):
        import torch.distributed as dist

        from dschat_cli.models.loading import zero3_init_disabled

        base = _unwrap(model)  # LoRA: the model with its adapter layers (merged at refresh)
        check_supported(base.config, size)
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % size:
            raise ValueError(f"{size} does not divide the {world} ranks into equal groups")
        self.size = size
        self.layout = LAYOUTS[base.config.model_type]
        # consecutive ranks form a group (one node's GPUs with the launcher's rank order)
        self.group = None
        for first in range(0, world, size):
            g = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                self.group, self.rank = g, rank - first
        with zero3_init_disabled(), torch.device("meta"):
            replica = type(base)._from_config(base.config, dtype=dtype)
        # the attention implementation the actor runs with (sdpa/eager), not a default
        replica.config._attn_implementation = base.config._attn_implementation
        self.slices: dict[str, tuple[int, slice] | None] = {}  # param name -> (dim, part)
        for name, mod in list(replica.named_modules()):
            leaf = name.rpartition(".")[2]
            if not isinstance(mod, nn.Linear) or leaf not in self.layout.column + self.layout.row:
                continue
            bias = mod.bias is not None
            if leaf in self.layout.column:
                n = mod.out_features // size
                new = nn.Linear(mod.in_features, n, bias=bias, device="meta", dtype=dtype)
                part = slice(self.rank * n, (self.rank + 1) * n)
                self.slices[f"{name}.weight"] = (0, part)
                if bias:
                    self.slices[f"{name}.bias"] = (0, part)
            else:
                n = mod.in_features // size
                new = RowParallelLinear(n, mod.out_features, bias, self.group, device="meta",
                                        dtype=dtype)
                self.slices[f"{name}.weight"] = (1, slice(self.rank * n, (self.rank + 1) * n))
            _set(replica, name, new)
        for mod in replica.modules():  # attention modules that count their heads themselves
            if hasattr(mod, "q_proj"):
                for attr in self.layout.head_attrs:
                    if isinstance(getattr(mod, attr, None), int):
                        setattr(mod, attr, getattr(mod, attr) // size)
        replica.to_empty(device=device)
        replica.tie_weights()
        replica.eval().requires_grad_(False)
        # buffers (rotary frequencies, ...) are never partitioned by ZeRO: copy them as they are
        src_buffers = dict(base.named_buffers())
        for name, buf in replica.named_buffers():
            if name in src_buffers:
                buf.copy_(src_buffers[name].to(device=device, dtype=buf.dtype))
        self.replica = replica
        self.device = torch.device(device)
        self.leader = rank - self.rank  # the group's first rank (global number)
        # the group's sampling noise: one generator, reseeded by the leader before each rollout
        self.rng = torch.Generator(device=self.device)
        self.fast = FastGenerator(replica, rng=self.rng, **fast_kwargs)

    # weights -------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, model, *, zero3: bool, chunk_elements: int = 1 << 28) -> None:
        """Copy the trained weights of `model` (the actor; its parameters partitioned under
        ZeRO-3) into the replica, this rank's slices only. LoRA adapters are merged into the
        copy (W + scale * B A); the trained weights themselves are left as they are."""
        items = self._sources(_unwrap(model))
        chunks, cur, size = [], [], 0
        for item in items:
            numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in item[1])
            if cur and size + numel > chunk_elements:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(item)
            size += numel
        if cur:
            chunks.append(cur)
        dst = dict(self.replica.named_parameters())
        for chunk in chunks:
            ctx = contextlib.nullcontext()
            if zero3:
                import deepspeed

                ctx = deepspeed.zero.GatheredParameters([p for _, ps, _ in chunk for p in ps],
                                                        modifier_rank=None)
            with ctx:
                for name, params, lora in chunk:
                    full = params[0].data
                    if lora is not None:
                        full = full + sum(lora.get_delta_weight(a).to(full.dtype)
                                          for a in lora.active_adapters)
                    where = self.slices.get(name)
                    part = full if where is None else full.narrow(
                        where[0], where[1].start, where[1].stop - where[1].start)
                    dst[name].copy_(part)

    def _sources(self, src_model) -> list[tuple[str, list, object]]:
        """(replica parameter, the trained parameters it is made of, the LoRA layer or None)."""
        src = dict(src_model.named_parameters())
        lora_layers = {n: m for n, m in src_model.named_modules()
                       if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}
        items = []
        for name, _ in self.replica.named_parameters():
            if name in src:
                items.append((name, [src[name]], None))
                continue
            prefix, _, leaf = name.rpartition(".")
            layer = lora_layers.get(prefix)
            if layer is None:
                raise RuntimeError(f"tensor-parallel generation: no trained parameter for {name}")
            base = getattr(layer.base_layer, leaf)
            if leaf != "weight":
                items.append((name, [base], None))
                continue
            adapters = [p for a in layer.active_adapters
                        for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
            items.append((name, [base, *adapters], layer))
        return items

    # generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Generated:
        """Decode this group's prompts together; returns this rank's rows (B, P + A)."""
        import torch.distributed as dist

        B, P = input_ids.shape
        dev = self.device
        shape = torch.tensor([B, P], dtype=torch.long, device=dev)
        shapes = [torch.empty_like(shape) for _ in range(self.size)]
        dist.all_gather(shapes, shape, group=self.group)
        b_max = int(max(int(s[0]) for s in shapes))
        p_max = int(max(int(s[1]) for s in shapes))
        pad = self.fast.pad
        ids = torch.full((b_max, p_max), pad, dtype=input_ids.dtype, device=dev)
        mask = torch.zeros((b_max, p_max), dtype=attention_mask.dtype, device=dev)
        ids[:B, p_max - P:] = input_ids.to(dev)
        mask[:B, p_max - P:] = attention_mask.to(dev)
        mask[B:, -1] = 1  # filler rows (a shorter batch on this rank): one pad token each
        all_ids = [torch.empty_like(ids) for _ in range(self.size)]
        all_mask = [torch.empty_like(mask) for _ in range(self.size)]
        dist.all_gather(all_ids, ids, group=self.group)
        dist.all_gather(all_mask, mask, group=self.group)
        # every rank must draw the same noise: the leader picks the seed from its own torch
        # random state (saved in checkpoints, so a resumed run samples as an uninterrupted one)
        seed = (torch.randint(0, 2 ** 62, (1,)) if self.rank == 0
                else torch.zeros(1, dtype=torch.long)).to(dev)
        dist.broadcast(seed, src=self.leader, group=self.group)
        self.rng.manual_seed(int(seed.item()))
        out = self.fast.generate(torch.cat(all_ids), torch.cat(all_mask))
        self._check_agreement(out.seq)
        rows = slice(self.rank * b_max, self.rank * b_max + B)
        return Generated(seq=out.seq[rows, p_max - P:], logprobs=out.logprobs[rows])

    def _check_agreement(self, seq: torch.Tensor) -> None:
        import torch.distributed as dist

        weights = torch.arange(1, seq.numel() + 1, device=seq.device, dtype=torch.float64)
        x = (seq.reshape(-1).double() * weights.remainder(9973)).sum().reshape(1)
        hi, lo = x.clone(), -x
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=self.group)
        if not bool(hi == -lo):
            raise GenerationMismatch(
                "the ranks of a tensor-parallel group generated different tokens; rerun with "
                f"{FLAG} 1 (and report the model family and GPUs)")

    @property
    def captures(self) -> int:
        return self.fast.captures
