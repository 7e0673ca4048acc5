"""The fast rollout engine of `dschat ppo --generation-engine fast` (the default; `hf` is plain
transformers generate, kept as the reference).

Why not `model.generate`: per token it re-creates masks, runs logits processors and a stopping
check that syncs with the host, and grows a dynamic KV cache, so an OPT-1.3B batch of 64 spends
~12 ms per decode step against a ~1.7 ms memory-bandwidth floor (docs/benchmarks.md). Here:

- one static KV cache of shape (B, heads, max_prompt + max_new, head_dim) per layer, allocated
  once and reused by every rollout of the same batch size;
- the attention mask is built by us as a 4D boolean tensor, so transformers' mask code is skipped
  (it syncs with the host); positions are passed explicitly (left-padded prompts);
- the decode step (forward of one token, sampling, bookkeeping) touches only fixed-shape tensors
  and keeps its counters on the device, so on CUDA it is captured once as a CUDA graph and replayed:
  no per-token Python or kernel-launch overhead. On CPU the same step runs eagerly;
- the sampled token's log-probability under the policy comes out of the same pass, which lets the
  trainer check (and optionally replace) the actor's scoring forward;
- each attention layer's q/k/v projections run as one matmul on a fused copy of their weights
  (fused.py; not under ZeRO-3 and not for LoRA-wrapped projections).

The engine drives the Hugging Face model itself (any family whose attention takes a 4D mask and a
`Cache`: OPT, Llama/Mistral, GPT-2, GPT-NeoX are tested), LoRA adapters included (they stay
unmerged: they run inside the graph, so there is nothing to merge back and no bf16 rounding drift
in the trained weights).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from dschat_cli.generation.sampling import sample_next


class Generated(NamedTuple):
    """seq: (B, P + A) prompt and answer tokens (answers padded after their eos with pad);
    logprobs: (B, A) float32, log p(seq[:, P + k] | seq[:, :P + k]) under the model that sampled
    it. A <= max_new_tokens: decoding stops early once every row has produced eos."""
    seq: torch.Tensor
    logprobs: torch.Tensor


class GenerationMismatch(RuntimeError):
    """The fast engine's logprobs disagree with the actor's own forward pass."""


try:  # transformers' Cache base class: models accept any subclass
    from transformers.cache_utils import Cache as _CacheBase
except ImportError:  # pragma: no cover - very old transformers
    _CacheBase = object


class _SlotLayer:
    """One layer of the static cache: writes new keys/values at the cache's current slots."""

    is_sliding = False
    is_compileable = True

    def __init__(self, owner: "SlotKVCache"):
        self.owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None or self.keys.shape[0] != key_states.shape[0] \
                or self.keys.dtype != key_states.dtype:
            B, H, _, D = key_states.shape
            shape = (B, H, self.owner.max_len, D)
            self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
            self.values = torch.zeros((B, H, self.owner.max_len, value_states.shape[-1]),
                                      dtype=value_states.dtype, device=value_states.device)
            self.is_initialized = True
        slots = self.owner.slots
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        n = self.owner.view_len  # attention reads only the first n slots (a context bucket)
        return self.keys[:, :, :n], self.values[:, :, :n]


class SlotKVCache(_CacheBase):
    """A static KV cache whose write positions are a device tensor (`slots`) that the decode step
    advances in place: graph-safe. Attention sees the first `view_len` slots (a context bucket:
    fixed for a CUDA graph, so a decode step reads not much more of the cache than it needs); the
    4D mask hides the slots not written yet."""

    def __init__(self, num_layers: int, max_len: int):  # noqa: no super().__init__: its
        # signature differs between transformers versions and nothing of it is used
        self.max_len = max_len
        self.view_len = max_len
        self.layers = [_SlotLayer(self) for _ in range(num_layers)]
        self.slots: torch.Tensor | None = None
        self.seen = 0  # host-side length (transformers reads it for defaults we override)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.max_len, 0

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def is_compileable(self) -> bool:
        return True


def _num_layers(model) -> int:
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot tell the number of layers of {type(model).__name__}")


