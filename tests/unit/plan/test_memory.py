"""The memory model of `dschat plan` (dschat_cli/plan/memory.py) on hand-computed examples: what each
ZeRO stage, offload and LoRA keep on a GPU, activations and logits, PPO's KV cache, and the phase
that sets the peak. The DeepSpeed configs come from the real builder."""

from __future__ import annotations

import pytest

from dschat_cli.config.ds_config import eval_ds_config, train_ds_config
from dschat_cli.config.sections import DeepSpeedOptions, OptimOptions
from dschat_cli.plan.arch import Arch
from dschat_cli.plan.memory import Engine, estimate_ppo, estimate_single, frozen_model, trained_model

# A made-up 1e9-parameter OPT-like model with round numbers (no dropout).
ARCH = Arch(model_type="opt", family="opt", hidden=2048, layers=24, heads=32, kv_dim=2048,
            intermediate=8192, vocab=50_000, head_in=2048, params=1_000_000_000, head_params=0,
            largest_tensor=100_000_000, dropout=0.0, prefix="model.", linears=())


def ds(stage=0, offload=False, dtype="bf16", world=1, micro=8, accum=1, torch_adam=False,
       fp32_grad_accum="auto"):
    return train_ds_config(DeepSpeedOptions(zero_stage=stage, offload=offload,
                                            fp32_grad_accum=fp32_grad_accum),
                           OptimOptions(per_device_train_batch_size=micro,
                                        gradient_accumulation_steps=accum),
                           world_size=world, dtype=dtype, torch_adam=torch_adam)


def sft(stage=0, world=1, **kw):
    return estimate_single("sft", ARCH, ds(stage, world=world, **kw), source="m", world_size=world,
                           micro_batch=8, eval_batch=8, seq_len=512, checkpointing=False,
                           lora_dim=0, lora_filter="", only_lora=False, dropout=None)


# Activations of 8 x 512 = 4096 tokens, per token and layer 8*2*2048 + 2*8192 = 49,152 bytes:
#   24 layers x 4096 x 49,152 = 4,831,838,208; + one layer's gradients 201,326,592;
#   + final norm and head inputs 4096 x 2*2*2048 = 33,554,432            -> 5,066,719,232
# SFT logits (fp32 log-softmax, its gradient and the incoming one): 12 x 4096 x 50,000
#                                                                        -> 2,457,600,000
ACT, LOGITS, ONE_LAYER = 5_066_719_232, 2_457_600_000, 201_326_592


def test_zero0_bf16_one_gpu():
    est = sft(stage=0)
    m = est.models[0]
    # bf16 weights 2N, bf16 grads 2N, fp32 master 4N + Adam m, v 8N; the step's fp32 grad copies 8N
    assert (m.weights, m.grads, m.optimizer, m.step_extra) == (2e9, 2e9, 12e9, 8e9)
    assert m.buffers == 0
    # training: resident 2N + 12N, plus the larger of activations + logits or gradients
    assert est.phases["training forward + backward"] == 14e9 + ACT + LOGITS
    # the step: 14N resident + 2N grads + 8N fp32 copies = 24 bytes per parameter: the peak
    assert est.phases["optimizer step"] == 24e9
    assert est.peak_phase == "optimizer step"
    # eval batch 8: bf16 logits + fp32 copy + log-softmax, 10 x 4096 x 50,000 = 2,048,000,000,
    # plus a no-grad layer's working set 4096 x (49,152 + 8,192) = 234,881,024
    assert est.phases["evaluation"] == 14e9 + 2_048_000_000 + 234_881_024


def test_zero0_gradient_accumulation_keeps_gradients():
    est = estimate_single("sft", ARCH, ds(0, accum=4), source="m", world_size=1, micro_batch=8,
                          eval_batch=8, seq_len=512, checkpointing=False, lora_dim=0,
                          lora_filter="", only_lora=False, dropout=None)
    assert est.phases["training forward + backward"] == 14e9 + 2e9 + ACT + LOGITS


