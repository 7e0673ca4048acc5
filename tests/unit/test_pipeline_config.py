"""`dschat pipeline` builds each step's config through the step commands' own resolver: size preset
< step YAML (--sft-config, ...) < pipeline flags, each layer by the steps' flag names."""

from __future__ import annotations

import pytest

from dschat_cli.config.pipeline import PipelineConfig
from dschat_cli.config.schema import ConfigError, from_flags
from dschat_cli.pipeline import plan_pipeline

# The demo's step settings by field path (what the demo was tuned and measured with, issue 15):
# the pipeline speaks flag names, and each must land on its field.
DEMO = {
    "sft": {("optim", "num_train_epochs"): 5, ("optim", "learning_rate"): 2e-3,
            ("optim", "per_device_train_batch_size"): 16, ("optim", "num_warmup_steps"): 0,
            ("data", "max_seq_len"): 96, ("deepspeed", "dtype"): "fp32"},
    "reward": {("optim", "num_train_epochs"): 2, ("optim", "learning_rate"): 1e-3,
               ("optim", "per_device_train_batch_size"): 16, ("data", "max_seq_len"): 96,
               ("deepspeed", "dtype"): "fp32", ("optim", "gradient_accumulation_steps"): 1},
    "ppo": {("train", "actor_learning_rate"): 1e-4, ("train", "critic_learning_rate"): 5e-4,
            ("train", "num_warmup_steps"): 0, ("train", "per_device_generation_batch_size"): 16,
            ("train", "per_device_training_batch_size"): 16, ("train", "num_train_epochs"): 2,
            ("generation", "max_answer_seq_len"): 48, ("data", "max_prompt_seq_len"): 32,
            ("data", "max_eval_samples"): 128, ("deepspeed", "dtype"): "fp32",
            ("ppo", "true_reward"): "demo", ("ppo", "kl_ctl"): 0.3},
}


def value(cfg, path):
    for part in path:
        cfg = getattr(cfg, part)
    return cfg


def test_demo_settings_are_unchanged(tmp_path):
    plans = plan_pipeline(from_flags(PipelineConfig, demo=True, output_dir=str(tmp_path)))
    assert [p.name for p in plans] == ["sft", "reward", "ppo"]
    for p in plans:
        for path, expected in DEMO[p.name].items():
            assert value(p.cfg, path) == expected, (p.name, path)


def test_preset_then_step_yaml_then_pipeline_flags(tmp_path):
    yaml = tmp_path / "sft.yaml"
    yaml.write_text("deepspeed:\n  zero_stage: 2\noptim:\n  per_device_train_batch_size: 3\n"
                    "  learning_rate: 1.0e-4\nseed: 7\n")
    base = dict(actor="opt-13b", output_dir=str(tmp_path / "out"), sft_config=str(yaml),
                deployment_type="single_node")
    sft = plan_pipeline(from_flags(PipelineConfig, **base))[0].cfg
    assert sft.deepspeed.zero_stage == 2  # the YAML over the 13B preset's ZeRO-3
    assert sft.optim.per_device_train_batch_size == 3  # the YAML over the preset's 4
    assert sft.model.gradient_checkpointing  # the preset's, untouched by the YAML
    assert sft.optim.learning_rate == 1e-4  # the YAML over the default
    assert sft.seed == 1234  # the pipeline's --seed is passed to every step: it wins
    assert sft.output_dir == str((tmp_path / "out" / "actor-models" / "opt-13b").resolve())
    # --actor-zero-stage replaces the preset's stage ("default: the size preset's"): a step YAML
    # that sets one still wins, as before
    flagged = plan_pipeline(from_flags(PipelineConfig, actor_zero_stage=1, **base))[0].cfg
    assert flagged.deepspeed.zero_stage == 2
    no_yaml = {k: v for k, v in base.items() if k != "sft_config"}
    flagged = plan_pipeline(from_flags(PipelineConfig, actor_zero_stage=1, **no_yaml))[0].cfg
    assert flagged.deepspeed.zero_stage == 1
    assert flagged.model.model == "opt-13b"  # the pipeline's --actor: a flag layer
    ppo = plan_pipeline(from_flags(PipelineConfig, **base))[2].cfg
    assert (ppo.deepspeed.actor_zero_stage, ppo.deepspeed.critic_zero_stage) == (3, 0)
    assert ppo.actor.model == str((tmp_path / "out" / "actor-models" / "opt-13b").resolve())
    assert ppo.critic.model == str((tmp_path / "out" / "reward-models" / "opt-350m").resolve())


def test_a_step_yaml_with_an_unknown_option_names_its_flag(tmp_path):
    yaml = tmp_path / "reward.yaml"
    yaml.write_text("optim:\n  lr: 1\n")
    with pytest.raises(ConfigError) as e:
        plan_pipeline(from_flags(PipelineConfig, output_dir=str(tmp_path), reward_config=str(yaml)))
    assert e.value.where == "--reward-config"
    assert "unknown RewardConfig option 'optim.lr'" in e.value.message


def test_pipeline_passes_the_estimator_and_names_its_own_step3_folder(tmp_path):
    base = dict(output_dir=str(tmp_path / "out"))
    gae = plan_pipeline(from_flags(PipelineConfig, **base))[2]
    grpo = plan_pipeline(from_flags(PipelineConfig, advantage_estimator="grpo",
                                    samples_per_prompt=8, **base))[2]
    assert gae.cfg.ppo.advantage_estimator == "gae" and gae.out.name == "opt-1.3b"
    assert grpo.cfg.ppo.advantage_estimator == "grpo" and grpo.out.name == "opt-1.3b-grpo"
    assert grpo.cfg.output_dir == str(grpo.out) and grpo.cfg.train.samples_per_prompt == 8
    assert not grpo.cfg.has_critic
    # the step YAML can pick it too; the pipeline flag wins over it
    yaml = tmp_path / "ppo.yaml"
    yaml.write_text("ppo:\n  advantage_estimator: rloo\ntrain:\n  samples_per_prompt: 2\n")
    rloo = plan_pipeline(from_flags(PipelineConfig, ppo_config=str(yaml), **base))[2]
    assert rloo.cfg.ppo.advantage_estimator == "rloo" and rloo.out.name == "opt-1.3b-rloo"
    flagged = plan_pipeline(from_flags(PipelineConfig, ppo_config=str(yaml),
                                       advantage_estimator="grpo", **base))[2]
    assert flagged.cfg.ppo.advantage_estimator == "grpo"
    # a group estimator without a group is refused, naming the flag
    with pytest.raises(ConfigError, match="samples-per-prompt"):
        plan_pipeline(from_flags(PipelineConfig, advantage_estimator="grpo", **base))


def test_demo_settings_by_estimator(tmp_path):
    grpo = plan_pipeline(from_flags(PipelineConfig, demo=True, advantage_estimator="grpo",
                                    output_dir=str(tmp_path)))[2].cfg
    assert (grpo.train.samples_per_prompt, grpo.train.per_device_generation_batch_size,
            grpo.train.num_train_epochs) == (4, 8, 1)
    assert grpo.train.critic_learning_rate == 5e-6  # untouched: the critic options are refused
    assert grpo.ppo.true_reward == "demo" and grpo.ppo.kl_ctl == 0.3
