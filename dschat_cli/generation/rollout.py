"""Turn the actor's training engine into a generator for one rollout, and back.

    with rollout_context(actor_engine.module, zero3=True):
        out = generator.generate(prompts, mask)

Under ZeRO-3 every parameter is gathered once for the whole rollout (not once per token and
layer) and released after; DeepSpeed's per-module forward hooks, which would otherwise run
(fetch bookkeeping, prefetch tracing) around every layer of every decode step, are set aside for
the rollout and put back after, so the decode step is plain tensor code (and CUDA-graph
capturable). The gathered copies are discarded on exit (modifier_rank=None): generation never
changes the trained weights.
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
def rollout_context(module, *, zero3: bool):
    """Eval mode (no dropout) and, under ZeRO-3, all parameters gathered without hooks."""
    was_training = module.training
    module.eval()
    try:
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None), \
                    without_forward_hooks(module):
                yield
        else:
            yield
    finally:
        module.train(was_training)