def test_zero1_bf16_accumulates_in_an_fp32_buffer_kept_for_the_run():
    est = sft(stage=1)
    m = est.models[0]
    # DeepSpeed's BF16_Optimizer with immediate_grad_update: an fp32 gradient buffer 4N kept
    # between steps, master + Adam 12N (one rank: nothing partitioned); each bf16 gradient is
    # added into the buffer (through an fp32 copy) and freed as backward makes it: at most the
    # largest tensor's 2 + 4 bytes x 1e8 at once; no reduce buckets, and the step copies nothing
    # (1e9 parameters fill the 5e8-element all-reduce bucket alone)
    assert (m.weights, m.grads, m.hp_grads, m.optimizer, m.step_extra, m.buffers) == \
        (2e9, 0.6e9, 4e9, 12e9, 0.0, 0.0)
    assert m.resident == 18e9  # ZeRO-0's 14N + the fp32 buffer
    # backward as at ZeRO-0 (the head's gradient first, no bucket): activations + logits lead
    assert est.phases["training forward + backward"] == 18e9 + ACT + LOGITS
    # the step: 18N + at most one tensor's gradient, against ZeRO-0's 24 bytes per parameter
    assert est.phases["optimizer step"] == 18.6e9
    assert est.peak_phase == "training forward + backward"
    # two ranks partition the master copy and Adam's states, not the fp32 gradient buffer
    m2 = sft(stage=1, world=2).models[0]
    assert (m2.hp_grads, m2.optimizer) == (4e9, 6e9)


def test_without_immediate_grad_update_the_bf16_gradients_stay_until_the_step():
    cfg = ds(1)
    assert cfg["bf16"]["immediate_grad_update"] is True  # what dschat's configs ask for
    del cfg["bf16"]["immediate_grad_update"]
    m = trained_model(ARCH, Engine.from_ds(cfg), role="model", source="m", world_size=1)
    # bf16 grads 2N as at ZeRO-0, added into the buffer after backward and kept to the step:
    # 18N + 2N = 20 bytes per parameter at the step
    assert (m.grads, m.hp_grads, m.resident + m.grads + m.step_extra) == (2e9, 4e9, 20e9)


def test_fp32_accumulation_only_where_deepspeed_builds_bf16_optimizer():
    assert Engine.from_ds(ds(1)).fp32_accum
    off = train_ds_config(DeepSpeedOptions(zero_stage=1, fp32_grad_accum="off"),
                          OptimOptions(per_device_train_batch_size=8), world_size=1,
                          dtype="bf16", torch_adam=False)
    assert not Engine.from_ds(off).fp32_accum
    assert sft(stage=1, fp32_grad_accum="off").models[0].hp_grads == 0
    for cfg in (ds(1, dtype="fp16"), ds(1, dtype="fp32"), ds(1, offload=True), ds(2)):
        assert not Engine.from_ds(cfg).fp32_accum
    # the key alone does not make DeepSpeed's BF16_Optimizer at ZeRO-2: it is ignored there
    assert not Engine.from_ds({**ds(2), "data_types": {"grad_accum_dtype": "fp32"}}).fp32_accum


def test_a_small_model_copies_its_fp32_gradients_for_the_all_reduce():
    small = Arch(**{**ARCH.__dict__, "params": 300_000_000})
    m = trained_model(small, Engine.from_ds(ds(1)), role="model", source="m", world_size=1)
    # all parameter groups share one 5e8-element bucket: flattened into a copy
    assert m.step_extra == 4 * 300_000_000


def test_zero2_partitions_over_four_gpus():
    est = sft(stage=2, world=4)
    m = est.models[0]
    # grads 2N/4, optimizer 12N/4, the step's fp32 grad partition 4N/4; weights stay whole
    assert (m.weights, m.grads, m.optimizer, m.step_extra) == (2e9, 5e8, 3e9, 1e9)
    # two bf16 reduce buckets of DeepSpeed's default 5e8 elements (overlap_comm double-buffers)
    assert m.buffers == 2 * 2 * 5e8
    # backward, resident 2e9 + 3e9 plus the largest of its moments:
    #   start: activations + fp32 logit gradients, ACT + LOGITS                  = 7,524,319,232
    #   head:  ACT + bf16 logit gradients 2 x 4096 x 50,000 + buckets 2e9        = 7,476,319,232
    #   partition allocated when the first 5e8-element bucket is full, half the layers done:
    #          ACT / 2 + buckets + partition 5e8                                  = 5,033,359,616
    #   end:   partition + buckets + one layer                                    = 2,701,326,592
    assert est.phases["training forward + backward"] == 5e9 + ACT + LOGITS
    assert est.phases["optimizer step"] == 5e9 + 5e8 + 1e9


def test_zero3_partitions_weights_and_keeps_buffers():
    m = sft(stage=3, world=4).models[0]
    assert (m.weights, m.grads, m.optimizer, m.step_extra) == (5e8, 5e8, 3e9, 1e9)
    # gathered: the largest tensor + the 3e7-element prefetch (ZERO3_TUNING), bf16; one bucket
    assert m.buffers == 2 * (1e8 + 3e7) + 2 * 5e8
    assert m.resident == 5e8 + 3e9 + 5e8 + m.buffers


