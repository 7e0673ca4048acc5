"""`dschat bench`'s config (dschat_cli/config/bench.py): --batch-size counts answers, so the step-3
config it runs holds --batch-size / --samples-per-prompt prompts, and a critic-free estimator's has
no critic."""

from __future__ import annotations

import pytest

from dschat_cli.config.bench import BenchConfig, bench_ds_configs, bench_ppo_config
from dschat_cli.config.schema import ConfigError


def bench(**kw) -> BenchConfig:
    """A bench config as the launch hands it on: ZeRO stages chosen (plan/choose.py)."""
    return BenchConfig(**{"actor_zero_stage": 2, "critic_zero_stage": 2, **kw})


def test_gae_is_todays_bench():
    cfg = bench(batch_size=64)
    cfg.check()
    t = bench_ppo_config(cfg).train
    assert (cfg.samples, t.per_device_generation_batch_size, t.samples_per_prompt,
            t.per_device_training_batch_size) == (1, 64, 1, 64)
    assert bench_ppo_config(cfg).has_critic


def test_group_estimator_defaults_to_8_answers_per_prompt_out_of_the_batch():
    cfg = bench(batch_size=64, advantage_estimator="grpo")
    cfg.check()
    ppo = bench_ppo_config(cfg)
    # 64 answers per GPU = 8 prompts x 8 answers, trained on in one mini-batch of 64
    assert (ppo.train.per_device_generation_batch_size, ppo.train.samples_per_prompt,
            ppo.train.per_device_training_batch_size) == (8, 8, 64)
    assert ppo.ppo.advantage_estimator == "grpo" and not ppo.has_critic
    configs = bench_ds_configs(cfg, world_size=1, dtype="bf16", torch_adam=False,
                               tensorboard_dir=None, job_name="bench")
    assert "critic" not in configs and {"actor", "ref", "reward"} <= set(configs)
    # reinforce++ needs no group: one answer per prompt unless asked
    assert BenchConfig(advantage_estimator="reinforce++").samples == 1
    assert BenchConfig(advantage_estimator="rloo", samples_per_prompt=4, batch_size=8).prompts == 2


def test_mini_batches_make_one_optimizer_step_per_batch():
    cfg = bench(batch_size=256, micro_batch_size=64)
    cfg.check()
    t = bench_ppo_config(cfg).train
    # 256 answers generated per step, trained in 4 mini-batches of 64, one optimizer step
    assert (t.per_device_generation_batch_size, t.per_device_training_batch_size,
            t.gradient_accumulation_steps, t.ppo_epochs) == (256, 64, 4, 1)
    ds = bench_ds_configs(cfg, world_size=1, dtype="bf16", torch_adam=False,
                          tensorboard_dir=None, job_name="bench")
    for role in ("actor", "critic"):
        assert (ds[role]["train_micro_batch_size_per_gpu"], ds[role]["train_batch_size"],
                ds[role]["gradient_accumulation_steps"]) == (64, 256, 4)
    with pytest.raises(ConfigError) as e:
        bench(batch_size=64, micro_batch_size=48).check()
    assert "e.g. 32" in str(e.value)


def test_critic_free_bench_does_not_checkpoint_a_critic_it_does_not_build():
    ppo = bench_ppo_config(bench(advantage_estimator="grpo", gradient_checkpointing=True))
    assert ppo.actor.gradient_checkpointing and not ppo.critic.gradient_checkpointing


@pytest.mark.parametrize("kw, flag", [
    (dict(advantage_estimator="grpo", samples_per_prompt=1), "--samples-per-prompt"),
    (dict(advantage_estimator="grpo", batch_size=12), "--batch-size"),  # 8 does not divide 12
    (dict(samples_per_prompt=3, batch_size=64), "--batch-size"),
    (dict(step="sft", advantage_estimator="rloo"), "--advantage-estimator"),
    (dict(step="sft", samples_per_prompt=2), "--samples-per-prompt"),
    (dict(step="dpo", micro_batch_size=8), "--micro-batch-size"),
    (dict(batch_size=64, micro_batch_size=48), "--micro-batch-size"),  # 48 does not divide 64
    (dict(micro_batch_size=128), "--micro-batch-size"),  # larger than the default batch
])
def test_bad_input_names_the_flag(kw, flag):
    with pytest.raises(ConfigError) as e:
        BenchConfig(**kw).check()
    assert e.value.where.startswith(flag)


def test_unset_zero_stages_must_be_chosen_before_the_run_configs_are_built():
    with pytest.raises(ValueError, match="chosen"):
        bench_ppo_config(BenchConfig(batch_size=64))


def test_gpu_memory_plans_the_batch_so_a_given_batch_refuses_it():
    BenchConfig(gpu_memory=80).check()
    with pytest.raises(ConfigError) as e:
        BenchConfig(gpu_memory=80, batch_size=64).check()
    assert e.value.where == "--gpu-memory"
