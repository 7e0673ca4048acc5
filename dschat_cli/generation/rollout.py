"""Turn the actor's training engine into a generator for one rollout, and back.

    with rollout_context(actor_engine.module, zero3=True, bare=True):
        out = generator.generate(prompts, mask)

Under ZeRO-3 every parameter is gathered once for the whole rollout (not once per token and
layer) and released after; the gathered copies are discarded on exit (modifier_rank=None):
generation never changes the trained weights. DeepSpeed's forward hooks are set aside for the
rollout and put back after, under ZeRO-3 (per-module fetch bookkeeping and prefetch tracing
around every layer of every decode step) and for the fast engine (`bare`: the engine's timers and
ZeRO bookkeeping on the whole module, which a recorded CUDA graph skips anyway and which
`--compile-decode on` could not trace), so the decode step is plain tensor code.
"""

from __future__ import annotations

import contextlib

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def without_forward_hooks(module):
    """Temporarily remove the forward (pre-)hooks of `module` and all its submodules."""
    saved = []
    for m in module.modules():
        for name in _HOOK_DICTS:
            d = getattr(m, name, None)
            if d:
                saved.append((d, dict(d)))
                d.clear()
    try:
        yield
    finally:
        for d, items in saved:
            d.update(items)


@contextlib.contextmanager
def rollout_context(module, *, zero3: bool, bare: bool = False):
    """Eval mode (no dropout); under ZeRO-3 all parameters gathered; without forward hooks
    under ZeRO-3 or when `bare`."""
    was_training = module.training
    module.eval()
    try:
        with contextlib.ExitStack() as stack:
            if zero3:
                import deepspeed

                stack.enter_context(deepspeed.zero.GatheredParameters(list(module.parameters()),
                                                                      modifier_rank=None))
            if zero3 or bare:
                stack.enter_context(without_forward_hooks(module))
            yield
    finally:
        module.train(was_training)


COMPILE_GAIN = ("the decode step 14% faster on an H100 at batch 56, docs/benchmarks.md; compiled "
                "once at the first rollout, about 1-2 minutes")


def decode_compile_choice(setting: str, *, device: str, engine: str, tensor_parallel: int,
                          zero3: bool, occasional: bool = False,
                          has_triton: bool | None = None) -> tuple[bool, str]:
    """--compile-decode on/off/auto -> (compile the fast engine's decode step?, why, for the run
    log). auto compiles where it was measured to pay: the fast engine on a GPU (a CPU gains
    nothing measured and compiles slowly), generating alone (tensor-parallel decode steps call
    collectives the compiled graph cannot hold) from a ZeRO-0/1/2 actor (ZeRO-3's weights are
    gathered afresh each rollout: not measured), for the rollouts themselves (an `occasional`
    generator, the held-out or greedy checks, runs too seldom to earn its compile), with Triton
    there for torch.compile's GPU kernels (`has_triton` None: looked up)."""
    if engine != "fast":
        return False, "uncompiled (the hf engine)"
    if setting != "auto":
        return setting == "on", f"{'compiled' if setting == 'on' else 'uncompiled'} " \
                                f"(--compile-decode {setting})"
    why_not = ("on CPU" if not device.startswith("cuda") else
               "the actor is ZeRO-3" if zero3 else
               "tensor-parallel generation" if tensor_parallel > 1 else
               "an occasional generation (held-out or greedy check)" if occasional else None)
    if why_not is None:
        if has_triton is None:
            has_triton = _has_triton()
        if not has_triton:
            why_not = "no Triton for torch.compile's GPU kernels"
    if why_not is not None:
        return False, f"uncompiled (--compile-decode auto: {why_not})"
    return True, f"compiled (--compile-decode auto: {COMPILE_GAIN}; --compile-decode off skips it)"


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except ImportError:  # pragma: no cover - a torch without the helper
        return False


