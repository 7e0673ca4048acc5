"""The floors `dschat bench` sets each phase against, on a hand-computed toy shape."""

from __future__ import annotations

import pytest

from dschat_cli.steps.bench import Shape, ppo_floors


def test_ppo_floors_hand_computed():
    # actor: 1000 params (all matmul), 2 layers, hidden 10; critic 100 params, 1 layer, hidden 5
    actor = Shape(params=1000, matmul_params=1000, layers=2, hidden=10)
    critic = Shape(params=100, matmul_params=80, layers=1, hidden=5)
    # 1 matmul TFLOP/s = 1e12 flop/s; 1 GB/s = 1e9 bytes/s
    ceil = {"matmul_tflops": 1.0, "copy_gbps": 1.0}
    f = ppo_floors(actor, critic, batch=2, prompt=3, answer=2, bytes_per_param=2, ceilings=ceil,
                   gradient_checkpointing=False)
    # forward flops per token = 2 * matmul params + 4 * layers * hidden * seq_len
    # actor forward over the whole 2 x 5 tokens: 10 * (2000 + 4*2*10*5) = 10 * 2400 = 24000
    assert f["actor_forward"] == (24000, 0.0, 24000 / 1e12)
    assert f["ref_forward"] == f["actor_forward"]
    # critic: 10 * (160 + 4*1*5*5) = 10 * 260 = 2600
    assert f["critic_forward"][0] == 2600 and f["reward_forward"][0] == 2600
    # training = 3 x forward; Adam moves 20 bytes per parameter
    assert f["actor_train"] == (72000, 20000.0, 72000 / 1e12 + 20000 / 1e9)
    # generation: prefill 2*3 tokens at seq 3: 6 * (2000 + 240) = 13440 flops; one decode step
    # (answer 2 -> t = 1, context 4): flops 2 * (2000 + 320) = 4640; bytes = weights 1000*2 +
    # KV 2 tensors * 2 layers * 2 rows * 4 ctx * 10 hidden * 2 bytes = 2000 + 640 = 2640
    flops, nbytes, floor = f["generation"]
    assert flops == 13440 + 4640 and nbytes == 2640
    assert floor == pytest.approx(13440 / 1e12 + 2640 / 1e9)
    # the decode-step floor at the mean context (3 + 2 // 2 = 4): same 2640 bytes
    assert f["decode_step"] == pytest.approx(2640 / 1e9)
    g = ppo_floors(actor, critic, batch=2, prompt=3, answer=2, bytes_per_param=2, ceilings=ceil,
                   gradient_checkpointing=True)
    assert g["actor_train"][0] == pytest.approx(72000 * 4 / 3)  # recomputed forward


def test_dpo_floors_hand_computed():
    from dschat_cli.steps.bench import dpo_floors

    policy = Shape(params=1000, matmul_params=1000, layers=2, hidden=10)
    ceil = {"matmul_tflops": 1.0, "copy_gbps": 1.0}
    f = dpo_floors(policy, pairs=2, seq_len=5, ceilings=ceil, gradient_checkpointing=False,
                   reference=True)
    # 2 pairs = 4 sequences of 5 tokens = 20 tokens; per token 2 * 1000 + 4 * 2 * 10 * 5 = 2400
    assert f["policy_forward"] == (48000, 0.0, 48000 / 1e12)
    assert f["ref_forward"] == f["policy_forward"]
    assert f["policy_backward"] == (96000, 0.0, 96000 / 1e12)  # 2x the forward
    # Adam: 28 bytes per parameter at 1 GB/s
    assert f["optimizer_step"] == (0.0, 28000.0, 28000 / 1e9)
    g = dpo_floors(policy, pairs=2, seq_len=5, ceilings=ceil, gradient_checkpointing=True,
                   reference=False)
    assert "ref_forward" not in g  # precomputed: no reference forward in the step
    assert g["policy_backward"][0] == 3 * 48000  # the forward recomputed in the backward
