"""RolloutGenerator over a live DeepSpeed engine (in process, one rank, CPU): the fast engine
decodes the bare model, not DeepSpeed's wrapped forward.

DeepSpeed registers a forward pre-hook and a forward hook on the engine's module (timers, ZeRO-3
bookkeeping). A recorded CUDA graph never runs them, and `--compile-decode on` traced them: on
an H100 the compile failed on DeepSpeed's `ZeroStageEnum` comparison and decoding fell back to
uncompiled (docs/benchmarks.md). The rollout sets the hooks aside and puts them back after.
"""

from __future__ import annotations

import pytest
import torch


def _engine(tiny_model_dir, zero_stage):
    import deepspeed

    from dschat_cli.config.sections import ModelOptions
    from dschat_cli.models.loading import load_causal_lm, load_tokenizer, optimizer_groups

    opts = ModelOptions(model=str(tiny_model_dir("opt")))
    tok = load_tokenizer(opts)
    cfg = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2,
           "gradient_accumulation_steps": 1, "zero_optimization": {"stage": zero_stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    model = load_causal_lm(opts, tok, dtype="fp32", ds_config=cfg)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(model, weight_decay=0.0, lora_lr=0.0),
        config=cfg)
    return engine, tok


def _hooks(module):
    return [(name, dict(getattr(m, name))) for m in module.modules()
            for name in ("_forward_pre_hooks", "_forward_hooks") if getattr(m, name)]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_compiled_fast_rollout_of_a_deepspeed_engine_runs_without_its_hooks(
        zero_stage, tiny_model_dir, one_rank):
    from dschat_cli.config.ppo import PPOGenerationOptions
    from dschat_cli.generation.fast import FastGenerator
    from dschat_cli.generation.rollout import RolloutGenerator

    engine, tok = _engine(tiny_model_dir, zero_stage)
    module = engine.module
    assert _hooks(module), "DeepSpeed no longer hooks the module's forward"
    calls = []  # a hook like DeepSpeed's that counts its calls (torch 2.13 traces DeepSpeed's own)
    module.register_forward_pre_hook(lambda m, a: calls.append(1))
    hooks = _hooks(module)
    opts = PPOGenerationOptions(max_answer_seq_len=6, compile_decode="on")
    gen = RolloutGenerator(opts, tok, max_prompt_seq_len=8, zero3=False, world_size=1,
                           device="cpu")
    kwargs = gen._fast_kwargs()
    assert kwargs.pop("compile_decode") is True
    # the engine RolloutGenerator would build, with the compile backend CI has time for
    gen.engine = FastGenerator(module, compile_decode=True, compile_backend="aot_eager", **kwargs)
    batch = tok([" Human: hi? Assistant:", " Human: how do I bake bread? Assistant:"],
                return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = gen.generate(module, batch["input_ids"], batch["attention_mask"])
    assert gen.engine.compile_failure is None and gen.engine.compile_decode
    assert out.seq.shape == (2, batch["input_ids"].shape[1] + 6) and out.logprobs is not None
    assert calls == []
    assert _hooks(module) == hooks  # back in place for training's forward
    engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert calls == [1]


@pytest.mark.parametrize("where, kwargs, compiled, why", [
    ("a GPU run's rollouts", {}, True, "auto: the decode step 14% faster"),
    ("CPU", {"device": "cpu"}, False, "auto: on CPU"),
    ("ZeRO-3", {"zero3": True}, False, "auto: the actor is ZeRO-3"),
    ("tensor-parallel", {"tensor_parallel": 2}, False, "auto: tensor-parallel generation"),
    ("held-out/greedy checks", {"occasional": True}, False, "auto: an occasional generation"),
    ("no Triton", {"has_triton": False}, False, "auto: no Triton"),
    ("the hf engine", {"engine": "hf"}, False, "the hf engine"),
])
def test_compile_decode_auto_compiles_only_where_it_was_measured_to_pay(where, kwargs, compiled,
                                                                         why):
    from dschat_cli.generation.rollout import decode_compile_choice

    args = dict(device="cuda:0", engine="fast", tensor_parallel=1, zero3=False, has_triton=True)
    on, reason = decode_compile_choice("auto", **{**args, **kwargs})
    assert on is compiled and why in reason, (where, reason)
    assert reason.startswith("compiled" if compiled else "uncompiled")


def test_an_explicit_compile_decode_wins_over_auto():
    from dschat_cli.generation.rollout import decode_compile_choice

    args = dict(engine="fast", tensor_parallel=1, zero3=False, has_triton=False)
    assert decode_compile_choice("on", device="cpu", **args) == \
        (True, "compiled (--compile-decode on)")
    assert decode_compile_choice("off", device="cuda:0", **{**args, "has_triton": True}) == \
        (False, "uncompiled (--compile-decode off)")


def test_the_rollout_generator_hands_its_choice_to_the_engine_and_reports_a_failure(
        tiny_model_dir, monkeypatch):
    from types import SimpleNamespace

    from dschat_cli.config.ppo import PPOGenerationOptions
    from dschat_cli.config.sections import ModelOptions
    from dschat_cli.generation.rollout import RolloutGenerator
    from dschat_cli.models.loading import load_tokenizer

    tok = load_tokenizer(ModelOptions(model=str(tiny_model_dir("opt"))))
    opts = PPOGenerationOptions(max_answer_seq_len=6)  # --compile-decode auto

    def make(**kw):
        return RolloutGenerator(opts, tok, max_prompt_seq_len=8, zero3=False, world_size=1, **kw)

    from dschat_cli.generation import rollout

    monkeypatch.setattr(rollout, "_has_triton", lambda: True)  # as on a CUDA machine
    assert make(device="cpu")._fast_kwargs()["compile_decode"] is False
    gpu = make(device="cuda:0")
    assert gpu._fast_kwargs()["compile_decode"] is True
    assert gpu.compile_reason.startswith("compiled (--compile-decode auto: ")
    assert make(device="cuda:0", occasional=True)._fast_kwargs()["compile_decode"] is False
    gpu.compile_reason = "compiled (--compile-decode auto: ...)"
    gpu.engine = SimpleNamespace(compile_failure="RuntimeError: boom")
    assert gpu.compile_line() == ("uncompiled: torch.compile failed (RuntimeError: boom); it was "
                                  "compiled (--compile-decode auto: ...)")
    gpu.engine = SimpleNamespace(compile_failure=None)
    assert gpu.compile_line() == "compiled (--compile-decode auto: ...)"
