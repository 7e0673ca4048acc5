"""Per-token log-probabilities (and entropy) from a causal LM's logits, in float32, without a
float32 copy of the whole logits tensor. Used by step 3's scoring and training forwards
(rlhf/ppo.py `answer_logprobs`) and by DPO (rlhf/dpo.py `summed_logprobs`).

    lp = token_logprobs(logits, labels)                       # (B, L) float32, differentiable
    lp, ent = token_logprobs(logits, labels, entropy=True)    # + (B, L) float32 entropy, no grad
    kw = answer_logits_kwargs(model, seq, P)                  # {"logits_to_keep": A + 1} or {}

Why by hand: logprob = logit[label] - logsumexp(logits) must be computed in float32 (bf16 has 8
significant bits: a logit near 20 is a multiple of 0.125, and the PPO ratio exp(new - old) sees
every such error), but `logits.float()` on (B, T, V) bf16 logits is a full float32 copy (OPT-1.3B
at batch 128 x 256 answer tokens x 50,272: 6.6 GB), which autograd keeps for the backward; the
backward of gather + logsumexp then makes more tensors of that size (softmax, the zero-filled
gather gradient, their sum). Here both passes walk the logits in chunks of positions: each chunk
is upcast to float32, used, and dropped, so the float32 work is bounded by one chunk
(CHUNK_ELEMENTS elements, at most 8 B each at the worst moment), whatever B and T. What is kept
for the backward: the input logits themselves (they exist anyway), the labels and the float32
logsumexp (B, L). The gradient is written, chunk by chunk, straight into one tensor of the
logits' dtype:

    d logprob / d logits = onehot(label) - softmax(logits)

PyTorch has no op for this: torch.nn.functional.cross_entropy is log_softmax + nll_loss, whose
log_softmax output is a full (N, V) tensor kept for the backward, in the logits' dtype. So the
Function is written here.
"""

from __future__ import annotations

import inspect

import torch

# Elements of one float32 chunk: 2^24 (64 MiB in float32), so 333 positions of OPT's 50,272
# vocabulary, 110 of a 152k one. Large enough that each kernel has a GPU's worth of work (not
# measured here), small beside the logits of a batch. plan/memory.py (torch-free) repeats this
# number: keep them equal (a test checks).
CHUNK_ELEMENTS = 1 << 24


