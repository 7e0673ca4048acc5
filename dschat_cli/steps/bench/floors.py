"""What each phase of `dschat bench` is set against: the device's measured ceilings, the
models' shapes, the FLOPs and bytes a phase must move (its floor), and the run's peak memory."""

from __future__ import annotations

import dataclasses
import time

import torch

from dschat_cli.dist import Dist
from dschat_cli.steps.common import count_params

# device ceilings ---------------------------------------------------------------------------------
def measure_ceilings(device: str, dtype: torch.dtype) -> dict:
    """Measured matmul FLOP/s (square matmuls in the training dtype) and copy bandwidth (bytes
    read + written per second) of this device: the denominators of every floor."""
    on_gpu = device != "cpu"
    n = 8192 if on_gpu else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = _best_seconds(lambda: a @ b, on_gpu, reps=10)
    size = (1 << 30) if on_gpu else (1 << 24)  # bytes
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    cp = _best_seconds(lambda: y.copy_(x), on_gpu, reps=10)
    return {"matmul_tflops": 2 * n ** 3 / mm / 1e12, "copy_gbps": 2 * size / cp / 1e9}


def _best_seconds(fn, on_gpu: bool, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        sync(on_gpu)
        t = time.perf_counter()
        fn()
        sync(on_gpu)
        best = min(best, time.perf_counter() - t)
    return best


def sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


# model shapes and FLOPs --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    params: int         # all parameters (what a decode step reads)
    matmul_params: int  # parameters used as matmul weights (input embeddings excluded without head)
    layers: int
    hidden: int
    head_params: int = 0  # of matmul_params, the output head's (vocab x hidden; 0: a value head)

    def forward_flops(self, tokens: int, seq_len: int, head_tokens: int | None = None) -> float:
        """A forward pass over `tokens` tokens of `seq_len`-token sequences whose output head
        runs on `head_tokens` of them (default all): only the positions whose logits the step
        needs count (step 3 scores the answer tokens; a prefill samples from its last
        position), so a phase that computes more is measured against the work it must do."""
        body = self.matmul_params - self.head_params
        head = tokens if head_tokens is None else head_tokens
        return (tokens * (2 * body + 4 * self.layers * self.hidden * seq_len)
                + head * 2 * self.head_params)


def model_shape(module) -> Shape:
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    cfg = getattr(base, "config", None) or base.backbone.config
    layers = next(getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                  if getattr(cfg, k, None))
    hidden = next(getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model")
                  if getattr(cfg, k, None))
    n = count_params(module)
    has_head = hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else \
        base.backbone.get_input_embeddings()
    emb_n = getattr(emb.weight, "ds_numel", emb.weight.numel())
    head = base.get_output_embeddings() if has_head else None
    head_n = getattr(head.weight, "ds_numel", head.weight.numel()) if head is not None else 0
    return Shape(params=n, matmul_params=n if has_head else n - emb_n, layers=layers,
                 hidden=hidden, head_params=head_n)


def ppo_floors(actor: Shape, critic: Shape | None, *, batch: int, prompt: int, answer: int,
               bytes_per_param: int, ceilings: dict, gradient_checkpointing: bool,
               decode_params: int | None = None, reward: Shape | None = None) -> dict:
    """{phase: (flops, bytes, floor seconds)} for one PPO step on one GPU, and the decode step's
    bandwidth floor in seconds ('decode_step'). `batch`: the rollout's sequences (prompts x
    samples per prompt; each prompt is prefilled once per answer). `critic` None: a critic-free
    estimator, no critic_forward or critic_train. `reward`: the reward model (default: the
    critic's shape). `decode_params`: the parameters a decode step reads on one GPU (default all
    of the actor's; tensor-parallel generation: its shard). Under N-way tensor parallelism a GPU
    decodes N x batch rows with 1/N of the heads: the same KV cache bytes and about the same
    FLOPs."""
    reward = reward or critic
    weights = (actor.params if decode_params is None else decode_params) * bytes_per_param
    mm = ceilings["matmul_tflops"] * 1e12
    bw = ceilings["copy_gbps"] * 1e9
    S = prompt + answer
    tokens = batch * S
    recompute = 4 / 3 if gradient_checkpointing else 1.0
    out = {}
    # generation: the prefill is compute-bound; each decode step reads all weights and the KV
    # cache so far (2 tensors x layers x batch x context x hidden, 2 bytes), and does 2N flops
    # per token
    prefill_flops = actor.forward_flops(batch * prompt, prompt, head_tokens=batch)
    gen_flops, gen_bytes, decode_floor = prefill_flops, 0.0, prefill_flops / mm
    for t in range(1, answer):
        ctx = prompt + t
        kv = 2 * actor.layers * batch * ctx * actor.hidden * bytes_per_param
        step_bytes = weights + kv
        step_flops = actor.forward_flops(batch, ctx)
        gen_flops += step_flops
        gen_bytes += step_bytes
        decode_floor += max(step_bytes / bw, step_flops / mm)
    out["generation"] = (gen_flops, gen_bytes, decode_floor)
    for name, shape in (("actor_forward", actor), ("ref_forward", actor),
                        ("critic_forward", critic), ("reward_forward", reward)):
        if shape is None:
            continue
        # the actor's and reference's logits: the answer positions only (rewards and values
        # come from small heads)
        f = shape.forward_flops(tokens, S, head_tokens=batch * answer)
        out[name] = (f, 0.0, f / mm)
    for name, shape in (("actor_train", actor), ("critic_train", critic)):
        if shape is None:
            continue
        f = 3 * shape.forward_flops(tokens, S, head_tokens=batch * answer) * recompute
        # Adam: read+write fp32 master weight and two moments, read the gradient: ~20 B/param
        b = 20.0 * shape.params
        out[name] = (f, b, f / mm + b / bw)
    mid = prompt + answer // 2
    out["decode_step"] = (weights + 2 * actor.layers * batch * mid * actor.hidden
                          * bytes_per_param) / bw
    return out


DPO_PHASES = ("ref_forward", "policy_forward", "policy_backward", "optimizer_step")
ADAM_BYTES = 28  # per trained parameter: fp32 master weight and both moments read and written
# (24 B), the gradient read and the bf16 weight written (2 + 2 B)


def dpo_floors(policy: Shape, *, pairs: int, seq_len: int, ceilings: dict,
               gradient_checkpointing: bool, reference: bool, answer: int | None = None) -> dict:
    """{phase: (flops, bytes, floor seconds)} of one DPO step on one GPU over `pairs` pairs =
    2 x pairs sequences of seq_len tokens: the reference's forward (when `reference`), the
    policy's forward and backward (2x forward; + one forward recomputed with gradient
    checkpointing), and Adam's pass over the weights and its states (bytes, not FLOPs). The
    output head counts on each sequence's `answer` tokens (default all): the logprobs of DPO are
    the answers'."""
    mm = ceilings["matmul_tflops"] * 1e12
    bw = ceilings["copy_gbps"] * 1e9
    f = policy.forward_flops(2 * pairs * seq_len, seq_len,
                             head_tokens=None if answer is None else 2 * pairs * answer)
    back = (3 if gradient_checkpointing else 2) * f
    out = {"policy_forward": (f, 0.0, f / mm), "policy_backward": (back, 0.0, back / mm)}
    if reference:
        out["ref_forward"] = (f, 0.0, f / mm)
    b = float(ADAM_BYTES * policy.params)
    out["optimizer_step"] = (0.0, b, b / bw)
    return out


def peak_gib(dist: Dist, on_gpu: bool) -> float | None:
    if not on_gpu:
        return None
    return dist.all_reduce_max(torch.cuda.max_memory_allocated() / 2**30)


def device_name(dist: Dist) -> str:
    if dist.device == "cpu":
        return "cpu"
    return f"{dist.world_size} x {torch.cuda.get_device_name()}"
