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


def test_ppo_floors_count_the_output_head_only_where_logits_are_needed():
    # the actor of the test above with 400 of its 1000 matmul parameters in the output head
    actor = Shape(params=1000, matmul_params=1000, layers=2, hidden=10, head_params=400)
    critic = Shape(params=100, matmul_params=80, layers=1, hidden=5)
    ceil = {"matmul_tflops": 1.0, "copy_gbps": 1.0}
    f = ppo_floors(actor, critic, batch=2, prompt=3, answer=2, bytes_per_param=2, ceilings=ceil,
                   gradient_checkpointing=False)
    # scoring forward: 10 tokens x (2 x 600 body + 4*2*10*5 attention) = 10 * 1600 = 16000,
    # plus the head on the 2 x 2 answer positions: 4 x 2 x 400 = 3200 -> 19200 (24000 with the
    # head on all 10)
    assert f["actor_forward"][0] == 19200 and f["ref_forward"][0] == 19200
    assert f["actor_train"][0] == 3 * 19200
    # prefill: 6 tokens x (1200 + 240) = 8640, head on the last position of each row: 2 x 800
    # = 1600 -> 10240; the decode step (one token per row, all need logits) is unchanged: 4640
    assert f["generation"][0] == 10240 + 4640
    # the critic has no output head: as before
    assert f["critic_forward"][0] == 2600


def test_model_shape_finds_the_output_head(tiny_opt):
    from transformers import AutoModelForCausalLM

    from dschat_cli.steps.bench import model_shape

    model = AutoModelForCausalLM.from_pretrained(tiny_opt)
    shape = model_shape(model)
    assert shape.head_params == model.config.vocab_size * model.config.hidden_size
    assert 0 < shape.head_params < shape.matmul_params


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
    h = dpo_floors(Shape(params=1000, matmul_params=1000, layers=2, hidden=10, head_params=400),
                   pairs=2, seq_len=5, ceilings=ceil, gradient_checkpointing=False,
                   reference=True, answer=2)
    # 20 tokens x (1200 + 400) = 32000, head on 4 sequences x 2 answer tokens: 8 x 800 = 6400
    assert h["policy_forward"][0] == 38400 and h["policy_backward"][0] == 2 * 38400
    g = dpo_floors(policy, pairs=2, seq_len=5, ceilings=ceil, gradient_checkpointing=True,
                   reference=False)
    assert "ref_forward" not in g  # precomputed: no reference forward in the step
    assert g["policy_backward"][0] == 3 * 48000  # the forward recomputed in the backward
