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
    "ppo": {("train", "actor_learning_rate"): 5e-5, ("train", "critic_learning_rate"): 5e-4,
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


# --method dpo: step 1, then `dschat dpo` as step 2 on step 1's model (DeepSpeed-Chat's
# step2_dpo_finetuning); no reward model, no step 3.

def test_method_dpo_plans_step_1_then_dpo_on_its_output(tmp_path):
    out = tmp_path / "out"
    plans = plan_pipeline(from_flags(PipelineConfig, method="dpo", output_dir=str(out)))
    assert [(p.number, p.name) for p in plans] == [(1, "sft"), (2, "dpo")]
    sft, dpo = plans
    assert dpo.out == (out / "dpo-models" / "opt-1.3b").resolve()
    assert dpo.cfg.output_dir == str(dpo.out) and dpo.inputs == (sft.out,)
    assert dpo.cfg.model.model == str(sft.out)  # the policy (and its reference) is step 1's model
    assert dpo.cfg.data.data_split == "2,4,4" and dpo.cfg.seed == 1234  # the pipeline's, shared
    # the 1.3B preset on one GPU: ZeRO-0; a pair is two sequences, so half step 1's micro-batch
    # and twice its accumulation: the same global batch
    assert dpo.cfg.deepspeed.zero_stage == sft.cfg.deepspeed.zero_stage == 0
    assert (sft.cfg.optim.per_device_train_batch_size, sft.cfg.optim.gradient_accumulation_steps,
            dpo.cfg.optim.per_device_train_batch_size,
            dpo.cfg.optim.gradient_accumulation_steps) == (8, 2, 4, 4)
    # the DPO defaults are the step's own (the reference's OPT-350M script), not step 1's
    assert (dpo.cfg.optim.learning_rate, dpo.cfg.dpo.beta) == (5e-5, 0.1)
    assert dpo.cfg.heldout.true_reward == "none"
    # rlhf, the default, is unchanged: three steps, no DPO folder
    assert [p.name for p in plan_pipeline(from_flags(PipelineConfig, output_dir=str(out)))] == \
        ["sft", "reward", "ppo"]


@pytest.mark.parametrize("method, steps, expected", [
    ("dpo", ("dpo",), ["dpo"]), ("dpo", ("2",), ["dpo"]), ("dpo", ("sft,dpo",), ["sft", "dpo"]),
    ("dpo", ("1",), ["sft"]), ("rlhf", ("ppo", "1"), ["sft", "ppo"]),
])
def test_steps_by_number_or_name_within_the_method(tmp_path, method, steps, expected):
    cfg = from_flags(PipelineConfig, method=method, steps=steps, output_dir=str(tmp_path))
    assert [p.name for p in plan_pipeline(cfg)] == expected


@pytest.mark.parametrize("flags, where, message", [
    ({"method": "dpo", "steps": ("3",)}, "--steps",
     "'3' is a step of --method rlhf, not of --method dpo; use 1 (sft) and/or 2 (dpo)"),
    ({"method": "dpo", "steps": ("reward",)}, "--steps", "'reward' is a step of --method rlhf"),
    ({"steps": ("dpo",)}, "--steps", "'dpo' is a step of --method dpo, not of --method rlhf"),
    ({"steps": ("4",)}, "--steps", "'4' is not a step of --method rlhf; use 1 (sft), 2 (reward) "
                                   "and/or 3 (ppo)"),
    ({"method": "dpo", "advantage_estimator": "grpo"}, "--advantage-estimator",
     "sets `dschat ppo`, which --method dpo does not run (its steps: sft, dpo)"),
    ({"method": "dpo", "reward_config": "r.yaml"}, "--reward-config", "--method dpo does not run"),
    ({"dpo_config": "d.yaml"}, "--dpo-config", "which --method rlhf does not run"),
])
def test_method_refuses_what_it_does_not_run_naming_the_flag(tmp_path, flags, where, message):
    with pytest.raises(ConfigError) as e:
        from_flags(PipelineConfig, output_dir=str(tmp_path), **flags).check()
    assert e.value.where == where and message in e.value.message, e.value


def test_dpo_config_yaml_is_the_dpo_steps_layer(tmp_path):
    yaml = tmp_path / "dpo.yaml"
    yaml.write_text("dpo:\n  beta: 0.3\n  loss_type: ipo\noptim:\n  learning_rate: 1.0e-6\n"
                    "seed: 7\n")
    dpo = plan_pipeline(from_flags(PipelineConfig, method="dpo", dpo_config=str(yaml),
                                   output_dir=str(tmp_path / "out")))[1].cfg
    assert (dpo.dpo.beta, dpo.dpo.loss_type, dpo.optim.learning_rate) == (0.3, "ipo", 1e-6)
    assert dpo.seed == 1234  # the pipeline's --seed wins, as for every step
    yaml.write_text("dpo:\n  betta: 1\n")
    with pytest.raises(ConfigError) as e:
        plan_pipeline(from_flags(PipelineConfig, method="dpo", dpo_config=str(yaml),
                                 output_dir=str(tmp_path)))
    assert e.value.where == "--dpo-config" and "dpo.betta" in e.value.message


def test_demo_dpo_settings(tmp_path):
    from dschat_cli.pipeline import DEMO_STEPS

    plans = plan_pipeline(from_flags(PipelineConfig, demo=True, method="dpo",
                                     output_dir=str(tmp_path)))
    assert [p.name for p in plans] == ["sft", "dpo"]
    sft, dpo = plans
    for path, expected in DEMO["sft"].items():  # step 1 is the rlhf demo's (it can be shared)
        assert value(sft.cfg, path) == expected, path
    c = dpo.cfg
    assert c.heldout.true_reward == "demo" and c.deepspeed.dtype == "fp32"
    assert c.data.max_seq_len == 96 and c.heldout.max_answer_seq_len == 48
    assert (c.optim.learning_rate, c.dpo.beta, c.optim.num_train_epochs) == tuple(
        DEMO_STEPS["dpo"][k] for k in ("learning_rate", "beta", "num_train_epochs"))


def test_summary_shows_dpo_figures_and_its_greedy_answers(tmp_path):
    import json

    from dschat_cli.pipeline import _summarise

    cfg = from_flags(PipelineConfig, method="dpo", output_dir=str(tmp_path))
    plans = plan_pipeline(cfg)
    dpo = plans[1]
    dpo.out.mkdir(parents=True)
    answer = {"prompt": "Human: How do I bake bread? Assistant:", "answer": "Sure! Knead it.",
              "true_reward": 1.0}
    (dpo.out / "train_summary.json").write_text(json.dumps({
        "eval_accuracy_start": 0.5, "eval_accuracy_end": 0.95, "eval_margin_end": 2.0,
        "eval_chosen_logprob_start": -0.4, "eval_chosen_logprob_end": -0.45, "eval_pairs": 128,
        "true_reward_heldout_start": 0.7, "true_reward_heldout_start_stderr": 0.02,
        "true_reward_heldout_end": 0.8, "true_reward_heldout_end_stderr": 0.02,
        "heldout_end_n": 80, "greedy_true_reward_start": 0.8, "greedy_true_reward_end": 1.0,
        "samples_start": [{**answer, "answer": "Of course!"}], "samples_end": [answer]}))
    from dschat_cli.pipeline import step_metrics

    rows = [{"step": 2, "name": "dpo", "status": "ran", "seconds": 30.0,
             "metrics": step_metrics(dpo)}]
    _summarise(cfg, plans, rows, 30.0, tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert ("| 2 (dpo) | ran | 30.0 | accuracy 0.500 -> 0.950, margin 2.000, chosen logprob/token "
            "-0.400 -> -0.450 (128 pairs); true reward 0.700 ± 0.020 -> 0.800 ± 0.020 (greedy "
            "answers 0.800 -> 1.000) (80 prompts) |") in md
    assert "## Held-out answers (greedy), before and after step 2 (dpo)" in md
    assert "| Human: How do I bake bread? Assistant: | Of course! | Sure! Knead it. |" in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "dpo" and "reward" not in summary  # no reward model was trained


def test_up_front_checks_run_dpos_checks_on_the_model_step_1_starts_from(tmp_path, monkeypatch):
    """Before step 1 runs, DPO's model (step 1's output) does not exist: the DPO checks run up
    front on the model step 1 starts from, and again on step 1's output when DPO launches."""
    from dschat_cli import checks
    from dschat_cli.demo.synthetic import write_jsonfile_dir
    from dschat_cli.pipeline import _validate_up_front

    data = tmp_path / "data"
    write_jsonfile_dir(data, seed=0, n_train=40, n_eval=10)
    called = []
    monkeypatch.setattr(checks, "validate_sft", lambda cfg: called.append("sft"))
    monkeypatch.setattr(checks, "validate_dpo", lambda cfg: called.append(cfg.model.model))
    cfg = from_flags(PipelineConfig, method="dpo", output_dir=str(tmp_path / "out"),
                     data_path=("local/jsonfile",), data_dir=str(data))
    plans = plan_pipeline(cfg)
    assert _validate_up_front(cfg, plans) == {1} and called == ["sft", "opt-1.3b"]
    called.clear()  # --steps dpo: step 1 ran before, DPO is checked in full on its output
    assert _validate_up_front(cfg, plans[1:]) == {2} and called == [str(plans[0].out)]


def test_plan_pipeline_method_dpo(monkeypatch):
    """`dschat plan pipeline --method dpo`: step 1, and the DPO step from the --actor's
    architecture (its model is step 1's output, not there yet), or a clear line when the planner
    has no memory model for DPO."""
    import json

    from typer.testing import CliRunner

    from dschat_cli.cli.app import app
    from dschat_cli.config.steps import step
    from dschat_cli.launch import runner as runner_mod

    monkeypatch.setattr(runner_mod, "query_gpus", lambda: [])
    r = CliRunner().invoke(app, ["plan", "pipeline", "--method", "dpo", "--actor", "opt-1.3b",
                                 "--gpu-memory", "80", "--json"], terminal_width=200)
    assert r.exit_code in (0, 1), r.output
    if step("dpo").memory is None:
        assert "no memory estimate" in r.output
        return
    doc = json.loads(r.output)
    assert [s["step"] for s in doc["steps"]] == ["sft", "dpo"]
    sft, dpo = doc["steps"]
    assert dpo["models"][0]["params"] == sft["models"][0]["params"] > 1e9
