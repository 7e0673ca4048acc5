"""Typed configs: flags derived from fields, YAML < flags precedence, errors name the flag."""

import pytest
import yaml

from dschat_cli.config.schema import ConfigError, flag_specs, from_dict, resolve, to_dict
from dschat_cli.config.sections import parse_split
from dschat_cli.config.sft import SFTConfig


def test_every_field_has_a_flag_and_help():
    specs = flag_specs(SFTConfig)
    flags = {s.flag for s in specs}
    for flag in ("--model", "--zero-stage", "--data-path", "--data-split", "--lora-dim",
                 "--only-optimize-lora", "--dtype", "--deployment-type", "--hostfile",
                 "--output-dir", "--mask-prompt", "--learning-rate", "--num-train-epochs"):
        assert flag in flags
    assert all(s.help.strip() for s in specs), [s.flag for s in specs if not s.help.strip()]


def test_yaml_then_flags_override(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"deepspeed": {"zero_stage": 2, "dtype": "fp32"},
                                 "optim": {"learning_rate": 1e-4}, "output_dir": "a"}))
    cfg = resolve(SFTConfig, str(p), {("deepspeed", "zero_stage"): 3})
    assert cfg.deepspeed.zero_stage == 3  # flag wins
    assert cfg.deepspeed.dtype == "fp32"  # from YAML
    assert cfg.optim.learning_rate == 1e-4
    assert cfg.optim.num_train_epochs == 16  # default (the reference's OPT-1.3B script)
    assert cfg.output_dir == "a"


def test_round_trip_through_dict():
    cfg = resolve(SFTConfig, None, {("model", "model"): "m", ("data", "data_path"): ["a", "b"],
                                    ("output_dir",): "o"})
    again = from_dict(SFTConfig, to_dict(cfg))
    assert again == cfg
    assert again.data.data_path == ("a", "b")


@pytest.mark.parametrize("path,value,flag", [
    (("deepspeed", "zero_stage"), 4, "--zero-stage"),
    (("deepspeed", "dtype"), "fp8", "--dtype"),
    (("data", "data_split"), "2,4", "--data-split"),
    (("data", "data_split"), "2,-1,4", "--data-split"),
    (("data", "data_split"), "0,0,0", "--data-split"),
    (("optim", "learning_rate"), -1.0, "--learning-rate"),
    (("optim", "per_device_train_batch_size"), "x", "--per-device-train-batch-size"),
])
def test_bad_values_name_the_flag(path, value, flag):
    with pytest.raises(ConfigError) as e:
        resolve(SFTConfig, None, {path: value})
    assert e.value.where == flag


def test_unknown_yaml_key_is_reported(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("deepspeed:\n  zero_stag: 2\n")
    with pytest.raises(ConfigError) as e:
        resolve(SFTConfig, str(p), {})
    assert e.value.where == "--config" and "zero_stag" in e.value.message


def test_split_parsing():
    assert parse_split("2,4,4") == (2, 4, 4)
    assert parse_split(" 10, 0 ,0") == (10, 0, 0)


def test_cross_field_checks():
    cfg = resolve(SFTConfig, None, {("model", "model"): "m", ("output_dir",): "o",
                                    ("lora", "only_optimize_lora"): True})
    with pytest.raises(ConfigError) as e:
        cfg.check()
    assert e.value.where == "--only-optimize-lora"