def chunk_rows_for(vocab: int) -> int:
    """Rows (positions) per chunk for a vocabulary of `vocab` entries: at least 1."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _blocks(B: int, L: int, rows: int):
    """(b0, b1, t0, t1) blocks that tile a (B, L) grid of positions, each of at most `rows`
    positions: whole stretches of one row's positions first, then several rows when a whole row
    fits (short rows, large chunks)."""
    tb = max(1, min(L, rows))
    bb = max(1, rows // tb)
    for b0 in range(0, B, bb):
        for t0 in range(0, L, tb):
            yield b0, min(B, b0 + bb), t0, min(L, t0 + tb)


class _TokenLogprobs(torch.autograd.Function):
    """logits (B, T, V) any float dtype, labels (B, L) long, `start` with start + L <= T ->
    logprobs (B, L) float32 where logprobs[b, k] = log softmax(logits[b, start + k])[labels[b, k]]
    (and entropy (B, L) float32, not differentiable, when `want_entropy`).

    Positions outside start .. start + L - 1 are not read and get a zero gradient. Taking the
    offset here, rather than a slice `logits[:, start:start + L]` from the caller, matters for the
    backward: autograd's slice backward would make a zero-filled copy of the whole logits in their
    dtype beside our gradient; here the one gradient tensor has the logits' full shape."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, start: int, rows: int,
                want_entropy: bool):
        B, L = labels.shape
        lse = torch.empty(B, L, dtype=torch.float32, device=logits.device)  # logsumexp, kept
        out = torch.empty(B, L, dtype=torch.float32, device=logits.device)
        ent = torch.empty(B, L, dtype=torch.float32, device=logits.device) if want_entropy \
            else None
        for b0, b1, t0, t1 in _blocks(B, L, rows):
            # (b, t, V) float32: always a copy (for float32 logits too), so it can be reused in
            # place below without touching the caller's logits
            x = logits[b0:b1, start + t0:start + t1].to(torch.float32, copy=True)
            m = torch.logsumexp(x, dim=-1)  # (b, t); makes one temporary of x's size
            lab = labels[b0:b1, t0:t1].unsqueeze(-1)
            out[b0:b1, t0:t1] = x.gather(-1, lab).squeeze(-1) - m
            lse[b0:b1, t0:t1] = m
            if want_entropy:
                # H = -sum p log p, with log p = x - logsumexp (in place: x becomes log p).
                # A -inf logit gives p = 0 and 0 x -inf = nan: that term is 0.
                logp = x.sub_(m.unsqueeze(-1))
                ent[b0:b1, t0:t1] = -torch.exp(logp).mul_(logp).nan_to_num_(nan=0.0).sum(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.start, ctx.rows = start, rows
        if want_entropy:
            ctx.mark_non_differentiable(ent)
            return out, ent
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor, *_grad_entropy):
        logits, labels, lse = ctx.saved_tensors
        start, rows = ctx.start, ctx.rows
        B, L = labels.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad[:, :start].zero_()  # positions without a label: no gradient
        grad[:, start + L:].zero_()
        g = grad_out.to(torch.float32)
        for b0, b1, t0, t1 in _blocks(B, L, rows):
            x = logits[b0:b1, start + t0:start + t1].to(torch.float32, copy=True)
            gb = g[b0:b1, t0:t1].unsqueeze(-1)  # (b, t, 1)
            # in place on the chunk: softmax, times -g, plus g at the label
            p = x.sub_(lse[b0:b1, t0:t1].unsqueeze(-1)).exp_().mul_(-gb)
            p.scatter_add_(-1, labels[b0:b1, t0:t1].unsqueeze(-1), gb)
            grad[b0:b1, start + t0:start + t1] = p  # cast to the logits' dtype
        return grad, None, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, start: int = 0,
                   entropy: bool = False, chunk_rows: int | None = None):
    """log softmax(logits)[label] per position, in float32, chunk by chunk (see the module doc).

    logits: (B, T, V) or (N, V), any float dtype; labels: (B, L) or (N,) long with
    start + L <= T: labels[b, k] is scored by the logits at position start + k.
    -> logprobs (B, L) (or (N,)) float32, differentiable in logits; with entropy=True also the
    entropy of each of those positions' distributions, -sum_v p log p (nats, float32, no
    gradient), from the same pass.
    chunk_rows: positions per chunk (default: CHUNK_ELEMENTS // V)."""
    flat = logits.dim() == 2
    if flat:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if logits.dim() != 3 or labels.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"token_logprobs takes logits (B, T, V) and labels (B, L), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if start < 0 or start + labels.shape[1] > logits.shape[1]:
        raise ValueError(f"labels of {labels.shape[1]} positions from position {start} do not fit "
                         f"in logits of {logits.shape[1]} positions")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    rows = chunk_rows if chunk_rows is not None else chunk_rows_for(logits.shape[-1])
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {rows}")
    res = _TokenLogprobs.apply(logits, labels.long(), int(start), int(rows), bool(entropy))
    if flat:
        res = tuple(r.squeeze(0) for r in res) if entropy else res.squeeze(0)
    return res


# ---------------------------------------------------------------------------------------------
# which logits to ask the model for


def logits_to_keep_kwarg(model) -> str | None:
    """The name under which `model`'s forward takes the number of final positions to compute
    logits for (transformers >= 4.50: logits_to_keep; 4.45-4.49: num_logits_to_keep), or None
    when it takes neither (older remote-code models: they make logits for every position).

    model: a transformers model, or one wrapped by peft (get_base_model()) and/or a DeepSpeed
    engine (.module); both wrappers pass the keyword through to the model's forward. Read from
    the signature, as generation/fast.py does: a forward that only has **kwargs may drop it."""
    base = getattr(model, "module", model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    params = inspect.signature(base.forward).parameters
    return next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)


def answer_logits_kwargs(model, seq: torch.Tensor, prompt_length: int) -> dict:
    """The forward keyword that makes `model` compute logits only where the answer tokens of
    seq (B, P + A) need them: the last A + 1 positions, P - 1 .. P + A - 1 (answer token k is
    scored at P - 1 + k; the last position scores nothing but comes with `logits_to_keep`, which
    keeps a suffix). {} when the model cannot: it then returns all P + A positions, and
    rlhf/ppo.py's `answer_logprobs` reads the same positions from either."""
    kw = logits_to_keep_kwarg(model)
    return {kw: seq.shape[1] - prompt_length + 1} if kw else {}