def test_offload_moves_optimizer_and_gradients_to_cpu():
    m = sft(stage=2, offload=True).models[0]
    assert (m.optimizer, m.grads, m.step_extra) == (0, 0, 0)
    m3 = trained_model(ARCH, Engine.from_ds(ds(3, offload=True, world=2)), role="model",
                       source="m", world_size=2)
    assert m3.weights == 0 and m3.optimizer == 0  # ZeRO-3 offload: parameters live on the CPU too


def test_fp32_has_no_master_copy():
    m = sft(stage=0, dtype="fp32").models[0]
    assert (m.weights, m.grads, m.optimizer, m.step_extra) == (4e9, 4e9, 8e9, 0)


def test_lora_only_trains_the_adapters():
    from dschat_cli.plan.arch import Linear

    arch = Arch(**{**ARCH.__dict__, "linears": (Linear("decoder.layers.0.fc1", 2048, 8192),)})
    m = trained_model(arch, Engine.from_ds(ds(0)), role="model", source="m", world_size=1,
                      lora_dim=8, only_lora=True)
    lora = 8 * (2048 + 8192)  # rank x (fan_in + fan_out) = 81,920
    assert (m.params, m.trainable) == (1e9 + lora, lora)
    assert (m.weights, m.optimizer) == (2 * (1e9 + lora), 12 * lora)
    # without --only-optimize-lora every weight trains as well (DeepSpeed-Chat's behaviour)
    m = trained_model(arch, Engine.from_ds(ds(0)), role="model", source="m", world_size=1,
                      lora_dim=8, only_lora=False)
    assert m.trainable == 1e9 + lora


def test_reward_model_has_two_sequences_per_pair_and_no_logits():
    est = estimate_single("reward", ARCH, ds(0), source="m", world_size=1, micro_batch=4,
                          eval_batch=4, seq_len=512, checkpointing=False, lora_dim=0,
                          lora_filter="", only_lora=False, dropout=None)
    m = est.models[0]
    assert m.params == 1e9 + 2048  # the backbone + Linear(2048, 1) value head
    # 4 pairs = 8 sequences of 512 tokens: the same activations as the SFT example, no logits
    assert m.activations == ACT


def test_gradient_checkpointing_keeps_layer_inputs():
    est = estimate_single("sft", ARCH, ds(0), source="m", world_size=1, micro_batch=8,
                          eval_batch=8, seq_len=512, checkpointing=True, lora_dim=0,
                          lora_filter="", only_lora=False, dropout=None)
    # 24 layer inputs 24 x 4096 x 2*2048 = 402,653,184; one layer recomputed and its gradients
    # 2 x 201,326,592; head inputs 33,554,432
    assert est.models[0].activations == 402_653_184 + 2 * ONE_LAYER + 33_554_432 + LOGITS


def test_frozen_models_hold_only_weights():
    ref = frozen_model(ARCH, Engine.from_ds(eval_ds_config(zero_stage=0, offload=False,
                                                           dtype="bf16", micro_batch_size=4,
                                                           world_size=2)),
                       role="ref", source="m", world_size=2)
    assert (ref.weights, ref.grads, ref.optimizer) == (2e9, 0, 0)
    offloaded = frozen_model(ARCH, Engine.from_ds(eval_ds_config(zero_stage=0, offload=True,
                                                                 dtype="bf16", micro_batch_size=4,
                                                                 world_size=2)),
                             role="ref", source="m", world_size=2)
    # offload makes it ZeRO-3 with parameters on the CPU: only the gathered ones (largest tensor
    # + DeepSpeed's default 5e7 prefetch) are on the GPU
    assert offloaded.weights == 2 * (1e8 + 5e7)