class RolloutGenerator:
    """# 1. generate: answers for a batch of left-padded prompts from the actor engine, with the
    engine --generation-engine chooses.

        gen = RolloutGenerator(cfg.generation, tokenizer, max_prompt_seq_len=..., zero3=..., world_size=...,
                               device=dist.device)  # "cuda:N" or "cpu": --compile-decode auto reads it
        out = gen.generate(actor_engine.module, prompts, prompt_mask)   # Generated(seq, logprobs)

    fast: dschat's engine (generation/fast.py), built at the first rollout, returning the sampled
    tokens' logprobs too; with --generation-tensor-parallel N the ranks of a group decode together
    on a sharded copy of the actor refreshed before every rollout (generation/tensor_parallel.py).
    hf: transformers' generate (no logprobs). Under actor ZeRO-3 the parameters are gathered once
    per rollout, not once per token.
    """

    def __init__(self, options, tokenizer, *, max_prompt_seq_len: int, zero3: bool, world_size: int,
                 device: str, occasional: bool = False):
        self.opts = options  # config/ppo.PPOGenerationOptions
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.max_prompt_seq_len = max_prompt_seq_len
        self.zero3 = zero3
        self.world_size = world_size
        self.ignore_eos = False  # benchmarks: answers of exactly --max-answer-seq-len tokens
        self.profile = False  # split the fast engine's time into prefill and decode
        self.engine = None  # the FastGenerator, once built (None with the hf engine)
        self.tensor_parallel = None  # the TensorParallelRollout with --generation-tensor-parallel
        # whether the fast engine's decode step is compiled, and why (printed in the run log)
        self.compile_decode, self.compile_reason = decode_compile_choice(
            options.compile_decode, device=device, engine=options.generation_engine,
            tensor_parallel=options.generation_tensor_parallel, zero3=zero3,
            occasional=occasional)

    def compile_line(self) -> str:
        """The decode step as it ran: the choice, and a compiler failure that undid it."""
        failure = self.engine.compile_failure if self.engine is not None else None
        if failure:
            return f"uncompiled: torch.compile failed ({failure}); it was {self.compile_reason}"
        return self.compile_reason

    def generate(self, module, input_ids, attention_mask):
        """(B, P) left-padded prompts -> Generated(seq (B, P + A), logprobs (B, A) or None)."""
        import torch

        with torch.no_grad():
            if self.opts.generation_engine == "fast":
                return self._fast(module, input_ids, attention_mask)
            return self._hf(module, input_ids, attention_mask)

    def _fast_kwargs(self) -> dict:
        g = self.opts
        return dict(eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                    max_new_tokens=g.max_answer_seq_len, do_sample=g.do_sample,
                    temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                    ignore_eos=self.ignore_eos, max_prompt_seq_len=self.max_prompt_seq_len,
                    compile_decode=self.compile_decode)

    def _fast(self, module, input_ids, attention_mask):
        from dschat_cli.generation.fast import FastGenerator

        if self.opts.generation_tensor_parallel > 1:
            return self._tensor_parallel(module, input_ids, attention_mask)
        if self.engine is None:
            # under ZeRO-3 the weights are gathered afresh for each rollout (new addresses, new
            # graphs): a fused q/k/v copy would add a quarter of the layers to that gather
            self.engine = FastGenerator(module, fuse_qkv=not self.zero3, **self._fast_kwargs())
            self.engine.profile = self.profile
        with rollout_context(module, zero3=self.zero3, bare=True):
            return self.engine.generate(input_ids, attention_mask)

    def _tensor_parallel(self, module, input_ids, attention_mask):
        from dschat_cli.config.schema import ConfigError
        from dschat_cli.generation.tensor_parallel import FLAG, TensorParallelRollout

        if self.tensor_parallel is None:
            try:
                self.tensor_parallel = TensorParallelRollout(
                    module, size=self.opts.generation_tensor_parallel, device=input_ids.device,
                    dtype=next(module.parameters()).dtype, fast_kwargs=self._fast_kwargs())
            except ValueError as e:
                raise ConfigError(FLAG, str(e)) from None
            self.engine = self.tensor_parallel.fast
            self.engine.profile = self.profile
        self.tensor_parallel.refresh(module, zero3=self.zero3)
        return self.tensor_parallel.generate(input_ids, attention_mask)

    def _hf(self, module, input_ids, attention_mask):
        import deepspeed

        from dschat_cli.generation.fast import Generated

        g = self.opts
        kwargs = dict(max_new_tokens=g.max_answer_seq_len, do_sample=g.do_sample,
                      pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                      use_cache=True)
        if self.ignore_eos:
            kwargs["min_new_tokens"] = g.max_answer_seq_len
        if g.do_sample:
            kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.zero3 and self.world_size > 1:
            kwargs["synced_gpus"] = True  # ranks may stop at different lengths
        gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                  if self.zero3 else contextlib.nullcontext())
        module.eval()
        with gather:
            seq = module.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return Generated(seq=seq, logprobs=None)