class FastGenerator:
    """Sample answers for left-padded prompts with a static KV cache (CUDA graph on GPU).

        gen = FastGenerator(model, eos_token_id=2, pad_token_id=1, max_new_tokens=256)
        out = gen.generate(input_ids, attention_mask)   # Generated(seq, logprobs)

    The model must be in eval mode with its parameters materialised (under ZeRO-3: inside the
    gather, see rollout_context). Each rank decodes on its own (no collective inside a step, even
    under ZeRO-3: the parameters are already gathered), so ranks may stop at different lengths.
    """

    def __init__(self, model, *, eos_token_id: int, pad_token_id: int, max_new_tokens: int,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, ignore_eos: bool = False, use_cuda_graph: bool | None = None,
                 check_every: int = 16,
                 bucket: int = 32, attention_backend: str | None = None,
                 max_prompt_seq_len: int = 0, rng: torch.Generator | None = None,
                 compile_decode: bool = False, compile_backend: str = "inductor",
                 fuse_qkv: bool = True):
        self.model = model
        self.eos = int(eos_token_id)
        self.pad = int(pad_token_id)
        self.max_new = int(max_new_tokens)
        self.sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k,
                             top_p=top_p, banned=self.eos if ignore_eos else None)
        self.ignore_eos = ignore_eos
        # the sampling noise's generator (None: PyTorch's default one of the device); the ranks
        # of a tensor-parallel group share a seed so that they draw the same tokens
        self.rng = rng
        self.use_cuda_graph = use_cuda_graph
        self.check_every = check_every
        # the cache holds max_prompt_seq_len + max_new_tokens slots from the first rollout on (wider
        # prompts grow it): its size, and so every rollout's numerics, never depend on history
        self.max_prompt_seq_len = max_prompt_seq_len
        # attention context in buckets of this many slots: one CUDA graph per bucket; a decode
        # step reads at most bucket - 1 cache slots it does not need
        self.bucket = bucket
        # SDPA backend of the decode steps (None: PyTorch's choice); benchmarks compare them
        self.attention_backend = attention_backend
        # torch.compile the decode step (one graph: elementwise work fused, fewer kernels), then
        # record it as CUDA graphs as usual. fullgraph: it compiles whole or not at all, so a
        # failure happens before the step has changed anything, and the step then runs as it is
        self.compile_decode = compile_decode
        self.compile_backend = compile_backend
        self._compiled = None
        self.compile_failure: str | None = None  # why compiling failed (then it runs uncompiled)
        # one matmul for each attention layer's q/k/v projections while generating (fused.py);
        # built at the first rollout (under ZeRO-3 the weights exist only inside the gather)
        self.fuse_qkv = fuse_qkv
        self.fusion = None
        self.fusion_failure: str | None = None  # why the model could not be fused
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.n_layers = _num_layers(base)
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params),
                             None)
        attn = getattr(base.config, "_attn_implementation", None) or "eager"
        if attn not in ("sdpa", "eager"):
            from dschat_cli.config.schema import ConfigError

            raise ConfigError("--generation-engine fast", f"needs sdpa or eager attention (the "
                              f"actor uses {attn}); use --generation-engine hf")
        self._float_mask = attn == "eager"
        self._state_key = None
        self._graphs: dict[int, object] = {}  # context bucket -> CUDA graph of one decode step
        self._graphs_key = None
        self._pool = None
        self.captures = 0  # how many times a CUDA graph was recorded (tests, benchmarks)
        # profile=True: synchronise after the prefill to split the rollout's time (benchmarks)
        self.profile = False
        self.last_timings: dict[str, float] = {}

    # state: buffers of one (batch, length, device) shape, reused across rollouts ------------------
    def _ensure_state(self, B: int, P: int, device, dtype) -> None:
        # The cache always holds P + max_new slots for the largest P seen: a new prompt width
        # within it reuses the buffers (and the captured graph).
        L = max(P, self.max_prompt_seq_len) + self.max_new
        if self._state_key is not None:
            b, l, dev, dt = self._state_key
            if b == B and l >= L and dev == device and dt == dtype:
                return
        self._drop_graphs()
        self._state_key = (B, L, device, dtype)
        self.cache = SlotKVCache(self.n_layers, L)
        self.arange = torch.arange(L, device=device)
        self.key_ok = torch.zeros(B, L, dtype=torch.bool, device=device)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.out_tokens = torch.full((B, self.max_new), self.pad, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(B, self.max_new, dtype=torch.float32, device=device)
        self.noise = None
        self.mask_dtype = dtype

    def _mask4d(self, allowed: torch.Tensor) -> torch.Tensor:
        """(B, Q, L) bool -> the (B, 1, Q, L) mask the attention takes (bool for sdpa, additive
        float for eager attention)."""
        m = allowed[:, None]
        if self._float_mask:
            return torch.zeros(m.shape, dtype=self.mask_dtype, device=m.device).masked_fill(
                ~m, torch.finfo(self.mask_dtype).min)
        return m

    def _forward(self, input_ids, mask4d, position_ids) -> torch.Tensor:
        kwargs = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_kw:
            kwargs[self._keep_kw] = 1
        out = self.model(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids,
                         **kwargs)
        return out.logits[:, -1]  # (B, V)

    def _draw(self, logits: torch.Tensor) -> torch.Tensor | None:
        if not self.sampling["do_sample"]:
            return None
        if self.noise is None or self.noise.shape != logits.shape:
            self.noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        return self.noise.exponential_(generator=self.rng)

    def _emit(self, logits: torch.Tensor, noise) -> None:
        """Sample from (B, V) logits, record token and logprob at column `step`, advance."""
        tok, lp = sample_next(logits, noise, **self.sampling)
        tok = torch.where(self.finished, torch.full_like(tok, self.pad), tok)
        self.out_tokens.index_copy_(1, self.step, tok[:, None])
        self.out_logprobs.index_copy_(1, self.step, lp[:, None])
        self.finished |= tok == self.eos
        self.tok.copy_(tok[:, None])
        self.step.add_(1)

    def _decode_step(self, view: int) -> None:
        """One token for every row, attending to the first `view` cache slots; fixed shapes,
        device-side counters: graph-capturable. Expects self.noise filled by the caller (outside
        the graph)."""
        if self.attention_backend is None:
            return self._run_step(view)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION}[self.attention_backend]
        with sdpa_kernel(backend):
            return self._run_step(view)

    def _run_step(self, view: int) -> None:
        if not self.compile_decode:
            return self._decode_step_body(view)
        if self._compiled is None:
            import torch._dynamo

            # one compile for the first context bucket, one with the bucket as a symbolic size
            # for all the others, per engine (step 3's greedy sample-answer engine is a second)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
            self._compiled = torch.compile(self._decode_step_body, backend=self.compile_backend,
                                           fullgraph=True)
        try:
            return self._compiled(view)
        except Exception as e:  # noqa: BLE001 - any compiler failure: run the step uncompiled
            import warnings

            self.compile_decode = False
            self.compile_failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            warnings.warn(f"torch.compile of the decode step failed ({self.compile_failure}); "
                          "decoding uncompiled (slower). Please report it.", stacklevel=2)
            return self._decode_step_body(view)

    def _decode_step_body(self, view: int) -> None:
        self.cache.slots = self.slot
        self.cache.view_len = view
        # (B, view): the keys written so far
        allowed = self.key_ok[:, :view] & (self.arange[:view] <= self.slot)
        logits = self._forward(self.tok, self._mask4d(allowed[:, None, :]), self.pos)
        self._emit(logits, self.noise if self.sampling["do_sample"] else None)
        self.pos.add_(1)
        self.slot.add_(1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Generated:
        if self.fuse_qkv and self.fusion is None:
            from dschat_cli.generation.fused import QKVFusion

            self.fusion = QKVFusion.build(self.model)
            if self.fusion is None:  # nothing to fuse (GPT-2, NeoX: fused already; LoRA'd q/k/v)
                self.fuse_qkv = False
        if self.fusion is None:
            return self._generate(input_ids, attention_mask)
        from dschat_cli.generation.fused import FusionMismatch

        try:
            with self.fusion.active():
                return self._generate(input_ids, attention_mask)
        except FusionMismatch as e:  # found on the eager prefill, before any graph is recorded
            import warnings

            self.fuse_qkv, self.fusion, self.fusion_failure = False, None, str(e)
            self._drop_graphs()
            warnings.warn(f"{e}: generating with separate q/k/v projections", stacklevel=2)
            return self._generate(input_ids, attention_mask)

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Generated:
        B, P = input_ids.shape
        device = input_ids.device
        t0 = self._clock(device)
        dtype = next(self.model.parameters()).dtype
        self._ensure_state(B, P, device, dtype)
        L = self.cache.max_len
        mask = attention_mask.bool()
        # prefill -----------------------------------------------------------------------------
        self.key_ok.zero_()
        self.key_ok[:, :P] = mask
        self.key_ok[:, P:] = True  # answer slots: visible once written (arange <= slot)
        self.finished.zero_()
        self.step.zero_()
        self.out_tokens.fill_(self.pad)
        self.out_logprobs.zero_()
        q = torch.arange(P, device=device)
        # query q sees keys k <= q that are real prompt tokens; a padding query sees itself (so no
        # row of the softmax is empty; its output is never attended to)
        allowed = (self.arange[None, :] <= q[:, None])[None] & self.key_ok[:, None, :]
        allowed |= (self.arange[None, :] == q[:, None])[None]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.cache.slots = q
        self.cache.view_len = L
        self.cache.seen = 0
        logits = self._forward(input_ids, self._mask4d(allowed), positions)
        self.cache.seen = P
        self._emit(logits, self._draw(logits))
        self.pos.copy_(mask.long().sum(-1, keepdim=True))
        self.slot.fill_(P)
        t1 = self._clock(device)
        # decode ------------------------------------------------------------------------------
        graph = self._use_graph(device)
        if graph and self._graphs_key != self._params_key():
            self._drop_graphs()
            self._graphs_key = self._params_key()
        steps = 1
        while steps < self.max_new:
            if not self.ignore_eos and steps % self.check_every == 0 \
                    and bool(self.finished.all()):
                break
            if self.sampling["do_sample"]:
                self.noise.exponential_(generator=self.rng)
            # this step writes slot P + steps - 1 and attends to every slot up to it
            view = min(L, -(-(P + steps) // self.bucket) * self.bucket)
            if not graph or self.use_cuda_graph is False:
                self._decode_step(view)
            elif view in self._graphs:
                self._graphs[view].replay()
            else:  # runs this step eagerly (warm-up) and records it for the bucket's next steps
                self._capture(view)
            steps += 1
        n = steps
        if self.profile:
            t2 = self._clock(device)
            self.last_timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": n - 1}
        seq = torch.cat([input_ids, self.out_tokens[:, :n]], dim=1)
        return Generated(seq=seq, logprobs=self.out_logprobs[:, :n].clone())

    def _clock(self, device) -> float:
        import time

        if self.profile and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    # CUDA graph ----------------------------------------------------------------------------------
    def _use_graph(self, device) -> bool:
        if device.type != "cuda":
            return False
        return True if self.use_cuda_graph is None else bool(self.use_cuda_graph)

    def _params_key(self) -> tuple:
        """The addresses the graph reads weights from: a re-gathered ZeRO-3 model may live
        elsewhere, and then the graph must be recorded again."""
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _capture(self, view: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode_step(view)  # the real step, run eagerly: warms up cuBLAS, allocator
        torch.cuda.current_stream().wait_stream(side)
        # Recording does not execute; the counters advanced by the eager run above stay put. The
        # bucket graphs share one memory pool: they are always replayed in the order recorded.
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._decode_step(view)
        except RuntimeError as e:
            # Correct results matter more than speed: decode eagerly from here on (slower).
            import warnings

            warnings.warn(f"CUDA graph capture of the decode step failed ({str(e)[:200]}); "
                          "generating without CUDA graphs (slower). Please report it.",
                          stacklevel=2)
            self.use_cuda_graph = False
            self._drop_graphs()
            return
        self._graphs[view] = graph
        self.captures += 1

    def _drop_graphs(self) -> None:
        """Forget every recorded graph and their memory pool: a pool whose graphs are all gone
        must not be captured into again (PyTorch's allocator asserts), so the next capture
        starts a new one."""
        self._graphs, self._graphs_key, self._pool = {}, None, None

    def release(self) -> None:
        """Free the KV cache and the graphs (e.g. before the training phase needs the memory)."""
        self._drop_graphs()
        self._state_key = None
        self.cache = None
        self.fusion = None  # rebuilt (weights copied afresh) at the next rollout


def logprob_gap(gen_logprobs: torch.Tensor, fwd_logprobs: torch.Tensor,
                action_mask: torch.Tensor) -> tuple[float, float]:
    """(mean, max) |generation - forward| logprob over the real answer tokens. All (B, A)."""
    m = action_mask.bool()
    if not bool(m.any()):
        return 0.0, 0.0
    d = (gen_logprobs.float() - fwd_logprobs.float()).abs()[m]
    return float(d.mean()), float(d.max())


def check_parity(gen_logprobs, fwd_logprobs, action_mask, *, tolerance: float,
                 step: int, reduce_max=None) -> tuple[float, float]:
    """Stop (GenerationMismatch) when the engine's logprobs are off by more than `tolerance`
    nats on average: training on wrong old logprobs would silently corrupt PPO. `reduce_max`
    (Dist.all_reduce_max): the gaps are the largest over the ranks, so every rank stops, or
    decides anything from them, alike (a rank that skipped a forward pass the others run would
    hang them under ZeRO-3). A nan gap counts as infinite."""
    mean, worst = logprob_gap(gen_logprobs, fwd_logprobs, action_mask)
    if reduce_max is not None:
        inf = float("inf")
        mean = reduce_max(mean if mean == mean else inf)
        worst = reduce_max(worst if worst == worst else inf)
    if not mean <= tolerance:
        raise GenerationMismatch(
            f"fast generation disagrees with the actor's forward pass at rollout {step}: mean "
            f"|logprob difference| {mean:.4f} nats (max {worst:.4f}) > --parity-tolerance "
            f"{tolerance}; rerun with --generation-engine hf (and report the model family)")
    return mean, worst