def test_ppo_kv_cache_and_phases():
    configs = {"actor": ds(0, micro=16), "critic": ds(0, micro=16),
               "ref": eval_ds_config(zero_stage=0, offload=False, dtype="bf16",
                                     micro_batch_size=16, world_size=1),
               "reward": eval_ds_config(zero_stage=0, offload=False, dtype="bf16",
                                        micro_batch_size=16, world_size=1)}
    archs = dict.fromkeys(("actor", "critic", "ref", "reward"), ARCH)
    est = estimate_ppo(archs, configs, dict.fromkeys(archs, "m"), world_size=1,
                       generation_batch=16, training_batch=16, generation_batches=1, ppo_epochs=1,
                       max_prompt_seq_len=256, max_answer_seq_len=256, actor_checkpointing=False,
                       critic_checkpointing=False, actor_lora=(0, "", False),
                       critic_lora=(0, "", False), actor_dropout=None, critic_dropout=None,
                       unsupervised=False, ema=False)
    actor = est.models[0]
    # keys and values: 2 x 24 layers x 16 x 512 tokens x 2048 x 2 bytes = 1,610,612,736,
    # plus one layer's copy while the cache grows: 2 x 16 x 512 x 2048 x 2 = 67,108,864
    assert actor.kv_cache == 1_610_612_736 + 67_108_864
    assert set(est.phases) == {"generation", "scoring", "actor training", "actor step",
                               "critic training", "critic step"}
    # actor and critic 14N resident each, ref and reward 2N (the critic's value head adds 2048)
    resident = 14e9 + 14 * (1e9 + 2048) + 2e9 + 2 * (1e9 + 2048)
    # scoring: bf16 logits of the 256 + 1 answer positions only (logits_to_keep), 2 x 16 x 257 x
    # 50,000 = 411,200,000, + one fp32 chunk of 16,777,216 // 50,000 = 335 positions and
    # logsumexp's temporary (8 x 335 x 50,000 = 134,000,000) + a layer's working set over all
    # 16 x 512 tokens
    assert est.phases["scoring"] == pytest.approx(
        resident + 411_200_000 + 134_000_000 + 16 * 512 * (49_152 + 8_192))
    # actor training, at the backward's start: activations of 16 x 512 tokens (twice the SFT
    # example's 4096: 10,133,438,464) + the bf16 logits of 16 x 257 positions beside their bf16
    # gradient (2 x 2 x 16 x 257 x 50,000 = 822,400,000) + one backward chunk (4 x 335 x 50,000 =
    # 67,000,000). Before chunked logprobs: 819,200,000 (bf16 logits of all 512 positions) +
    # 16 x 16 x 256 x 50,000 = 3,276,800,000 (the fp32 answer slice and its backward), 3.07 GB
    # more.
    assert est.phases["actor training"] == pytest.approx(
        resident + 10_133_438_464 + 822_400_000 + 67_000_000)
    # the steps see no logits (freed by the actor's backward): 2N grads + 8N fp32 copies each
    assert est.phases["actor step"] == pytest.approx(resident + 10e9)
    assert est.phases["critic step"] == pytest.approx(resident + 10 * (1e9 + 2048))
    assert est.peak_phase == "actor training"


def test_fused_qkv_copy_counts_only_the_layers_the_engine_fuses():
    """The fast engine copies each attention layer's plain q/k/v Linears into one matrix; LoRA-
    wrapped ones stay separate; a tensor-parallel replica's are 1/T wide and always plain."""
    from dataclasses import replace

    from dschat_cli.plan.arch import Linear
    from dschat_cli.plan.memory import fused_qkv_bytes

    lins = []
    for i in range(2):
        at = f"decoder.layers.{i}."
        lins += [Linear(at + "self_attn.q_proj", 2048, 2048),
                 Linear(at + "self_attn.k_proj", 2048, 512),
                 Linear(at + "self_attn.v_proj", 2048, 512), Linear(at + "fc1", 2048, 8192)]
    arch = replace(ARCH, layers=2, linears=tuple(lins))
    per_layer = 2048 * (2048 + 512 + 512)  # fc1 is no part of it
    assert fused_qkv_bytes(arch, 2) == 2 * 2 * per_layer
    assert fused_qkv_bytes(arch, 2, lora_dim=8, lora_filter="") == 0  # every Linear wrapped
    assert fused_qkv_bytes(arch, 2, lora_dim=8, lora_filter="layers.1.") == 2 * per_layer
    assert fused_qkv_bytes(arch, 2, lora_dim=8, lora_filter="fc1") == 2 * 2 * per_layer
    assert fused_qkv_bytes(arch, 2, 4, lora_dim=8, lora_filter="") == 2 * 2 * per_layer / 4


def test_overhead_and_verdicts():
    from dschat_cli.plan.memory import GiB, overhead_bytes
    from dschat_cli.plan.planner import verdict

    assert overhead_bytes(100 * GiB, 1) == pytest.approx(0.6 * GiB + 7 * GiB)
    assert overhead_bytes(100 * GiB, 8) == pytest.approx(1.1 * GiB + 7 * GiB)
    # fits with the 15% margin / only without it / not at all / nothing to compare with
    assert verdict(60 * GiB, 5 * GiB, 80 * GiB) == "fits"
    assert verdict(70 * GiB, 5 * GiB, 80 * GiB) == "tight"
    assert verdict(76 * GiB, 5 * GiB, 80 * GiB) == "does not fit"
    assert verdict(76 * GiB, 5 * GiB, None) == "unknown"


