"""What dschat's bf16 ZeRO-1 config asks of DeepSpeed's BF16_Optimizer (fp32 gradient
accumulation with bf16.immediate_grad_update), checked on real DeepSpeed on CPU: each bf16
gradient is freed as backward adds it into the fp32 buffer (what `dschat plan` counts), and the
weights come out bit for bit as when the gradients are added after backward."""

from __future__ import annotations

import pytest


def _train(tiny_model_dir, *, immediate: bool, steps: int = 3):
    import deepspeed
    import torch

    from dschat_cli.config.ds_config import train_ds_config
    from dschat_cli.config.sections import DeepSpeedOptions, ModelOptions, OptimOptions
    from dschat_cli.models.loading import load_causal_lm, load_tokenizer, optimizer_groups

    # accumulation over 2 micro-batches and a clipping threshold below the gradients' norm, so
    # both the sums and the clipping are exercised
    cfg = train_ds_config(DeepSpeedOptions(zero_stage=1),
                          OptimOptions(per_device_train_batch_size=2,
                                       gradient_accumulation_steps=2, gradient_clipping=0.01,
                                       learning_rate=1e-2),
                          world_size=1, dtype="bf16", torch_adam=True)
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["bf16"]["immediate_grad_update"] is True  # as dschat ships it
    cfg["bf16"]["immediate_grad_update"] = immediate
    opts = ModelOptions(model=str(tiny_model_dir("opt")))
    tok = load_tokenizer(opts)
    torch.manual_seed(0)
    model = load_causal_lm(opts, tok, dtype="bf16", ds_config=cfg)
    engine, *_ = deepspeed.initialize(
        model=model, config=cfg,
        model_parameters=optimizer_groups(model, weight_decay=0.0, lora_lr=1e-2))
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    gen = torch.Generator().manual_seed(1)
    live_grads, norms = [], []
    for _ in range(2 * steps):
        ids = torch.randint(5, tok.vocab_size - 5, (2, 12), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        live_grads.append(sum(p.grad is not None for p in engine.module.parameters()))
        before = engine.global_steps
        engine.step()
        if engine.global_steps != before:  # an optimizer step, every second micro-batch
            norms.append(float(engine.get_global_grad_norm()))
    assert len(norms) == steps
    weights = [p.detach().float().clone() for p in engine.module.parameters()]
    return weights, live_grads, norms


def test_immediate_grad_update_frees_the_bf16_gradients_and_keeps_the_weights_bit_exact(
        tiny_model_dir, one_rank):
    import torch

    after, grads_after, norms_after = _train(tiny_model_dir, immediate=False)
    hooks, grads_hooks, norms_hooks = _train(tiny_model_dir, immediate=True)
    # added after backward, every parameter keeps its bf16 gradient until the step; added from
    # the hooks, none is left once backward returns
    assert min(grads_after) > 0 and set(grads_hooks) == {0}
    assert all(n > 0.01 for n in norms_after)  # clipping was active
    assert norms_hooks == norms_after
    assert len(after) == len(hooks)
    for a, b in zip(after, hooks):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stage, dtype", [(0, "bf16"), (2, "bf16"), (1, "fp32")])
def test_immediate_grad_update_is_asked_only_with_fp32_accumulation(stage, dtype):
    from dschat_cli.config.ds_config import train_ds_config
    from dschat_cli.config.sections import DeepSpeedOptions, OptimOptions

    cfg = train_ds_config(DeepSpeedOptions(zero_stage=stage), OptimOptions(), world_size=1,
                          dtype=dtype, torch_adam=False)
    assert "data_types" not in cfg and "immediate_grad_update" not in cfg["bf16"]
