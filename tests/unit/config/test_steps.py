"""The table of steps (config/steps.py): every reference in it resolves to what its readers call,
and every option path names a field of the step's config."""

from __future__ import annotations

import inspect

import pytest

from dschat_cli.config import steps as table
from dschat_cli.config.schema import flag_specs
from dschat_cli.config.steps import STEPS, load, pipeline_steps, step

ROWS = [pytest.param(s, id=s.name) for s in STEPS]


@pytest.mark.parametrize("spec", ROWS)
def test_every_reference_resolves_with_the_signature_its_reader_calls(spec):
    cls = spec.config_class()
    assert inspect.isclass(cls)
    run = load(spec.run)  # the worker calls run(cfg, dist, resolved=record)
    assert list(inspect.signature(run).parameters) == ["cfg", "dist", "resolved"]
    assert list(inspect.signature(load(spec.validate)).parameters) == ["cfg"]
    if spec.validate_world:
        assert list(inspect.signature(load(spec.validate_world)).parameters) == ["cfg",
                                                                                 "world_size"]
    ds = inspect.signature(load(spec.ds_configs)).parameters
    assert {"world_size", "dtype", "torch_adam", "tensorboard_dir", "job_name"} <= set(ds)


@pytest.mark.parametrize("spec", ROWS)
def test_option_paths_are_fields_of_the_steps_config(spec):
    paths = {s.dotted for s in flag_specs(spec.config_class())}
    named = [spec.precision, spec.torch_adam, *spec.seq_len] + \
        ([spec.tensorboard] if spec.tensorboard else [])
    assert set(named) <= paths, set(named) - paths
    cfg = spec.config_class()()  # defaults
    assert spec.get(cfg, spec.precision) == "auto"
    assert sum(spec.get(cfg, p) for p in spec.seq_len) > 0


def test_pipeline_steps_are_numbered_in_order_with_their_folders():
    rows = pipeline_steps()
    assert [s.number for s in rows] == [1, 2, 3]
    assert [s.name for s in rows] == ["sft", "reward", "ppo"]
    assert [s.pipeline_dir for s in rows] == ["actor-models", "reward-models", "step3-models"]
    assert all(s.done == table.DONE_MARKER for s in rows)
    assert step("ppo").models == ("actor", "critic") and step("sft").models == (".",)
    assert [s.data_phase for s in rows] == [1, 2, 3]


def test_method_dpo_is_step_1_then_dpo_in_its_own_folder():
    rows = pipeline_steps("dpo")
    assert [(s.number, s.name, s.pipeline_dir) for s in rows] == \
        [(1, "sft", "actor-models"), (2, "dpo", "dpo-models")]
    assert step("dpo").data_phase == 2 and step("dpo").models == (".",)  # chat reads the folder
    assert pipeline_steps() == pipeline_steps("rlhf")  # rlhf is the default
    assert table.METHODS == ("rlhf", "dpo")
    with pytest.raises(KeyError, match="unknown method 'kto'"):
        pipeline_steps("kto")


def test_names_are_unique_and_unknown_names_are_refused():
    assert len({s.name for s in STEPS}) == len(STEPS)
    with pytest.raises(KeyError, match="unknown step 'kto'; one of sft, reward, ppo, dpo, bench"):
        step("kto")