def dpo(reference="copy", accum=1, lora=0, arch=ARCH):
    from dschat_cli.plan.memory import estimate_dpo

    configs = {"model": ds(0, micro=4, accum=accum),
               "ref": eval_ds_config(zero_stage=0, offload=False, dtype="bf16", micro_batch_size=4,
                                     world_size=1)}
    return estimate_dpo(arch, configs, source="m", world_size=1, micro_batch=4, eval_batch=4,
                        seq_len=512, checkpointing=False, lora_dim=lora, lora_filter="",
                        only_lora=lora > 0, dropout=None, reference=reference)


# DPO logits over 4 pairs = 8 sequences of 512 = 4096 tokens (the SFT example's ACT), scored in
# fp32 chunks of 16,777,216 // 50,000 = 335 positions (rlhf/logprobs.py):
#   training: the bf16 logits kept for the backward and the bf16 gradient it writes, 2 x 2 x 4096
#   x 50,000 = 819,200,000, + one backward chunk 4 x 335 x 50,000 = 67,000,000 (before chunking:
#   the fp32 copy and its gradient's fp32 temporaries, 16 x 4096 x 50,000 = 3,276,800,000)
#   a no-grad forward: bf16 logits 2 x 4096 x 50,000 = 409,600,000 + one forward chunk 8 x 335 x
#   50,000 = 134,000,000 (before: + the fp32 copy and logsumexp's temporary, 10 B per element),
#   plus a layer's working set 4096 x (49,152 + 8,192) = 234,881,024
DPO_LOGITS, SCORING = 819_200_000 + 67_000_000, 409_600_000 + 134_000_000 + 234_881_024


def test_dpo_policy_and_reference_copy():
    est = dpo()
    policy, ref = est.models
    assert (policy.role, ref.role) == ("policy", "ref")
    assert (policy.weights, policy.grads, policy.optimizer, policy.step_extra) == (2e9, 2e9, 12e9,
                                                                                  8e9)
    assert (ref.weights, ref.trainable, ref.optimizer) == (2e9, 0, 0)  # a frozen bf16 copy
    # resident: the policy's 2N weights + 12N Adam states, the copy's 2N
    assert est.phases["reference forward"] == 16e9 + SCORING
    # backward's start: every activation + the logits work (the head moment, ACT + bf16 logit
    # gradients 409,600,000 + head gradient 204,800,000 = ACT + 614,400,000, is smaller)
    assert est.phases["policy forward + backward"] == 16e9 + ACT + DPO_LOGITS
    # the step: 16N resident + 2N grads + 8N fp32 copies
    assert est.phases["optimizer step"] == 26e9
    assert est.phases["evaluation"] == 16e9 + SCORING  # 4 eval pairs: the same 4096 tokens
    assert policy.activations == ACT + DPO_LOGITS and ref.activations == SCORING


def test_dpo_precomputed_reference_is_gone_before_training():
    est = dpo("precomputed")
    # the copy alone scores the pairs (4 eval pairs at a time), before the policy exists
    assert est.phases["reference precompute"] == 2e9 + SCORING
    assert "reference forward" not in est.phases
    # no copy while training: 2 GB less than with one
    assert est.phases["policy forward + backward"] == 14e9 + ACT + DPO_LOGITS
    assert est.phases["optimizer step"] == 24e9
    assert est.models[1].role == "ref (before training)"
    assert any("--precompute-ref-logprobs" in n for n in est.notes)


def test_dpo_lora_reference_is_the_policy_with_adapters_off():
    from dschat_cli.plan.arch import Linear

    arch = Arch(**{**ARCH.__dict__, "linears": (Linear("decoder.layers.0.fc1", 2048, 8192),)})
    est = dpo("adapters-off", lora=8, arch=arch)
    assert [m.role for m in est.models] == ["policy"]  # no second model
    lora = 8 * (2048 + 8192)  # 81,920 trained parameters
    resident = 2 * (1e9 + lora) + 12 * lora
    assert est.phases["reference forward"] == resident + SCORING
    assert est.phases["optimizer step"] == resident + 2 * lora + 8 * lora


def test_dpo_gradient_accumulation_holds_gradients_through_the_reference_forward():
    # ZeRO-0 with 2 micro-batches: the reference scores the 2nd while the 1st's 2N grads are held
    assert dpo(accum=2).phases["reference forward"] == 16e9 + 2e9 + SCORING
