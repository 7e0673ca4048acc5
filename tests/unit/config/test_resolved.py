"""The run record (config/resolved.py): resolved once from the config and the machine, written next
to run_config.yaml, read back by the ranks, and checked against each rank's hardware."""

from __future__ import annotations

import json

import pytest

from dschat_cli.config.ds_config import eval_ds_config, train_ds_config
from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.resolved import RECORD, ResolvedRun, resolve_run, with_config
from dschat_cli.config.schema import ConfigError, from_flags
from dschat_cli.config.sft import SFTConfig


def sft(tmp_path, **flags):
    return from_flags(SFTConfig, model="m", output_dir=str(tmp_path / "out"), **flags)


def test_cpu_run_trains_in_fp32_with_torch_adam_and_the_one_builders_config(tmp_path):
    cfg = sft(tmp_path, zero_stage=2, per_device_train_batch_size=4, max_seq_len=128)
    r = resolve_run("sft", cfg, world_size=2, device="cpu", bf16_supported=False,
                    hub_reachable=False)
    assert (r.step, r.device, r.world_size, r.dtype, r.torch_adam) == \
        ("sft", "cpu", 2, "fp32", True)
    assert r.output_dir == str((tmp_path / "out").resolve()) and r.tensorboard_dir is None
    assert r.max_seq_len == 128 and r.hub_reachable is False
    assert r.ds_configs == {"model": train_ds_config(cfg.deepspeed, cfg.optim, world_size=2,
                                                     dtype="fp32", torch_adam=True,
                                                     job_name="sft")}
    assert r.ds_config()["train_batch_size"] == 8


def test_gpu_auto_precision_and_tensorboard(tmp_path):
    cfg = sft(tmp_path, enable_tensorboard=True)
    bf16 = resolve_run("sft", cfg, world_size=1, device="cuda", bf16_supported=True,
                       hub_reachable=True)
    assert bf16.dtype == "bf16" and bf16.torch_adam is False
    assert bf16.tensorboard_dir == str((tmp_path / "out" / "tensorboard").resolve())
    assert bf16.ds_config()["tensorboard"] == {"enabled": True, "output_path": bf16.tensorboard_dir,
                                               "job_name": "sft"}
    older = resolve_run("sft", cfg, world_size=1, device="cuda", bf16_supported=False,
                        hub_reachable=True)
    assert older.dtype == "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU") as e:
        resolve_run("sft", sft(tmp_path, dtype="fp16"), world_size=1, device="cpu",
                    bf16_supported=False, hub_reachable=False)
    assert e.value.where == "--dtype"


def test_ppo_record_has_the_four_roles_and_their_files(tmp_path):
    cfg = from_flags(PPOConfig, actor_model="a", critic_model="c", output_dir=str(tmp_path / "o"),
                     actor_zero_stage=3, per_device_generation_batch_size=4,
                     per_device_training_batch_size=2, max_prompt_seq_len=64,
                     max_answer_seq_len=32)
    r = resolve_run("ppo", cfg, world_size=2, device="cuda", bf16_supported=True,
                    hub_reachable=False)
    assert list(r.ds_configs) == ["actor", "critic", "ref", "reward"]
    assert sorted(r.ds_files()) == ["ds_config_actor.json", "ds_config_critic.json",
                                    "ds_config_ref.json", "ds_config_reward.json"]
    assert r.ds_config("ref") == eval_ds_config(zero_stage=3, offload=False, dtype="bf16",
                                                micro_batch_size=4, world_size=2)
    assert r.ds_config("actor")["train_micro_batch_size_per_gpu"] == 2
    assert r.max_seq_len == 64 + 32
    with pytest.raises(KeyError, match="roles: actor, critic, ref, reward"):
        r.ds_config()


def test_ds_config_is_a_copy(tmp_path):
    r = resolve_run("sft", sft(tmp_path), world_size=1, device="cpu", bf16_supported=False,
                    hub_reachable=False)
    r.ds_config()["zero_optimization"]["stage"] = 3  # an engine adding to its dict
    assert r.ds_configs["model"]["zero_optimization"]["stage"] == 0


def test_written_once_and_read_back(tmp_path):
    r = resolve_run("sft", sft(tmp_path), world_size=1, device="cpu", bf16_supported=False,
                    hub_reachable=False)
    out = tmp_path / "out"
    out.mkdir()
    r.write(out)
    assert sorted(p.name for p in out.iterdir()) == ["ds_config.json", RECORD]
    assert json.loads((out / "ds_config.json").read_text()) == r.ds_configs["model"]
    assert ResolvedRun.read(out) == r


def test_a_missing_or_foreign_record_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="run the dschat command again"):
        ResolvedRun.read(tmp_path)
    (tmp_path / RECORD).write_text(json.dumps({"step": "sft"}))
    with pytest.raises(ConfigError, match="missing .*world_size"):
        ResolvedRun.read(tmp_path)
    (tmp_path / RECORD).write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ResolvedRun.read(tmp_path)


def test_a_rank_whose_hardware_disagrees_stops(tmp_path):
    r = resolve_run("sft", sft(tmp_path), world_size=2, device="cuda", bf16_supported=True,
                    hub_reachable=False)
    r.check_rank(world_size=2, device="cuda", bf16_supported=True)  # agrees
    with pytest.raises(ConfigError, match="resolved for 2 rank\\(s\\) but 4 started"):
        r.check_rank(world_size=4, device="cuda", bf16_supported=True)
    with pytest.raises(ConfigError, match="resolved for cuda but this rank runs on cpu"):
        r.check_rank(world_size=2, device="cpu", bf16_supported=False)
    with pytest.raises(ConfigError, match="resolved for bf16 but this rank's GPU"):
        r.check_rank(world_size=2, device="cuda", bf16_supported=False)


def test_with_config_keeps_the_machine_and_rebuilds_the_ds_configs(tmp_path):
    r = resolve_run("sft", sft(tmp_path), world_size=4, device="cuda", bf16_supported=True,
                    hub_reachable=False)
    changed = with_config(r, sft(tmp_path, zero_stage=3, per_device_train_batch_size=2))
    assert (changed.world_size, changed.dtype, changed.device) == (4, "bf16", "cuda")
    assert changed.ds_config()["zero_optimization"]["stage"] == 3
    assert changed.ds_config()["train_batch_size"] == 8
