"""The estimator table and a run's resolved settings (config/estimators.py), and what a PPO
config refuses for each estimator (config/ppo.py)."""

from __future__ import annotations

import pytest

from dschat_cli.config.estimators import ESTIMATORS
from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.schema import ConfigError, from_flags


def cfg(**flags) -> PPOConfig:
    base = {"actor_model": "a", "critic_model": "r", "output_dir": "/tmp/x"}
    return from_flags(PPOConfig, **{**base, **flags})


# estimator -> (placement, KL estimate, coefficient, aggregation, critic?)
DEFAULTS = {
    "gae": ("reward", "k1", 0.1, "token-mean", True),
    "grpo": ("loss", "k3", 0.04, "seq-mean-token-mean", False),
    "dr-grpo": ("loss", "k3", 0.0, "seq-mean-token-sum-norm", False),
    "rloo": ("reward", "k1", 0.05, "token-mean", False),
    "reinforce++": ("reward", "k1", 0.01, "token-mean", False),
    "reinforce++-baseline": ("reward", "k1", 0.01, "token-mean", False),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_each_estimators_defaults(name):
    spec = ESTIMATORS[name]
    c = cfg(advantage_estimator=name,
            samples_per_prompt=4 if spec.needs_group else 1)
    c.check()
    s = c.ppo.settings
    assert (s.kl_placement, s.kl_estimator, s.kl_coef, s.loss_aggregation, c.has_critic) == \
        DEFAULTS[name]
    assert (s.cliprange_low, s.cliprange_high, s.dual_clip) == (0.2, 0.2, None)


def test_explicit_flags_win_and_auto_follows_the_placement():
    s = cfg(kl_ctl=0.5, kl_placement="loss", loss_aggregation="seq-mean-token-mean",
            cliprange_high=0.28, dual_clip=3.0).ppo.settings
    assert (s.kl_coef, s.kl_placement, s.kl_estimator) == (0.5, "loss", "k3")  # k3 in a loss
    assert (s.loss_aggregation, s.cliprange_high, s.dual_clip) == ("seq-mean-token-mean", 0.28,
                                                                   3.0)
    s = cfg(advantage_estimator="grpo", samples_per_prompt=2, kl_placement="reward").ppo.settings
    assert (s.kl_placement, s.kl_estimator, s.kl_coef) == ("reward", "k1", 0.04)
    assert cfg(kl_estimator="k2").ppo.settings.kl_estimator == "k2"


@pytest.mark.parametrize("flags,where", [
    ({"advantage_estimator": "grpo"}, "--samples-per-prompt"),  # a group needs >= 2 answers
    ({"advantage_estimator": "rloo", "samples_per_prompt": 1}, "--samples-per-prompt"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 2, "critic_learning_rate": 1e-3},
     "--critic-learning-rate"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 2, "critic_lora_dim": 4},
     "--critic-lora-dim"),
    ({"advantage_estimator": "rloo", "samples_per_prompt": 2, "cliprange_value": 0.5},
     "--cliprange-value"),
    ({"advantage_estimator": "rloo", "samples_per_prompt": 2, "lam": 0.9}, "--lam"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 2, "gamma": 0.9}, "--gamma"),
    ({"advantage_estimator": "reinforce++", "whiten_advantages": True}, "--whiten-advantages"),
    ({"advantage_estimator": "dr-grpo", "samples_per_prompt": 2, "kl_target": 1.0},
     "--kl-target"),  # adaptive KL of a coefficient 0
    ({"advantage_estimator": "grpo", "samples_per_prompt": 2, "reward_model": "other"},
     "--critic-model"),  # two different reward models named
    ({"samples_per_prompt": 3}, "--per-device-training-batch-size"),  # 16 x 3 rows, mini 16: ok
])
def test_refusals_name_the_flag(flags, where):
    if where == "--per-device-training-batch-size":
        cfg(**flags).check()  # 48 rows in mini-batches of 16: fine
        flags = {**flags, "per_device_training_batch_size": 32}
    with pytest.raises(ConfigError) as e:
        cfg(**flags).check()
    assert e.value.where == where, e.value


def test_critic_free_takes_the_reward_model_from_either_flag():
    c = cfg(advantage_estimator="grpo", samples_per_prompt=2, critic_model=None,
            reward_model="r")
    c.check()
    assert c.reward_path == "r"
    c = cfg(advantage_estimator="grpo", samples_per_prompt=2)  # --critic-model r
    c.check()
    assert c.reward_path == "r"
    with pytest.raises(ConfigError) as e:
        cfg(advantage_estimator="grpo", samples_per_prompt=2, critic_model=None).check()
    assert e.value.where == "--reward-model"


def test_old_logprobs_defaults_to_auto_and_its_gap_is_refused_elsewhere():
    assert cfg().generation.old_logprobs == "auto"
    cfg(parity_switch_gap=0.05).check()
    for flags, where in (({"old_logprobs": "forward", "parity_switch_gap": 0.05},
                          "--parity-switch-gap"),  # accepted and ignored otherwise
                         ({"parity_switch_gap": 0.2}, "--parity-switch-gap"),  # > tolerance 0.1
                         ({"old_logprobs": "generation", "generation_engine": "hf"},
                          "--old-logprobs generation")):
        with pytest.raises(ConfigError) as e:
            cfg(**flags).check()
        assert e.value.where == where, e.value
    cfg(old_logprobs="auto", generation_engine="hf").check()  # auto: the forward pass, said so


def test_compile_decode_needs_the_fast_engine():
    assert cfg().generation.compile_decode == "auto"
    cfg(compile_decode="on").check()
    cfg(generation_engine="hf").check()  # auto with the hf engine: nothing to compile
    with pytest.raises(ConfigError) as e:
        cfg(compile_decode="on", generation_engine="hf").check()
    assert e.value.where == "--compile-decode on" and "--generation-engine fast" in e.value.message


def test_fp32_grad_accum_on_needs_zero_1_for_each_trained_model():
    cfg(fp32_grad_accum="on", actor_zero_stage=1, critic_zero_stage=1).check()
    # no critic is trained without one: only the actor's stage counts
    cfg(fp32_grad_accum="on", actor_zero_stage=1, advantage_estimator="grpo",
        samples_per_prompt=2).check()
    cfg(actor_zero_stage=1).check()  # auto: fp32 wherever the stage is 1, nothing to refuse
    for flags, named in (({"actor_zero_stage": 1}, "--critic-zero-stage is 0"),
                         ({"critic_zero_stage": 1, "actor_zero_stage": 2},
                          "--actor-zero-stage is 2")):
        with pytest.raises(ConfigError) as e:
            cfg(fp32_grad_accum="on", **flags).check()
        assert e.value.where == "--fp32-grad-accum" and named in e.value.message
